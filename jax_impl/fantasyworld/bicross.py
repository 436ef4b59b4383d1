"""FantasyWorld's bidirectional cross-attention between the Wan stream and the geometry stream (Flax NNX).

Non-affine LayerNorm on both streams; q from the video tokens, k from the geometry tokens, both rotated
by Wan's 3D RoPE (the geometry stream's camera/register tokens get the identity rotation); the video
attends to the geometry (q, k, geometry values) and the geometry to the video (k, q, video values); each
result returns to its stream through its output projection and a per-channel gate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from jax_impl.layers import F32, Dense
from jax_impl.rope import apply_rope, axis_tables


def rope3d_tables(grid: tuple[int, int, int], split: tuple[int, int, int], special: int = 0):
    """cos, sin [f*(special + h*w), head_dim] in Wan's pair-repeated layout; `special` identity rows
    (cos 1, sin 0) open every latent frame."""
    f, h, w = grid
    out = []
    for which, fill in ((0, 1.0), (1, 0.0)):
        parts = []
        for axis, (n, d) in enumerate(zip(grid, split)):
            shape = [1, 1, 1, d]
            shape[axis] = n
            parts.append(np.broadcast_to(axis_tables(d, max(grid))[which][:n].reshape(shape), (f, h, w, d)))
        table = np.concatenate(parts, axis=-1).reshape(f, h * w, -1)
        table = np.concatenate([np.full((f, special, table.shape[-1]), fill, np.float32), table], axis=1)
        out.append(jnp.asarray(table.reshape(-1, table.shape[-1])))
    return out[0], out[1]


def _plain_ln(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    h = x.astype(F32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    return ((h - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class BiCrossAttention(nnx.Module):
    def __init__(self, video_dim: int, geo_dim: int, dim: int, heads: int, *, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        self.heads, self.backend = heads, attention_backend
        self.q_proj = Dense(video_dim, dim, rngs=rngs)
        self.k_proj = Dense(geo_dim, dim, rngs=rngs)
        self.v_video = Dense(video_dim, dim, rngs=rngs)
        self.v_geo = Dense(geo_dim, dim, rngs=rngs)
        self.out_video = Dense(dim, video_dim, rngs=rngs)
        self.out_geo = Dense(dim, geo_dim, rngs=rngs)
        self.gate_video = nnx.Param(jnp.zeros((video_dim,), F32))
        self.gate_geo = nnx.Param(jnp.zeros((geo_dim,), F32))

    def __call__(self, video: jax.Array, geo: jax.Array, rope_video, rope_geo) -> tuple[jax.Array, jax.Array]:
        """video [B, L, Dv], geo [B, M, Dg] -> both updated; rope_* from `rope3d_tables`."""
        hv, hg = _plain_ln(video), _plain_ln(geo)
        heads = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # noqa: E731
        q = apply_rope(heads(self.q_proj(hv)), *rope_video)
        k = apply_rope(heads(self.k_proj(hg)), *rope_geo)
        to_video = kernels.attention(q, k, heads(self.v_geo(hg)), backend=self.backend)
        to_geo = kernels.attention(k, q, heads(self.v_video(hv)), backend=self.backend)
        flat = lambda t: t.reshape(*t.shape[:-2], -1)  # noqa: E731
        video = video + (self.gate_video.value * self.out_video(flat(to_video))).astype(video.dtype)
        geo = geo + (self.gate_geo.value * self.out_geo(flat(to_geo))).astype(geo.dtype)
        return video, geo
