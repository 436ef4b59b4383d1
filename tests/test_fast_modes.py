"""Fast modes of the guided sampler (jax_impl.sampling, jax_impl.step_cache): the default path unchanged, CFG reuse
against its formula computed from separate model calls, step-cache plans (determinism, never-skip rules, reused
predictions), calibration files, and the command line's errors."""

from __future__ import annotations

import dataclasses
import functools
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jax_impl import sampling, schedulers, step_cache
from jax_impl.noise import initial_noise
from jax_impl.pipeline import GenerateSettings, Pipeline
from jax_impl.sampling import DenoiseInputs, model_input
from jax_impl.settings import StepCacheSettings
from wanport.cli import main

I2V = "tiny-wan2.1-i2v-14b"
A14B = "tiny-wan2.2-i2v-a14b"
S = GenerateSettings(frames=5, height=32, width=32, steps=6, guidance=4.0, seed=3)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    return Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def i2v(tiny_ckpt, image):
    pipe = Pipeline(tiny_ckpt(I2V))
    return pipe, pipe.encode(S, prompt="a cat", image=image, negative_prompt="blurry")


def _inputs(encoded):
    return DenoiseInputs(text=jnp.asarray(encoded["prompt_embeds"]),
                         negative_text=jnp.asarray(encoded["negative_prompt_embeds"]),
                         image=jnp.asarray(encoded["image_embeds"]), condition=encoded.condition)


@functools.partial(jax.jit, static_argnums=0)
def _call(graphdef, params, latents, t, inputs, text):
    model = nnx.merge(graphdef, params)
    x, timestep = model_input(latents, inputs, t, model.dtype)
    return model(x, timestep, text, inputs.image).astype(jnp.float32)


def _predictions(model, encoded, latents, t):
    """(v_cond, v_uncond) from two plain batch-1 model calls, outside the sampler."""
    inputs = _inputs(encoded)
    graphdef, params = nnx.split(model)
    latents, t = jnp.asarray(latents), jnp.float32(t)
    return (_call(graphdef, params, latents, t, inputs, inputs.text),
            _call(graphdef, params, latents, t, inputs, inputs.negative_text))


_scheduler_step = jax.jit(schedulers.step)


def _steps(pipe, encoded, settings):
    """Every step's on_step arrays (host copies) and the final latents."""
    rows = []

    def keep(d):
        rows.append({k: (np.array(v) if hasattr(v, "shape") else v) for k, v in d.items()})

    return rows, pipe.denoise(encoded, settings, on_step=keep, progress=False)


# --- the default path --------------------------------------------------------------------------------------


def test_default_run_is_the_plain_guided_loop(i2v):
    """The default run (no fast mode) equals a loop written here from plain model calls and the scheduler step;
    the fast machinery with nothing to skip and no reuse gives the same latents bit for bit."""
    pipe, encoded = i2v
    settings = dataclasses.replace(S, guidance_steps=4)  # guided and unguided steps
    got = pipe.denoise(encoded, settings, progress=False)
    assert settings.cfg_reuse is False and settings.step_cache is None
    schedule = pipe.schedule(settings)
    state = schedulers.init_state(schedule, initial_noise(settings.seed, pipe.latent_shape(settings)))
    model = pipe.experts[0]
    for i, t in enumerate(schedule.timesteps):
        v_c, v_u = _predictions(model, encoded, state.sample, t)
        v = v_u + settings.guidance * (v_c - v_u) if i < settings.guidance_steps else v_c
        state, _ = _scheduler_step(state, v, jnp.int32(i))
    want = np.asarray(encoded.condition.finalize(state.sample))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # the fast step with an empty plan: the same computation, bit for bit
    empty = step_cache.SkipPlan(6, (), (1.0,) * 6, (1.0,) * 6, (None,) * 6, "nothing")
    fast = sampling.sample(pipe.experts, schedule, initial_noise(settings.seed, pipe.latent_shape(settings)),
                           _inputs(encoded), sampling.Guidance.from_settings(settings), skip=empty, progress=False)
    np.testing.assert_array_equal(np.asarray(fast), got)
    # the stage key of a default run has no fast-mode fields (old cache files still match)
    key = pipe.denoise_inputs(settings, "k")
    assert "cfg_reuse" not in key and "step_cache" not in key
    assert pipe.denoise_inputs(dataclasses.replace(settings, cfg_reuse=True), "k")["cfg_reuse"] is True


