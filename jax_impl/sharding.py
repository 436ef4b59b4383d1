"""Run the Wan DiT over several devices: weights split FSDP-style, video tokens split (context parallel).

One mesh axis ("devices") does both jobs:

* Weights (FSDP). Every parameter is stored split along one of its axes, so N devices each hold about
  1/N of the model. Rule (`param_spec`): take the parameter's largest axis whose length N divides
  (ties: the earlier axis), never the stacked layer axis of `blocks.*` (the scan walks that one);
  parameters with fewer than `min_elements` elements per layer, or with no divisible axis, are
  replicated (norm scales, biases of tiny models: a few KiB, not worth a collective). Inside the layer
  scan each layer's weights are all-gathered just before use and dropped after, so at most one
  layer is ever whole on a device.
* Tokens (context parallel). The `[batch, tokens, dim]` activations are split along tokens. All
  per-token work (projections, norms, modulation, feed-forward) is local. Self-attention keeps the
  local query slice and all-gathers K/V (see `kernels/context_parallel.py`); cross-attention uses
  the text/image K/V, which are small and whole on every device. Token counts that N does not divide
  are padded at the end and the padded keys cut off after the gather, so any video size works.

    mesh = make_mesh(8)
    model = create_sharded(lambda: WanTransformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), mesh)
    forward = sharded_forward(model, mesh)
    velocity = forward(latents, timestep, text, image)   # numpy or jax inputs, any placement

Weights loaded whole on the host can be split with `shard_params(model, mesh)`; random full-size
models should use `create_sharded`, which initialises each device's slice in place, so a 14B model is
never whole on one device.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kernels.context_parallel import SequenceSplit

AXIS = "devices"
MIN_ELEMENTS = 1024  # parameters smaller than this (per layer) stay replicated
STACKED = ("blocks",)  # top-level attributes whose parameters carry a leading layer axis


def make_mesh(num_devices: int | None = None, axis: str = AXIS, devices=None) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (default: all of `devices`, else jax.devices())."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"asked for {n} devices but {len(devices)} are visible; on CPU, simulate more with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts"
        )
    return Mesh(np.array(devices[:n]), (axis,))


def param_spec(shape: tuple[int, ...], n: int, *, axis: str = AXIS, stacked: bool = False,
               min_elements: int = MIN_ELEMENTS) -> P:
    """PartitionSpec of one parameter under the FSDP rule in the module docstring."""
    first = 1 if stacked else 0
    dims = list(range(first, len(shape)))
    if n == 1 or int(np.prod([shape[d] for d in dims], dtype=np.int64)) < min_elements:
        return P()
    for d in sorted(dims, key=lambda d: (-shape[d], d)):
        if shape[d] % n == 0:
            spec = [None] * len(shape)
            spec[d] = axis
            return P(*spec)
    return P()


def param_shardings(model_or_state, mesh: Mesh, axis: str = AXIS, min_elements: int = MIN_ELEMENTS):
    """A tree of NamedShardings matching `nnx.state(model)` (abstract models from nnx.eval_shape work)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    n = mesh.shape[axis]

    def one(path, leaf):
        top = getattr(path[0], "key", getattr(path[0], "name", None))
        spec = param_spec(tuple(leaf.shape), n, axis=axis, stacked=top in STACKED, min_elements=min_elements)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, state)


def shard_params(model: nnx.Module, mesh: Mesh, axis: str = AXIS, min_elements: int = MIN_ELEMENTS) -> nnx.Module:
    """Move `model`'s parameters onto `mesh`, split by the FSDP rule (in place; returns the model)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, axis, min_elements)))
    return model


def create_sharded(make: Callable[[], nnx.Module], mesh: Mesh, axis: str = AXIS,
                   min_elements: int = MIN_ELEMENTS) -> nnx.Module:
    """Build `make()` with every parameter created directly in its FSDP slice (nothing whole anywhere).

    `make` must be traceable (a model constructor with fixed nnx.Rngs). Random values do not depend on
    the device count (JAX's partitionable threefry), so models built on different meshes agree.
    """
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, axis, min_elements)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def sequence_split(mesh: Mesh, axis: str = AXIS) -> SequenceSplit:
    """The context-parallel setting to pass as `WanTransformer(...)(..., seq_split=...)`."""
    return SequenceSplit(mesh, axis)


def sharded_call(model: nnx.Module, mesh: Mesh, fn: Callable, axis: str = AXIS):
    """Jit `fn(model, seq_split, *args)` with the model FSDP-sharded over `mesh`; returns `f(*args)`.

    Parameters are placed by the FSDP rule (moved if they are not already there). The arguments are
    placed replicated, as is the result: they are the small things (latents, embeddings, timesteps),
    the big activations live inside `fn`, split by `seq_split`. `f` holds the parameters as they are
    now: later changes to `model` are not seen (call this again). `f.state` holds the sharded params.
    """
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh, axis)
    state = jax.device_put(state, shardings)
    replicated = NamedSharding(mesh, P())
    split = sequence_split(mesh, axis)

    def apply(state, args):
        return fn(nnx.merge(graphdef, state), split, *args)

    run = jax.jit(apply, in_shardings=(shardings, replicated), out_shardings=replicated)

    def call(*args):
        args = tuple(None if a is None else jax.device_put(np.asarray(a) if np.isscalar(a) else a, replicated)
                     for a in args)
        return run(state, args)

    call.mesh, call.state, call.jitted = mesh, state, run
    return call


def sharded_forward(model: nnx.Module, mesh: Mesh, axis: str = AXIS, *, capture: bool = False):
    """A jitted `f(latents, timestep, text, image=None)`: the model's forward, sharded over `mesh`.

    Inputs may be numpy or jax arrays on any device; the output comes back replicated on the mesh.
    With capture=True it returns (output, taps) like the model. See `sharded_call`.
    """

    def forward(model, split, latents, timestep, text, image=None):
        return model(latents, timestep, text, image, capture=capture, seq_split=split)

    return sharded_call(model, mesh, forward, axis)


def local_shape(x: jax.Array) -> tuple[int, ...]:
    """Shape of the first addressable shard of x (smaller than x.shape when x is split)."""
    return tuple(x.addressable_shards[0].data.shape)


__all__ = [
    "AXIS",
    "make_mesh",
    "param_spec",
    "param_shardings",
    "shard_params",
    "create_sharded",
    "sequence_split",
    "sharded_call",
    "sharded_forward",
    "local_shape",
]
