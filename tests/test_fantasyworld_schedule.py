"""The DiffSynth flow-match schedule of the public FantasyWorld pipeline (`jax_impl.schedulers.diffsynth_schedule`)
against its formula, DiffSynth's float32 computation re-stated in torch, and diffusers' Euler scheduler given the
same unshifted levels (docs/fantasyworld.md, section 7)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from jax_impl.schedulers import SchedulerConfig, diffsynth_schedule, init_state, make_schedule, step
from weights.configs.base import ConfigError


@pytest.mark.parametrize("shift,n", [(5.0, 50), (5.0, 2), (3.0, 7), (1.0, 4)])
def test_levels_match_the_formula_and_diffsynth(shift, n):
    sched = diffsynth_schedule(shift, n)
    u = 1.0 - np.arange(n) / n
    np.testing.assert_allclose(sched.sigmas[:-1], shift * u / (1 + (shift - 1) * u), rtol=1e-6)
    assert sched.sigmas[-1] == 0.0 and sched.sigmas.shape == (n + 1,)
    np.testing.assert_allclose(sched.timesteps, 1000 * sched.sigmas[:-1], rtol=1e-6)
    # DiffSynth's FlowMatchScheduler(sigma_min=0, extra_one_step=True): float32 linspace, shifted in float32
    s = torch.linspace(1.0, 0.0, n + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    np.testing.assert_allclose(sched.sigmas[:-1], s.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(sched.timesteps, (s * 1000).numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shift,n", [(5.0, 50), (3.0, 7)])
def test_equals_diffusers_euler_on_the_same_levels(shift, n):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(sigmas=[1.0 - k / n for k in range(n)])
    sched = diffsynth_schedule(shift, n)
    np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy().astype(np.float32))


def test_not_diffusers_default_levels():
    """The spec's point: at shift 5 and 50 steps DiffSynth's last nonzero level is 0.093, diffusers' 0.024."""
    ours = diffsynth_schedule(5.0, 50).sigmas
    default = make_schedule(SchedulerConfig("euler", 5.0), 50).sigmas
    assert abs(ours[-2] - 5 * 0.02 / (1 + 4 * 0.02)) < 1e-6 and abs(ours[-2] - 0.0926) < 1e-3
    assert abs(default[-2] - 0.0242) < 1e-3


def test_step_is_flow_euler():
    sched = diffsynth_schedule(5.0, 5)
    g = np.random.default_rng(0)
    x = g.standard_normal((2, 3)).astype(np.float32)
    state = init_state(sched, jnp.asarray(x))
    for i in range(sched.num_steps):
        v = g.standard_normal((2, 3)).astype(np.float32)
        state, out = step(state, jnp.asarray(v), i)
        x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * v
        np.testing.assert_allclose(np.asarray(out), x, rtol=1e-5, atol=1e-6)


def test_rejects_bad_step_counts():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="num_steps"):
            diffsynth_schedule(5.0, bad)
