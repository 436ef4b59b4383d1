"""Small building blocks shared by the Wan models: dense layers and norms with explicit dtypes.

Why not `nnx.Linear`: we need the bias added in float32 before rounding (as cuBLAS's fused epilogue
does in PyTorch) and parameters that may stay float32 while activations are bfloat16, per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel stored `[in, out]`; accumulates and adds the bias in float32."""

    def __init__(self, d_in: int, d_out: int, *, param_dtype=F32, rngs: nnx.Rngs):
        scale = d_in**-0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (d_in, d_out), F32, -scale, scale).astype(param_dtype))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (d_out,), F32, -scale, scale).astype(param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel.value
        y = jnp.einsum("...i,io->...o", x.astype(kernel.dtype), kernel, preferred_element_type=F32)
        return (y + self.bias.value.astype(F32)).astype(kernel.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (as diffusers' FP32LayerNorm), optional affine, output in x's dtype."""

    def __init__(self, dim: int, *, eps: float, affine: bool):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), F32)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), F32)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(F32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            h = h * self.scale.value.astype(F32) + self.bias.value.astype(F32)
        return h.astype(x.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis, computed in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype=F32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(F32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        return (h * self.scale.value.astype(F32)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)
