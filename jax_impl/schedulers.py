"""Flow-matching samplers for Wan: UniPC (2nd order by default, as the Wan pipelines ship it) and Euler.

Design
------
* `SchedulerConfig` (`weights.configs.scheduler`) is a frozen dataclass that reads and writes diffusers'
  `scheduler/scheduler_config.json`. The flow shift is one of its fields, so it is fixed before any schedule
  exists; `shift_sigma` is the one shift formula.
* `make_schedule(cfg, num_steps)` builds an immutable `Schedule`: the timesteps the model is conditioned on and
  the `num_steps + 1` noise levels (ending at 0), both equal to what diffusers' `set_timesteps` produces for the
  same config, plus the per-step update coefficients.
* For flow matching every update is a linear combination of the current sample, the previous sample and the
  stored clean-sample predictions x0 = sample - sigma * v. The weights depend only on the noise levels, so they
  are computed once on the host (float64 numpy) into small per-step tables. `step(state, model_output, i)` is
  then a pure function that looks its weights up with `table[i]`; `i` may be a traced int32, so one compiled
  function serves every step of a loop.

Usage::

    sched = make_schedule(SchedulerConfig.from_json(".../scheduler/scheduler_config.json"), 50)
    step_fn = jax.jit(step)
    state = init_state(sched, noise)
    for i, t in enumerate(sched.timesteps):
        v = model(state.sample, t)
        state, sample = step_fn(state, v, jnp.int32(i))
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from weights.configs.base import ConfigError
from weights.configs.scheduler import SchedulerConfig, parse_timesteps, shift_sigma  # noqa: F401 (re-exported)

# --- noise levels ------------------------------------------------------------------------------------


def _unipc_levels(cfg: SchedulerConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Unshifted levels evenly spaced from 1 down to (but excluding) 1/T, shifted in float64. diffusers then
    # nudges a first level of exactly 1 down by 1e-6 (so x0 stays finite) and hands the model the levels
    # times T *truncated to integers*.
    T = cfg.num_train_timesteps
    s = shift_sigma(np.linspace(1.0, 1.0 / T, n + 1)[:-1], cfg.shift)
    if abs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6
    timesteps = np.trunc(s * T).astype(np.float32)
    sigmas = np.append(s, 0.0).astype(np.float32)
    return timesteps, sigmas


def _given_levels(cfg: SchedulerConfig, unshifted: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    # Explicit levels, as diffusers' Euler `set_timesteps(sigmas=...)` builds them: the given unshifted levels
    # in float32, shifted in float32, model timesteps = level * T, a final level 0 appended.
    f32 = np.float32
    u = np.asarray(unshifted, np.float64).astype(f32)
    sig32 = (f32(cfg.shift) * u / (f32(1.0) + f32(cfg.shift - 1.0) * u)).astype(f32)
    return (sig32 * f32(cfg.num_train_timesteps)).astype(f32), np.append(sig32, f32(0.0))


def _euler_levels(cfg: SchedulerConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    # diffusers builds a T-level float32 table at construction, shifted once, and takes its end points as the
    # range of the inference levels; those are then shifted again. The top end is 1 either way, but the bottom
    # end carries the shift twice. Reproduced here (the float32 steps as float32) to match it exactly.
    T = cfg.num_train_timesteps
    f32 = np.float32
    low = f32(1.0) / f32(T)
    low = shift_sigma(low, cfg.shift, np.float32)
    top = shift_sigma(f32(1.0), cfg.shift, np.float32)
    s = np.linspace(float(top) * T, float(low) * T, n) / T
    sig32 = shift_sigma(s, cfg.shift).astype(np.float32)
    timesteps = sig32 * np.float32(T)
    return timesteps.astype(np.float32), np.append(sig32, np.float32(0.0))


# --- update coefficients -------------------------------------------------------------------------------


@flax.struct.dataclass
class StepCoeffs:
    """Per-step weights, one row per step i (K = history size).

    x0    = sample - sigma[i] * model_output
    x_c   = c_x[i] * sample + c_last[i] * last + c_new[i] * x0 + sum_j c_hist[i, j] * hist[j]     (corrector)
    hist' = hist[1:] + (x0,)
    next  = p_x[i] * x_c + sum_j p_hist[i, j] * hist'[j]                                         (predictor)
    hist[-1] is the newest prediction.
    """

    sigma: Any
    c_x: Any
    c_last: Any
    c_new: Any
    c_hist: Any
    p_x: Any
    p_hist: Any


def _unipc_update(lam, sig, s0: int, t: int, order: int, corrector: bool):
    """UniP / UniC step from level s0 to level t in the x0 parameterisation (float64).

    Returns (weight of the sample at s0, weights of x0 at s0, s0-1, ..., s0-order+1, weight of x0 at t);
    the last is 0 for the predictor.
    """
    alpha_t, sigma_t = 1.0 - sig[t], sig[t]
    h = lam[t] - lam[s0]
    r = np.array([(lam[s0 - k] - lam[s0]) / h for k in range(1, order)])
    hh = -h
    phi1 = np.expm1(hh)
    b_h = phi1  # the "bh2" choice B(h) = e^{-h} - 1
    rks = np.append(r, 1.0)
    R = np.stack([rks**p for p in range(order)])
    b, phi_k, fact = [], phi1 / hh - 1.0, 1.0
    for p in range(1, order + 1):
        b.append(phi_k * fact / b_h)
        fact *= p + 1
        phi_k = phi_k / hh - 1.0 / fact
    b = np.array(b)
    # UniPC fixes the 2nd-order predictor weight and the 1st-order corrector weight at 1/2.
    if corrector:
        rho = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
        rho_d, rho_t = rho[:-1], rho[-1]
    else:
        rho_d = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]) if order > 2 else r[:0]
        rho_t = 0.0
    w_x = sigma_t / sig[s0]
    w_hist = np.zeros(order)
    w_hist[0] = -alpha_t * phi1 + alpha_t * b_h * (np.sum(rho_d / r) + rho_t)
    w_hist[1:] = -alpha_t * b_h * rho_d / r
    return w_x, w_hist, -alpha_t * b_h * rho_t


def _coefficients(cfg: SchedulerConfig, sig32: np.ndarray) -> StepCoeffs:
    n = sig32.shape[0] - 1
    K = cfg.history_size
    sig = sig32.astype(np.float64)
    c_x, c_last, c_new, p_x = (np.zeros(n) for _ in range(4))
    c_hist, p_hist = np.zeros((n, K)), np.zeros((n, K))
    if cfg.kind == "euler":
        c_x[:] = 1.0
        p_x[:] = sig[1:] / sig[:-1]
        p_hist[:, -1] = 1.0 - p_x
    else:
        with np.errstate(divide="ignore"):
            lam = np.log1p(-sig) - np.log(sig)  # log-SNR; +inf at the final level 0
        # Order at step i: capped by the predictions available (warm-up) and by the steps left (diffusers'
        # lower_order_final, which is what keeps the last step away from the infinite log-SNR).
        orders = [min(K, i + 1, n - i) for i in range(n)]
        for i in range(n):
            if i == 0:
                c_x[i] = 1.0
            else:  # correct the sample predicted at step i-1 with the new prediction, same order as there
                o = orders[i - 1]
                w_x, w_h, w_t = _unipc_update(lam, sig, i - 1, i, o, True)
                c_last[i], c_new[i] = w_x, w_t
                c_hist[i, K - o :] = w_h[::-1]
            o = orders[i]
            w_x, w_h, _ = _unipc_update(lam, sig, i, i + 1, o, False)
            p_x[i] = w_x
            p_hist[i, K - o :] = w_h[::-1]
    tables = StepCoeffs(sig[:-1].copy(), c_x, c_last, c_new, c_hist, p_x, p_hist)
    for name, arr in vars(tables).items():
        if not np.all(np.isfinite(arr)):
            raise ConfigError(f"non-finite update weights ({name}) for {cfg} and {n} steps")
        arr.flags.writeable = False
    return tables


# --- schedule -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The noise levels and update weights of one sampling run; computed from (config, num_steps) only.

    timesteps: float32 [num_steps], what the model is conditioned on at step i, as diffusers gives it
        (integer-valued for UniPC, which truncates them; fractional for Euler).
    sigmas: float32 [num_steps + 1], the noise level before step i; sigmas[-1] == 0.
    unshifted: explicit noise levels before the shift (see `schedule_from_timesteps`); None for the
        config's evenly spaced levels.
    All arrays are read-only.
    """

    config: SchedulerConfig
    num_steps: int
    unshifted: tuple[float, ...] | None = None
    timesteps: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    sigmas: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    coeffs: StepCoeffs = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, SchedulerConfig):
            raise TypeError(f"config must be a SchedulerConfig, got {type(self.config).__name__}")
        n = self.num_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ConfigError(f"num_steps must be an int, got {n!r}")
        if n < 1:
            raise ConfigError(f"num_steps must be >= 1, got {n}")
        object.__setattr__(self, "num_steps", int(n))
        if self.unshifted is not None:
            if self.config.kind != "euler":
                raise ConfigError("explicit timesteps are sampled with the flow-Euler step; use a kind='euler' config")
            if len(self.unshifted) != n:
                raise ConfigError(f"{len(self.unshifted)} explicit levels for num_steps={n}")
            timesteps, sigmas = _given_levels(self.config, self.unshifted)
        else:
            levels = _unipc_levels if self.config.kind == "unipc" else _euler_levels
            timesteps, sigmas = levels(self.config, self.num_steps)
        for a in (timesteps, sigmas):
            a.flags.writeable = False
        object.__setattr__(self, "timesteps", timesteps)
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "coeffs", _coefficients(self.config, sigmas))


