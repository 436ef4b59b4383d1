"""`wanport analyze cfg` / `analyze truncation` (parity.guidance): exactness of guidance truncation, the recorded
cond/uncond gap against independent recomputations, and the files the tiny default writes."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import pytest
from PIL import Image

from wanport.cli import main
from jax_impl.pipeline import GenerateSettings, Pipeline
from jax_impl.sampling import DenoiseInputs, expert_for, model_input
from parity import guidance

I2V = "tiny-wan2.1-i2v-14b"
A14B = "tiny-wan2.2-i2v-a14b"
SETTINGS = GenerateSettings(frames=5, height=32, width=32, steps=4, guidance=5.0, seed=1)
# 6 steps at the A14B's shift: the first on the high-noise expert (t >= 900), the last on the low-noise one
A14B_SETTINGS = GenerateSettings(frames=5, height=32, width=32, steps=6, guidance=3.5, guidance_2=2.0)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def i2v(tiny_ckpt, image):
    pipe = Pipeline(tiny_ckpt(I2V))
    encoded = pipe.encode(SETTINGS, prompt="a cat on the beach", image=image, negative_prompt="blurry")
    return pipe, encoded


def _denoise(pipe, encoded, settings, **kw):
    return pipe.denoise(encoded, settings, progress=False, **kw)


def _collect(pipe, encoded, settings):
    """A separate run that keeps every step's arrays: (steps, final latents)."""
    steps = []

    def keep(d):
        steps.append({k: (np.array(v) if hasattr(v, "shape") else v) for k, v in d.items()})

    return steps, _denoise(pipe, encoded, settings, on_step=keep)


def _inputs(encoded):
    return DenoiseInputs(text=encoded["prompt_embeds"], negative_text=encoded.get("negative_prompt_embeds"),
                         image=encoded.get("image_embeds"), condition=encoded.condition)


@functools.partial(jax.jit, static_argnums=0)
def _call(graphdef, params, x, timestep, text, image):
    return nnx.merge(graphdef, params)(x, timestep, text, image)


def _direct_gap(model, encoded, latents_before, t):
    """cond/uncond MSE from two plain model calls (batch 1 each), outside the sampler."""
    inputs = _inputs(encoded)
    x, ts = model_input(jnp.asarray(latents_before), inputs, jnp.float32(t), model.dtype)
    graphdef, params = nnx.split(model)
    v_c = np.asarray(_call(graphdef, params, x, ts, inputs.text, inputs.image), np.float64)
    v_u = np.asarray(_call(graphdef, params, x, ts, inputs.negative_text, inputs.image), np.float64)
    return float(np.mean((v_c - v_u) ** 2))


def test_truncation_at_all_steps_is_full_guidance_and_at_zero_is_unguided(i2v):
    pipe, encoded = i2v
    full = _denoise(pipe, encoded, SETTINGS)
    for n in (SETTINGS.steps, SETTINGS.steps + 5):  # N >= steps: CFG on every step
        np.testing.assert_array_equal(_denoise(pipe, encoded, dataclasses.replace(SETTINGS, guidance_steps=n)), full)
    zero = _denoise(pipe, encoded, dataclasses.replace(SETTINGS, guidance_steps=0))
    scale_one = _denoise(pipe, encoded, dataclasses.replace(SETTINGS, guidance=1.0))
    no_negative = _denoise(pipe, dataclasses.replace(
        encoded, embeddings={k: v for k, v in encoded.items() if k != "negative_prompt_embeds"}), SETTINGS)
    np.testing.assert_array_equal(zero, scale_one)
    np.testing.assert_array_equal(zero, no_negative)
    assert not np.array_equal(zero, full), "guidance must change the result, or the test proves nothing"
    half = _denoise(pipe, encoded, dataclasses.replace(SETTINGS, guidance_steps=2))
    assert not np.array_equal(half, full) and not np.array_equal(half, zero)
    # and the decoded frames, bit for bit
    all_steps = _denoise(pipe, encoded, dataclasses.replace(SETTINGS, guidance_steps=SETTINGS.steps))
    np.testing.assert_array_equal(pipe.decode(all_steps), pipe.decode(full))


