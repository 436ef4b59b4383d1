"""Helpers shared by the bench scripts: full-size random-weight models without init-time memory spikes."""

from __future__ import annotations

import functools
import os
import sys

import jax  # importing starts no backend: safe in the parent process of the bench scripts
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_dit(cfg, *, dtype="bfloat16", attention_backend: str = "auto", seed: int = 0, device=None):
    """A WanTransformer with N(0, 0.02) weights made one parameter at a time, directly in `dtype`.

    Building the model inside one jit would make every float32 random tensor at once (about 2x the model
    in float32 for a 14B expert). Filling an abstract model leaf by leaf, and the stacked block leaves one
    layer at a time into a buffer that is updated in place, keeps the transient at one layer's float32
    draw: measured device peaks are then the model's own, not the initialisation's (a whole stacked
    [40, 5120, 13824] leaf drawn at once cost ~22 GiB of float32 bits and normals on top of the weights).
    Norm scales are 1, as in a real checkpoint.
    """
    from flax import nnx

    from jax_impl.dit import WanTransformer

    dtype = jnp.dtype(dtype)
    abstract = nnx.eval_shape(lambda: WanTransformer(cfg, dtype=dtype, attention_backend=attention_backend,
                                                      rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    device = device or jax.devices()[0]
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(flat):
        shape, dt = var.value.shape, var.value.dtype
        name = str(path[-1])
        with jax.default_device(device):
            if name == "scale":
                value = jnp.ones(shape, dt)
            elif path[0] == "blocks":  # stacked [layers, ...]: one layer's draw at a time
                value = jnp.zeros(shape, dt)
                for layer in range(shape[0]):
                    value = _set_layer(value, layer, _normal(jax.random.fold_in(jax.random.fold_in(key, i), layer),
                                                             shape[1:], dt))
            else:
                value = _normal(jax.random.fold_in(key, i), shape, dt)
        var.value = value
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_layer(stack, layer, value):
    return jax.lax.dynamic_update_index_in_dim(stack, value, layer, 0)


def peak_bytes(device=None) -> int | None:
    """Peak device memory in use so far (None where the platform does not report it)."""
    try:
        return (device or jax.devices()[0]).memory_stats().get("peak_bytes_in_use")
    except Exception:
        return None
