"""jax_impl.schedulers against diffusers' UniPCMultistepScheduler / FlowMatchEulerDiscreteScheduler, computed live."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from weights.configs.base import ConfigError
from jax_impl.schedulers import (
    Schedule,
    SchedulerConfig,
    add_noise,
    init_state,
    make_schedule,
    step,
)

SHIFTS = [1.0, 3.0, 5.0, 8.0]
STEPS = [1, 2, 10, 20, 40, 50]
_STEP = jax.jit(step)


def _wan_unipc(shift, order=2, **kw):
    """UniPC set up the way the Wan pipelines' scheduler_config.json sets it up."""
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=order, **kw
    )


def _ref(cfg: SchedulerConfig, n: int):
    if cfg.kind == "unipc":
        s = _wan_unipc(cfg.shift, cfg.solver_order)
    else:
        s = FlowMatchEulerDiscreteScheduler(shift=cfg.shift)
    s.set_timesteps(n)
    return s


def _same_levels(sched: Schedule, ref) -> bool:
    t = ref.timesteps.numpy().astype(np.float32)
    return np.array_equal(sched.timesteps, t) and np.array_equal(sched.sigmas, ref.sigmas.numpy())


# --- schedules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unipc", "euler"])
def test_schedule_matches_diffusers(kind):
    for shift in SHIFTS:
        for n in STEPS:
            cfg = SchedulerConfig(kind, shift)
            sched, ref = make_schedule(cfg, n), _ref(cfg, n)
            assert sched.timesteps.dtype == np.float32 and sched.sigmas.dtype == np.float32
            assert sched.timesteps.shape == (n,) and sched.sigmas.shape == (n + 1,) and sched.sigmas[-1] == 0
            want_t = ref.timesteps.numpy().astype(np.float32)
            np.testing.assert_array_equal(sched.timesteps, want_t, err_msg=f"{shift=} {n=}")
            np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy(), err_msg=f"{shift=} {n=}")
            if kind == "unipc":  # diffusers hands UniPC's timesteps to the model as truncated integers
                assert ref.timesteps.dtype == torch.int64
                np.testing.assert_array_equal(sched.timesteps, np.trunc(sched.timesteps))


# --- trajectories ---------------------------------------------------------------------------------------


def _trajectory(cfg, n, shape=(1, 16, 3, 6, 8), seed=0, ref=None):
    """Feed the same seeded 'model outputs' to diffusers and to the jitted step; per-step relative L2 errors."""
    ref = ref or _ref(cfg, n)
    sched = make_schedule(cfg, n)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    ref_dtype = ref.sigmas.dtype
    xt = torch.from_numpy(x).to(ref_dtype)
    state = init_state(sched, x)
    errs = []
    for i, t in enumerate(ref.timesteps):
        v = rng.standard_normal(shape).astype(np.float32)
        xt = ref.step(torch.from_numpy(v).to(ref_dtype), t, xt).prev_sample
        state, y = _STEP(state, v, jnp.int32(i))
        b = xt.double().numpy()
        errs.append(np.linalg.norm(np.asarray(y, np.float64) - b) / np.linalg.norm(b))
    assert np.isfinite(np.asarray(y)).all()
    return np.array(errs)


@pytest.mark.parametrize(
    "kind,order,n",
    [("unipc", 2, 12), ("unipc", 2, 40), ("euler", 2, 12), ("euler", 2, 40), ("unipc", 1, 12), ("unipc", 3, 12)],
)
def test_trajectory_matches_diffusers(kind, order, n):
    errs = _trajectory(SchedulerConfig(kind, 5.0, solver_order=order), n)
    assert errs.max() < 1e-5, errs  # measured: < 1e-6 (order 3: ~6e-7)


def test_trajectory_order3_long_vs_float64_weights():
    # At 40 steps, diffusers' 3rd-order UniPC drifts ~8.5e-6 from exact arithmetic because it solves for its
    # weights in float32; ours are float64. Against diffusers fed float64 noise levels (so its weights are
    # float64 too, the samples float64) our float32 samples agree to float32 rounding.
    cfg = SchedulerConfig("unipc", 5.0, solver_order=3)
    ref = _ref(cfg, 40)
    ref.sigmas = ref.sigmas.double()
    errs = _trajectory(cfg, 40, ref=ref)
    assert errs.max() < 2e-6, errs


