"""FantasyWorld's heads in Flax NNX: camera head (iterative pose refinement), causal temporal upsampler
(21 latent frames -> 81 video frames) and the DPT depth / point heads with RefineNet fusion.

Inputs are the joint layers' taps `[B, S, P, 2 * geo_dim]` (S latent frames, P tokens per frame).
Feature maps are channels-last `[frames, H, W, C]`. The DPT fusion and output convolutions run on
chunks of video frames (`frames_per_chunk`), as the public code does, to bound the full-resolution
activations (81 x 336 x 592 x 128 floats would be 8 GB).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.fantasyworld.geometry import GeometryBlock
from jax_impl.fantasyworld.ops import BlockConvTranspose, Conv, resize_bilinear
from jax_impl.layers import F32, Dense, LayerNorm, gelu_exact
from weights.configs.fantasyworld import FantasyWorldConfig


def _plain_ln(x: jax.Array, eps: float) -> jax.Array:
    h = x.astype(F32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    return ((h - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class CameraHead(nnx.Module):
    def __init__(self, cfg: FantasyWorldConfig, *, attention_backend: str = "auto", rngs: nnx.Rngs):
        d = cfg.head_dim_in
        self.iterations = cfg.head_iterations
        self.trunk = nnx.List([GeometryBlock(d, cfg.head_heads, 4, qk_norm=False, attention_backend=attention_backend,
                                             rngs=rngs) for _ in range(cfg.head_trunk_depth)])
        self.token_norm = LayerNorm(d, eps=1e-5, affine=True)
        self.trunk_norm = LayerNorm(d, eps=1e-5, affine=True)
        self.empty_pose = nnx.Param(jnp.zeros((1, 1, 9), F32))
        self.embed_pose = Dense(9, d, rngs=rngs)
        self.pose_modulation = Dense(d, 3 * d, rngs=rngs)
        self.time_upsample = Conv(d, 4 * d, (1,), rngs=rngs)
        self.pose_fc1 = Dense(d, d // 2, rngs=rngs)
        self.pose_fc2 = Dense(d // 2, 9, rngs=rngs)

    def camera_tokens(self, last_tap: jax.Array) -> jax.Array:
        """[B, S, P, D] -> [B, 1 + 4(S-1), D]; expanded token m = s*(S-1) + n is copy s of frame n+1 (Conv1d
        channel 4c + s), the order the released weights use. Only frame 0's token is LayerNorm-ed."""
        cam = last_tap[:, :, 0]
        b, n, d = cam[:, 1:].shape
        up = self.time_upsample(cam[:, 1:]).reshape(b, n, d, 4).transpose(0, 3, 1, 2).reshape(b, 4 * n, d)
        return jnp.concatenate([self.token_norm(cam[:, :1]), up.astype(cam.dtype)], axis=1)

    def __call__(self, last_tap: jax.Array) -> list[jax.Array]:
        """Poses [B, frames, 9] (translation, quaternion xyzw, fov_h, fov_w) after each refinement pass."""
        x = self.camera_tokens(last_tap)
        pose, out = None, []
        for _ in range(self.iterations):
            src = jnp.broadcast_to(self.empty_pose.value, (*x.shape[:2], 9)) if pose is None else pose
            shift, scale, gate = jnp.split(self.pose_modulation(jax.nn.silu(self.embed_pose(src))), 3, axis=-1)
            h = gate * (_plain_ln(x, 1e-6) * (1 + scale) + shift) + x
            for block in self.trunk:
                h = block(h)
            delta = self.pose_fc2(gelu_exact(self.pose_fc1(self.trunk_norm(h))))
            pose = delta if pose is None else pose + delta
            out.append(jnp.concatenate([pose[..., :7], jax.nn.relu(pose[..., 7:])], axis=-1))
        return out


def _causal_time_pad(x: jax.Array, spatial: int) -> jax.Array:
    """Two zero frames in front (time axis 1), `spatial` zeros on both sides of H and W."""
    return jnp.pad(x, ((0, 0), (2, 0), (spatial, spatial), (spatial, spatial), (0, 0)))


