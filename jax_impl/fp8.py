"""FP8 (e4m3) linear layers for Hopper: quantise, the scaled FP8 matmul, and an NNX layer that runs it.

`fp8_dense` is written so that XLA's GPU GEMM rewriter emits one cuBLASLt FP8 GEMM (`__cublas$lt$matmul$f8`):
a `dot_general` on two float8_e4m3fn operands, accumulating in float32 inside and writing bf16, with the
activation and weight scales applied to its output in one fused elementwise pass, the pattern measured on an
H100 at 1.3-1.6x the bf16 GEMM at the A14B's shapes (bench/NOTES.md, "FP8 GEMMs"). Activations are
quantised on the fly from their own maximum, per token (one scale per row, the default) or per tensor;
weights once, per output channel (default) or per tensor. The arithmetic is weights/fp8.py's, bit for bit.

Which layers: `weights.fp8.is_fp8_linear` (the blocks' attention and feed-forward linears; its docstring says
why the embeddings, time projection and head stay bf16). `quantize_model` swaps those `Dense` modules of a
loaded model for `Fp8Dense` in place, so any checkpoint can run in FP8 without an FP8 file.

Wiring into the DiT: the self-attention q/k/v and the cross-attention k/v go through `fused_dense` from here
(jax_impl/dit.py imports it), which fuses FP8 layers in FP8 and plain `Dense` ones as `layers.fused_dense` does;
concatenating e4m3 kernels as plain ones would multiply them unscaled.

High-precision first/last steps (xDiT runs them unquantised) are a sampling choice: `step_uses_fp8` says which
steps run in FP8, and a sampler alternates between two models (an FP8 one and a bf16 one kept on the host,
as the idle A14B expert already is) or, sparing the second copy, `set_act_scaling(model, None)` runs the same
FP8 weights with bf16 activations (weight-only; one more compiled step, no extra memory).
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.layers import Dense, dense
from jax_impl.layers import fused_dense as _plain_fused_dense
from weights.fp8 import E4M3_MAX, INV_E4M3_MAX, SCALINGS, is_fp8_linear

E4M3 = jnp.float8_e4m3fn
F32 = jnp.float32
ACT_SCALINGS = ("token", "tensor", None)  # None: weight-only FP8, bf16 activations and matmul


def quantize(x: jax.Array, scale: jax.Array) -> jax.Array:
    """e4m3(clip(x / scale, -448, 448)) in float32; the clip keeps values past 448 from becoming NaN."""
    return jnp.clip(x.astype(F32) / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def dequantize(q: jax.Array, scale: jax.Array, dtype=F32) -> jax.Array:
    """q * scale, computed in float32, returned in `dtype`."""
    return (q.astype(F32) * scale).astype(dtype)


def amax_scale(amax: jax.Array) -> jax.Array:
    """amax / 448 (as weights.fp8 computes it), or 1 where amax is 0 (an all-zero row or channel gives zeros)."""
    return jnp.where(amax > 0, amax.astype(F32) * INV_E4M3_MAX, jnp.float32(1.0))


def quantize_activation(x: jax.Array, scaling: str = "token") -> tuple[jax.Array, jax.Array]:
    """x -> (e4m3 x, float32 scale): one scale per token ([..., 1], the max over the last axis) or per tensor ([])."""
    h = x.astype(F32)
    if scaling == "token":
        scale = amax_scale(jnp.max(jnp.abs(h), axis=-1, keepdims=True))
    elif scaling == "tensor":
        scale = amax_scale(jnp.max(jnp.abs(h)))
    else:
        raise ValueError(f"activation scaling must be 'token' or 'tensor', got {scaling!r}")
    return quantize(h, scale), scale


def quantize_weight(kernel: jax.Array, scaling: str = "channel") -> tuple[jax.Array, jax.Array]:
    """kernel [..., in, out] -> (e4m3 kernel, float32 scale [..., out] per output channel or [...] per tensor).

    Leading axes (a scan-stacked model's layer axis) get their own scales; such kernels are converted one
    slice at a time, so the float32 temporary is one layer's, not the stack's."""
    if scaling not in SCALINGS:
        raise ValueError(f"weight scaling must be one of {SCALINGS}, got {scaling!r}")
    if kernel.ndim < 2:
        raise ValueError(f"a kernel has shape [..., in, out], got {kernel.shape}")
    if kernel.ndim > 2:
        parts = [quantize_weight(k, scaling) for k in kernel]  # one compiled 2D conversion, reused per layer
        return jnp.stack([q for q, _ in parts]), jnp.stack([s for _, s in parts])
    return _quantize_2d(kernel, scaling)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_2d(kernel: jax.Array, scaling: str) -> tuple[jax.Array, jax.Array]:
    h = kernel.astype(F32)
    if scaling == "channel":
        scale = amax_scale(jnp.max(jnp.abs(h), axis=0))
    else:
        scale = amax_scale(jnp.max(jnp.abs(h)))
    return quantize(h, scale), scale


def fp8_dense(
    x: jax.Array,
    kernel: jax.Array,
    kernel_scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    act_scaling: str | None = "token",
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """x @ (kernel * kernel_scale) + bias with an e4m3 `kernel` [in, out] and float32 `kernel_scale` [out] or [].

    x [..., in] is quantised per token or per tensor (`act_scaling`), the e4m3 x e4m3 matmul accumulates in
    float32 and writes `out_dtype` (bf16: the cuBLASLt FP8 GEMM's output), the scales multiply its output in
    float32, the bias is added in `out_dtype`. `act_scaling=None` dequantises the kernel and runs a
    half-precision matmul instead (weight-only FP8)."""
    out_dtype = jnp.dtype(out_dtype)
    if act_scaling is None:
        return dense(x, dequantize(kernel, kernel_scale, out_dtype), None if bias is None else bias.astype(out_dtype))
    lead, d_in = x.shape[:-1], x.shape[-1]
    x8, x_scale = quantize_activation(x.reshape(-1, d_in), act_scaling)  # 2D: the shape the GEMM rewriter matches
    y = jax.lax.dot_general(x8, kernel, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)
    y = (y.astype(F32) * x_scale * kernel_scale).astype(out_dtype).reshape(*lead, -1)
    return y if bias is None else y + bias.astype(out_dtype)


class Fp8Dense(nnx.Module):
    """y = x @ (kernel * kernel_scale) + bias in FP8: the call of `layers.Dense`, e4m3 kernel [in, out], float32
    kernel_scale [out] (per output channel) or [] (per tensor); see `fp8_dense`. `dtype` is the output and
    bias dtype. Built from arrays, usually by `from_dense`; leading (scan-stacked) axes are allowed."""

    def __init__(self, kernel: jax.Array, kernel_scale: jax.Array, bias: jax.Array | None = None, *,
                 act_scaling: str | None = "token", dtype=jnp.bfloat16):
        if kernel.dtype != E4M3:
            raise ValueError(f"Fp8Dense needs a float8_e4m3fn kernel, got {kernel.dtype}; quantise with quantize_weight")
        if act_scaling not in ACT_SCALINGS:
            raise ValueError(f"activation scaling must be one of {ACT_SCALINGS}, got {act_scaling!r}")
        lead, d_out = kernel.shape[:-2], kernel.shape[-1]
        if tuple(kernel_scale.shape) not in (lead, lead + (d_out,)):
            raise ValueError(
                f"kernel_scale of shape {kernel_scale.shape} does not fit kernel {kernel.shape}: "
                f"expected {lead + (d_out,)} (per output channel) or {lead} (per tensor)"
            )
        if bias is not None and tuple(bias.shape) != lead + (d_out,):
            raise ValueError(f"bias of shape {bias.shape} does not fit kernel {kernel.shape}")
        self.dtype = jnp.dtype(dtype)
        self.act_scaling = act_scaling
        self.kernel = nnx.Param(kernel)
        self.kernel_scale = nnx.Param(kernel_scale.astype(F32))
        self.bias = nnx.Param(bias.astype(self.dtype)) if bias is not None else None

    @classmethod
    def from_dense(cls, layer: Dense, *, weight_scaling: str = "channel", act_scaling: str | None = "token",
                   dtype=None) -> "Fp8Dense":
        """Quantise a loaded `Dense` (any float kernel dtype). `dtype` defaults to the Dense's kernel dtype, so a
        bf16 model stays bf16 between layers (and a float32 one float32)."""
        kernel = layer.kernel[...]
        q, scale = quantize_weight(kernel, weight_scaling)
        return cls(q, scale, layer.bias[...], act_scaling=act_scaling, dtype=dtype or kernel.dtype)

    def dequantized_kernel(self, dtype=F32) -> jax.Array:
        """kernel * kernel_scale in `dtype` (the weight this layer multiplies by)."""
        scale = self.kernel_scale[...]
        per_channel = scale.ndim == self.kernel.ndim - 1
        return dequantize(self.kernel[...], scale[..., None, :] if per_channel else scale[..., None, None], dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return fp8_dense(x, self.kernel[...], self.kernel_scale[...], bias, act_scaling=self.act_scaling,
                         out_dtype=self.dtype)

    @staticmethod
    def fused(x: jax.Array, layers: "list[Fp8Dense]") -> list[jax.Array]:
        """Several Fp8Dense on one input as one GEMM (x quantised once): kernels and biases concatenated, a
        per-tensor scale widened to its layer's channels. Equals calling each layer."""
        first = layers[0]
        if any((d.act_scaling, d.dtype) != (first.act_scaling, first.dtype) for d in layers):
            return [d(x) for d in layers]
        widths = [d.kernel.shape[-1] for d in layers]
        kernel = jnp.concatenate([d.kernel[...] for d in layers], axis=-1)
        scale = jnp.concatenate([jnp.broadcast_to(d.kernel_scale[...], (w,)) for d, w in zip(layers, widths)])
        bias = None
        if all(d.bias is not None for d in layers):
            bias = jnp.concatenate([d.bias[...] for d in layers])
        elif any(d.bias is not None for d in layers):
            bias = jnp.concatenate([d.bias[...] if d.bias is not None else jnp.zeros((w,), first.dtype)
                                    for d, w in zip(layers, widths)])
        y = fp8_dense(x, kernel, scale, bias, act_scaling=first.act_scaling, out_dtype=first.dtype)
        return jnp.split(y, list(itertools.accumulate(widths))[:-1], axis=-1)


def fused_dense(x: jax.Array, layers: list) -> list[jax.Array]:
    """`layers.fused_dense` for any mix of layers: FP8 ones fused by `Fp8Dense.fused`, plain `Dense` ones by the
    plain version, a mix layer by layer."""
    if all(isinstance(d, Fp8Dense) for d in layers):
        return Fp8Dense.fused(x, layers)
    if all(type(d) is Dense for d in layers):
        return _plain_fused_dense(x, layers)
    return [d(x) for d in layers]


# ------------------------------------------------------------------------------------------------------------
# whole models
def dense_layers(model: nnx.Module) -> Iterator[tuple[str, nnx.Module, str, Dense]]:
    """Every `Dense` of `model` as (dotted path, parent module, attribute name, layer), in a stable order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense) and path:
            parent = model
            for key in path[:-1]:
                parent = getattr(parent, key) if isinstance(key, str) else parent[key]
            yield ".".join(str(p) for p in path), parent, path[-1], node


def quantize_model(
    model: nnx.Module,
    *,
    weight_scaling: str = "channel",
    act_scaling: str | None = "token",
    select: Callable[[str], bool] = is_fp8_linear,
) -> list[str]:
    """Replace, in place, every `Dense` of `model` whose path `select` accepts by its `Fp8Dense`; returns the
    paths replaced. Each bf16 kernel is released as soon as its FP8 copy exists, so the peak is the model
    plus one layer's conversion. Raises if nothing matched (a model this predicate does not know)."""
    if weight_scaling not in SCALINGS:
        raise ValueError(f"weight scaling must be one of {SCALINGS}, got {weight_scaling!r}")
    if act_scaling not in ACT_SCALINGS:
        raise ValueError(f"activation scaling must be one of {ACT_SCALINGS}, got {act_scaling!r}")
    targets = [(path, parent, name) for path, parent, name, _ in dense_layers(model) if select(path)]
    if not targets:
        raise ValueError(f"no Dense layer of {type(model).__name__} is selected for FP8; check the `select` predicate")
    for path, parent, name in targets:
        layer = getattr(parent, name)
        setattr(parent, name, Fp8Dense.from_dense(layer, weight_scaling=weight_scaling, act_scaling=act_scaling))
        del layer
    return [path for path, _, _ in targets]


def fp8_layers(model: nnx.Module) -> list[tuple[str, Fp8Dense]]:
    return [(".".join(str(p) for p in path), node) for path, node in nnx.iter_graph(model) if isinstance(node, Fp8Dense)]


def set_act_scaling(model: nnx.Module, act_scaling: str | None) -> None:
    """Switch every Fp8Dense of `model` to per-token, per-tensor or no (None: weight-only) activation scaling;
    the next jitted call compiles once for the new setting."""
    if act_scaling not in ACT_SCALINGS:
        raise ValueError(f"activation scaling must be one of {ACT_SCALINGS}, got {act_scaling!r}")
    for _, layer in fp8_layers(model):
        layer.act_scaling = act_scaling


def step_uses_fp8(step: int, num_steps: int, *, high_precision_first: int = 0, high_precision_last: int = 0) -> bool:
    """Whether sampling step `step` (0-based, of `num_steps`) runs in FP8 when the first and last few run in high
    precision (xDiT's option: the first steps set the layout, the last the fine detail)."""
    if not 0 <= step < num_steps:
        raise ValueError(f"step {step} is outside 0..{num_steps - 1}")
    return high_precision_first <= step < num_steps - high_precision_last


__all__ = [
    "Fp8Dense",
    "dequantize",
    "fp8_dense",
    "fp8_layers",
    "fused_dense",
    "is_fp8_linear",
    "quantize",
    "quantize_activation",
    "quantize_model",
    "quantize_weight",
    "set_act_scaling",
    "step_uses_fp8",
]