def test_run_truncation_rows_and_common_frames(i2v, image):
    from parity import metrics

    pipe, _ = i2v
    result = guidance.run_truncation(pipe, SETTINGS, [0, 2, 4], [5, 1], prompt="a cat on the beach", image=image,
                                     negative_prompt="blurry", keep_latents=True, repeats=2, log=lambda m: None)
    runs = result["runs"]
    assert [(r.frames, r.cut) for r in runs] == [(5, 4), (5, 0), (5, 2), (1, 0), (1, 2), (1, 4)]
    ref = runs[0]
    assert ref.row["identical"] and ref.row["psnr_mean"] == np.inf and ref.row["time_saved_pct"] == 0.0
    assert result["repeats"] == 2 and all(r.row["denoise_s"] > 0 and r.row["decode_s"] > 0 for r in runs)
    # costs: a guided step is 2 evaluations in one batch-of-2 call
    assert [r.row["model_evals"] for r in runs] == [8, 4, 6, 4, 6, 8]
    assert all(r.row["model_calls"] == 4 for r in runs)
    assert runs[1].row["evals_saved_pct"] == 50.0 and not runs[1].row["identical"]
    # cut 0 is the unguided run, bit for bit (same noise and inputs)
    unguided = _denoise(pipe, i2v[1], dataclasses.replace(SETTINGS, guidance=1.0))
    np.testing.assert_array_equal(runs[1].latents, unguided)
    # fewer frames: compared with the reference's first frames, from the reference's noise cut to its latent frames
    ref_video = pipe.decode(ref.latents)
    short = runs[-1]
    assert short.row["compared_frames"] == 1 and short.row["temporal_mse"] is None
    assert short.row["psnr_per_frame"] == metrics.video_psnr(pipe.decode(short.latents), ref_video[:, :1],
                                                             metrics.RANGE_SIGNED).values.tolist()
    from jax_impl.noise import initial_noise

    noise = initial_noise(SETTINGS.seed, pipe.latent_shape(SETTINGS))[:, :1]
    np.testing.assert_array_equal(short.latents, _denoise(pipe, pipe.encode(
        dataclasses.replace(SETTINGS, frames=1), prompt="a cat on the beach", image=image, negative_prompt="blurry"),
        dataclasses.replace(SETTINGS, frames=1), noise=noise))
    for r in runs[1:]:
        assert r.row["psnr_mean"] > 0 and 0 < r.row["ssim_mean"] < 1 and r.video.dtype == np.uint8


def test_cfg_gap_matches_independent_recomputation(i2v):
    pipe, encoded = i2v
    settings = dataclasses.replace(SETTINGS, guidance_steps=3)
    records, latents, _ = guidance.record_cfg(pipe, encoded, settings)
    assert [r["guided"] for r in records] == [True, True, True, False]
    assert [r["expert"] for r in records] == [0, 0, 0, 0]
    # 1) from the on_step arrays of a separate run, with plain numpy
    steps, latents_2 = _collect(pipe, encoded, settings)
    np.testing.assert_array_equal(latents, latents_2)
    for rec, st in zip(records, steps):
        want = float(np.mean((st["v_cond"].astype(np.float64) - st["v_uncond"].astype(np.float64)) ** 2))
        assert rec["cfg_mse"] == pytest.approx(want, rel=1e-12, abs=0)
        assert rec["t"] == st["t"]
    assert records[3]["cfg_mse"] == 0.0 and records[3]["scale"] == 1.0  # guidance off: no unconditional prediction
    assert all(r["cfg_mse"] > 0 and r["scale"] == 5.0 for r in records[:3])
    # 2) from calling the model directly, cond and uncond as two batch-1 calls, at steps 0 and 2
    noise = pipe.latent_shape(settings)
    from jax_impl.noise import initial_noise

    before = {0: initial_noise(settings.seed, noise), 2: steps[1]["latents"]}
    for i, x in before.items():
        assert records[i]["cfg_mse"] == pytest.approx(_direct_gap(pipe.experts[0], encoded, x, records[i]["t"]),
                                                      rel=1e-3)
    summary = guidance.cfg_summary(records, 1, True)
    assert summary["model_evals"] == 7 and summary["guided_steps"] == 3
    assert summary["per_expert"]["0"]["cfg_mse_last"] == records[2]["cfg_mse"]