# --- CFG reuse ---------------------------------------------------------------------------------------------


def test_cfg_reuse_is_cond_plus_scale_minus_one_times_the_last_guided_difference(i2v):
    pipe, encoded = i2v
    cut = 2
    settings = dataclasses.replace(S, guidance_steps=cut, cfg_reuse=True)
    rows, reuse = _steps(pipe, encoded, settings)
    full_rows, full = _steps(pipe, encoded, S)
    _, trunc = _steps(pipe, encoded, dataclasses.replace(S, guidance_steps=cut))
    assert [r["guided"] for r in rows] == [True, True, False, False, False, False]
    assert [r["model_evals"] for r in rows] == [2, 2, 1, 1, 1, 1]
    for i in range(cut):  # before the cut: the full run, bit for bit
        np.testing.assert_array_equal(rows[i]["latents"], full_rows[i]["latents"])
    model = pipe.experts[0]
    # d_last from the last guided step (1), recomputed from two separate calls on the latents it started from
    c1, u1 = _predictions(model, encoded, rows[0]["latents"], rows[1]["t"])
    for i in (cut, cut + 1):
        c, _ = _predictions(model, encoded, rows[i - 1]["latents"], rows[i]["t"])
        want = np.asarray(c) + (S.guidance - 1.0) * (np.asarray(c1) - np.asarray(u1))
        np.testing.assert_allclose(rows[i]["v"], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(rows[i]["v_cond"], np.asarray(c), rtol=1e-4, atol=1e-4)
    # it is neither truncation nor the full run, and it stays nearer the full run than truncation on this seed
    err = lambda x: np.linalg.norm(x - full) / np.linalg.norm(full)  # noqa: E731
    assert 0 < err(reuse) and 0 < err(trunc) and not np.array_equal(reuse, trunc)


def test_cfg_reuse_needs_a_cut():
    for steps in (None, 0, 6, 9):
        with pytest.raises(ValueError, match="--cfg-reuse .* needs --guidance-steps N with 0 < N < --steps"):
            dataclasses.replace(S, guidance_steps=steps, cfg_reuse=True)
    with pytest.raises(ValueError, match="cfg_reuse must be True or False"):
        dataclasses.replace(S, cfg_reuse=1)


# --- step-cache plans ----------------------------------------------------------------------------------------


def _kinds(n, switch=None, cut=None):
    """Step kinds like `sampling.step_kinds` gives them: expert 1 from `switch` on, guided before `cut`."""
    return [SimpleNamespace(expert=int(switch is not None and i >= switch), guided=cut is None or i < cut)
            for i in range(n)]


def _calibration(norms_c, norms_u=None, key=None):
    n = len(norms_c)
    norms_u = norms_u or norms_c
    steps = tuple(step_cache.CalibrationStep(i, 1000.0 - i, 0, True, float(norms_c[i]), float(norms_u[i]),
                                             None if i == 0 else 0.1, None if i == 0 else 0.1) for i in range(n))
    return step_cache.Calibration(key or {"steps": n}, steps)


def test_threshold_plan_by_hand_and_deterministic(tmp_path):
    # ratios 1, 1.02, 1.02, 1.02, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0
    norms = [1.0, 1.02, 1.0404, 1.061208, 1.591812, 1.591812, 1.591812, 1.591812, 1.591812, 1.591812]
    cal = _calibration(norms)
    kinds = _kinds(10)
    plan = step_cache.plan_from_calibration(cal, 0.07, kinds, max_skips=2, keep_first=2)
    # 0, 1 kept (first 2); 2: R=1.02, err .02 -> skip; 3: R=1.0404, err .0604 -> skip; 4: third in a row -> computed;
    # 5, 6: R=1, err 0 -> skip, skip; 7 computed (run of 2); 8 skip; 9 computed (the last step)
    assert plan.skipped == (2, 3, 5, 6, 8)
    assert plan.cond_scale[2] == pytest.approx(1.02) and plan.cond_scale[3] == pytest.approx(1.02 ** 2)
    assert plan.cond_scale[5] == pytest.approx(1.0) and plan.cond_scale[4] == 1.0
    assert plan.predicted_error[3] == pytest.approx(0.02 + 0.0404)
    # the same calibration, through its JSON file, gives the same plan
    cal.save(tmp_path / "c.json")
    assert step_cache.plan_from_calibration(step_cache.Calibration.load(tmp_path / "c.json"), 0.07, kinds,
                                            max_skips=2, keep_first=2) == plan
    # a lower threshold stops at the error: step 3 (0.0604) is computed at 0.05
    assert step_cache.plan_from_calibration(cal, 0.05, kinds, max_skips=2, keep_first=2).skipped == (2, 5, 6, 8)
    # the change metric sums the relative changes (0.1 each) and reuses the prediction unscaled
    ch = step_cache.plan_from_calibration(cal, 0.15, kinds, max_skips=3, keep_first=2, metric="change")
    assert ch.skipped == (2, 4, 6, 8) and set(ch.cond_scale) == {1.0}


def test_threshold_plan_never_skips_protected_steps():
    rng = np.random.default_rng(0)
    skipped_any = False
    for trial in range(40):
        n = int(rng.integers(4, 30))
        switch = int(rng.integers(1, n)) if trial % 2 else None
        cut = int(rng.integers(1, n)) if trial % 3 == 0 else None
        norms = np.cumprod(1 + rng.normal(0, 0.02, n))
        cal = _calibration(list(norms), list(norms * 1.01))
        k, first, threshold = int(rng.integers(1, 4)), int(rng.integers(0, 5)), float(rng.uniform(0.01, 0.5))
        kinds = _kinds(n, switch, cut)
        plan = step_cache.plan_from_calibration(cal, threshold, kinds, max_skips=k, keep_first=first)
        never = {0, n - 1} | set(range(first)) | ({switch} if switch else set()) | ({cut} if cut else set())
        assert not never & set(plan.skipped), (never, plan.skipped)
        run = longest = 0
        for a, b in zip([-2, *plan.skipped], plan.skipped):
            run = run + 1 if b == a + 1 else 1
            longest = max(longest, run)
        assert longest <= k
        assert all(plan.predicted_error[i] < threshold for i in plan.skipped)
        assert all(plan.predicted_error[i] == 0 for i in range(n) if i not in plan.skipped)
        skipped_any = skipped_any or bool(plan.skipped)
    assert skipped_any, "the trials must skip something, or the checks prove nothing"


def test_fixed_list_refuses_steps_that_must_be_computed():
    kinds = _kinds(8, switch=4, cut=6)
    plan = step_cache.plan_from_list([5, 2, 2], kinds)
    assert plan.skipped == (2, 5) and set(plan.cond_scale) == {1.0}
    for bad, why in ((0, "step 0 has no earlier"), (4, "first step of the low-noise expert"),
                     (6, "first step after the guidance cut")):
        with pytest.raises(step_cache.StepCacheError, match=why):
            step_cache.plan_from_list([2, bad], kinds)
    with pytest.raises(step_cache.StepCacheError, match=r"steps are 0..7"):
        step_cache.plan_from_list([8], kinds)


def test_a14b_switch_step_is_never_skipped(tiny_ckpt):
    pipe = Pipeline(tiny_ckpt(A14B), load_encoders=False)
    s = GenerateSettings(frames=5, height=32, width=32, steps=6, guidance=3.5)
    kinds = pipe.step_kinds(s)
    switch = [k.expert for k in kinds].index(1)
    assert 0 < switch < 6
    with pytest.raises(step_cache.StepCacheError, match="low-noise expert"):
        pipe.check_settings(dataclasses.replace(s, step_cache=StepCacheSettings(skip_steps=(switch,))), True)


# --- skipped steps in the sampler ----------------------------------------------------------------------------


def test_skipped_steps_reuse_the_carried_prediction_and_are_reported(i2v, tmp_path):
    pipe, encoded = i2v
    rec = step_cache.CalibrationRecorder()
    full_rows, full = _steps(pipe, encoded, S)
    pipe.denoise(encoded, S, on_step=rec, progress=False)
    cal = rec.calibration(pipe.step_cache_key(S), {"note": "test"})
    # the recorder's numbers are the norms of the on_step arrays
    for st, row in zip(cal.steps, full_rows):
        assert st.cond_norm == pytest.approx(np.linalg.norm(row["v_cond"].astype(np.float64)), rel=1e-5)
        assert st.uncond_norm == pytest.approx(np.linalg.norm(row["v_uncond"].astype(np.float64)), rel=1e-5)
    prev = full_rows[2]["v_cond"].astype(np.float64)
    assert cal.steps[3].cond_change == pytest.approx(
        np.linalg.norm(full_rows[3]["v_cond"] - prev) / np.linalg.norm(prev), rel=1e-4)
    path = cal.save(tmp_path / "cal.json")
    # a threshold that skips two steps in a row: each reuses the last computed prediction times its own scale
    sc = StepCacheSettings(threshold=1.0, calibration=str(path), keep_first=1, max_skips=2)
    settings = dataclasses.replace(S, step_cache=sc)
    plan = pipe.skip_plan(settings)
    assert plan.skipped == (1, 2, 4)
    rows, cached = _steps(pipe, encoded, settings)
    assert [r["skipped"] for r in rows] == [i in plan.skipped for i in range(6)]
    assert sum(r["model_evals"] for r in rows) == 12 - 2 * len(plan.skipped)
    for i in plan.skipped:
        for b, scale in (("v_cond", plan.cond_scale[i]), ("v_uncond", plan.uncond_scale[i])):
            np.testing.assert_allclose(rows[i][b], rows[0][b] * scale if i < 3 else rows[3][b] * scale, rtol=1e-6)
    assert plan.cond_scale[2] != pytest.approx(plan.cond_scale[1])  # so a carry overwritten at step 1 would show
    np.testing.assert_array_equal(rows[0]["latents"], full_rows[0]["latents"])
    assert not np.array_equal(cached, full)
    # a fixed list reuses the prediction as is
    rows, _ = _steps(pipe, encoded, dataclasses.replace(S, step_cache=StepCacheSettings(skip_steps=(3,))))
    np.testing.assert_array_equal(rows[3]["v_cond"], rows[2]["v_cond"])
    assert [r["model_evals"] for r in rows] == [2, 2, 2, 0, 2, 2]


def test_calibration_for_another_schedule_or_model_is_refused(i2v, tmp_path, tiny_ckpt):
    pipe, encoded = i2v
    rec = step_cache.CalibrationRecorder()
    pipe.denoise(encoded, S, on_step=rec, progress=False)
    path = rec.calibration(pipe.step_cache_key(S)).save(tmp_path / "cal.json")
    sc = StepCacheSettings(threshold=0.1, calibration=str(path))
    with pytest.raises(step_cache.StepCacheError, match="--steps: calibrated with 6, this run has 8"):
        pipe.check_settings(dataclasses.replace(S, steps=8, step_cache=sc), True)
    with pytest.raises(step_cache.StepCacheError, match="--shift: calibrated with 3.0, this run has 5.0"):
        pipe.check_settings(dataclasses.replace(S, shift=5.0, step_cache=sc), True)
    other = Pipeline(tiny_ckpt("tiny-wan2.1-t2v-1.3b"), load_encoders=False)
    with pytest.raises(step_cache.StepCacheError, match="DiT config: calibrated on 2 layers"):
        other.check_settings(dataclasses.replace(S, step_cache=sc), False)
    raw = json.loads(path.read_text())
    raw["steps"][2]["cond_norm"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(step_cache.StepCacheError, match="step 2 cond_norm must be a finite number"):
        step_cache.Calibration.load(tmp_path / "bad.json")
    with pytest.raises(step_cache.StepCacheError, match="does not exist; write one"):
        step_cache.Calibration.load(tmp_path / "missing.json")


# --- the command line --------------------------------------------------------------------------------------


SMALL = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "4", "--prompt", "a cat"]


@pytest.mark.parametrize("flags, message", [
    (["--cfg-reuse"], "--cfg-reuse .* needs --guidance-steps N"),
    (["--cfg-reuse", "--guidance-steps", "4"], "0 < N < --steps"),
    (["--step-cache", "0.1"], "needs --step-cache-calibration FILE"),
    (["--step-cache", "0"], "--step-cache must be a finite number > 0"),
    (["--step-cache-max-skips", "3"], "--step-cache-max-skips only applies with --step-cache"),
    (["--skip-steps", "a,b"], "comma-separated step numbers"),
    (["--skip-steps", "0"], "step 0 has no earlier prediction"),
    (["--skip-steps", "9"], "--skip-steps must be in 0..3"),
    (["--skip-steps", "2", "--step-cache-metric", "change"], "--skip-steps names the steps itself"),
    (["--step-cache", "0.1", "--step-cache-calibration", "nope.json"], "nope.json does not exist"),
    (["--skip-steps", "2", "--write-step-cache-calibration", "c.json"], "records a full run"),
    (["--write-step-cache-calibration", "c.txt"], "must end in .json"),
])
def test_cli_refuses_bad_fast_mode_flags_before_writing(tiny_ckpt, image, tmp_path, capsys, flags, message):
    img = tmp_path / "in" / "img.png"
    img.parent.mkdir()
    image.save(img)
    flags = [str(tmp_path / f) if f.endswith((".json", ".txt")) else f for f in flags]
    out = tmp_path / "o" / "v.mp4"
    rc = main(["generate", "--checkpoint", str(tiny_ckpt(I2V)), "--image", str(img), *SMALL, "--out", str(out),
               *flags])
    assert rc == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_generate_help_teaches_the_fast_modes(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--cfg-reuse", "--step-cache THRESHOLD", "--step-cache-calibration FILE", "--skip-steps",
                 "--write-step-cache-calibration", "wanport analyze fast-modes"):
        assert flag in text


# --- analyze fast-modes and the GPU bench, on the CPU ------------------------------------------------------


def test_cli_analyze_fast_modes_refuses_bad_lists(tmp_path, capsys):
    for flags, message in ((["--guidance-steps", "3"], "give --cut"), (["--cut", "10"], "in 1..9"),
                           (["--thresholds", "0.1,x"], "comma-separated numbers"),
                           (["--thresholds", "-1"], "finite number > 0"),
                           (["--step-cache-max-skips", "0"], "--step-cache-max-skips must be >= 1")):
        assert main(["analyze", "fast-modes", "--out", str(tmp_path / "o"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_analyze_fast_modes_rows_match_independent_runs(tiny_ckpt, tmp_path, capsys):
    import csv

    from jax_impl.media import load_image
    from parity import metrics
    from wanport.commands.demo import DEMO_IMAGE

    ckpt, out = tiny_ckpt(I2V), tmp_path / "fast"
    rc = main(["analyze", "fast-modes", "--checkpoint", str(ckpt), "--image", str(DEMO_IMAGE), "--prompt", "waves",
               "--negative-prompt", "blurry", "--frames", "5", "--height", "32", "--width", "32", "--steps", "4",
               "--guidance", "4", "--cut", "2", "--thresholds", "1.0", "--skip-steps", "2", "--repeats", "1",
               "--out", str(out)])
    assert rc == 0
    assert "| run | evals | skipped evals |" in capsys.readouterr().out
    with open(out / "fast_modes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["full", "truncation 2/4", "CFG reuse 2/4", "step cache 1", "skip 2"]
    assert [int(r["model_evals"]) for r in rows] == [8, 6, 6, 4, 6]  # step cache 1: steps 1 and 2 skipped
    assert rows[3]["skipped_steps"] == "[1, 2]" and rows[4]["skipped_steps"] == "[2]"
    assert rows[0]["identical"] == "True" and rows[0]["psnr_mean"] == "inf"
    assert all(r["identical"] == "False" and float(r["latents_rel_l2"]) > 0 for r in rows[1:])
    with open(out / "fast_modes_steps.csv", newline="") as f:
        steps = [r for r in csv.DictReader(f) if r["label"] in ("truncation 2/4", "skip 2")]
    err = {(r["label"], int(r["i"])): float(r["latents_rel_l2"]) for r in steps}
    assert err[("truncation 2/4", 1)] == 0 and err[("truncation 2/4", 2)] > 0
    assert err[("skip 2", 1)] == 0 and err[("skip 2", 2)] > 0
    # the calibration beside the report is valid for this model and schedule
    pipe = Pipeline(ckpt)
    settings = GenerateSettings(frames=5, height=32, width=32, steps=4, guidance=4.0)
    cal = step_cache.Calibration.load(out / "calibration.json")
    cal.check_key(pipe.step_cache_key(settings))
    # a row recomputed outside the analysis: the fixed list's latents and frames against the full run's
    encoded = pipe.encode(settings, prompt="waves", image=load_image(DEMO_IMAGE), negative_prompt="blurry")
    full = pipe.denoise(encoded, settings, progress=False)
    skipped = pipe.denoise(encoded, dataclasses.replace(settings, step_cache=StepCacheSettings(skip_steps=(2,))),
                           progress=False)
    assert float(rows[4]["latents_rel_l2"]) == pytest.approx(metrics.rel_l2(skipped, full), rel=1e-9)
    frames = metrics.compare_videos(pipe.decode(skipped), pipe.decode(full), metrics.RANGE_SIGNED)
    assert float(rows[4]["psnr_mean"]) == pytest.approx(frames["psnr_mean"], rel=1e-9)
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "fast_modes" and report["skip_plans"]["skip 2"].endswith("skipping 1 of 4 steps: 2")
    for name in ("fast_modes.png", "fast_modes_steps.png", "contact.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert len(list((out / "videos").iterdir())) == 5


@pytest.mark.slow
def test_bench_fast_modes_tiny_end_to_end(tmp_path):
    """bench/fast_modes.py --tiny on the CPU: every mode runs, nothing compiles while timed, evaluations add up."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "fast.json"
    p = subprocess.run([sys.executable, str(root / "bench" / "fast_modes.py"), "--tiny", "--skip-steps", "2,4",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "speed-up" in p.stdout and "frames SSIM" in p.stdout
    res = json.loads(out.read_text())
    rows = {r["mode"]: r for r in res["rows"]}
    assert list(rows) == ["full", "step cache 0.1", "skip 2,4", "CFG reuse 3/6", "truncation 3/6"]
    assert all(r["compiles_while_timed"] == 0 and r["latents_finite"] for r in rows.values())
    assert rows["full"]["model_evals"] == 12 and rows["full"]["latents"]["rel_l2"] == 0
    assert rows["skip 2,4"]["model_evals"] == 8 and rows["skip 2,4"]["skipped_steps"] == [2, 4]
    assert rows["CFG reuse 3/6"]["model_evals"] == rows["truncation 3/6"]["model_evals"] == 9
    cache = rows["step cache 0.1"]
    assert cache["model_evals"] == 12 - 2 * len(cache["skipped_steps"])
    assert all(r["latents"]["rel_l2"] > 0 and r["frames"]["psnr"] > 0 for m, r in rows.items() if m != "full")
    assert set(res["versions"]) >= {"jax", "flax"} and res["calibration"]["cond_ratio"][0] is None


@pytest.mark.slow
def test_generate_writes_a_calibration_then_skips_with_it(tiny_ckpt, image, tmp_path, capsys):
    img = tmp_path / "img.png"
    image.save(img)
    ckpt = tiny_ckpt(I2V)
    base = ["generate", "--checkpoint", str(ckpt), "--image", str(img), *SMALL, "--guidance", "4"]
    cal = tmp_path / "cal" / "c.json"
    assert main([*base, "--out", str(tmp_path / "a.mp4"), "--write-step-cache-calibration", str(cal)]) == 0
    assert f"wrote the step-cache calibration {cal}" in capsys.readouterr().out
    pipe = Pipeline(ckpt, load_encoders=False)
    settings = GenerateSettings(frames=5, height=32, width=32, steps=4, guidance=4.0)
    step_cache.Calibration.load(cal).check_key(pipe.step_cache_key(settings))
    # the same run with the cache: encode reused, denoise recomputed (the step cache is in its key), skips printed
    out = tmp_path / "a.mp4"
    assert main([*base, "--out", str(out), "--work-dir", str(tmp_path / "a.stages"), "--resume", "--step-cache", "1",
                 "--step-cache-calibration", str(cal)]) == 0
    log = capsys.readouterr().out
    assert "reusing" in log and "recomputing" in log
    assert "step cache (magnitude threshold 1, at most 2 in a row, first 1 kept): skipping 2 of 4 steps: 1,2" in log
