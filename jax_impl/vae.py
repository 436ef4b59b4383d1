"""The Wan causal 3D VAE (AutoencoderKLWan: Wan2.1 and Wan2.2) in Flax NNX, channels-last.

Video is `[batch, frames, height, width, channels]` in [-1, 1]; latents `[batch, frames, h, w, z_dim]`.
Time is processed causally in chunks (encode: 1 frame, then 4 at a time; decode: 1 latent frame at a
time), as diffusers does, so peak memory does not depend on the video length. Every causal 3D conv
keeps the last two frames of its input stream; these caches are an explicit pytree (a list, in call
order) passed into and returned from one jit-compiled chunk step instead of hidden module state.

The cache starts as two zero frames, which is exactly the causal zero padding; two places differ on
the first chunk and take a static `first` flag: the temporal downsampler passes its first frame through
(no time conv), and the temporal upsampler does not double its first frame (and its time conv then
starts from zeros). Parameter names follow diffusers' module paths (see `weights.vae_map`).

How the convolutions run (3D, or time taps folded into channels of a 2D conv; float32 precision) is
`ConvSettings`. `WanVAE.stream` is the production path: ahead-of-time compiled chunk steps with the caches
donated from step to step; `encode` / `decode` add spatial tiling (`jax_impl.vae_tiling`) and
`tile="auto"` (`jax_impl.vae_run`). `capture=True` records every layer for the parity tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.layers import F32
from weights.configs.vae import VaeConfig

CACHE_T = 2  # frames of history a kernel-3 causal conv needs
ENCODE_CHUNK = 4  # frames per encoder step after the first (diffusers' fixed choice)
Caches = list[jax.Array]
HIGHEST = jax.lax.Precision.HIGHEST


class VaeInputError(ValueError):
    """A video or latent whose shape the VAE cannot process; the message says what is expected."""


@dataclasses.dataclass(frozen=True)
class Valid:
    """The valid top-left `height` x `width` region (traced int32 scalars) of a chunk whose spatial size is
    `full` (static): spatial tiles are padded to one shape so that one compiled step serves every tile, and
    this says which part is real at every resolution the network reaches (sizes scale by powers of two)."""

    height: jax.Array
    width: jax.Array
    full: tuple[int, int]

    def mask(self, h: int, w: int) -> jax.Array:
        """[h, w] bool: inside the valid region of a feature map of spatial size h x w."""
        def scaled(v, n, full):
            return v * (n // full) if n >= full else v // (full // n)

        rows = jnp.arange(h) < scaled(self.height, h, self.full[0])
        cols = jnp.arange(w) < scaled(self.width, w, self.full[1])
        return rows[:, None] & cols[None, :]


class Cursor:
    """Threads the conv caches through one chunk in call order and collects taps (trace-time only)."""

    def __init__(self, caches: Caches | None, capture: bool, valid: "Valid | None" = None):
        self.inp, self.i, self.out = caches, 0, []
        self.capture = capture
        self.taps: dict[str, jax.Array] = {}
        self.valid = valid

    def mask(self, x: jax.Array) -> jax.Array:
        """`x` with the pixels outside the valid region zeroed (padded tiles; a no-op for whole frames).

        Called on the input of every spatial conv, so a padded tile computes exactly what the smaller tile
        would: the conv sees zeros past the valid edge, as its zero padding would give it.
        """
        if self.valid is None:
            return x
        return jnp.where(self.valid.mask(x.shape[2], x.shape[3])[None, None, :, :, None], x, jnp.zeros((), x.dtype))

    @property
    def first(self) -> bool:
        return self.inp is None

    def take(self) -> jax.Array | None:
        c = None if self.inp is None else self.inp[self.i]
        self.i += 1
        return c

    def put(self, c: jax.Array) -> None:
        self.out.append(c)

    def tap(self, name: str, x: jax.Array) -> None:
        if self.capture:
            self.taps[name] = x


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> nnx.Param:
    s = fan_in**-0.5
    return nnx.Param(jax.random.uniform(rngs.params(), shape, F32, -s, s).astype(dtype))


@dataclasses.dataclass(frozen=True)
class ConvSettings:
    """How the VAE's convolutions run: the one place that chooses their formulation and float32 precision.

    `time_taps`: "channels" (default) folds a time kernel's taps into the channel axis: the kt shifted frame
    windows are concatenated along channels and one 2D conv with kt*Cin inputs runs over all output frames
    (fastest on an H100 in bf16 and TF32, bench/NOTES.md 2026-11-24, at the cost of a kt-times copy of the
    conv input); "conv3d" runs one 3D convolution (no copy, less memory).
    `strict_fp32`: float32 convolutions and attention matmuls at `Precision.HIGHEST`. Default False: the
    platform's default precision, which is TF32 on NVIDIA GPUs since Ampere, as torch/diffusers use by default
    (`torch.backends.cudnn.allow_tf32` is True). CPU float32 results are the same either way.
    Half-precision convs always write half-precision output; cuDNN accumulates in float32 inside.
    """

    time_taps: str = "channels"
    strict_fp32: bool = False

    def __post_init__(self) -> None:
        if self.time_taps not in TIME_TAPS:
            raise ValueError(f"time_taps must be one of {TIME_TAPS}, got {self.time_taps!r}")

    def precision(self, dtype) -> jax.lax.Precision | None:
        """The precision argument for a conv or matmul whose operands are `dtype`."""
        return HIGHEST if self.strict_fp32 and jnp.dtype(dtype) == F32 else None


TIME_TAPS = ("channels", "conv3d")
DEFAULT_CONV = ConvSettings()


def _conv2d(x: jax.Array, k: jax.Array, stride: tuple[int, int], pad: tuple[int, int], prec) -> jax.Array:
    """Per-frame 2D conv of `[B, T, H, W, Cin]` with `[kh, kw, Cin, Cout]`; a 1x1 kernel is a matmul."""
    if k.shape[:2] == (1, 1) and tuple(stride) == (1, 1) and tuple(pad) == (0, 0):
        return jnp.einsum("...c,co->...o", x, k[0, 0], precision=prec)
    b, t = x.shape[:2]
    y = jax.lax.conv_general_dilated(x.reshape(b * t, *x.shape[2:]), k, stride, [pad, pad],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=prec)
    return y.reshape(b, t, *y.shape[1:])


def _fold_time(x: jax.Array, k: jax.Array, st: int) -> tuple[jax.Array, jax.Array]:
    """A time conv as a 2D one: x `[B, Tin, H, W, C]` -> the kt strided frame windows side by side in channels
    `[B, Tout, H, W, kt*C]`, kernel `[kt, kh, kw, C, O]` -> `[kh, kw, kt*C, O]` (channel index = tap*C + c)."""
    kt, kh, kw, c, o = k.shape
    tout = (x.shape[1] - kt) // st + 1
    xs = jnp.concatenate([x[:, i:i + st * (tout - 1) + 1:st] for i in range(kt)], axis=-1)
    return xs, jnp.moveaxis(k, 0, 2).reshape(kh, kw, kt * c, o)


class Conv(nnx.Module):
    """3D (kernel (kt, kh, kw, in, out)) or 2D per-frame (kh, kw, in, out) convolution in the kernel's dtype.

    Takes `[B, T, H, W, C]`; no time padding here (callers prepend cache frames), symmetric spatial
    padding `pad`, or `pad=(0, 1)` for the downsampler's right/bottom-only zero pad. How it runs (3D conv or
    time taps folded into channels, float32 precision) is `self.settings` (see `ConvSettings`).
    """

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, ...], *, stride: tuple[int, ...] | None = None,
                 pad: tuple[int, int] = (0, 0), dtype=F32, rngs: nnx.Rngs):
        self.is3d = len(kernel) == 3
        self.stride = stride or (1,) * len(kernel)
        self.pad = pad
        self.settings = DEFAULT_CONV
        self.kernel = _uniform(rngs, (*kernel, c_in, c_out), c_in * math.prod(kernel), dtype)
        self.bias = _uniform(rngs, (c_out,), c_in * math.prod(kernel), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel.value
        x = x.astype(k.dtype)
        prec = self.settings.precision(k.dtype)
        if not self.is3d:
            y = _conv2d(x, k, self.stride, self.pad, prec)
        elif k.shape[0] == 1 and self.stride[0] == 1:
            y = _conv2d(x, k[0], self.stride[1:], self.pad, prec)
        elif self.settings.time_taps == "channels":
            xs, kk = _fold_time(x, k, self.stride[0])
            y = _conv2d(xs, kk, self.stride[1:], self.pad, prec)
        else:
            y = jax.lax.conv_general_dilated(
                x, k, self.stride, [(0, 0), self.pad, self.pad], dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                precision=prec)
        return y + self.bias.value


class CausalConv(Conv):
    """Kernel-3 (in time) causal conv carrying the last CACHE_T input frames across chunks."""

    def __init__(self, c_in: int, c_out: int, *, dtype=F32, rngs: nnx.Rngs):
        super().__init__(c_in, c_out, (3, 3, 3), pad=(1, 1), dtype=dtype, rngs=rngs)

    def step(self, x: jax.Array, cur: Cursor) -> jax.Array:
        cache = cur.take()
        x = cur.mask(x)
        if cache is None:
            cache = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
        full = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        cur.put(full[:, -CACHE_T:])
        return self(full)


class ChannelRMSNorm(nnx.Module):
    """Wan's RMS norm: L2-normalise over channels, times sqrt(C) and a gain (diffusers' WanRMS_norm)."""

    def __init__(self, dim: int, *, dtype=F32):
        self.scale = dim**0.5
        self.gamma = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(F32)
        n = h / jnp.maximum(jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True)), 1e-12)
        n = (n.astype(x.dtype).astype(F32) * self.scale).astype(x.dtype)  # rounds where torch rounds
        return (n.astype(F32) * self.gamma.value.astype(F32)).astype(x.dtype)


class ResBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = ChannelRMSNorm(c_in, dtype=dtype)
        self.conv1 = CausalConv(c_in, c_out, dtype=dtype, rngs=rngs)
        self.norm2 = ChannelRMSNorm(c_out, dtype=dtype)
        self.conv2 = CausalConv(c_out, c_out, dtype=dtype, rngs=rngs)
        self.conv_shortcut = Conv(c_in, c_out, (1, 1, 1), dtype=dtype, rngs=rngs) if c_in != c_out else None

    def __call__(self, x: jax.Array, cur: Cursor) -> jax.Array:
        h = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        x = self.conv1.step(jax.nn.silu(self.norm1(x)), cur)
        x = self.conv2.step(jax.nn.silu(self.norm2(x)), cur)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame (not across time).

    Logits and softmax in float32 (cheap: one frame at latent resolution); the matmuls run at the conv
    settings' precision (TF32 for float32 on GPU unless strict) and p @ v writes the activation dtype.
    """

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.norm = ChannelRMSNorm(dim, dtype=dtype)
        self.to_qkv = Conv(dim, 3 * dim, (1, 1), dtype=dtype, rngs=rngs)
        self.proj = Conv(dim, dim, (1, 1), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cur: Cursor) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        prec = self.proj.settings.precision(v.dtype)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=prec, preferred_element_type=F32) / math.sqrt(c)
        if cur.valid is not None:  # a padded tile: its padding is no key (queries there are cropped later)
            logits = jnp.where(cur.valid.mask(h, w).reshape(1, 1, h * w), logits, -jnp.inf)
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("bqk,bkc->bqc", p, v, precision=prec)
        return self.proj(o.reshape(b, t, h, w, c)) + x


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResBlock(dim, dim, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttnBlock(dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, cur: Cursor) -> jax.Array:
        x = self.resnets[0](x, cur)
        return self.resnets[1](self.attentions[0](x, cur), cur)


def _up2(x: jax.Array) -> jax.Array:
    """Nearest 2x spatial upsampling (nearest-exact at integer scale duplicates each pixel)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)


class Resample(nnx.Module):
    """Spatial 2x up/down-sampling, with a causal time conv for the '3d' modes (diffusers' WanResample)."""

    def __init__(self, dim: int, mode: str, out_dim: int | None = None, *, dtype, rngs: nnx.Rngs):
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = Conv(dim, out_dim or dim // 2, (3, 3), pad=(1, 1), dtype=dtype, rngs=rngs)
            self.time_conv = Conv(dim, 2 * dim, (3, 1, 1), dtype=dtype, rngs=rngs) if mode == "upsample3d" else None
        else:
            self.resample = Conv(dim, dim, (3, 3), stride=(2, 2), pad=(0, 1), dtype=dtype, rngs=rngs)
            self.time_conv = (
                Conv(dim, dim, (3, 1, 1), stride=(2, 1, 1), dtype=dtype, rngs=rngs) if mode == "downsample3d" else None
            )

    def __call__(self, x: jax.Array, cur: Cursor) -> jax.Array:
        if self.mode == "upsample3d":
            cache = cur.take()
            if cur.first:  # the first frame is not doubled; the time conv's stream starts at the next chunk
                cur.put(jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype))
            else:
                full = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
                cur.put(full[:, -CACHE_T:])
                y = self.time_conv(full)  # [B, T, H, W, 2C]: two output frames per input frame
                b, t, h, w, c2 = y.shape
                x = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
        if self.mode.startswith("upsample"):
            x = _up2(x)
        x = self.resample(cur.mask(x))
        if self.mode == "downsample3d":
            cache = cur.take()
            cur.put(x[:, -1:])
            if not cur.first:  # the first frame passes through; later ones pair with their predecessor
                x = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
        return x


def avg_down(x: jax.Array, c_out: int, ft: int, fs: int) -> jax.Array:
    """Wan2.2's parameter-free shortcut: fold (ft, fs, fs) blocks into channels, average channel groups."""
    b, t, h, w, c = x.shape
    pad = (ft - t % ft) % ft
    if pad:
        x = jnp.pad(x, [(0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)])
        t += pad
    x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    x = x.reshape(b, t // ft, h // fs, w // fs, c_out, c * ft * fs * fs // c_out)
    return jnp.mean(x.astype(F32), axis=-1).astype(x.dtype)


def dup_up(x: jax.Array, c_out: int, ft: int, fs: int, first: bool) -> jax.Array:
    """Inverse of `avg_down`: repeat channels, unfold them into (ft, fs, fs) blocks."""
    b, t, h, w, c = x.shape
    x = jnp.repeat(x, c_out * ft * fs * fs // c, axis=-1).reshape(b, t, h, w, c_out, ft, fs, fs)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * ft, h * fs, w * fs, c_out)
    return x[:, ft - 1:] if first else x


class ResidualDownBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, n_res: int, temporal: bool, down: bool, *, dtype, rngs: nnx.Rngs):
        self.c_out, self.ft, self.fs = c_out, 2 if temporal else 1, 2 if down else 1
        self.resnets = nnx.List([ResBlock(c_in if i == 0 else c_out, c_out, dtype=dtype, rngs=rngs) for i in range(n_res)])
        mode = "downsample3d" if temporal else "downsample2d"
        self.downsampler = Resample(c_out, mode, dtype=dtype, rngs=rngs) if down else None

    def __call__(self, x: jax.Array, cur: Cursor) -> jax.Array:
        skip = avg_down(x, self.c_out, self.ft, self.fs)
        for r in self.resnets:
            x = r(x, cur)
        if self.downsampler is not None:
            x = self.downsampler(x, cur)
        return x + skip


class UpBlock(nnx.Module):
    """Decoder stage: n_res+1 residual blocks then an optional upsampler; Wan2.2 adds a DupUp shortcut."""

    def __init__(self, c_in: int, c_out: int, n_res: int, mode: str | None, residual: bool, temporal: bool,
                 *, dtype, rngs: nnx.Rngs):
        self.residual, self.c_out, self.ft = residual, c_out, 2 if temporal else 1
        self.resnets = nnx.List([ResBlock(c_in if i == 0 else c_out, c_out, dtype=dtype, rngs=rngs) for i in range(n_res + 1)])
        sampler = Resample(c_out, mode, c_out if residual else None, dtype=dtype, rngs=rngs) if mode else None
        self.upsampler = sampler  # diffusers: `upsampler` (Wan2.2) or `upsamplers.0` (Wan2.1)
        self.has_shortcut = residual and mode is not None

    def __call__(self, x: jax.Array, cur: Cursor) -> jax.Array:
        skip = dup_up(x, self.c_out, self.ft, 2, cur.first) if self.has_shortcut else None
        for r in self.resnets:
            x = r(x, cur)
        if self.upsampler is not None:
            x = self.upsampler(x, cur)
        return x if skip is None else x + skip


class Encoder(nnx.Module):
    def __init__(self, cfg: VaeConfig, *, dtype, rngs: nnx.Rngs):
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        n = len(cfg.dim_mult)
        self.conv_in = CausalConv(cfg.in_channels, dims[0], dtype=dtype, rngs=rngs)
        blocks: list[nnx.Module] = []
        for i, (ci, co) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == n - 1
            if cfg.is_residual:
                temporal = cfg.temperal_downsample[i] if not last else False
                blocks.append(ResidualDownBlock(ci, co, cfg.num_res_blocks, temporal, not last, dtype=dtype, rngs=rngs))
            else:
                for j in range(cfg.num_res_blocks):
                    blocks.append(ResBlock(ci if j == 0 else co, co, dtype=dtype, rngs=rngs))
                if not last:
                    mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                    blocks.append(Resample(co, mode, dtype=dtype, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], dtype=dtype, rngs=rngs)
        self.norm_out = ChannelRMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv(dims[-1], 2 * cfg.z_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cur: Cursor) -> jax.Array:
        x = self.conv_in.step(x, cur)
        cur.tap("encoder.conv_in", x)
        for i, blk in enumerate(self.down_blocks):
            x = blk(x, cur)
            cur.tap(f"encoder.down_blocks.{i}", x)
        x = self.mid_block(x, cur)
        cur.tap("encoder.mid_block", x)
        x = self.conv_out.step(jax.nn.silu(self.norm_out(x)), cur)
        cur.tap("encoder.conv_out", x)
        return x


class Decoder(nnx.Module):
    def __init__(self, cfg: VaeConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.decoder_dim
        dims = [d * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        n = len(cfg.dim_mult)
        self.conv_in = CausalConv(cfg.z_dim, dims[0], dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(dims[0], dtype=dtype, rngs=rngs)
        blocks = []
        for i, (ci, co) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0 and not cfg.is_residual:
                ci //= 2  # the previous Wan2.1 upsampler halved the channels
            up = i != n - 1
            temporal = bool(cfg.temperal_upsample[i]) if up else False
            mode = ("upsample3d" if temporal else "upsample2d") if up else None
            blocks.append(UpBlock(ci, co, cfg.num_res_blocks, mode, cfg.is_residual, temporal, dtype=dtype, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = ChannelRMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv(dims[-1], cfg.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cur: Cursor) -> jax.Array:
        x = self.conv_in.step(x, cur)
        cur.tap("decoder.conv_in", x)
        x = self.mid_block(x, cur)
        cur.tap("decoder.mid_block", x)
        for i, blk in enumerate(self.up_blocks):
            x = blk(x, cur)
            cur.tap(f"decoder.up_blocks.{i}", x)
        x = self.conv_out.step(jax.nn.silu(self.norm_out(x)), cur)
        cur.tap("decoder.conv_out", x)
        return x


def patchify(x: jax.Array, p: int) -> jax.Array:
    """[B,T,H,W,C] -> [B,T,H/p,W/p,C*p*p], channel order (c, pw, ph) as diffusers' patchify."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x: jax.Array, p: int) -> jax.Array:
    if p == 1:
        return x
    b, t, h, w, cp = x.shape
    x = x.reshape(b, t, h, w, cp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * p, w * p, cp // (p * p))


class WanVAE(nnx.Module):
    """AutoencoderKLWan in Flax. `encode` returns the posterior mean, `decode` a video clipped to [-1, 1]."""

    def __init__(self, cfg: VaeConfig, *, dtype=F32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.quant_conv = Conv(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), dtype=dtype, rngs=rngs)
        self.post_quant_conv = Conv(cfg.z_dim, cfg.z_dim, (1, 1, 1), dtype=dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)

    @property
    def conv_settings(self) -> ConvSettings:
        return self.encoder.conv_in.settings

    def set_conv_settings(self, settings: ConvSettings) -> "WanVAE":
        """Use `settings` in every conv and attention block (the next call compiles new chunk steps)."""
        for _, m in self.iter_modules():
            if isinstance(m, Conv):
                m.settings = settings
        return self

    # --- one chunk (traced under jit by the drivers below) ---------------------------------------
    def encode_chunk(self, x: jax.Array, caches: Caches | None, capture: bool = False, valid: Valid | None = None):
        """`valid`: the real part of a padded tile (see `Valid`); None for whole frames."""
        cur = Cursor(caches, capture, valid)
        moments = self.quant_conv(self.encoder(patchify(x.astype(self.dtype), self.cfg.patch), cur))
        cur.tap("quant_conv", moments)
        return moments, cur.out, cur.taps

    def decode_chunk(self, z: jax.Array, caches: Caches | None, capture: bool = False, raw: bool = False,
                     valid: Valid | None = None):
        """`raw`: the decoder's output before unpatchify and clipping (what spatial tiles are blended on);
        `valid`: the real part of a padded tile (see `Valid`)."""
        cur = Cursor(caches, capture, valid)
        x = self.post_quant_conv(z.astype(self.dtype))
        cur.tap("post_quant_conv", x)
        x = self.decoder(x, cur)
        if raw:
            return x, cur.out, cur.taps
        return jnp.clip(unpatchify(x, self.cfg.patch), -1.0, 1.0), cur.out, cur.taps

    # --- whole videos ------------------------------------------------------------------------------
    def check_video(self, video) -> None:
        cfg = self.cfg
        c = cfg.in_channels // (cfg.patch * cfg.patch)
        if len(video.shape) != 5:
            raise VaeInputError(f"video must be [batch, frames, height, width, {c}] (channels-last), got shape {tuple(video.shape)}")
        _, f, h, w, ch = video.shape
        if ch != c:
            raise VaeInputError(f"video has {ch} channels, this VAE takes {c} (channels-last [B, F, H, W, C]); got shape {tuple(video.shape)}")
        if f < 1 or (f - 1) % ENCODE_CHUNK:
            lo = (max(f - 1, 0) // 4) * 4 + 1
            raise VaeInputError(f"frame count {f} is not 4k+1; use {lo} or {lo + 4} frames")
        s = cfg.spatial_factor
        if h % s or w % s:
            raise VaeInputError(f"height and width must be multiples of {s} for this VAE, got {h}x{w}")

    def check_latents(self, z) -> None:
        if len(z.shape) != 5 or z.shape[-1] != self.cfg.z_dim:
            raise VaeInputError(
                f"latents must be [batch, frames, height, width, {self.cfg.z_dim}] (channels-last), got shape {tuple(z.shape)}")

    def out_frames(self, kind: str, frames: int) -> int:
        """Frames `stream(kind, ...)` returns for `frames` input frames (latent frames when encoding)."""
        tf = self.cfg.temporal_factor
        return 1 + (frames - 1) // tf if kind == "encode" else 1 + (frames - 1) * tf

    def encode(self, video, *, capture: bool = False, return_moments: bool = False):
        """Posterior mean [B, 1+(F-1)/4, H/s, W/s, z_dim] of a video [B, F, H, W, C] (F = 4k+1), whole frames.

        `video` may be a numpy array: then only one chunk at a time is moved to the device. `capture` records
        the per-layer taps that parity tests compare. Spatial tiles: `jax_impl.vae_run.encode`.
        """
        self.check_video(video)
        if capture:
            return _drive(_chunk_fn(self, "encode"), self._chunks("encode", video), self.cfg.z_dim,
                          return_moments, "encoder")
        out = self.stream("encode", video)
        return out if return_moments else out[..., :self.cfg.z_dim]

    def decode(self, z, *, capture: bool = False):
        """Video [B, 1+4(F-1), H*s, W*s, C] in [-1, 1] from latents [B, F, h, w, z_dim], one frame per step,
        whole frames. Spatial tiles: `jax_impl.vae_run.decode`."""
        self.check_latents(z)
        if capture:
            return _drive(_chunk_fn(self, "decode"), self._chunks("decode", z), None, False, "decoder")
        return self.stream("decode", z)

    def _chunks(self, kind: str, x) -> list:
        return [x[:, a:b] for a, b in chunk_bounds(kind, x.shape[1])]

    def stream(self, kind: str, x, *, raw: bool = False, split=None, valid: tuple[int, int] | None = None) -> jax.Array:
        """Every time chunk of `x` (a video to encode, or latents to decode) through the compiled chunk step.

        Encode returns the moments (mean and log-variance), decode the clipped video (`raw`: the decoder's
        output before unpatchify and clipping). The conv caches are donated from step to step and every
        chunk's output is written into one preallocated buffer, so the device holds the caches once and
        the result once, whatever the length. `split`: `nnx.split(self)`, when the caller has it already
        (tiles split once per video, not once per tile). `valid`: `x` is a tile padded with zeros past its valid
        (height, width); every tile size then runs the same executables (the padding's outputs are garbage the
        caller crops).
        """
        graphdef, state = split or nnx.split(self)
        steps = step_table(graphdef, kind, raw, masked=valid is not None)
        extra = () if valid is None else (jnp.asarray(valid, jnp.int32),)
        caches, buf, t = None, None, 0
        for a, b in chunk_bounds(kind, x.shape[1]):
            xc = jnp.asarray(x[:, a:b])
            y, caches = steps.get(state, xc, caches)(state, xc, caches, *extra)
            if buf is None:
                buf = jnp.zeros((y.shape[0], self.out_frames(kind, x.shape[1]), *y.shape[2:]), y.dtype)
            if t + y.shape[1] > buf.shape[1]:  # dynamic_update_slice would clamp and overwrite silently
                raise AssertionError(f"{kind}: chunk output overruns the {buf.shape[1]}-frame buffer at frame {t}")
            buf = put_block(buf, y, (0, t, 0, 0, 0))
            t += y.shape[1]
        if t != buf.shape[1]:
            raise AssertionError(f"{kind}: {t} frames produced, {buf.shape[1]} expected")
        return buf


def chunk_bounds(kind: str, frames: int) -> list[tuple[int, int]]:
    """Time chunks [a, b): encode 1 frame then ENCODE_CHUNK at a time; decode one latent frame at a time."""
    if kind == "encode":
        return [(0, 1)] + [(i, i + ENCODE_CHUNK) for i in range(1, frames, ENCODE_CHUNK)]
    if kind == "decode":
        return [(i, i + 1) for i in range(frames)]
    raise ValueError(f"kind must be 'encode' or 'decode', got {kind!r}")



@functools.partial(jax.jit, donate_argnums=0)
def put_block(buf: jax.Array, y: jax.Array, start: tuple) -> jax.Array:
    """buf with y written at `start` (in place: buf is donated)."""
    return jax.lax.dynamic_update_slice(buf, y.astype(buf.dtype), start)


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return str(treedef), tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in leaves)


class StepTable:
    """The chunk step (state, x, caches) -> (y, caches) of one graph structure and kind, compiled ahead of time
    per argument shapes. The caches argument is donated: a step's new caches reuse the old ones' memory."""

    def __init__(self, graphdef, kind: str, raw: bool, masked: bool = False):
        """`masked`: the step takes a fourth argument, int32[2], the valid (height, width) of a padded tile (see
        `Valid`): one executable then serves tiles of every size."""
        def step(state, x, caches, valid=None):
            m = nnx.merge(graphdef, state)
            v = None if valid is None else Valid(valid[0], valid[1], tuple(x.shape[2:4]))
            y, new, _ = (m.encode_chunk(x, caches, valid=v) if kind == "encode"
                         else m.decode_chunk(x, caches, raw=raw, valid=v))
            return y, new

        self.masked = masked
        self.jitted = jax.jit(step, donate_argnums=2)
        self.compiled: dict = {}

    def get(self, state, x, caches):
        """The executable for these shapes (`x`, `caches`: arrays or `jax.ShapeDtypeStruct`s), compiled once."""
        key = (_signature(x), _signature(caches))
        c = self.compiled.get(key)
        if c is None:
            extra = (jax.ShapeDtypeStruct((2,), jnp.int32),) if self.masked else ()
            c = self.compiled[key] = self.jitted.lower(state, x, caches, *extra).compile()
        return c


_TABLES: dict = {}


def step_table(graphdef, kind: str, raw: bool, masked: bool = False) -> StepTable:
    """Keyed by graph structure (config, dtype, conv settings): every model of the same structure shares it.
    (Hashing a graph costs milliseconds, so callers look the table up once per video, not per chunk.)"""
    key = (graphdef, kind, raw, masked)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = StepTable(graphdef, kind, raw, masked)
    return table


_STEPS: dict = {}


def _chunk_fn(model: WanVAE, kind: str) -> Callable:
    """The jitted step (state, x, caches) -> (y, caches, taps) that records layer taps (parity runs only).

    Keyed by graph structure, so every model with the same config and dtype shares one compilation
    (one per chunk shape: the first chunk and the steady-state chunk). Nothing is donated: the caches
    after every chunk are part of what is recorded.
    """
    graphdef, state = nnx.split(model)
    key = (graphdef, kind)
    step = _STEPS.get(key)
    if step is None:

        @functools.partial(jax.jit, static_argnames=("capture",))
        def step(state, x, caches, capture=False):
            m = nnx.merge(graphdef, state)
            return (m.encode_chunk if kind == "encode" else m.decode_chunk)(x, caches, capture)

        _STEPS[key] = step
    return functools.partial(step, state)


def _drive(step, chunks, z_dim, return_moments, side):
    """Run the recording step over `chunks`; returns (output, taps) with the taps concatenated over time."""
    caches = None
    outs, taps, cache_log = [], {}, []
    for x in chunks:
        y, caches, t = step(jnp.asarray(x), caches, capture=True)
        outs.append(y)
        for k, v in t.items():
            taps.setdefault(k, []).append(v)
        cache_log.append(list(caches))
    out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    if z_dim is not None and not return_moments:
        out = out[..., :z_dim]
    merged = {k: jnp.concatenate(v, axis=1) for k, v in taps.items()}
    merged[f"{side}.caches"] = cache_log  # per chunk, the caches after it, in diffusers' feat_idx order
    return out, merged
