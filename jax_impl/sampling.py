"""The denoising loop: classifier-free guidance, the Wan2.2 expert switch, a jit-compiled step.

One compiled function does a whole step (model call(s), guidance, scheduler update). Both experts of the
A14B share its compiled code: the model's parameters are an argument, not a constant, so the switch at
`boundary_ratio` changes which weights are passed in, nothing else. Guidance runs conditional and
unconditional inputs as one batch of 2 (`cfg_batch=True`) or as two calls. After `guidance_steps` steps
only the conditional prediction is made (guidance truncation).

Fast modes (off by default; `sample` then runs exactly the loop above): CFG reuse after the cut
(`Guidance.reuse_cfg`: v = v_cond + (scale - 1) * d_last, d_last = v_cond - v_uncond of the last guided step)
and step caching (`skip`, a `jax_impl.step_cache.SkipPlan` fixed before the run: a skipped step makes no model
call and reuses the last computed prediction(s), times the plan's scale). Both keep what they reuse in a
`StepCarry` on the device, passed into and out of the jitted step, so the loop still never waits for the host;
`step_kinds` is the one place that decides, per step, which expert runs and what is computed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl import schedulers
from jax_impl.conditioning import Conditioning, NoCondition

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Guidance settings: scale for the (high-noise) expert, `scale_2` for the low-noise expert of the A14B
    (defaults to `scale`), classifier-free guidance only for the first `steps` steps (None: all)."""

    scale: float = 5.0
    scale_2: float | None = None
    steps: int | None = None
    cfg_batch: bool = True
    reuse_cfg: bool = False  # after the cut: v_cond + (scale - 1) * (v_cond - v_uncond of the last guided step)

    @classmethod
    def from_settings(cls, settings) -> "Guidance":
        """The guidance of a `jax_impl.settings.GenerateSettings` (one place that reads its guidance fields)."""
        return cls(settings.guidance, settings.guidance_2, settings.guidance_steps, settings.cfg_batch,
                   settings.cfg_reuse)

    def scale_for(self, expert: int) -> float:
        return self.scale if expert == 0 or self.scale_2 is None else self.scale_2

    def active(self, i: int, expert: int, has_negative: bool) -> bool:
        within = self.steps is None or i < self.steps
        return has_negative and within and self.scale_for(expert) > 1.0

    def reuses(self, i: int, expert: int, has_negative: bool) -> bool:
        """True on a step after the cut that CFG reuse guides with the last guided step's cond - uncond (zero,
        so plain truncation, if no step was guided before)."""
        after_cut = self.steps is not None and i >= self.steps
        return self.reuse_cfg and after_cut and has_negative and self.scale_for(expert) > 1.0


@flax.struct.dataclass
class DenoiseInputs:
    """Everything fixed during sampling; arrays are channels-last, float32 on the host or device.

    condition: the typed image condition (`jax_impl.conditioning`: none, I2V concat, TI2V first frame),
    which makes the model input from the latents and finalises the sampled latents.
    """

    text: Any
    negative_text: Any | None = None
    image: Any | None = None
    condition: Conditioning = NoCondition()


def expert_for(t: float, boundary_ratio: float | None, num_experts: int, num_train_timesteps: int = 1000) -> int:
    """0 (high-noise expert, or the only model) while t >= boundary_ratio * T, else 1 (low-noise expert)."""
    if num_experts == 1 or boundary_ratio is None:
        return 0
    return 0 if t >= boundary_ratio * num_train_timesteps else 1


