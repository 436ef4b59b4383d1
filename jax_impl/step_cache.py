"""Step caching in the manner of MagCache / TeaCache: which denoising steps skip the DiT, decided before the run.

Why before the run. The sampling loop never waits for the host (`jax_impl.sampling`), so a skip cannot hinge on a
value computed at step i. Both published methods decide from quantities that are fixed per model and schedule:
MagCache from a per-step magnitude ratio of the model's residual, calibrated once on one full run and reused for
every prompt; TeaCache (Wan2.1) from the change of the timestep embedding, which depends on the timestep alone.
Here the calibration is one full run of our sampler: per step and per branch (conditional, unconditional) the
norm of the predicted velocity and its relative change from the step before. A threshold then turns it into a
deterministic `SkipPlan` (which steps skip, and by how much a reused prediction is scaled), the same plan for
every run with that calibration, so a skipped step costs no model call and no host sync.

Decision (metric "magnitude", after MagCache): walking the steps after the last computed one, multiply the
calibrated ratios r_i = |v_i| / |v_{i-1}| into a running ratio R and add |1 - R| to a running error; a step is
skipped while that error stays below the threshold (every branch the step needs), and it reuses the last
computed prediction times R (the magnitude the calibration predicts for it). Metric "change" (after TeaCache):
the running error is the sum of the calibrated relative changes |v_i - v_{i-1}| / |v_{i-1}|, and the reused
prediction is not rescaled. Either way a computed step resets the running values.

Never skipped: step 0 (nothing to reuse), the first step of each expert of a Wan2.2 A14B (the cached prediction
would be the other expert's), the first step after the guidance cut (the prediction changes kind). With a
threshold, also the first `keep_first` steps (default 20% of them, where the predictions change fastest), the
last step, and more than `max_skips` steps in a row (default 2). A fixed list of steps (`--skip-steps`) must
avoid the never-skipped steps above; the other rules are the list's author's choice.

Calibrations are small JSON files keyed by the DiT configuration, the number of experts and the schedule
(scheduler kind, shift, steps, boundary, explicit timesteps): a file for another model or schedule is refused
with the fields that differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp

from weights.atomic import atomic_write

FORMAT = "wanport-step-cache-calibration"
VERSION = 1
METRICS = ("magnitude", "change")
DEFAULT_MAX_SKIPS = 2
KEEP_FIRST_FRACTION = 0.2
BRANCHES = ("cond", "uncond")


class StepCacheError(ValueError):
    """A calibration or skip list that cannot be used; the message names the problem and the fix."""


def default_keep_first(num_steps: int) -> int:
    """Steps never skipped at the start with a threshold: 20% of them (MagCache's retention), at least 1."""
    return max(1, round(KEEP_FIRST_FRACTION * num_steps))


def calibration_key(dit_config: Any, num_experts: int, schedule: Any, boundary_ratio: float | None) -> dict[str, Any]:
    """What a calibration is valid for: the DiT configuration (digest and a readable summary), the experts and
    the schedule. `dit_config` is a dataclass (`weights.configs.dit.DitConfig`), `schedule` a
    `jax_impl.schedulers.Schedule`."""
    cfg = dataclasses.asdict(dit_config)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    summary = (f"{cfg.get('num_layers')} layers x {cfg.get('num_attention_heads')} heads x "
               f"{cfg.get('attention_head_dim')}, in {cfg.get('in_channels')}")
    return {
        "dit": digest, "dit_summary": summary, "num_experts": int(num_experts),
        "boundary_ratio": boundary_ratio if num_experts == 2 else None,
        "scheduler": schedule.config.kind, "shift": float(schedule.config.shift), "steps": int(schedule.num_steps),
        "timesteps": None if schedule.unshifted is None else [float(u) for u in schedule.unshifted],
    }


_KEY_FIX = {"steps": "--steps", "shift": "--shift", "scheduler": "--scheduler", "timesteps": "--timesteps"}


@dataclasses.dataclass(frozen=True)
class CalibrationStep:
    """One step of the calibration run: norms of the predictions and their relative change from step i-1
    (None where a branch was not computed at i or i-1)."""

    i: int
    t: float
    expert: int
    guided: bool
    cond_norm: float
    uncond_norm: float | None = None
    cond_change: float | None = None
    uncond_change: float | None = None

    def norm(self, branch: str) -> float | None:
        return self.cond_norm if branch == "cond" else self.uncond_norm

    def change(self, branch: str) -> float | None:
        return self.cond_change if branch == "cond" else self.uncond_change


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per-step prediction norms and changes from one full run, valid for `key` (see `calibration_key`)."""

    key: dict[str, Any]
    steps: tuple[CalibrationStep, ...]
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    def ratio(self, i: int, branch: str) -> float | None:
        """|v_i| / |v_{i-1}| of `branch`, or None where either step lacks it."""
        if i < 1:
            return None
        a, b = self.steps[i].norm(branch), self.steps[i - 1].norm(branch)
        return None if a is None or b is None or b == 0 else a / b

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "key": self.key, "source": self.source,
                "steps": [dataclasses.asdict(s) for s in self.steps]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (the file appears whole or not at all)."""
        path = Path(path)
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise StepCacheError(f"step-cache calibration {path} does not exist; write one with `wanport generate ... "
                                 "--write-step-cache-calibration FILE` (a full run) or `wanport analyze fast-modes`")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise StepCacheError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(raw, str(path))

    @classmethod
    def from_json(cls, raw: Any, where: str = "calibration") -> "Calibration":
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise StepCacheError(f"{where}: not a step-cache calibration (no \"format\": \"{FORMAT}\")")
        if raw.get("version") != VERSION:
            raise StepCacheError(f"{where}: calibration version {raw.get('version')!r}, this wanport reads {VERSION}; "
                                 "calibrate again")
        key, rows = raw.get("key"), raw.get("steps")
        if not isinstance(key, dict) or not isinstance(rows, list) or not rows:
            raise StepCacheError(f"{where}: needs a \"key\" object and a non-empty \"steps\" list")
        names = {f.name for f in dataclasses.fields(CalibrationStep)}
        steps = []
        for k, row in enumerate(rows):
            if not isinstance(row, dict) or set(row) != names or row["i"] != k:
                raise StepCacheError(f"{where}: step {k} must be an object with exactly {sorted(names)} and i={k}")
            for f in ("cond_norm", "uncond_norm", "cond_change", "uncond_change"):
                v = row[f]
                if v is None and f != "cond_norm":
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise StepCacheError(f"{where}: step {k} {f} must be a finite number >= 0, got {v!r}")
            steps.append(CalibrationStep(**row))
        if len(steps) != key.get("steps"):
            raise StepCacheError(f"{where}: {len(steps)} steps recorded, its key says {key.get('steps')}")
        return cls(key, tuple(steps), raw.get("source") or {})

    def check_key(self, key: dict[str, Any], where: str = "calibration") -> None:
        """Refuse a calibration made for another model or schedule, naming what differs and the fix."""
        diff = [k for k in sorted(set(key) | set(self.key)) if k != "dit_summary" and key.get(k) != self.key.get(k)]
        if not diff:
            return
        parts = []
        for k in diff:
            mine, want = self.key.get(k), key.get(k)
            if k == "dit":
                mine, want = self.key.get("dit_summary", mine), key.get("dit_summary", want)
                parts.append(f"DiT config: calibrated on {mine} ({self.key.get('dit')}), this model is {want} "
                             f"({key.get('dit')})")
            else:
                parts.append(f"{_KEY_FIX.get(k, k)}: calibrated with {mine}, this run has {want}")
        raise StepCacheError(f"{where} was made for another model or schedule: {'; '.join(parts)}. Calibrate for this "
                             "one (`wanport generate ... --write-step-cache-calibration FILE`, same model and schedule)")


def _l2(v: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32))))


