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
    in float32 for a 14B expert); filling an abstract model leaf by leaf keeps the peak at the model's
    size plus its largest parameter. Norm scales are 1, as in a real checkpoint.
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
            else:
                value = _normal(jax.random.fold_in(key, i), shape, dt)
        var.value = value
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def peak_bytes(device=None) -> int | None:
    """Peak device memory in use so far (None where the platform does not report it)."""
    try:
        return (device or jax.devices()[0]).memory_stats().get("peak_bytes_in_use")
    except Exception:
        return None