def model_input(latents: jax.Array, inputs: DenoiseInputs, t: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(DiT input in `dtype`, timestep) for the current latents: what the condition makes of them."""
    x, timestep = inputs.condition.model_input(latents, t)
    return x.astype(dtype), timestep


def _double(a):
    return None if a is None else jnp.concatenate([a, a], axis=0)


class NonFiniteLatents(ValueError):
    """Sampling produced NaN or inf latents; the message names the first step and its expert."""


def _first_non_finite(first_bad: jax.Array, latents: jax.Array, i) -> jax.Array:
    """`first_bad` (int32, -1 while all is well) becomes `i` at the first step whose latents are not all finite.

    Kept on the device and carried from step to step, so the loop never waits for the host; `sample`
    reads it once, after the last step.
    """
    return jnp.where((first_bad < 0) & ~jnp.all(jnp.isfinite(latents)), jnp.asarray(i, jnp.int32), first_bad)


def _predict(model, sampler: schedulers.SamplerState, t, inputs: DenoiseInputs, *, guided: bool, cfg_batch: bool,
             seq_split) -> tuple[jax.Array, jax.Array | None]:
    """(v_cond, v_uncond) at the current latents, float32; v_uncond is None on an unguided step."""
    x, timestep = model_input(sampler.sample, inputs, t, model.dtype)
    if not guided:
        return model(x, timestep, inputs.text, inputs.image, seq_split=seq_split).astype(F32), None
    if cfg_batch:
        both = model(_double(x), _double(timestep), jnp.concatenate([inputs.text, inputs.negative_text], 0),
                     _double(inputs.image), seq_split=seq_split).astype(F32)
        v_cond, v_uncond = jnp.split(both, 2, axis=0)
        return v_cond, v_uncond
    v_cond = model(x, timestep, inputs.text, inputs.image, seq_split=seq_split).astype(F32)
    v_uncond = model(x, timestep, inputs.negative_text, inputs.image, seq_split=seq_split).astype(F32)
    return v_cond, v_uncond


def _cfg(v_cond, v_uncond, scale):
    """Classifier-free guidance: the one formula, shared by every step variant."""
    return v_uncond + scale * (v_cond - v_uncond)


@functools.partial(jax.jit, static_argnames=("graphdef", "guided", "cfg_batch", "seq_split"))
def denoise_step(graphdef, params, sampler: schedulers.SamplerState, i, t, inputs: DenoiseInputs, scale,
                 first_bad=-1, *, guided: bool, cfg_batch: bool, seq_split=None):
    """One sampling step; returns (new sampler state, guided velocity, cond velocity, uncond velocity or cond,
    first non-finite step so far: `first_bad` carried on, or `i` if this step's latents are not finite).
    `seq_split` (a `kernels.context_parallel.SequenceSplit`) runs the model context-parallel over its mesh."""
    model = nnx.merge(graphdef, params)
    v_cond, v_uncond = _predict(model, sampler, t, inputs, guided=guided, cfg_batch=cfg_batch, seq_split=seq_split)
    if v_uncond is None:
        v_uncond = v = v_cond
    else:
        v = _cfg(v_cond, v_uncond, scale)
    sampler, _ = schedulers.step(sampler, v, i)
    return sampler, v, v_cond, v_uncond, _first_non_finite(first_bad, sampler.sample, i)


@flax.struct.dataclass
class StepCarry:
    """What the fast modes reuse, kept on the device from step to step (float32, the latents' shape).

    cond, uncond: the last computed conditional / unconditional predictions (what a skipped step reuses);
    diff: v_cond - v_uncond of the last guided step (what CFG reuse adds after the cut; zero before one).
    """

    cond: jax.Array
    uncond: jax.Array
    diff: jax.Array

    @classmethod
    def zeros(cls, latents: jax.Array) -> "StepCarry":
        """Zeros committed to the default device, as the step's outputs are (a skipped step passes the carry
        through, and jit compiles committed and uncommitted arguments separately)."""
        z = jax.device_put(jnp.zeros(latents.shape, F32), jax.devices()[0])
        return cls(z, z, z)


@functools.partial(jax.jit, static_argnames=("graphdef", "guided", "cfg_batch", "reuse_cfg", "skipped", "seq_split"))
def fast_step(graphdef, params, sampler: schedulers.SamplerState, i, t, inputs: DenoiseInputs, scale, first_bad,
              carry: StepCarry, cond_scale, uncond_scale, *, guided: bool, cfg_batch: bool, reuse_cfg: bool,
              skipped: bool, seq_split=None):
    """`denoise_step` for the fast modes, with the reused predictions carried in and out (`StepCarry`).

    skipped: no model call; the carried predictions times `cond_scale` / `uncond_scale` stand in for this
    step's (the carry is kept: later skips scale the same prediction by their accumulated ratio).
    reuse_cfg (an unguided step after the cut): v = v_cond + (scale - 1) * carry.diff.
    Returns (sampler state, v, v_cond, v_uncond or v_cond, first_bad, carry).
    """
    if skipped:
        v_cond = carry.cond * cond_scale
        v_uncond = carry.uncond * uncond_scale if guided else None
    else:
        model = nnx.merge(graphdef, params)
        v_cond, v_uncond = _predict(model, sampler, t, inputs, guided=guided, cfg_batch=cfg_batch,
                                    seq_split=seq_split)
        if guided:
            carry = StepCarry(v_cond, v_uncond, v_cond - v_uncond)
        else:
            carry = carry.replace(cond=v_cond)
    if v_uncond is not None:
        v = _cfg(v_cond, v_uncond, scale)
    elif reuse_cfg:
        v = v_cond + (scale - 1.0) * carry.diff
    else:
        v = v_cond
    sampler, _ = schedulers.step(sampler, v, i)
    v_uncond = v_cond if v_uncond is None else v_uncond
    return sampler, v, v_cond, v_uncond, _first_non_finite(first_bad, sampler.sample, i), carry


@dataclasses.dataclass(frozen=True)
class StepKind:
    """What step i computes: which expert, whether guided (cond and uncond), whether CFG reuse guides it after
    the cut, whether it is skipped (no model call; the carried prediction times cond_scale / uncond_scale)."""

    i: int
    t: float
    expert: int
    guided: bool
    reuse_cfg: bool = False
    skipped: bool = False
    cond_scale: float = 1.0
    uncond_scale: float = 1.0

    @property
    def model_evals(self) -> int:
        """DiT evaluations this step makes: 2 guided (cond and uncond), 1 unguided, 0 skipped."""
        return 0 if self.skipped else (2 if self.guided else 1)

    @property
    def variant(self) -> tuple[bool, bool, bool]:
        """The static arguments of `fast_step` this step compiles to."""
        return self.guided, self.reuse_cfg, self.skipped


def step_kinds(schedule: schedulers.Schedule, guidance: Guidance, *, boundary_ratio: float | None, num_experts: int,
               has_negative: bool, skip=None) -> list[StepKind]:
    """Per step, what `sample` does: the expert switch, guidance (and its truncation), CFG reuse, and the
    skipped steps of `skip` (a `jax_impl.step_cache.SkipPlan`, or None)."""
    if skip is not None and skip.num_steps != schedule.num_steps:
        raise ValueError(f"the step-cache plan is for {skip.num_steps} steps, this schedule has {schedule.num_steps}")
    kinds = []
    for i in range(schedule.num_steps):
        t = float(schedule.timesteps[i])
        expert = expert_for(t, boundary_ratio, num_experts, schedule.config.num_train_timesteps)
        guided = guidance.active(i, expert, has_negative)
        reuse = not guided and guidance.reuses(i, expert, has_negative)
        skipped = skip is not None and i in skip.skipped
        kinds.append(StepKind(i, t, expert, guided, reuse, skipped,
                              skip.cond_scale[i] if skipped else 1.0, skip.uncond_scale[i] if skipped else 1.0))
    return kinds


StepCallback = Callable[[dict[str, Any]], None]


def _run_step(kind: StepKind, graphdef, params, state, inputs: DenoiseInputs, guidance: Guidance, first_bad, carry,
              fast: bool):
    """Step `kind.i` as `sample` runs it: `denoise_step` on the default path, `fast_step` with the carry otherwise.
    Returns (state, v, v_cond, v_uncond, first_bad, carry)."""
    scale = jnp.float32(guidance.scale_for(kind.expert))
    if not fast:
        out = denoise_step(graphdef, params, state, jnp.int32(kind.i), jnp.float32(kind.t), inputs, scale, first_bad,
                           guided=kind.guided, cfg_batch=guidance.cfg_batch)
        return (*out, carry)
    return fast_step(graphdef, params, state, jnp.int32(kind.i), jnp.float32(kind.t), inputs, scale, first_bad, carry,
                     jnp.float32(kind.cond_scale), jnp.float32(kind.uncond_scale), guided=kind.guided,
                     cfg_batch=guidance.cfg_batch, reuse_cfg=kind.reuse_cfg, skipped=kind.skipped)


def _loop_start(num_experts: int, schedule: schedulers.Schedule, noise: Any, inputs: DenoiseInputs,
                guidance: Guidance, boundary_ratio: float | None, skip):
    """What `sample` and `compile_steps` start from: (inputs on the device, step-0 sampler state, every step's
    `StepKind`, whether the fast step runs, its zero carry or None)."""
    inputs = jax.tree.map(lambda a: None if a is None else jnp.asarray(a), inputs)
    state = schedulers.init_state(schedule, noise)
    kinds = step_kinds(schedule, guidance, boundary_ratio=boundary_ratio, num_experts=num_experts,
                       has_negative=inputs.negative_text is not None, skip=skip)
    fast = skip is not None or guidance.reuse_cfg
    return inputs, state, kinds, fast, StepCarry.zeros(state.sample) if fast else None


def compile_steps(experts: list[nnx.Module], schedule: schedulers.Schedule, noise: Any, inputs: DenoiseInputs,
                  guidance: Guidance, *, boundary_ratio: float | None = None, skip=None) -> int:
    """Compile (and run, from step 0's state, results dropped) every step variant `sample` will use with these
    arguments, so a timed `sample` holds no compilation. The experts share one compiled step, so only the first
    expert's parameters are used. Returns how many variants ran."""
    graphdef, params = nnx.split(experts[0])
    params = jax.device_put(params, jax.devices()[0])
    inputs, state, kinds, fast, carry = _loop_start(len(experts), schedule, noise, inputs, guidance, boundary_ratio,
                                                    skip)
    seen = {}
    for kind in kinds:
        seen.setdefault(kind.variant, kind)
    for kind in seen.values():
        kind = dataclasses.replace(kind, i=0)
        # twice: the first call takes fresh arrays (as step 0 does), the second the first's outputs, which are
        # committed to the device (as every later step's are) and so are a separate entry of jit's cache
        out = _run_step(kind, graphdef, params, state, inputs, guidance, jnp.int32(-1), carry, fast)
        out = _run_step(kind, graphdef, params, out[0], inputs, guidance, out[4], out[5], fast)
        jax.block_until_ready(out[0].sample)
    return len(seen)


def sample(
    experts: list[nnx.Module],
    schedule: schedulers.Schedule,
    noise: Any,
    inputs: DenoiseInputs,
    guidance: Guidance,
    *,
    boundary_ratio: float | None = None,
    on_step: StepCallback | None = None,
    progress: bool = True,
    expert_names: list[str] | None = None,
    skip=None,
) -> jax.Array:
    """Run the whole schedule from `noise` [B, F, h, w, z] and return the final latents (float32).

    Experts whose parameters live in host memory (see `offload`) are moved to the device when the
    schedule reaches them, so only one A14B expert occupies the device at a time.

    `skip` (a `jax_impl.step_cache.SkipPlan`) and `guidance.reuse_cfg` switch on the fast modes (see the module
    docstring); without them every step is `denoise_step`, as it always was.

    `on_step` receives a dict per step: i, t, expert, guided, latents (after the step), v, v_cond, v_uncond,
    skipped (no model call: v_cond / v_uncond are the reused predictions), model_evals (0, 1 or 2).
    Raises NonFiniteLatents, naming the first such step and its expert (from `expert_names`), when the
    latents stop being finite (checked once after the loop; the flag is carried on the device).
    """
    splits = [nnx.split(m) for m in experts]  # parameters may live on the host (offloaded experts)
    graphdef = splits[0][0]
    if any(g != graphdef for g, _ in splits[1:]):
        raise ValueError("the experts have different structures; both must be the same DiT configuration")
    inputs, state, kinds, fast, carry = _loop_start(len(experts), schedule, noise, inputs, guidance, boundary_ratio,
                                                    skip)
    steps = range(schedule.num_steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="denoise", unit="step", dynamic_ncols=True)
    device = jax.devices()[0]
    current, params = None, None
    first_bad = jnp.int32(-1)
    for i in steps:
        kind = kinds[i]
        t, expert = kind.t, kind.expert
        if expert != current:
            # At the switch the previous expert's device copy is dropped before the next one is moved in;
            # for experts already on the device, device_put is a no-op and nothing moves.
            params = None
            params = jax.device_put(splits[expert][1], device)
            current = expert
        guided = kind.guided
        state, v, v_cond, v_uncond, first_bad, carry = _run_step(kind, graphdef, params, state, inputs, guidance,
                                                                 first_bad, carry, fast)
        if on_step is not None:
            on_step(dict(i=i, t=t, expert=expert, guided=guided, latents=state.sample, v=v,
                         v_cond=v_cond, v_uncond=v_uncond, skipped=kind.skipped, model_evals=kind.model_evals))
    bad = int(first_bad)
    if bad >= 0:
        t, expert = kinds[bad].t, kinds[bad].expert
        names = expert_names or (["high-noise expert", "low-noise expert"] if len(experts) == 2 else ["the model"])
        raise NonFiniteLatents(
            f"sampling produced non-finite latents (NaN or inf) at step {bad} of {schedule.num_steps} (t={t:g}), "
            f"expert {expert} ({names[expert]}) with guidance {guidance.scale_for(expert):g}; lower the guidance, "
            "or check the weights (`wanport convert --verify`)"
        )
    return inputs.condition.finalize(state.sample)


def offload(model: nnx.Module) -> nnx.Module:
    """Move a model's parameters to host memory (numpy); `sample` moves them back when it needs them."""
    nnx.update(model, jax.device_get(nnx.state(model)))
    return model
