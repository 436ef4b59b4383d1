"""The options of one generation, and the checks of their types and ranges, in one place.

`GenerateSettings` is plain data (no jax at import), so the command line builds and validates it before
anything heavy starts; the checks that need the checkpoint (4k+1 frames, sizes against the VAE and patch,
which images it takes) are `jax_impl.pipeline.Pipeline.check_settings`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from weights.configs.scheduler import KINDS as SCHEDULER_KINDS

MAX_SEED = 2**32 - 1  # JAX's default PRNG keys hold 32 bits: larger seeds would alias smaller ones
MAX_FPS = 1000


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{_flag(name)} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{_flag(name)} must be {bound}, got {value}")


def _check_float(name: str, value: Any, lo: float, *, above: bool = False) -> None:
    """A finite number >= lo (> lo with `above`): nan and inf are refused, never passed on to sampling."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{_flag(name)} must be a number, got {value!r}")
    if not math.isfinite(value) or value < lo or (above and value == lo):
        raise ValueError(f"{_flag(name)} must be a finite number {'>' if above else '>='} {lo:g}, got {value}")


STEP_CACHE_METRICS = ("magnitude", "change")  # jax_impl.step_cache.METRICS (kept jax-free here)


@dataclasses.dataclass(frozen=True)
class StepCacheSettings:
    """Step caching (`jax_impl.step_cache`): skip the DiT on steps whose predicted change is small. Either a
    `threshold` on the running error predicted by the `calibration` file (a full run's per-step prediction
    norms), or a fixed list of `skip_steps`. `max_skips`, `keep_first` and `metric` shape the threshold's
    decision (keep_first None: 20% of the steps)."""

    threshold: float | None = None
    calibration: str | None = None
    skip_steps: tuple[int, ...] | None = None
    max_skips: int = 2
    keep_first: int | None = None
    metric: str = "magnitude"

    def __post_init__(self) -> None:
        if self.skip_steps is not None:
            object.__setattr__(self, "skip_steps", tuple(self.skip_steps))
        self.validate()

    def validate(self, steps: int | None = None) -> None:
        if self.skip_steps is not None:
            if self.threshold is not None:
                raise ValueError("--skip-steps and --step-cache THRESHOLD both choose the skipped steps; give one")
            for s in self.skip_steps:
                _check_int("skip_steps", s, 0, None if steps is None else steps - 1)
            if not self.skip_steps:
                raise ValueError("--skip-steps is empty; give step numbers, e.g. 12,15,18")
            if self.calibration is not None:
                raise ValueError("--step-cache-calibration goes with --step-cache THRESHOLD; a --skip-steps list needs "
                                 "none: drop one of them")
        else:
            if self.threshold is None:
                raise ValueError("step caching needs --step-cache THRESHOLD (with --step-cache-calibration FILE) or "
                                 "--skip-steps I,J,...")
            _check_float("step_cache", self.threshold, 0.0, above=True)
            if not isinstance(self.calibration, str) or not self.calibration:
                raise ValueError("--step-cache THRESHOLD needs --step-cache-calibration FILE: the per-step prediction "
                                 "norms of one full run, written by `wanport generate ... --write-step-cache-calibration "
                                 "FILE` or `wanport analyze fast-modes`")
        _check_int("step_cache_max_skips", self.max_skips, 1)
        if self.keep_first is not None:
            _check_int("step_cache_keep_first", self.keep_first, 0)
        if self.metric not in STEP_CACHE_METRICS:
            raise ValueError(f"--step-cache-metric must be one of {', '.join(STEP_CACHE_METRICS)}, got {self.metric!r}")


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """What shapes one generation. Frames 4k+1; height and width multiples of VAE factor x patch (16 or 32)."""

    frames: int = 81
    height: int = 480
    width: int = 832
    steps: int = 40
    shift: float | None = None  # None: the checkpoint's scheduler/scheduler_config.json
    scheduler: str | None = None  # None: the checkpoint's; or "unipc" / "euler"
    guidance: float = 3.5
    guidance_2: float | None = None  # low-noise expert of the A14B; None: same as guidance
    guidance_steps: int | None = None  # guidance truncation: CFG for the first N steps only
    cfg_batch: bool = True
    seed: int = 0
    batch: int = 1
    fps: int = 16
    # fast modes, off by default (see `jax_impl.sampling`): CFG reuse after the --guidance-steps cut, step caching
    cfg_reuse: bool = False
    step_cache: StepCacheSettings | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every option's type and range, in one place, before any stage runs (the checks that need the
        checkpoint, such as 4k+1 frames, are `Pipeline.check_settings`). Floats must be finite: a nan
        guidance would quietly switch guidance off, an infinite one make a black video."""
        for name in ("frames", "height", "width", "steps", "batch"):
            _check_int(name, getattr(self, name), 1)
        _check_int("fps", self.fps, 1, MAX_FPS)
        _check_int("seed", self.seed, 0, MAX_SEED)
        if self.guidance_steps is not None:
            _check_int("guidance_steps", self.guidance_steps, 0)
        _check_float("guidance", self.guidance, 0.0)
        if self.guidance_2 is not None:
            _check_float("guidance_2", self.guidance_2, 0.0)
        if self.shift is not None:
            _check_float("shift", self.shift, 0.0, above=True)
        if self.scheduler is not None and self.scheduler not in SCHEDULER_KINDS:
            raise ValueError(f"--scheduler must be one of {', '.join(SCHEDULER_KINDS)}, got {self.scheduler!r}")
        if not isinstance(self.cfg_batch, bool):
            raise ValueError(f"cfg_batch must be True or False, got {self.cfg_batch!r}")
        if not isinstance(self.cfg_reuse, bool):
            raise ValueError(f"cfg_reuse must be True or False, got {self.cfg_reuse!r}")
        if self.cfg_reuse and not (self.guidance_steps is not None and 0 < self.guidance_steps < self.steps):
            raise ValueError("--cfg-reuse guides the steps after the guidance cut with the last guided step's "
                             "cond - uncond difference: it needs --guidance-steps N with 0 < N < --steps "
                             f"({self.steps}), got {self.guidance_steps}")
        if self.step_cache is not None:
            if not isinstance(self.step_cache, StepCacheSettings):
                raise ValueError(f"step_cache must be a StepCacheSettings, got {self.step_cache!r}")
            self.step_cache.validate(self.steps)
