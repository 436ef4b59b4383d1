"""The one attention entry point used by every model in `jax_impl`.

Layout is `[batch, seq, heads, head_dim]`, as `jax.nn.dot_product_attention`. Back-ends register in
`BACKENDS`; `backend="auto"` picks the fastest one the current platform supports.
"""

from __future__ import annotations

from typing import Callable

import jax

AttentionFn = Callable[..., jax.Array]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain softmax(q k^T / sqrt(d)) v. Materialises the score matrix: the reference, not a GPU path."""
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


BACKENDS: dict[str, AttentionFn] = {"xla": xla_attention}


def available_backends() -> list[str]:
    """Back-ends that can run on the default JAX platform."""
    return [name for name in BACKENDS if _supported(name)]


def _supported(name: str) -> bool:
    platform = jax.default_backend()
    if name == "cudnn":
        return platform == "gpu"
    return True


def _auto() -> str:
    platform = jax.default_backend()
    if platform == "gpu" and "cudnn" in BACKENDS:
        return "cudnn"
    if platform == "tpu" and "splash" in BACKENDS:
        return "splash"
    return "xla"


def resolve_backend(backend: str) -> str:
    name = _auto() if backend == "auto" else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    return name


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "auto", **options) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v over `[batch, seq, heads, head_dim]` inputs.

    q may have a different sequence length than k/v (cross-attention). The output has q's shape/dtype.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants [batch, seq, heads, head_dim] inputs, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention shapes do not agree: q {q.shape}, k {k.shape}, v {v.shape}")
    return BACKENDS[resolve_backend(backend)](q, k, v, **options).astype(q.dtype)


__all__ = ["attention", "available_backends", "resolve_backend", "BACKENDS", "xla_attention"]
