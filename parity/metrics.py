"""Error metrics between a candidate tensor and a reference, computed in float64 on the host."""

from __future__ import annotations

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def max_abs(x, ref) -> float:
    x, ref = _f64(x), _f64(ref)
    return float(np.max(np.abs(x - ref))) if x.size else 0.0


def rel_l2(x, ref) -> float:
    """||x - ref|| / ||ref||; inf if ref is zero and x is not, 0 if both are zero. NaN anywhere gives NaN."""
    x, ref = _f64(x), _f64(ref)
    num, den = np.linalg.norm((x - ref).ravel()), np.linalg.norm(ref.ravel())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(num / den)


def cosine(x, ref) -> float:
    x, ref = _f64(x).ravel(), _f64(ref).ravel()
    nx, nr = np.linalg.norm(x), np.linalg.norm(ref)
    if nx == 0.0 or nr == 0.0:
        return 1.0 if nx == nr else 0.0
    return float(np.dot(x, ref) / (nx * nr))


def compare(x, ref) -> dict[str, float]:
    x, ref = np.asarray(x), np.asarray(ref)
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: candidate {x.shape} vs reference {ref.shape}")
    return {"max_abs": max_abs(x, ref), "rel_l2": rel_l2(x, ref), "cosine": cosine(x, ref)}