def make_schedule(cfg: SchedulerConfig, num_steps: int) -> Schedule:
    return Schedule(cfg, num_steps)


def schedule_from_timesteps(cfg: SchedulerConfig, timesteps: Sequence[float]) -> Schedule:
    """A few-step schedule for step-distilled models (the LightX2V / Wan2.2-Lightning LoRAs).

    `timesteps` are in *unshifted* units of `num_train_timesteps`, as LightX2V's `denoising_step_list`
    gives them (1000, 750, 500, 250): step i runs at noise level shift(t_i / T) and the model is
    conditioned on T times that level (with shift 5: 1000, 937.5, 833.3, 625), ending at level 0. The
    update is the flow-matching Euler step x + (sigma_next - sigma) * v whatever `cfg.kind` is, which is
    what LightX2V's step-distill scheduler computes; only `cfg.shift` and `num_train_timesteps` are used.
    Identical to diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(sigmas=[t / T ...]).
    """
    T = cfg.num_train_timesteps
    ts = tuple(float(t) for t in timesteps)
    if not ts:
        raise ConfigError("explicit timesteps: the list is empty; give e.g. 1000,750,500,250")
    bad = [t for t in ts if not (math.isfinite(t) and 0 < t <= T)]
    if bad:
        raise ConfigError(f"explicit timesteps must lie in (0, {T}] (unshifted units of num_train_timesteps); got {bad}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ConfigError(f"explicit timesteps must be strictly decreasing (noisiest first); got {list(ts)}")
    euler = SchedulerConfig("euler", cfg.shift, num_train_timesteps=T)
    return Schedule(euler, len(ts), unshifted=tuple(t / T for t in ts))


def diffsynth_schedule(shift: float, num_steps: int, num_train_timesteps: int = 1000) -> Schedule:
    """DiffSynth's `FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`, the schedule of the public
    FantasyWorld pipeline (docs/fantasyworld.md, section 7): sigma_k = shift(1 - k/N) for k = 0..N-1, model
    timesteps T sigma_k, the flow-Euler step x + (sigma_{k+1} - sigma_k) v with sigma_N = 0.

    Not diffusers' default FlowMatchEuler levels at the same shift (its last nonzero level at shift 5 and 50
    steps is 0.024, DiffSynth's 0.093); it is diffusers' `set_timesteps(sigmas=[1 - k/N ...])`.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ConfigError(f"num_steps must be an int >= 1, got {num_steps!r}")
    euler = SchedulerConfig("euler", shift, num_train_timesteps=num_train_timesteps)
    return Schedule(euler, int(num_steps), unshifted=tuple(1.0 - k / num_steps for k in range(num_steps)))


# --- sampler state and step -----------------------------------------------------------------------------


@flax.struct.dataclass
class SamplerState:
    """Everything `step` reads: the weights (device copies of Schedule.coeffs) and the running arrays.

    sample: the current noisy sample. hist: the last K x0 predictions, newest last (zeros before they exist).
    last: the sample the previous predictor started from (UniPC's corrector input); None for Euler.
    """

    coeffs: StepCoeffs
    sample: jax.Array
    hist: tuple
    last: jax.Array | None


def init_state(schedule: Schedule, sample: Any, dtype: Any = jnp.float32) -> SamplerState:
    """State for step 0 from the initial noise (both Wan schedulers start at unit noise, unscaled)."""
    x = jnp.asarray(sample, dtype)
    coeffs = jax.tree.map(lambda a: jnp.asarray(a, dtype), schedule.coeffs)
    hist = tuple(jnp.zeros_like(x) for _ in range(schedule.config.history_size))
    last = jnp.zeros_like(x) if schedule.config.kind == "unipc" else None
    return SamplerState(coeffs=coeffs, sample=x, hist=hist, last=last)


def step(state: SamplerState, model_output: jax.Array, i: Any) -> tuple[SamplerState, jax.Array]:
    """Advance from level sigmas[i] to sigmas[i + 1] given the model's velocity at (state.sample, timesteps[i]).

    Pure and jit-friendly: `i` may be a traced int32, so `jax.jit(step)` compiles once for all steps.
    Steps must be taken in order 0, 1, ..., num_steps - 1. Computes in the state's dtype.
    """
    c = state.coeffs
    x = state.sample
    v = jnp.asarray(model_output).astype(x.dtype)
    x0 = x - c.sigma[i] * v
    if state.last is None:
        x_c = x
    else:
        x_c = c.c_x[i] * x + c.c_last[i] * state.last + c.c_new[i] * x0
        for j, m in enumerate(state.hist):
            x_c = x_c + c.c_hist[i, j] * m
    hist = state.hist[1:] + (x0,)
    new = c.p_x[i] * x_c
    for j, m in enumerate(hist):
        new = new + c.p_hist[i, j] * m
    last = None if state.last is None else x_c
    return SamplerState(coeffs=c, sample=new, hist=hist, last=last), new


def add_noise(x0: Any, noise: Any, sigma: Any) -> Any:
    """Flow-matching forward process: (1 - sigma) * x0 + sigma * noise. `sigma` broadcasts against x0
    (a scalar, or shaped [B, 1, ...] for per-sample levels)."""
    return (1 - sigma) * x0 + sigma * noise