class TemporalUpsampler(nnx.Module):
    """[B, T, H, W, C] -> [B, 1 + 4(T-1), H, W, C]: 1x1x1 conv, then twice (frame-doubling causal conv,
    residual unit with channel RMS norm + SiLU + causal 3x3x3 conv); frame 0 is never doubled."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        c = channels
        self.conv_in = Conv(c, c, (1, 1, 1), rngs=rngs)
        self.time_conv1 = Conv(c, 2 * c, (3, 1, 1), rngs=rngs)
        self.res1_gamma = nnx.Param(jnp.ones((c,), F32))
        self.res1_conv = Conv(c, c, (3, 3, 3), rngs=rngs)
        self.time_conv2 = Conv(c, 2 * c, (3, 1, 1), rngs=rngs)
        self.res2_gamma = nnx.Param(jnp.ones((c,), F32))
        self.res2_conv = Conv(c, c, (3, 3, 3), rngs=rngs)

    @staticmethod
    def _double(x: jax.Array, conv: Conv) -> jax.Array:
        if x.shape[1] == 1:
            return x
        y = conv(_causal_time_pad(x[:, 1:], 0))  # [B, T-1, H, W, 2C]
        b, t, h, w, c2 = y.shape
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
        return jnp.concatenate([x[:, :1], y], axis=1)

    @staticmethod
    def _residual(x: jax.Array, gamma: jax.Array, conv: Conv) -> jax.Array:
        norm = jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        h = jax.nn.silu(x / norm * math.sqrt(x.shape[-1]) * gamma)
        return x + conv(_causal_time_pad(h, 1))

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self._residual(self._double(x, self.time_conv1), self.res1_gamma.value, self.res1_conv)
        return self._residual(self._double(x, self.time_conv2), self.res2_gamma.value, self.res2_conv)


def uv_embedding(h: int, w: int, channels: int, aspect: float) -> jax.Array:
    """[h, w, channels] = 0.1 x [sin(u w_k), cos(u w_k), sin(v w_k), cos(v w_k)] of the centred uv grid."""
    diag = math.hypot(aspect, 1.0)
    sx, sy = aspect / diag, 1.0 / diag
    u = np.linspace(-sx * (w - 1) / w, sx * (w - 1) / w, w)
    v = np.linspace(-sy * (h - 1) / h, sy * (h - 1) / h, h)
    q = channels // 4
    omega = 1.0 / 100.0 ** (np.arange(q, dtype=np.float64) / q)
    parts = []
    for coord in (np.broadcast_to(u[None, :], (h, w)), np.broadcast_to(v[:, None], (h, w))):
        a = coord[..., None] * omega
        parts += [np.sin(a), np.cos(a)]
    return jnp.asarray(0.1 * np.concatenate(parts, axis=-1), F32)


class ResidualConvUnit(nnx.Module):
    """relu(x) + conv(relu(conv(relu(x)))) (the skip carries relu(x), as in the public code)."""

    def __init__(self, c: int, *, rngs: nnx.Rngs):
        pad = ((1, 1), (1, 1))
        self.conv1 = Conv(c, c, (3, 3), padding=pad, rngs=rngs)
        self.conv2 = Conv(c, c, (3, 3), padding=pad, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        a = jax.nn.relu(x)
        return a + self.conv2(jax.nn.relu(self.conv1(a)))


class FusionBlock(nnx.Module):
    def __init__(self, c: int, has_skip: bool, *, rngs: nnx.Rngs):
        self.unit1 = ResidualConvUnit(c, rngs=rngs) if has_skip else None
        self.unit2 = ResidualConvUnit(c, rngs=rngs)
        self.out_conv = Conv(c, c, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array | None = None, size=None) -> jax.Array:
        if skip is not None:
            x = x + self.unit1(skip)
        x = self.unit2(x)
        x = resize_bilinear(x, size if size is not None else (2 * x.shape[1], 2 * x.shape[2]))
        return self.out_conv(x)


class DPTHead(nnx.Module):
    def __init__(self, cfg: FantasyWorldConfig, out_dim: int, activation: str, *, rngs: nnx.Rngs):
        if activation not in ("exp", "inv_log"):
            raise ValueError(f"DPT activation must be 'exp' (depth) or 'inv_log' (points), got {activation!r}")
        d, ch, fe = cfg.head_dim_in, cfg.dpt_channels, cfg.dpt_features
        self.layers, self.start, self.patch, self.activation = cfg.dpt_layers, cfg.patch_start, cfg.dpt_patch, activation
        self.norm = LayerNorm(d, eps=1e-5, affine=True)
        self.projects = nnx.List([Conv(d, c, (1, 1), rngs=rngs) for c in ch])
        self.resize0 = BlockConvTranspose(ch[0], ch[0], 4, rngs=rngs)
        self.resize1 = BlockConvTranspose(ch[1], ch[1], 2, rngs=rngs)
        self.resize3 = Conv(ch[3], ch[3], (3, 3), stride=(2, 2), padding=((1, 1), (1, 1)), rngs=rngs)
        self.upsamplers = nnx.List([TemporalUpsampler(c, rngs=rngs) for c in ch])
        pad = ((1, 1), (1, 1))
        self.layer_rn = nnx.List([Conv(c, fe, (3, 3), padding=pad, bias=False, rngs=rngs) for c in ch])
        self.refine = nnx.List([FusionBlock(fe, has_skip=i < 3, rngs=rngs) for i in range(4)])
        self.out_conv1 = Conv(fe, fe // 2, (3, 3), padding=pad, rngs=rngs)
        self.out_conv2 = Conv(fe // 2, cfg.dpt_hidden, (3, 3), padding=pad, rngs=rngs)
        self.out_conv3 = Conv(cfg.dpt_hidden, out_dim, (1, 1), rngs=rngs)

    def level(self, k: int, tap: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """Level-k features [B, frames, h_k, w_k, C_k] of every video frame."""
        b, s = tap.shape[:2]
        h, w = grid
        x = self.norm(tap[:, :, self.start:]).reshape(b * s, h, w, -1)
        x = self.projects[k](x)
        x = x + uv_embedding(h, w, x.shape[-1], w / h).astype(x.dtype)
        if k == 0:
            x = self.resize0(x)
        elif k == 1:
            x = self.resize1(x)
        elif k == 3:
            x = self.resize3(x)
        return self.upsamplers[k](x.reshape(b, s, *x.shape[1:]))

    def fuse(self, feats: list[jax.Array], grid: tuple[int, int]) -> jax.Array:
        """Level features of some frames [n, h_k, w_k, C_k] -> raw outputs [n, H, W, out_dim]."""
        f1, f2, f3, f4 = (self.layer_rn[k](f) for k, f in enumerate(feats))
        x = self.refine[3](f4, size=f3.shape[1:3])
        x = self.refine[2](x, f3, size=f2.shape[1:3])
        x = self.refine[1](x, f2, size=f1.shape[1:3])
        x = self.out_conv1(self.refine[0](x, f1))
        h, w = grid
        x = resize_bilinear(x, (h * self.patch, w * self.patch))
        x = x + uv_embedding(h * self.patch, w * self.patch, x.shape[-1], w / h).astype(x.dtype)
        return self.out_conv3(jax.nn.relu(self.out_conv2(x)))

    def __call__(self, taps: list[jax.Array], grid: tuple[int, int], frames_per_chunk: int = 16):
        """taps: every joint layer's [B, S, P, D]; grid (h, w) tokens per frame.
        Returns (values [B, T, H, W, out_dim - 1], confidence [B, T, H, W])."""
        b = taps[self.layers[0]].shape[0]  # only the tapped layers need to be given (others may be None)
        feats = [self.level(k, taps[i], grid) for k, i in enumerate(self.layers)]
        feats = [f.reshape(-1, *f.shape[2:]) for f in feats]
        n = feats[0].shape[0]
        out = jnp.concatenate([self.fuse([f[i:i + frames_per_chunk] for f in feats], grid)
                               for i in range(0, n, frames_per_chunk)], axis=0)
        out = out.reshape(b, -1, *out.shape[1:])
        values, conf = out[..., :-1], 1 + jnp.exp(out[..., -1])
        if self.activation == "exp":
            values = jnp.exp(values)
        else:
            values = jnp.sign(values) * jnp.expm1(jnp.abs(values))
        return values, conf