# --- the shift is applied at construction, and only there ------------------------------------------------


def test_shift_applied_late_in_diffusers_differs_and_ours_matches_the_right_one():
    n = 20
    unipc, euler = SchedulerConfig("unipc", 5.0), SchedulerConfig("euler", 5.0)

    # UniPC: timesteps made with the default shift 1, the shift changed afterwards: they stay unshifted.
    late = _wan_unipc(1.0)
    late.set_timesteps(n)
    late.register_to_config(flow_shift=5.0)
    assert not _same_levels(make_schedule(unipc, n), late)
    assert _same_levels(make_schedule(unipc, n), _ref(unipc, n))

    # Euler: set_shift after set_timesteps does nothing to the schedule ...
    late = FlowMatchEulerDiscreteScheduler(shift=1.0)
    late.set_timesteps(n)
    late.set_shift(5.0)
    assert not _same_levels(make_schedule(euler, n), late)
    # ... and set_shift before set_timesteps still gives another schedule than shift=5 at construction:
    # diffusers takes the lowest level from a table shifted at construction, then shifts everything again.
    early = FlowMatchEulerDiscreteScheduler(shift=1.0)
    early.set_shift(5.0)
    early.set_timesteps(n)
    assert not _same_levels(make_schedule(euler, n), early)
    assert _same_levels(make_schedule(euler, n), _ref(euler, n))

    # Not applying the shift at all is caught too.
    for kind in ("unipc", "euler"):
        assert not _same_levels(make_schedule(SchedulerConfig(kind, 1.0), n), _ref(SchedulerConfig(kind, 5.0), n))


def test_no_way_to_change_shift_after_the_schedule_exists():
    cfg = SchedulerConfig("unipc", 5.0)
    sched = make_schedule(cfg, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.shift = 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.config = SchedulerConfig("unipc", 3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.sigmas = np.zeros(11, np.float32)
    for arr in (sched.timesteps, sched.sigmas, *vars(sched.coeffs).values()):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 0
    # Nothing public re-applies or sets a shift.
    for obj in (sched, cfg):
        assert not [a for a in dir(obj) if not a.startswith("_") and "shift" in a.lower() and callable(getattr(obj, a))]
    # The only path to another shift is a new config and a new schedule, whose levels are recomputed.
    again = dataclasses.replace(sched, config=cfg.replace(shift=3.0))
    assert _same_levels(again, _ref(SchedulerConfig("unipc", 3.0), 10))
    assert _same_levels(sched, _ref(cfg, 10))


# --- config -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [SchedulerConfig("unipc", 5.0), SchedulerConfig("unipc", 3.0, solver_order=3),
                                 SchedulerConfig("euler", 8.0), SchedulerConfig("euler", 1.0, num_train_timesteps=500)])
def test_to_dict_loads_in_diffusers(cfg, tmp_path):
    cls = UniPCMultistepScheduler if cfg.kind == "unipc" else FlowMatchEulerDiscreteScheduler
    ref = cls.from_config(cfg.to_dict())
    ref.set_timesteps(30)
    sched = make_schedule(cfg, 30)
    assert _same_levels(sched, ref)
    # and diffusers' own file reads back to the same config
    ref.save_config(tmp_path)
    assert SchedulerConfig.from_json(tmp_path / "scheduler_config.json") == cfg
    cfg.to_json(tmp_path / "ours.json")
    assert SchedulerConfig.from_json(tmp_path / "ours.json") == cfg


def test_reads_wan_style_config(tmp_path):
    # Every key diffusers writes for the Wan UniPC set-up (beta schedule etc. included).
    _wan_unipc(3.0).save_config(tmp_path)
    raw = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert "beta_schedule" in raw and raw["use_flow_sigmas"] is True
    assert SchedulerConfig.from_dict(raw) == SchedulerConfig("unipc", 3.0)


