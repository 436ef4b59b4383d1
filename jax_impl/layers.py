"""Small building blocks shared by the Wan models: dense layers and norms with explicit dtypes.

Why not `nnx.Linear`: parameters may stay float32 while activations are bfloat16, per layer, and the
output dtype is chosen for speed on the GPU (see `dense`).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x @ kernel (+ bias) in the kernel's dtype; the matmul accumulates in float32 either way.

    float32 kernels: float32 all through. Half-precision kernels: the matmul writes half-precision output
    (cuBLAS accumulates in float32 inside) and the bias is added to it. Asking XLA for a float32 output
    instead doubles the bytes of the largest activations (the 13824-wide feed-forward) and costs a
    rounding pass; measured on an H100 that is 2.5-4% of a Wan forward. The bf16 parity tolerance
    (parity.report.measured_bf16_layers) covers the one extra rounding of the bias add.
    """
    if kernel.dtype == F32:
        y = jnp.einsum("...i,io->...o", x.astype(F32), kernel, preferred_element_type=F32)
        return y if bias is None else y + bias.astype(F32)
    y = jnp.einsum("...i,io->...o", x.astype(kernel.dtype), kernel)
    return y if bias is None else y + bias.astype(kernel.dtype)


def fused_dense(x: jax.Array, layers: "list[Dense]") -> list[jax.Array]:
    """Several Dense layers applied to the same input as one matmul: x is read once and the GEMM is wider
    (self-attention q, k, v: about 1-2% of a Wan forward on an H100). The same arithmetic as calling each
    layer; in half precision the matmul may round differently (a few 1e-3 relative), as any GEMM tiling can."""
    kernel = jnp.concatenate([d.kernel.value for d in layers], axis=1)
    bias = jnp.concatenate([d.bias.value for d in layers])
    y = dense(x, kernel, bias)
    cuts = list(itertools.accumulate(d.kernel.value.shape[1] for d in layers))[:-1]
    return jnp.split(y, cuts, axis=-1)


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel stored `[in, out]` (see `dense` for the dtype rules)."""

    def __init__(self, d_in: int, d_out: int, *, param_dtype=F32, rngs: nnx.Rngs):
        scale = d_in**-0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (d_in, d_out), F32, -scale, scale).astype(param_dtype))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (d_out,), F32, -scale, scale).astype(param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(x, self.kernel.value, self.bias.value)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """Non-affine LayerNorm over the last axis, computed and returned in float32 (the DiT's modulated norms
    scale and shift the float32 result before rounding; `LayerNorm` applies its affine and rounds)."""
    h = x.astype(F32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (as diffusers' FP32LayerNorm), optional affine, output in x's dtype."""

    def __init__(self, dim: int, *, eps: float, affine: bool):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), F32)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), F32)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = layer_norm(x, self.eps)
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


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' activation names (config.json `hidden_act` / `dense_act_fn`) -> the function they compute.
# gelu_new and gelu_pytorch_tanh are the same tanh approximation (written differently in torch).
ACTIVATIONS = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": gelu_exact,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
