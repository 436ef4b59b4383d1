"""cuDNN fused (flash) attention on NVIDIA GPUs behind `kernels.attention(..., backend="cudnn")`.

cuDNN's fused kernel only takes float16/bfloat16 and head_dim <= 128 (256 on Hopper+) in multiples of 8;
sequence lengths are free (no padding needed, unlike splash). float32 inputs are refused unless the caller opts in
with `cast_fp32=True`, because silently computing in bfloat16 would break float32 parity runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, cast_fp32: bool = False, mask: jax.Array | None = None
) -> jax.Array:
    """cuDNN attention; any sequence lengths. `cast_fp32=True` computes float32 inputs in bfloat16."""
    platform = jax.default_backend()
    if platform != "gpu":
        raise RuntimeError(
            f"attention backend 'cudnn' needs an NVIDIA GPU, but JAX's platform is {platform!r}; "
            "use backend='auto' or 'xla' (or 'splash' on TPU)"
        )
    dtype = jnp.dtype(q.dtype)
    if dtype not in HALF_DTYPES:
        if not cast_fp32:
            raise ValueError(
                f"cuDNN attention needs bfloat16 or float16 inputs, got {dtype}; cast them, pass "
                "cast_fp32=True to compute in bfloat16, or use backend='xla' for float32 accuracy"
            )
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    return out.astype(dtype)


__all__ = ["cudnn_attention"]
