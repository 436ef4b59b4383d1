"""The parity report: one row per captured layer, the first layer past tolerance, table and JSON.

Every model (DiT, VAE, pipelines) reports through this type so CI and users read one format:
JSON with `layers` (each `name`, `shape`, `max_abs`, `rel_l2`, `cosine`, `tol`, `passed`),
`worst_rel_l2`, `first_failure` and `passed`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable

from parity.metrics import compare
from weights.atomic import atomic_write


@dataclasses.dataclass
class LayerResult:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel_l2: float
    cosine: float
    tol: float
    passed: bool
    ref_rel_l2: float | None = None  # bf16 mode: the reference implementation's own error at this layer


@dataclasses.dataclass
class Report:
    layers: list[LayerResult]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.layers) and all(layer.passed for layer in self.layers)

    @property
    def worst_rel_l2(self) -> float:
        return max((layer.rel_l2 for layer in self.layers), default=float("nan"))

    @property
    def first_failure(self) -> str | None:
        return next((layer.name for layer in self.layers if not layer.passed), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "worst_rel_l2": self.worst_rel_l2,
            "first_failure": self.first_failure,
            "meta": self.meta,
            "layers": [dataclasses.asdict(layer) | {"shape": list(layer.shape)} for layer in self.layers],
        }

    def write_json(self, path: str | os.PathLike) -> None:
        """Write the report as JSON, atomically (serialised first: a bad value leaves no file behind)."""
        text = json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n"
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(text)

    def table(self) -> str:
        has_ref = any(layer.ref_rel_l2 is not None for layer in self.layers)
        head = f"{'layer':<28} {'shape':<20} {'max_abs':>10} {'rel_l2':>10} {'cosine':>10} {'tol':>9}"
        head += f" {'torch_err':>10}" if has_ref else ""
        lines = [head + "  ok", "-" * len(head) + "----"]
        for r in self.layers:
            row = (
                f"{r.name:<28} {str(tuple(r.shape)):<20} {r.max_abs:>10.3e} {r.rel_l2:>10.3e} "
                f"{r.cosine:>10.7f} {r.tol:>9.1e}"
            )
            if has_ref:
                row += f" {r.ref_rel_l2:>10.3e}" if r.ref_rel_l2 is not None else f" {'-':>10}"
            lines.append(row + ("  ok" if r.passed else "  FAIL"))
        verdict = "PASSED" if self.passed else f"FAILED (first diverging layer: {self.first_failure})"
        lines.append(f"worst rel_l2 {self.worst_rel_l2:.3e}; parity {verdict}")
        return "\n".join(lines)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def compare_layers(
    candidate: dict[str, Any],
    reference: dict[str, Any],
    tol: float | dict[str, float],
    order: Iterable[str] | None = None,
) -> list[LayerResult]:
    """Compare same-named tensors; a layer missing on either side is an error, not a silent skip."""
    names = list(order) if order is not None else list(reference)
    missing = [n for n in names if n not in candidate or n not in reference]
    if missing:
        raise KeyError(f"layers captured on one side only: {missing}")
    out = []
    for name in names:
        m = compare(candidate[name], reference[name])
        t = tol[name] if isinstance(tol, dict) else tol
        ok = math.isfinite(m["rel_l2"]) and m["rel_l2"] <= t
        out.append(LayerResult(name=name, shape=tuple(reference[name].shape), tol=t, passed=ok, **m))
    return out


def measured_bf16_layers(
    ours: dict[str, Any], ref: dict[str, Any], theirs: dict[str, Any], order: list[str], factor: float, floor: float
) -> list[LayerResult]:
    """bf16 parity with a measured tolerance: ours vs the fp32 reference must be within `factor` times the
    reference implementation's own bf16 error at that layer (`floor` keeps exact layers from needing 0)."""
    ref_err = {r.name: r.rel_l2 for r in compare_layers(theirs, ref, float("inf"), order)}
    tol = {n: max(factor * e, floor) for n, e in ref_err.items()}
    layers = compare_layers(ours, ref, tol, order)
    for layer in layers:
        layer.ref_rel_l2 = ref_err[layer.name]
    return layers