def test_a14b_steps_are_tagged_with_both_experts(tiny_ckpt, image):
    pipe = Pipeline(tiny_ckpt(A14B))
    encoded = pipe.encode(A14B_SETTINGS, prompt="a dog", image=image, negative_prompt="")
    records, _, _ = guidance.record_cfg(pipe, encoded, A14B_SETTINGS)
    schedule = pipe.schedule(A14B_SETTINGS)
    want = [expert_for(float(t), pipe.boundary_ratio, 2) for t in schedule.timesteps]
    assert want[0] == 0 and want[-1] == 1, "the settings must use both experts"
    assert [r["expert"] for r in records] == want
    assert [r["scale"] for r in records] == [3.5 if e == 0 else 2.0 for e in want]
    steps, _ = _collect(pipe, encoded, A14B_SETTINGS)
    for rec, st in zip(records, steps):
        gap = float(np.mean((st["v_cond"].astype(np.float64) - st["v_uncond"].astype(np.float64)) ** 2))
        assert rec["expert"] == st["expert"] and rec["cfg_mse"] == pytest.approx(gap, rel=1e-12, abs=0)
    # step 4 ran on the low-noise expert: the direct call to expert 1 reproduces its gap, expert 0's does not
    i = want.index(1)
    got = _direct_gap(pipe.experts[1], encoded, steps[i - 1]["latents"], records[i]["t"])
    other = _direct_gap(pipe.experts[0], encoded, steps[i - 1]["latents"], records[i]["t"])
    assert records[i]["cfg_mse"] == pytest.approx(got, rel=1e-3)
    assert records[i]["cfg_mse"] != pytest.approx(other, rel=1e-2)
    summary = guidance.cfg_summary(records, 2, True)
    assert summary["per_expert"]["0"]["name"] == "high-noise expert"
    assert summary["per_expert"]["1"]["steps"] == list(range(i, 6))


def _png_ok(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_cfg_tiny_default_writes_report_and_plots(tmp_path, capsys):
    out = tmp_path / "cfg"
    assert main(["analyze", "cfg", "--out", str(out), "--no-video"]) == 0  # tiny default: 17 frames, 64x64, 10 steps
    for name in ("cfg.png", "cfg_t.png"):
        _png_ok(out / name)
    rows = _csv_rows(out / "cfg.csv")
    assert [int(r["i"]) for r in rows] == list(range(10))
    assert set(guidance.CFG_COLUMNS) == set(rows[0])
    assert all(r["guided"] == "True" and float(r["cfg_mse"]) > 0 and r["expert"] == "0" for r in rows)
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "cfg" and report["tiny_preset"] == I2V
    assert {k: report["settings"][k] for k in ("frames", "height", "width", "steps")} == {
        "frames": 17, "height": 64, "width": 64, "steps": 10}
    assert [s["cfg_mse"] for s in report["steps"]] == [float(r["cfg_mse"]) for r in rows]
    assert report["summary"]["model_evals"] == 20
    assert "CFG gap" in (out / "report.md").read_text()
    assert "model (0): 10 guided steps" in capsys.readouterr().out


def test_cli_truncation_writes_table_plots_and_contact_sheet(tiny_ckpt, tmp_path, capsys):
    from wanport.commands.demo import DEMO_IMAGE

    out = tmp_path / "trunc"
    rc = main(["analyze", "truncation", "--checkpoint", str(tiny_ckpt(I2V)), "--image", str(DEMO_IMAGE),
               "--prompt", "waves", "--negative-prompt", "blurry", "--frames", "5", "--height", "32", "--width", "32",
               "--steps", "3", "--cut", "0,1,3", "--frames-list", "5,1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| run | frames | cut |" in printed and "saved %" in printed
    for name in ("truncation.png", "truncation_frames.png", "contact.png"):
        _png_ok(out / name)
    rows = _csv_rows(out / "truncation.csv")
    assert [(r["frames"], r["cut"]) for r in rows] == [("5", "3"), ("5", "0"), ("5", "1"), ("1", "0"), ("1", "1"),
                                                       ("1", "3")]
    assert list(rows[0]) == list(guidance.TRUNCATION_COLUMNS)
    assert rows[0]["identical"] == "True" and rows[0]["psnr_mean"] == "inf"
    assert [int(r["model_evals"]) for r in rows] == [6, 3, 4, 3, 4, 6]
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "truncation" and report["cuts"] == [0, 1, 3] and len(report["runs"]) == 6
    assert len(report["runs"][1]["psnr_per_frame"][0]) == 5 and report["contact_frames"] == [0]
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(
        f"f{r['frames']}_cut{r['cut']}.mp4" for r in rows)
    assert "common frames" in (out / "report.md").read_text()


def test_cli_bad_input_is_a_message(tmp_path, capsys):
    assert main(["analyze", "truncation", "--out", str(tmp_path), "--guidance-steps", "3"]) == 2
    assert "--cut" in capsys.readouterr().err
    assert main(["analyze", "truncation", "--out", str(tmp_path), "--cut", "0,20"]) == 2
    assert "0..10" in capsys.readouterr().err
    assert main(["analyze", "truncation", "--out", str(tmp_path), "--cut", "a,b"]) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(["analyze", "truncation", "--out", str(tmp_path), "--frames-list", "81"]) == 2
    assert "at most --frames (17)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "bad input must fail before anything is written"
    assert main(["analyze"]) == 2
