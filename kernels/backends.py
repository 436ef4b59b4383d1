"""Attention on one device: the back-end registry and the local call behind `kernels.attention`.

Layout is `[batch, seq, heads, head_dim]`, as `jax.nn.dot_product_attention`. Back-ends register in
`BACKENDS`; `backend="auto"` picks the fastest one the current platform and dtype support:
cuDNN on NVIDIA GPUs (half precision only), Splash on TPU, the plain XLA reference otherwise. `cudnn_fp8`
(cuDNN's FP8 flash attention, inference only) is used only when named. `local_attention` is what both
`kernels.attention` and each device of `kernels.context_parallel` run.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kernels.cudnn import HALF_DTYPES, cudnn_attention
from kernels.cudnn_fp8 import cudnn_fp8_attention
from kernels.splash import splash_attention

AttentionFn = Callable[..., jax.Array]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Plain softmax(q k^T / sqrt(d)) v. Materialises the score matrix: the reference, not a GPU path."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


BACKENDS: dict[str, AttentionFn] = {
    "xla": xla_attention,
    "cudnn": cudnn_attention,
    "cudnn_fp8": cudnn_fp8_attention,  # never picked by "auto": FP8 error is a choice (kernels/cudnn_fp8.py)
    "splash": splash_attention,
}


def available_backends() -> list[str]:
    """Back-ends that can run on the default JAX platform (splash runs anywhere, interpreted off TPU)."""
    return [name for name in BACKENDS if _supported(name)]


def _supported(name: str) -> bool:
    platform = jax.default_backend()
    if name.startswith("cudnn"):
        return platform == "gpu"
    return True


def _auto(dtype: Any = None) -> str:
    """cuDNN on GPU for half-precision inputs (it has no float32 kernel), splash on TPU, else xla."""
    platform = jax.default_backend()
    if platform == "gpu" and "cudnn" in BACKENDS and (dtype is None or jnp.dtype(dtype) in HALF_DTYPES):
        return "cudnn"
    if platform == "tpu" and "splash" in BACKENDS:
        return "splash"
    return "xla"


def resolve_backend(backend: str, dtype: Any = None) -> str:
    """The concrete back-end name `backend` stands for on this platform (and for inputs of `dtype`)."""
    name = _auto(dtype) if backend == "auto" else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    return name


def _accepted_options(fn: AttentionFn) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def local_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "auto", mask: jax.Array | None = None, **options
) -> jax.Array:
    """Attention on the local device with the back-end `backend` stands for (inputs already checked by
    `kernels.attention`). An explicitly named back-end rejects options it does not know; with
    backend="auto" options meant for a back-end that was not chosen are dropped. `mask` is never dropped:
    a back-end that cannot apply it raises instead."""
    name = resolve_backend(backend, q.dtype)
    fn = BACKENDS[name]
    accepted = _accepted_options(fn)
    if mask is not None:
        if "mask" not in accepted:
            raise ValueError(f"attention backend {name!r} cannot apply a mask; use backend='xla' or 'cudnn'")
        options = dict(options, mask=mask)
    unknown = set(options) - accepted
    if unknown:
        if backend != "auto":
            raise TypeError(
                f"attention backend {name!r} does not take option(s) {sorted(unknown)}; "
                f"it takes {sorted(accepted) or 'none'}"
            )
        options = {key: val for key, val in options.items() if key in accepted}
    return fn(q, k, v, **options).astype(q.dtype)


__all__ = ["local_attention", "available_backends", "resolve_backend", "BACKENDS", "xla_attention"]