def _unipc_raw(**changes):
    raw = _wan_unipc(5.0).config
    return {"_class_name": "UniPCMultistepScheduler", **dict(raw), **changes}


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"_class_name": "DDIMScheduler"}, "DDIMScheduler.*not supported"),
        ({"flow_shift": 5.0}, "_class_name None"),
        (_unipc_raw(prediction_type="epsilon"), "'prediction_type' is 'epsilon'.*set it to \"flow_prediction\""),
        (_unipc_raw(use_flow_sigmas=False), "'use_flow_sigmas'.*true"),
        (_unipc_raw(lower_order_final=False), "'lower_order_final'"),
        (_unipc_raw(solver_type="bh1"), "'solver_type'.*bh2"),
        (_unipc_raw(disable_corrector=[0]), "'disable_corrector'"),
        (_unipc_raw(final_sigmas_type="sigma_min"), "'final_sigmas_type'"),
        (_unipc_raw(solver_order=4), "solver_order must be an int in 1..3"),
        (_unipc_raw(flow_shift=0.0), "shift must be a finite number > 0"),
        (_unipc_raw(shift=5.0), "rename it 'flow_shift'"),
        (_unipc_raw(frobnicate=1), r"unknown UniPCMultistepScheduler config keys \['frobnicate'\]"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "flow_shift": 5.0}, "rename it 'shift'"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0, "invert_sigmas": True}, "'invert_sigmas'"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "'use_dynamic_shifting'"),
    ],
)
def test_from_dict_errors(raw, match):
    with pytest.raises(ConfigError, match=match):
        SchedulerConfig.from_dict(raw, source="sched.json")


def test_missing_flow_keys_use_diffusers_defaults_and_are_rejected():
    # A bare UniPC config is an epsilon-prediction DDPM sampler in diffusers, not Wan's flow sampler.
    with pytest.raises(ConfigError, match="'prediction_type' is absent, so diffusers uses 'epsilon'"):
        SchedulerConfig.from_dict({"_class_name": "UniPCMultistepScheduler", "flow_shift": 5.0})


def test_rejected_options_really_break_diffusers():
    # Why lower_order_final=False and bh1 are refused: diffusers' last step (into noise level 0) is inf/nan.
    for kw in ({"lower_order_final": False}, {"solver_type": "bh1"}):
        s = _wan_unipc(5.0, **kw)
        s.set_timesteps(6)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 2, 3, 3, generator=g)
        for t in s.timesteps:
            x = s.step(torch.randn(x.shape, generator=g), t, x).prev_sample
        assert not torch.isfinite(x).all(), kw


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_num_steps_validated(bad):
    with pytest.raises(ConfigError, match="num_steps"):
        make_schedule(SchedulerConfig("unipc", 5.0), bad)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"kind": "ddim", "shift": 1.0}, "kind 'ddim' is not supported"),
        ({"kind": "unipc", "shift": -1.0}, "shift must be a finite number > 0"),
        ({"kind": "unipc", "shift": float("nan")}, "shift must be a finite number > 0"),
        ({"kind": "unipc", "shift": 5.0, "solver_order": 0}, "solver_order"),
        ({"kind": "unipc", "shift": 5.0, "solver_order": 2.0}, "solver_order must be an int"),
        ({"kind": "euler", "shift": 5.0, "solver_order": 3}, "solver_order is a UniPC option"),
        ({"kind": "euler", "shift": 5.0, "num_train_timesteps": 1.5}, "num_train_timesteps must be an int"),
    ],
)
def test_config_validated(kw, match):
    with pytest.raises(ConfigError, match=match):
        SchedulerConfig(**kw)


# --- jit -----------------------------------------------------------------------------------------------------


def test_one_compiled_step_for_all_steps_and_schedules():
    traces = []

    def counted(state, v, i):
        traces.append(1)
        return step(state, v, i)

    fn = jax.jit(counted)
    x = np.random.default_rng(1).standard_normal((1, 2, 4, 4, 16)).astype(np.float32)
    for shift in (3.0, 5.0):  # same step count and order: the weights are arguments, not constants
        sched = make_schedule(SchedulerConfig("unipc", shift), 12)
        state = init_state(sched, x)
        for i in range(sched.num_steps):
            state, y = fn(state, jnp.asarray(x), jnp.int32(i))
    assert len(traces) == 1 and fn._cache_size() == 1
    assert np.isfinite(np.asarray(y)).all()


# --- forward process ------------------------------------------------------------------------------------------


