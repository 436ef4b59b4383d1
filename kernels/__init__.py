"""Attention back-ends behind one call: `kernels.attention(q, k, v, backend=...)`.

`attention` checks its inputs, then runs on the local device (`kernels.backends`) or, given a
`sequence_split`, context-parallel over a device mesh (`kernels.context_parallel`), which runs the same
local attention on each device. Both import downwards; nothing in the package imports this module.

This top-level name can collide with Hugging Face's `kernels` distribution. If that distribution is
installed in the same environment it may overwrite or shadow these files, so we refuse to start with
a message that says how to fix it instead of failing later with an unrelated AttributeError.
"""

from __future__ import annotations

import importlib.metadata as _md


def _check_no_hf_kernels() -> None:
    try:
        dist = _md.distribution("kernels")
    except _md.PackageNotFoundError:
        return
    raise ImportError(
        f"Hugging Face's `kernels` distribution (version {dist.version}) is installed in this environment and "
        "shares the top-level package name `kernels` with wanport's attention back-ends. "
        "Fix: `pip uninstall kernels` here, or install wanport in its own virtual environment."
    )


_check_no_hf_kernels()

WANPORT_KERNELS = True  # marker: lets importers verify they got this package, not a namesake

import jax  # noqa: E402

from kernels.backends import BACKENDS, available_backends, local_attention  # noqa: E402
from kernels.context_parallel import SequenceSplit, split_attention  # noqa: E402


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    backend: str = "auto",
    mask: jax.Array | None = None,
    sequence_split: SequenceSplit | None = None,
    **options,
) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v over `[batch, seq, heads, head_dim]` inputs.

    q may have a different sequence length than k/v (cross-attention). The output has q's shape/dtype.
    `options` go to the back-end (e.g. splash's `block_q`, `block_kv`, `interpret`; cudnn's
    `cast_fp32`). An explicitly named back-end rejects options it does not know; with
    backend="auto" options meant for a back-end that was not chosen are dropped, so one call site
    can carry tuning for every platform. `mask` (boolean, broadcastable to [batch, heads, q_len, k_len],
    True = attend) is never dropped: a back-end that cannot apply it raises instead.
    `sequence_split` (a `kernels.context_parallel.SequenceSplit`) runs it context-parallel: q split by
    sequence over a mesh axis, K/V gathered (self-attention) or replicated (cross-attention), then the
    same local attention runs on each device.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants [batch, seq, heads, head_dim] inputs, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention shapes do not agree: q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"attention needs non-empty sequences: q {q.shape}, k {k.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention wants one dtype for q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    if sequence_split is not None:
        return split_attention(q, k, v, sequence_split, backend=backend, mask=mask, **options)
    return local_attention(q, k, v, backend=backend, mask=mask, **options)


__all__ = ["attention", "available_backends", "BACKENDS", "SequenceSplit", "WANPORT_KERNELS"]
