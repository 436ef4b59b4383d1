"""Seeded Gaussian noise, in one place: the starting latents of the plain sampler and the per-block, per-step
noise of the block-causal sampler come from the same function.

Every sample of a batch has its own stream (the seed's key folded with the sample index), so sample i is
the same whatever the batch size; further stream indices (the causal sampler's block and step) are folded
in after it. Same numbers on every back-end for one seed (jax's threefry, not numpy's generator).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def seeded_noise(seed: int, batch: int, shape: Sequence[int], *streams: int) -> jax.Array:
    """Standard normal float32 [batch, *shape]: sample i from key(seed) folded with i, then with each of `streams`
    (e.g. block, step), in order."""
    stream = jnp.asarray([int(s) for s in streams], jnp.int32).reshape(len(streams))
    return _noise(jnp.uint32(seed), batch, stream, tuple(int(n) for n in shape))


@functools.partial(jax.jit, static_argnums=(1, 3))
def _noise(seed, batch, streams, shape):
    key = jax.random.key(seed)

    def one(i):
        k = jax.random.fold_in(key, i)
        for j in range(streams.shape[0]):
            k = jax.random.fold_in(k, streams[j])
        return jax.random.normal(k, shape, F32)

    return jax.vmap(one)(jnp.arange(batch))


def initial_noise(seed: int, shape: Sequence[int]) -> np.ndarray:
    """Seeded starting latents [B, ...] (float32, on the host): `seeded_noise` with no further stream."""
    return np.asarray(seeded_noise(seed, shape[0], shape[1:]))