def test_add_noise_matches_diffusers():
    rng = np.random.default_rng(2)
    x0, noise = (rng.standard_normal((2, 4, 3, 5)).astype(np.float32) for _ in range(2))
    euler = _ref(SchedulerConfig("euler", 5.0), 10)
    unipc = _ref(SchedulerConfig("unipc", 5.0), 10)
    sched_e = make_schedule(SchedulerConfig("euler", 5.0), 10)
    sched_u = make_schedule(SchedulerConfig("unipc", 5.0), 10)
    for k in (0, 4, 9):
        t = euler.timesteps[k : k + 1].repeat(2)
        want = euler.scale_noise(torch.from_numpy(x0), t, torch.from_numpy(noise)).numpy()
        got = np.asarray(add_noise(jnp.asarray(x0), jnp.asarray(noise), sched_e.sigmas[k]))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        t = unipc.timesteps[k : k + 1].repeat(2)
        want = unipc.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
        got = np.asarray(add_noise(jnp.asarray(x0), jnp.asarray(noise), sched_u.sigmas[k]))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# --- explicit timesteps (few-step distilled models) ------------------------------------------------------

DISTILL = [(1000, 750, 500, 250), (999, 500), (1000,), (800, 640.5, 12)]


@pytest.mark.parametrize("ts", DISTILL)
def test_explicit_timesteps_match_diffusers_sigmas(ts):
    from jax_impl.schedulers import schedule_from_timesteps

    for shift in SHIFTS:
        sched = schedule_from_timesteps(SchedulerConfig("unipc", shift), ts)  # any kind: the step is Euler
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(sigmas=[t / 1000 for t in ts])
        np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy(), err_msg=f"{shift=}")
        np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy().astype(np.float32), err_msg=f"{shift=}")
        assert sched.config.kind == "euler" and sched.num_steps == len(ts)


def test_explicit_timesteps_are_lightx2v_levels():
    """LightX2V's step-distill scheduler: 1000 shifted levels, index 1000 - t; with shift 5 the model sees
    1000, 937.5, 833.3, 625 for the list 1000, 750, 500, 250."""
    from jax_impl.schedulers import schedule_from_timesteps

    sched = schedule_from_timesteps(SchedulerConfig("euler", 5.0), (1000, 750, 500, 250))
    table = np.linspace(1.0, 0.0, 1001)[:-1]
    table = 5.0 * table / (1 + 4.0 * table)
    np.testing.assert_allclose(sched.sigmas[:-1], table[[0, 250, 500, 750]], rtol=1e-6)
    np.testing.assert_allclose(sched.timesteps, [1000, 937.5, 2500 / 3, 625], rtol=1e-6)


def test_explicit_timestep_trajectory_matches_diffusers_and_lightx2v_update():
    from jax_impl.schedulers import schedule_from_timesteps

    ts = (1000, 750, 500, 250)
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    ref.set_timesteps(sigmas=[t / 1000 for t in ts])
    sched = schedule_from_timesteps(SchedulerConfig("euler", 5.0), ts)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 16, 2, 4, 4)).astype(np.float32)
    xt, xl, state = torch.from_numpy(x), x.astype(np.float64), init_state(sched, x)
    sig = sched.sigmas.astype(np.float64)
    for i, t in enumerate(ref.timesteps):
        v = rng.standard_normal(x.shape).astype(np.float32)
        xt = ref.step(torch.from_numpy(v), t, xt).prev_sample
        state, y = _STEP(state, v, jnp.int32(i))
        xl = xl - sig[i] * v + (sig[i + 1] * v if i < len(ts) - 1 else 0)  # LightX2V's step, no re-noising
        np.testing.assert_allclose(np.asarray(y), xt.numpy(), rtol=0, atol=2e-6)
        np.testing.assert_allclose(np.asarray(y), xl, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "ts,match",
    [((), "empty"), ((1000, 1000), "strictly decreasing"), ((250, 500), "strictly decreasing"),
     ((1001, 500), r"\(0, 1000\]"), ((500, 0), r"\(0, 1000\]"), ((float("nan"),), r"\(0, 1000\]")],
)
def test_explicit_timesteps_validated(ts, match):
    from jax_impl.schedulers import schedule_from_timesteps

    with pytest.raises(ConfigError, match=match):
        schedule_from_timesteps(SchedulerConfig("euler", 5.0), ts)


def test_parse_timesteps():
    from jax_impl.schedulers import parse_timesteps

    assert parse_timesteps("1000,750, 500,250") == (1000.0, 750.0, 500.0, 250.0)
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_timesteps("1000;750")
