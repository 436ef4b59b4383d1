"""3D rotary position embedding of Wan: head channels split over (frame, height, width) axes.

Frequencies are computed on the host in float64 and rounded once to float32 (as the reference does),
so the tables are bit-identical to PyTorch's; the per-axis tables are small (max_len x dim) and the
[seq, head_dim] table is assembled on device by broadcasting.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=32)
def axis_tables(dim: int, max_len: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_len, dim] for one axis, each frequency repeated for its (even, odd) pair."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    angles = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)
    cos = np.repeat(np.cos(angles), 2, axis=1).astype(np.float32)
    sin = np.repeat(np.sin(angles), 2, axis=1).astype(np.float32)
    return cos, sin


def rope_tables(
    grid: tuple[int, int, int], split: tuple[int, int, int], max_len: int, frame_offset: int | jax.Array = 0
) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [f*h*w, head_dim] for a (f, h, w) token grid in frame-major order.

    `frame_offset` shifts frame positions (block-wise generation keeps counting across blocks). It may be a
    traced integer (the block-causal cache's counter): the frame table is then sliced dynamically, so the
    offset changes without recompiling, and the caller guarantees offset + f <= max_len (a Python int is
    checked here).
    """
    f, h, w = grid
    static = isinstance(frame_offset, (int, np.integer))
    if max(f + (frame_offset if static else 0), h, w) > max_len:
        raise ValueError(f"token grid {grid} (frame offset {frame_offset}) exceeds rope_max_seq_len={max_len}")
    out = []
    for table_idx in range(2):
        parts = []
        for axis, (n, d) in enumerate(zip((f, h, w), split)):
            full = axis_tables(d, max_len)[table_idx]
            if axis > 0 or static:
                start = int(frame_offset) if axis == 0 else 0
                table = jnp.asarray(full[start : start + n])
            else:
                table = jax.lax.dynamic_slice_in_dim(jnp.asarray(full), frame_offset, n, 0)
            shape = [1, 1, 1, d]
            shape[axis] = n
            parts.append(jnp.broadcast_to(table.reshape(shape), (f, h, w, d)))
        out.append(jnp.concatenate(parts, axis=-1).reshape(f * h * w, sum(split)))
    return out[0], out[1]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (even, odd) channel pairs of x [batch, seq, heads, head_dim] in float32; output in x's dtype."""
    h = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x1, x2 = h[..., 0], h[..., 1]
    c = cos[None, :, None, 0::2]
    s = sin[None, :, None, 1::2]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
