"""FantasyWorld's geometry stream in Flax NNX: 2D RoPE, geometry blocks (frame/global attention, q/k
LayerNorm, LayerScale, time modulation) split into attention and feed-forward halves, and the embedding
that turns the Wan hidden state into per-frame [camera, registers, patches] tokens.

Tokens are `[rows, tokens, geo_dim]`: rows = batch x latent frames for frame attention, batch for global
attention. Attention runs through `kernels.attention` on `[batch, seq, heads, head_dim]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from jax_impl.dit import timestep_embedding
from jax_impl.fantasyworld.ops import Conv
from jax_impl.layers import F32, Dense, LayerNorm, gelu_exact
from weights.configs.fantasyworld import FantasyWorldConfig

Mod = tuple[jax.Array, ...]  # six [rows, 1, D] modulation vectors


def frame_positions(h: int, w: int, special: int) -> np.ndarray:
    """(row, column) per token of one frame [special + h*w, 2]: special tokens (0, 0), patches (y+1, x+1)."""
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    patches = np.stack([ys.reshape(-1), xs.reshape(-1)], axis=-1) + 1
    return np.concatenate([np.zeros((special, 2), np.int64), patches], axis=0)


def rope2d_tables(pos: np.ndarray, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [N, head_dim]: channels [0, hd/2) rotate with the row, [hd/2, hd) with the column, in the
    rotate-half layout within each half (host float64, rounded once to float32)."""
    quarter = head_dim // 4
    inv = 1.0 / base ** (np.arange(0, 2 * quarter, 2, dtype=np.float64) / (2 * quarter))
    angles = [np.tile(pos[:, axis, None].astype(np.float64) * inv[None], 2) for axis in range(2)]
    ang = np.concatenate(angles, axis=-1)
    return jnp.asarray(np.cos(ang), F32), jnp.asarray(np.sin(ang), F32)


def apply_rope2d(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, N, heads, head_dim] rotated in float32 (each half of the channels rotate-half style)."""
    h = x.astype(F32)
    q = h.shape[-1] // 4
    rot = jnp.concatenate([-h[..., q:2 * q], h[..., :q], -h[..., 3 * q:], h[..., 2 * q:3 * q]], axis=-1)
    return (h * cos[None, :, None] + rot * sin[None, :, None]).astype(x.dtype)


class GeoAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, *, attention_backend: str = "auto", rngs: nnx.Rngs):
        self.heads, self.backend = heads, attention_backend
        self.qkv = Dense(dim, 3 * dim, rngs=rngs)
        self.q_norm = LayerNorm(dim // heads, eps=1e-5, affine=True) if qk_norm else None
        self.k_norm = LayerNorm(dim // heads, eps=1e-5, affine=True) if qk_norm else None
        self.proj = Dense(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        b, n, c = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(b, n, 3, self.heads, -1), 2, 0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope2d(q, *rope), apply_rope2d(k, *rope)
        return self.proj(kernels.attention(q, k, v, backend=self.backend).reshape(b, n, c))


class GeometryBlock(nnx.Module):
    """Pre-norm block with LayerScale; with a time modulation `m` (six vectors):
    x + ls1 * attn(LN(x) (1 + m1) + m0), then x + ls2 * (mlp(LN(x)) (1 + m4) + m3) * m5.
    Without one (the camera head's trunk) a plain pre-norm block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, qk_norm: bool, *, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, eps=1e-5, affine=True)
        self.attn = GeoAttention(dim, heads, qk_norm, attention_backend=attention_backend, rngs=rngs)
        self.ls1 = nnx.Param(jnp.full((dim,), 0.01, F32))
        self.norm2 = LayerNorm(dim, eps=1e-5, affine=True)
        self.fc1 = Dense(dim, mlp_ratio * dim, rngs=rngs)
        self.fc2 = Dense(mlp_ratio * dim, dim, rngs=rngs)
        self.ls2 = nnx.Param(jnp.full((dim,), 0.01, F32))
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 6, dim), F32) / dim**0.5)

    def mod(self, e0: jax.Array) -> Mod:
        """Six [rows, 1, D] vectors from the time projection e0 [rows, 6, D] (float32)."""
        m = self.modulation.value + e0.astype(F32)
        return tuple(m[:, i:i + 1] for i in range(6))

    def attention_half(self, x: jax.Array, rope=None, mod: Mod | None = None) -> jax.Array:
        h = self.norm1(x)
        if mod is not None:
            h = (h.astype(F32) * (1 + mod[1]) + mod[0]).astype(x.dtype)
        return x + self.ls1.value.astype(x.dtype) * self.attn(h, rope)

    def ffn_half(self, x: jax.Array, mod: Mod | None = None) -> jax.Array:
        h = self.fc2(gelu_exact(self.fc1(self.norm2(x))))
        if mod is None:
            return x + self.ls2.value.astype(x.dtype) * h
        h = (h.astype(F32) * (1 + mod[4]) + mod[3]) * self.ls2.value * mod[5]
        return (x.astype(F32) + h).astype(x.dtype)

    def __call__(self, x: jax.Array, rope=None, e0: jax.Array | None = None) -> jax.Array:
        mod = self.mod(e0) if e0 is not None else None
        return self.ffn_half(self.attention_half(x, rope, mod), mod)


