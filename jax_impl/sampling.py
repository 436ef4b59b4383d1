"""The denoising loop: classifier-free guidance, the Wan2.2 expert switch, a jit-compiled step.

One compiled function does a whole step (model call(s), guidance, scheduler update). Both experts of the
A14B share its compiled code: the model's parameters are an argument, not a constant, so the switch at
`boundary_ratio` changes which weights are passed in, nothing else. Guidance runs conditional and
unconditional inputs as one batch of 2 (`cfg_batch=True`) or as two calls. After `guidance_steps` steps
only the conditional prediction is made (guidance truncation).
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

    def scale_for(self, expert: int) -> float:
        return self.scale if expert == 0 or self.scale_2 is None else self.scale_2

    def active(self, i: int, expert: int, has_negative: bool) -> bool:
        within = self.steps is None or i < self.steps
        return has_negative and within and self.scale_for(expert) > 1.0


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


@functools.partial(jax.jit, static_argnames=("graphdef", "guided", "cfg_batch", "seq_split"))
def denoise_step(graphdef, params, sampler: schedulers.SamplerState, i, t, inputs: DenoiseInputs, scale,
                 first_bad=-1, *, guided: bool, cfg_batch: bool, seq_split=None):
    """One sampling step; returns (new sampler state, guided velocity, cond velocity, uncond velocity or cond,
    first non-finite step so far: `first_bad` carried on, or `i` if this step's latents are not finite).
    `seq_split` (a `kernels.context_parallel.SequenceSplit`) runs the model context-parallel over its mesh."""
    model = nnx.merge(graphdef, params)
    x, timestep = model_input(sampler.sample, inputs, t, model.dtype)
    if not guided:
        v_cond = model(x, timestep, inputs.text, inputs.image, seq_split=seq_split).astype(F32)
        v_uncond = v = v_cond
    elif cfg_batch:
        both = model(_double(x), _double(timestep), jnp.concatenate([inputs.text, inputs.negative_text], 0),
                     _double(inputs.image), seq_split=seq_split).astype(F32)
        v_cond, v_uncond = jnp.split(both, 2, axis=0)
        v = v_uncond + scale * (v_cond - v_uncond)
    else:
        v_cond = model(x, timestep, inputs.text, inputs.image, seq_split=seq_split).astype(F32)
        v_uncond = model(x, timestep, inputs.negative_text, inputs.image, seq_split=seq_split).astype(F32)
        v = v_uncond + scale * (v_cond - v_uncond)
    sampler, _ = schedulers.step(sampler, v, i)
    return sampler, v, v_cond, v_uncond, _first_non_finite(first_bad, sampler.sample, i)


StepCallback = Callable[[dict[str, Any]], None]


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
) -> jax.Array:
    """Run the whole schedule from `noise` [B, F, h, w, z] and return the final latents (float32).

    Experts whose parameters live in host memory (see `offload`) are moved to the device when the
    schedule reaches them, so only one A14B expert occupies the device at a time.

    `on_step` receives a dict per step: i, t, expert, guided, latents (after the step), v, v_cond, v_uncond.
    Raises NonFiniteLatents, naming the first such step and its expert (from `expert_names`), when the
    latents stop being finite (checked once after the loop; the flag is carried on the device).
    """
    splits = [nnx.split(m) for m in experts]  # parameters may live on the host (offloaded experts)
    graphdef = splits[0][0]
    if any(g != graphdef for g, _ in splits[1:]):
        raise ValueError("the experts have different structures; both must be the same DiT configuration")
    inputs = jax.tree.map(lambda a: None if a is None else jnp.asarray(a), inputs)
    state = schedulers.init_state(schedule, noise)
    steps = range(schedule.num_steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="denoise", unit="step", dynamic_ncols=True)
    device = jax.devices()[0]
    current, params = None, None
    first_bad = jnp.int32(-1)
    used: list[tuple[float, int]] = []
    for i in steps:
        t = float(schedule.timesteps[i])
        expert = expert_for(t, boundary_ratio, len(experts), schedule.config.num_train_timesteps)
        if expert != current:
            # At the switch the previous expert's device copy is dropped before the next one is moved in;
            # for experts already on the device, device_put is a no-op and nothing moves.
            params = None
            params = jax.device_put(splits[expert][1], device)
            current = expert
        guided = guidance.active(i, expert, inputs.negative_text is not None)
        state, v, v_cond, v_uncond, first_bad = denoise_step(
            graphdef, params, state, jnp.int32(i), jnp.float32(t), inputs,
            jnp.float32(guidance.scale_for(expert)), first_bad, guided=guided, cfg_batch=guidance.cfg_batch,
        )
        used.append((t, expert))
        if on_step is not None:
            on_step(dict(i=i, t=t, expert=expert, guided=guided, latents=state.sample, v=v,
                         v_cond=v_cond, v_uncond=v_uncond))
    bad = int(first_bad)
    if bad >= 0:
        t, expert = used[bad]
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
