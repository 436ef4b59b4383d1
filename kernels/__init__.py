"""Attention back-ends behind one call: `kernels.attention(q, k, v, backend=...)`.

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

from kernels.attention import BACKENDS, attention, available_backends  # noqa: E402

__all__ = ["attention", "available_backends", "BACKENDS", "WANPORT_KERNELS"]