class GeometryEmbed(nnx.Module):
    """Wan hidden state after the branch-start block -> geometry tokens, plus the stream's time modulation."""

    def __init__(self, cfg: FantasyWorldConfig, *, rngs: nnx.Rngs):
        d = cfg.geo_dim
        self.freq_dim = cfg.geo_freq_dim
        self.proj_in = Conv(cfg.wan_dim, d, (1, 1, 1), rngs=rngs)
        self.time_fc1 = Dense(cfg.geo_freq_dim, d, rngs=rngs)
        self.time_fc2 = Dense(d, d, rngs=rngs)
        self.time_proj = Dense(d, 6 * d, rngs=rngs)
        self.camera_token = nnx.Param(jnp.zeros((1, 2, 1, d), F32))
        self.register_token = nnx.Param(jnp.zeros((1, 2, cfg.register_tokens, d), F32))
        # camera-token projector of the released weights; unused at inference (no camera tokens given)
        self.cam_fc1 = Dense(cfg.cam_token_in, cfg.cam_token_hidden, rngs=rngs)
        self.cam_fc2 = Dense(cfg.cam_token_hidden, d, rngs=rngs)

    def time(self, t: jax.Array) -> jax.Array:
        """e0 [B, 6, D] float32 for timesteps [B]."""
        e = self.time_fc2(jax.nn.silu(self.time_fc1(timestep_embedding(t, self.freq_dim))))
        return self.time_proj(jax.nn.silu(e)).reshape(t.shape[0], 6, -1).astype(F32)

    def __call__(self, x: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """x [B, f*h*w, Dwan] -> tokens [B*f, 1 + R + h*w, D] (rows frame-major within each sample)."""
        b = x.shape[0]
        f, h, w = grid
        k = self.proj_in.kernel.value
        patches = jnp.einsum("bli,io->blo", x, k.reshape(k.shape[-2], k.shape[-1]).astype(x.dtype),
                             precision=jax.lax.Precision.HIGHEST) + self.proj_in.bias.value.astype(x.dtype)
        patches = patches.reshape(b * f, h * w, -1)
        variant = jnp.asarray([0] + [1] * (f - 1))
        special = jnp.concatenate([self.camera_token.value, self.register_token.value], axis=2)[0, variant]
        special = jnp.broadcast_to(special[None], (b, *special.shape)).reshape(b * f, -1, special.shape[-1])
        return jnp.concatenate([special.astype(x.dtype), patches], axis=1)