@jax.jit
def _norm(v: jax.Array) -> jax.Array:
    """|v| as a device scalar (one compiled program per shape, so a timed run compiles nothing after its first)."""
    return _l2(v)


@jax.jit
def _norm_and_change(v: jax.Array, prev: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(|v|, |v - prev| / |prev|) as device scalars."""
    return _l2(v), _l2(v - prev) / _l2(prev)


class CalibrationRecorder:
    """An `on_step` callback that records a calibration from a full run without waiting for the device: the norms
    and changes are computed as device scalars and read once, in `calibration()`, after the loop."""

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._prev: dict[str, Any] = {}

    def __call__(self, step: dict[str, Any]) -> None:
        if step.get("skipped"):
            raise StepCacheError("a calibration needs every step computed: calibrate without --step-cache/--skip-steps")
        row = {"i": int(step["i"]), "t": float(step["t"]), "expert": int(step["expert"]), "guided": bool(step["guided"])}
        present = {"cond": step["v_cond"], "uncond": step["v_uncond"] if step["guided"] else None}
        for b in BRANCHES:
            v = present[b]
            prev = self._prev.get(b)
            if v is None:
                row[f"{b}_norm"] = row[f"{b}_change"] = None
            elif prev is None:
                row[f"{b}_norm"], row[f"{b}_change"] = _norm(v), None
            else:
                row[f"{b}_norm"], row[f"{b}_change"] = _norm_and_change(v, prev)
            self._prev[b] = v
        self._rows.append(row)

    def calibration(self, key: dict[str, Any], source: dict[str, Any] | None = None) -> Calibration:
        if len(self._rows) != key["steps"]:
            raise StepCacheError(f"recorded {len(self._rows)} steps, the schedule has {key['steps']}")
        steps = tuple(CalibrationStep(**{k: (None if v is None else float(v)) if k.endswith(("_norm", "_change"))
                                         else v for k, v in r.items()}) for r in self._rows)
        return Calibration(dict(key), steps, dict(source or {}))


@dataclasses.dataclass(frozen=True)
class SkipPlan:
    """Which steps skip the DiT and how their reused predictions are scaled; fixed before the run.

    cond_scale / uncond_scale: per step (1.0 where computed); predicted_error: the running error the decision
    saw at each skipped step (0 elsewhere; None per step for a fixed list); source: how the plan was made.
    """

    num_steps: int
    skipped: tuple[int, ...]
    cond_scale: tuple[float, ...]
    uncond_scale: tuple[float, ...]
    predicted_error: tuple[float | None, ...]
    source: str

    def describe(self) -> str:
        steps = ",".join(map(str, self.skipped)) or "none"
        return f"step cache ({self.source}): skipping {len(self.skipped)} of {self.num_steps} steps: {steps}"


def protected_steps(kinds: Sequence[Any]) -> dict[int, str]:
    """{step: why it is never skipped} for the steps of a run (objects with .expert and .guided, as
    `jax_impl.sampling.step_kinds` gives them)."""
    out = {0: "step 0 has no earlier prediction to reuse"}
    for k in range(1, len(kinds)):
        if kinds[k].expert != kinds[k - 1].expert:
            out[k] = "the first step of the low-noise expert (the cached prediction is the other expert's)"
        elif kinds[k - 1].guided and not kinds[k].guided:
            out[k] = "the first step after the guidance cut (the prediction changes kind)"
    return out


def plan_from_list(steps: Iterable[int], kinds: Sequence[Any]) -> SkipPlan:
    """A fixed list of steps to skip (reused predictions not rescaled); refuses steps that must be computed."""
    n = len(kinds)
    steps = sorted(set(int(s) for s in steps))
    bad = [s for s in steps if not 0 <= s < n]
    if bad:
        raise StepCacheError(f"--skip-steps {bad}: steps are 0..{n - 1} (--steps {n})")
    protected = protected_steps(kinds)
    hit = [f"{s} ({protected[s]})" for s in steps if s in protected]
    if hit:
        raise StepCacheError(f"--skip-steps: these steps must be computed: {'; '.join(hit)}; drop them from the list")
    return SkipPlan(n, tuple(steps), (1.0,) * n, (1.0,) * n, (None,) * n, f"fixed list {','.join(map(str, steps))}")


def plan_from_calibration(calibration: Calibration, threshold: float, kinds: Sequence[Any], *,
                          max_skips: int = DEFAULT_MAX_SKIPS, keep_first: int | None = None,
                          metric: str = "magnitude") -> SkipPlan:
    """The steps whose running predicted error stays below `threshold` (see the module docstring)."""
    n = len(kinds)
    if metric not in METRICS:
        raise StepCacheError(f"--step-cache-metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise StepCacheError(f"--step-cache threshold must be a finite number > 0, got {threshold!r}")
    if len(calibration.steps) != n:
        raise StepCacheError(f"the calibration has {len(calibration.steps)} steps, this run {n}")
    keep_first = default_keep_first(n) if keep_first is None else keep_first
    never = set(protected_steps(kinds)) | set(range(min(keep_first, n))) | {n - 1}
    skipped: list[int] = []
    cond_scale, uncond_scale, errors = [1.0] * n, [1.0] * n, [0.0] * n
    ratio = {b: 1.0 for b in BRANCHES}
    error = {b: 0.0 for b in BRANCHES}
    run = 0
    for i, kind in enumerate(kinds):
        branches = BRANCHES if kind.guided else ("cond",)
        new_ratio, new_error = dict(ratio), dict(error)
        for b in branches:
            if metric == "magnitude":
                r = calibration.ratio(i, b)
                if r is None and i not in never:
                    raise _missing(b, i)
                new_ratio[b] *= r if r is not None else 1.0
                new_error[b] += abs(1.0 - new_ratio[b])
            else:
                c = calibration.steps[i].change(b)
                if c is None and i not in never:
                    raise _missing(b, i)
                new_error[b] += c if c is not None else 0.0
        worst = max(new_error[b] for b in branches)
        if i not in never and run < max_skips and worst < threshold:
            skipped.append(i)
            run += 1
            ratio, error = new_ratio, new_error
            errors[i] = worst
            if metric == "magnitude":
                cond_scale[i] = ratio["cond"]
                uncond_scale[i] = ratio["uncond"] if kind.guided else 1.0
        else:  # computed: the cache holds this step's prediction
            run = 0
            ratio = {b: 1.0 for b in BRANCHES}
            error = {b: 0.0 for b in BRANCHES}
    source = f"{metric} threshold {threshold:g}, at most {max_skips} in a row, first {keep_first} kept"
    return SkipPlan(n, tuple(skipped), tuple(cond_scale), tuple(uncond_scale), tuple(errors), source)


def _missing(branch: str, i: int) -> StepCacheError:
    what = "conditional" if branch == "cond" else "unconditional"
    return StepCacheError(f"the calibration has no {what} prediction at step {i} or {i - 1} (its run was not guided "
                          "there): calibrate with full guidance (no --guidance-steps)")
