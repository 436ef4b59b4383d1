"""cuDNN FP8 flash attention (Hopper) behind `kernels.attention(..., backend="cudnn_fp8")`: inference only.

q, k and v are quantised to e4m3 per tensor from their own maxima; cuDNN computes q k^T in FP8 with float32
accumulation, the softmax, P = exp(s - max) quantised to e4m3 at scale 256 (P <= 1, so it never saturates),
P v, and writes the output in e4m3 at v's scale: each output row is a convex combination of v's rows, so
|o| <= max|v| and that scale never saturates either. The output is dequantised to q's dtype.

This goes through JAX's private `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(use_fp8=True)`,
which may change between JAX versions; bench/fp8.py (attention part) measures its speed and error against a
float32 reference before anyone relies on it. No masks, no float32 path, forward only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
P_SCALE = 256.0  # probabilities in [0, 1] -> [0, 256]: a power of two, so the descale 1/256 is exact


def quantize_per_tensor(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x -> (e4m3 x, float32 scale []), the per-tensor case of jax_impl.fp8.quantize_activation (kernels/ imports
    nothing above it; tests/test_fp8.py checks the two agree)."""
    h = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(h))
    scale = jnp.where(amax > 0, amax * jnp.float32(1.0 / E4M3_MAX), jnp.float32(1.0))
    return jnp.clip(h / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3), scale


def fp8_attention_params(q_scale: jax.Array, k_scale: jax.Array, v_scale: jax.Array) -> dict[str, jax.Array]:
    """The scale dict cuDNN's FP8 attention takes (every key, shape [1, 1, 1, 1] float32).

    descale_x turns stored x back into real values (x_real = x8 * descale_x); scale_x turns real values into
    stored ones. The output is stored at v's scale (scale_o = 1 / v_scale). Backward-pass entries are 1."""
    one = jnp.ones((1, 1, 1, 1), jnp.float32)
    as4 = lambda s: jnp.reshape(s, (1, 1, 1, 1)).astype(jnp.float32)  # noqa: E731
    from jax._src.cudnn.fused_attention_stablehlo import fp8_params_keys

    params = {key: one for key in fp8_params_keys}
    params.update(
        descale_q=as4(q_scale), descale_k=as4(k_scale), descale_v=as4(v_scale),
        descale_s=one / P_SCALE, scale_s=one * P_SCALE, scale_o=1.0 / as4(v_scale),
    )
    return params


def cudnn_fp8_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v through cuDNN's FP8 flash attention; [batch, seq, heads, head_dim] in, q's dtype out."""
    platform = jax.default_backend()
    if platform != "gpu":
        raise RuntimeError(
            f"attention backend 'cudnn_fp8' needs an NVIDIA Hopper (or newer) GPU, but JAX's platform is {platform!r}; "
            "use backend='auto', 'xla' or 'cudnn'"
        )
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention

    (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(x) for x in (q, k, v))
    out8, _amax_s, _amax_o = dot_product_attention(
        q8, k8, v8, fp8_params=fp8_attention_params(sq, sk, sv), scale=1.0 / math.sqrt(q.shape[-1]),
        qkv_layout="BTNH", use_fp8=True,
    )
    return (out8.astype(jnp.float32) * sv).astype(q.dtype)


__all__ = ["cudnn_fp8_attention", "fp8_attention_params", "quantize_per_tensor"]
