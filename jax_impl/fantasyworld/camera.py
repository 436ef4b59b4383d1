"""FantasyWorld's camera conditioning in Flax NNX: Plucker rays, the pose encoder and the adapter that
shifts the Wan cross-attention output (before its output projection) by a camera-dependent amount.

Rays [B, frames, H, W, 6] -> pixel-unshuffle by 8 -> 1x1 convs with GroupNorm -> two temporal poolings
(frame 0 kept, later frames averaged in pairs) -> (1, 2, 2) patchify conv -> MLP with LayerNorms ->
one camera feature per Wan token [B, L, camera_context_dim].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.fantasyworld.ops import Conv, GroupNorm, pixel_unshuffle
from jax_impl.layers import F32, Dense, LayerNorm, gelu_exact
from weights.configs.fantasyworld import FantasyWorldConfig


def plucker_rays(c2w: jax.Array, intrinsics: jax.Array, height: int, width: int) -> jax.Array:
    """Rays [F, H, W, 6] = (o x d, d) through pixel centres; c2w [F, 4, 4], intrinsics [F, 4] (fx, fy, cx, cy)."""
    j, i = jnp.meshgrid(jnp.arange(height, dtype=F32), jnp.arange(width, dtype=F32), indexing="ij")
    fx, fy, cx, cy = (intrinsics[:, k, None, None].astype(F32) for k in range(4))
    d = jnp.stack([(i + 0.5 - cx) / fx, (j + 0.5 - cy) / fy, jnp.ones_like(fx * i)], axis=-1)
    d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
    d = jnp.einsum("fhwc,frc->fhwr", d, c2w[:, :3, :3].astype(F32), precision=jax.lax.Precision.HIGHEST)
    o = jnp.broadcast_to(c2w[:, None, None, :3, 3].astype(F32), d.shape)
    return jnp.concatenate([jnp.cross(o, d), d], axis=-1)


def pool_time(x: jax.Array) -> jax.Array:
    """[B, F, ...] -> [B, F', ...]: odd F keeps frame 0 and averages the rest in pairs; even F averages pairs."""
    if x.shape[1] % 2:
        rest = x[:, 1:].reshape(x.shape[0], -1, 2, *x.shape[2:]).mean(axis=2)
        return jnp.concatenate([x[:, :1], rest], axis=1)
    return x.reshape(x.shape[0], -1, 2, *x.shape[2:]).mean(axis=2)


class CameraPoseEncoder(nnx.Module):
    def __init__(self, cfg: FantasyWorldConfig, *, rngs: nnx.Rngs):
        c, g, d = cfg.camera_unshuffled, cfg.camera_groups, cfg.camera_dim
        self.down = cfg.camera_downscale
        self.conv1, self.norm1 = Conv(c, c, (1, 1), rngs=rngs), GroupNorm(g, c)
        self.conv2, self.norm2 = Conv(c, c, (1, 1), rngs=rngs), GroupNorm(g, c)
        self.conv3, self.norm3 = Conv(c, 2 * c, (1, 1), rngs=rngs), GroupNorm(g, 2 * c)
        self.patch_embed = Conv(2 * c, d, (1, 2, 2), stride=(1, 2, 2), rngs=rngs)
        self.fc1, self.fc_norm1 = Dense(d, d // 2, rngs=rngs), LayerNorm(d // 2, eps=1e-5, affine=True)
        self.fc2 = Dense(d // 2, cfg.camera_context_dim, rngs=rngs)
        self.fc_norm2 = LayerNorm(cfg.camera_context_dim, eps=1e-5, affine=True)

    def __call__(self, rays: jax.Array) -> jax.Array:
        """rays [B, F, H, W, 6] -> [B, f*h*w, camera_context_dim]."""
        b, f = rays.shape[:2]
        x = pixel_unshuffle(rays.reshape(b * f, *rays.shape[2:]), self.down)
        x = jax.nn.relu(self.norm2(self.conv2(self.norm1(self.conv1(x)))))
        x = pool_time(x.reshape(b, -1, *x.shape[1:]))
        x = jax.nn.relu(self.norm3(self.conv3(x.reshape(-1, *x.shape[2:]))))
        x = pool_time(x.reshape(b, -1, *x.shape[1:]))  # [B, f, h8, w8, C]
        x = self.patch_embed(x)
        x = x.reshape(b, -1, x.shape[-1])
        return self.fc_norm2(self.fc2(gelu_exact(self.fc_norm1(self.fc1(x)))))


class CameraAdapter(nnx.Module):
    """attention output a [B, L, Dw] -> a + MLP(MLP(a) + Linear(camera)); skipped for all-zero camera features."""

    def __init__(self, cfg: FantasyWorldConfig, *, rngs: nnx.Rngs):
        ctx, d = cfg.camera_context_dim, cfg.wan_dim
        self.context_proj = Dense(ctx, ctx, rngs=rngs)
        self.attn_down = Dense(d, cfg.adapter_hidden, rngs=rngs)
        self.attn_up = Dense(cfg.adapter_hidden, ctx, rngs=rngs)
        self.shift_down = Dense(ctx, cfg.adapter_shift_hidden, rngs=rngs)
        self.shift_up = Dense(cfg.adapter_shift_hidden, d, rngs=rngs)

    def __call__(self, attn_out: jax.Array, camera: jax.Array | None) -> jax.Array:
        if camera is None:
            return attn_out
        mix = self.attn_up(jax.nn.relu(self.attn_down(attn_out))) + self.context_proj(camera.astype(attn_out.dtype))
        shift = self.shift_up(jax.nn.relu(self.shift_down(mix))).astype(attn_out.dtype)
        return jnp.where(jnp.any(camera != 0), attn_out + shift, attn_out)
