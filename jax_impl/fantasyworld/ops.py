"""Convolution-side building blocks of FantasyWorld's added modules, channels-last.

Convs (2D, 3D and 1D as 2D with a unit axis) with kernels stored `[*spatial, in, out]`, GroupNorm,
pixel-unshuffle in PyTorch's channel order, bilinear resizing with align_corners=True (the DPT heads'
resize; `jax.image.resize` uses half-pixel centres instead) and the stride == kernel transposed conv of
the DPT heads written as one matmul.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.layers import F32

HIGHEST = jax.lax.Precision.HIGHEST


class Conv(nnx.Module):
    """N-d convolution on `[batch, *spatial, channels]`, kernel `[*kernel_size, in, out]`.

    `padding` is a per-axis (low, high) list or "VALID"; the causal temporal convs pad explicitly."""

    def __init__(self, d_in: int, d_out: int, kernel_size: tuple[int, ...], *, stride: tuple[int, ...] | None = None,
                 padding="VALID", bias: bool = True, rngs: nnx.Rngs):
        scale = (d_in * math.prod(kernel_size)) ** -0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (*kernel_size, d_in, d_out), F32, -scale, scale))
        self.bias = nnx.Param(jnp.zeros((d_out,), F32)) if bias else None
        self.stride = tuple(stride or (1,) * len(kernel_size))
        self.padding = padding

    def __call__(self, x: jax.Array) -> jax.Array:
        n = x.ndim - 2
        spatial = "DHW"[-n:] if n <= 3 else None
        dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        y = jax.lax.conv_general_dilated(x, self.kernel.value.astype(x.dtype), self.stride, self.padding,
                                         dimension_numbers=dn, precision=HIGHEST)
        return y if self.bias is None else y + self.bias.value.astype(y.dtype)


class BlockConvTranspose(nnx.Module):
    """Transposed 2D conv with stride == kernel size and no padding: every input pixel becomes a k x k
    block, i.e. one matmul `[in] -> [k, k, out]` and a reshape. Kernel `[k, k, in, out]`."""

    def __init__(self, d_in: int, d_out: int, k: int, *, rngs: nnx.Rngs):
        scale = (d_in * k * k) ** -0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (k, k, d_in, d_out), F32, -scale, scale))
        self.bias = nnx.Param(jnp.zeros((d_out,), F32))

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, _ = x.shape
        k, _, _, o = self.kernel.value.shape
        y = jnp.einsum("nhwi,abio->nhawbo", x, self.kernel.value.astype(x.dtype), precision=HIGHEST)
        return y.reshape(n, h * k, w * k, o) + self.bias.value.astype(x.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over channels-last `[batch, *spatial, channels]` (statistics per sample and group)."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        self.groups, self.eps = groups, eps
        self.scale = nnx.Param(jnp.ones((channels,), F32))
        self.bias = nnx.Param(jnp.zeros((channels,), F32))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        h = x.astype(F32).reshape(shape[0], -1, self.groups, shape[-1] // self.groups)
        mean = jnp.mean(h, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=(1, 3), keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (h * self.scale.value + self.bias.value).astype(x.dtype)


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
    """[N, H, W, C] -> [N, H/r, W/r, C*r*r], output channel c*r*r + dy*r + dx (PyTorch's order)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(n, h // r, w // r, c * r * r)


def _align_corners_weights(n_in: int, n_out: int):
    """Source indices and weights of 1D linear interpolation with the corners aligned."""
    if n_out == 1 or n_in == 1:
        pos = jnp.zeros((n_out,), F32)
    else:
        pos = jnp.arange(n_out, dtype=F32) * ((n_in - 1) / (n_out - 1))
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n_in - 1)
    hi = jnp.minimum(lo + 1, n_in - 1)
    return lo, hi, pos - lo.astype(F32)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of [N, H, W, C] to `size` with align_corners=True (PyTorch semantics)."""
    lo, hi, t = _align_corners_weights(x.shape[1], size[0])
    x = x[:, lo] * (1 - t)[None, :, None, None] + x[:, hi] * t[None, :, None, None]
    lo, hi, t = _align_corners_weights(x.shape[2], size[1])
    return x[:, :, lo] * (1 - t)[None, None, :, None] + x[:, :, hi] * t[None, None, :, None]
