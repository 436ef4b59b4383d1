"""What the fast modes cost in quality and save in model evaluations and time, each against the full run.

The modes (see `jax_impl.sampling` and `jax_impl.step_cache`): guidance truncation at a cut N (only v_cond after
step N), CFG reuse at the same cut (after N: v_cond + (scale - 1) * d_last), and step caching (skip the DiT where a
calibration predicts a small change: a threshold, or a fixed list of steps). Every run goes through the real
pipeline (`Pipeline.denoise`) with the same seed, settings and encoded inputs as the reference, the full run
(full guidance, no skipped step); nothing about the sampler is re-implemented here and every number comes from
`parity.metrics`.

Per run: model evaluations made (a guided step 2, an unguided step 1, a skipped step 0) and skipped against the
reference, the skipped steps, the latents' relative L2 error against the reference's after every step (the per-step
latent error) and at the end, PSNR and SSIM of the decoded frames ([-1, 1], data range 2) against the
reference's, and the denoise and decode wall time. The calibration for the step-cache thresholds is recorded from
the reference run itself (`jax_impl.step_cache.CalibrationRecorder`) and written beside the report.

Timing: each run is made once untimed first (it compiles that run's step variants and records the per-step
latents, which needs the host), then timed `repeats` times with nothing read back per step; the fastest is kept.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jax_impl.media import to_uint8
from jax_impl.noise import initial_noise
from jax_impl.settings import StepCacheSettings
from jax_impl.step_cache import CalibrationRecorder
from parity import metrics
from parity.guidance import _fmt, _table, _write_text
from parity.plots import contact_sheet, frame_indices, plot_series, plot_tradeoff, write_csv, write_json

COLUMNS = ("label", "mode", "cut", "threshold", "steps", "model_evals", "evals_skipped", "evals_saved_pct",
           "skipped_steps", "denoise_s", "decode_s", "run_s", "time_saved_pct", "latents_rel_l2", "step_rel_l2_max",
           "psnr_mean", "psnr_min", "ssim_mean", "ssim_min", "identical")
STEP_COLUMNS = ("label", "i", "t", "expert", "guided", "skipped", "model_evals", "latents_rel_l2")


@dataclasses.dataclass
class FastRun:
    label: str
    settings: Any  # GenerateSettings of this run
    row: dict[str, Any]  # the table row (JSON-ready)
    steps: list[dict[str, Any]]  # per-step rows
    video: np.ndarray  # uint8 [B, F, H, W, 3]


def default_cuts(steps: int) -> list[int]:
    """One cut halfway (at least 1, before the last step): 40 steps -> 20, 10 -> 5."""
    return [min(max(1, steps // 2), steps - 1)] if steps >= 2 else []


DEFAULT_THRESHOLDS = (0.02, 0.05, 0.1)


def plan_modes(settings, cuts: Sequence[int], thresholds: Sequence[float], skip_lists: Sequence[Sequence[int]],
               calibration: str, *, max_skips: int | None = None, keep_first: int | None = None,
               metric: str = "magnitude") -> list[tuple[str, str, Any]]:
    """[(label, mode, settings)] of every run, the reference ("full") first; settings are checked here."""
    n = settings.steps
    if settings.guidance_steps is not None or settings.cfg_reuse or settings.step_cache is not None:
        raise ValueError("analyze fast-modes sets the modes itself (--cut, --thresholds, --skip-steps): drop "
                         "--guidance-steps")
    bad = [c for c in cuts if not 0 < c < n]
    if bad:
        raise ValueError(f"--cut {bad}: a cut N must be in 1..{n - 1} (--steps {n}): guidance on steps 0..N-1, then "
                         "truncation or CFG reuse")
    shape = {k: v for k, v in (("max_skips", max_skips), ("keep_first", keep_first)) if v is not None}
    out = [("full", "full", settings)]
    for c in sorted(set(cuts)):
        out.append((f"truncation {c}/{n}", "truncation", dataclasses.replace(settings, guidance_steps=c)))
        out.append((f"CFG reuse {c}/{n}", "cfg reuse", dataclasses.replace(settings, guidance_steps=c,
                                                                             cfg_reuse=True)))
    for t in sorted(set(thresholds)):
        sc = StepCacheSettings(threshold=float(t), calibration=str(calibration), metric=metric, **shape)
        out.append((f"step cache {t:g}", "step cache", dataclasses.replace(settings, step_cache=sc)))
    for lst in skip_lists:
        sc = StepCacheSettings(skip_steps=tuple(lst))
        out.append((f"skip {','.join(map(str, sorted(set(lst))))}", "skip list",
                    dataclasses.replace(settings, step_cache=sc)))
    return out


def run_fast_modes(pipe, settings, *, cuts: Sequence[int], thresholds: Sequence[float],
                   skip_lists: Sequence[Sequence[int]] = (), calibration_path, prompt: str | None, image=None,
                   last_image=None, negative_prompt: str = "", embeddings=None, max_skips: int | None = None,
                   keep_first: int | None = None, metric: str = "magnitude", repeats: int = 1,
                   log: Callable[[str], None] = print, on_video: Callable[[FastRun], None] | None = None
                   ) -> dict[str, Any]:
    """Calibrate on the reference run, then run and compare every mode. Returns {"runs": [FastRun, ...] (the
    reference first), "calibration": path, "encode_s", "calibrate_s", "skip_plans": {label: plan description}}."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    calibration_path = Path(calibration_path)
    modes = plan_modes(settings, cuts, thresholds, skip_lists, str(calibration_path), max_skips=max_skips,
                       keep_first=keep_first, metric=metric)
    pipe.check_settings(settings, image is not None)
    for label, mode, s in modes:
        if mode == "skip list":  # thresholds are checked once the calibration exists
            pipe.check_settings(s, image is not None)
    t0 = time.perf_counter()
    encoded = pipe.encode(settings, prompt=prompt, image=image, last_image=last_image,
                          negative_prompt=negative_prompt, embeddings=embeddings)
    encode_s = time.perf_counter() - t0
    has_negative = "negative_prompt_embeds" in encoded
    if not has_negative:
        log("note: no negative prompt embeddings: no step is guided, so truncation and CFG reuse change nothing")
    noise = initial_noise(settings.seed, pipe.latent_shape(settings))

    t0 = time.perf_counter()
    recorder = CalibrationRecorder()
    pipe.denoise(encoded, settings, noise=noise, on_step=recorder, progress=False)
    source = {"prompt": prompt, "seed": settings.seed, "guidance": settings.guidance, "frames": settings.frames,
              "height": settings.height, "width": settings.width, "note": "recorded by wanport analyze fast-modes"}
    recorder.calibration(pipe.step_cache_key(settings), source).save(calibration_path)
    calibrate_s = time.perf_counter() - t0
    log(f"calibration (per-step prediction norms of the full run): {calibration_path}")

    def once(s) -> tuple[list[dict[str, Any]], np.ndarray]:
        rows: list[dict[str, Any]] = []

        def keep(d):
            rows.append({"i": d["i"], "t": d["t"], "expert": d["expert"], "guided": d["guided"],
                         "skipped": d["skipped"], "model_evals": d["model_evals"],
                         "latents": np.array(d["latents"], np.float32)})

        return rows, pipe.denoise(encoded, s, noise=noise, on_step=keep, progress=False)

    def timed(s) -> tuple[float, float, np.ndarray, np.ndarray]:
        denoise_s = decode_s = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            latents = pipe.denoise(encoded, s, noise=noise, progress=False)
            denoise_s = min(denoise_s, time.perf_counter() - t)
            t = time.perf_counter()
            video = pipe.decode(latents)
            decode_s = min(decode_s, time.perf_counter() - t)
        return denoise_s, decode_s, latents, video

    pipe.decode(noise)  # compile the decoder before any timing
    runs: list[FastRun] = []
    plans: dict[str, str] = {}
    ref_steps = ref = None
    for label, mode, s in modes:
        plan = pipe.skip_plan(s, has_negative)
        if plan is not None:
            plans[label] = plan.describe()
            log(f"  {label}: {plan.describe()}")
        steps, _ = once(s)  # compiles this run's step variants; per-step latents
        denoise_s, decode_s, latents, video = timed(s)
        evals = sum(r["model_evals"] for r in steps)
        if ref is None:
            ref_steps = [r["latents"] for r in steps]
            ref = {"latents": latents, "video": video, "evals": evals, "run_s": denoise_s + decode_s}
        for r, want in zip(steps, ref_steps):
            r["latents_rel_l2"] = metrics.rel_l2(r.pop("latents"), want)
        cmp = metrics.compare_videos(video, ref["video"], metrics.RANGE_SIGNED)
        run_s = denoise_s + decode_s
        row = {
            "label": label, "mode": mode, "cut": s.guidance_steps,
            "threshold": s.step_cache.threshold if s.step_cache is not None else None,
            "steps": s.steps, "model_evals": evals, "evals_skipped": ref["evals"] - evals,
            "evals_saved_pct": 100.0 * (1 - evals / ref["evals"]),
            "skipped_steps": [r["i"] for r in steps if r["skipped"]],
            "denoise_s": denoise_s, "decode_s": decode_s, "run_s": run_s,
            "time_saved_pct": 100.0 * (1 - run_s / ref["run_s"]) if ref["run_s"] > 0 else 0.0,
            "latents_rel_l2": metrics.rel_l2(latents, ref["latents"]),
            "step_rel_l2_max": max(r["latents_rel_l2"] for r in steps),
            "psnr_mean": cmp["psnr_mean"], "psnr_min": cmp["psnr_min"],
            "ssim_mean": cmp["ssim_mean"], "ssim_min": cmp["ssim_min"],
            "identical": bool(np.array_equal(latents, ref["latents"])),
            "step_latents_rel_l2": [r["latents_rel_l2"] for r in steps],
            "psnr_per_frame": cmp["psnr_per_frame"], "ssim_per_frame": cmp["ssim_per_frame"], "notes": cmp["notes"],
        }
        run = FastRun(label, s, row, [{"label": label, **r} for r in steps], to_uint8(video))
        runs.append(run)
        if on_video is not None:
            on_video(run)
        log(f"  {label:<18} evals {evals:3d} (skipped {row['evals_skipped']:3d})  {run_s:7.2f} s  "
            f"latents rel L2 {row['latents_rel_l2']:.2e}  PSNR {row['psnr_mean']:.2f} dB  "
            f"SSIM {_fmt(row['ssim_mean'], '.4f')}")
    return {"runs": runs, "calibration": str(calibration_path), "encode_s": encode_s, "calibrate_s": calibrate_s,
            "skip_plans": plans, "repeats": repeats}


def write_report(out, result: dict[str, Any], meta: dict[str, Any], *,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """fast_modes.csv, fast_modes_steps.csv, fast_modes.png (quality vs evaluations saved), fast_modes_steps.png
    (per-step latent error), contact.png, report.json, report.md under `out`; prints the table."""
    out = Path(out)
    runs: list[FastRun] = result["runs"]
    rows = [r.row for r in runs]
    files = {"csv": out / "fast_modes.csv", "steps_csv": out / "fast_modes_steps.csv", "plot": out / "fast_modes.png",
             "plot_steps": out / "fast_modes_steps.png", "contact": out / "contact.png",
             "calibration": Path(result["calibration"]), "json": out / "report.json", "summary": out / "report.md"}
    write_csv(files["csv"], [{k: r[k] for k in COLUMNS} for r in rows], COLUMNS)
    write_csv(files["steps_csv"], [{k: s[k] for k in STEP_COLUMNS} for r in runs for s in r.steps], STEP_COLUMNS)
    ssim = all(r["ssim_mean"] is not None for r in rows)
    finite = [r["psnr_mean"] for r in rows if np.isfinite(r["psnr_mean"])]
    cap = (max(finite) if finite else 0.0) + 5.0
    points = [{"label": r["label"], "time_saved": r["evals_saved_pct"],
               "quality": r["ssim_mean"] if ssim else (r["psnr_mean"] if np.isfinite(r["psnr_mean"]) else cap)}
              for r in rows]
    plot_tradeoff(files["plot"], points, xlabel="model evaluations saved vs the full run (%)",
                  ylabel=f"{'SSIM' if ssim else 'PSNR (dB)'} vs the full run (mean over frames)",
                  title="fast modes: quality vs model evaluations saved")
    n = rows[0]["steps"]
    series = {r.label: [max(v, 1e-12) for v in r.row["step_latents_rel_l2"]] for r in runs[1:]}
    if series:
        plot_series(files["plot_steps"], list(range(n)), series, "denoising step",
                    "latents rel L2 vs the full run (log; 0 drawn at 1e-12)", "per-step latent error of each fast mode",
                    logy=True)
    else:
        files.pop("plot_steps")
    h, w = runs[0].video.shape[2:4]
    columns = frame_indices(runs[0].video.shape[1], 5)
    contact_sheet(files["contact"], {r.label: r.video[0] for r in runs}, frames=columns,
                  scale=max(1, min(4, 128 // max(h, w))), label_width=130)
    report = {
        "kind": "fast_modes", **meta,
        "comparison": ("Every run uses the reference's seed, settings and encoded inputs; the reference is the full "
                       "run (full guidance, no step skipped). Latents: relative L2 against the reference's after "
                       "every step and at the end; frames: PSNR/SSIM of the decoded videos in [-1, 1] (data range 2)."
                       " A guided step is 2 model evaluations, an unguided step 1, a skipped step 0."),
        "timing": ("denoise + decode wall seconds, the fastest of `repeats` runs, each after an untimed run of the "
                   "same mode (compilation, per-step latents); encode is shared and not counted."),
        "repeats": result["repeats"], "encode_s": result["encode_s"], "calibrate_s": result["calibrate_s"],
        "skip_plans": result["skip_plans"], "contact_frames": columns, "runs": rows,
        "files": {k: str(v) for k, v in files.items()},
    }
    write_json(files["json"], report)
    table = _table(rows, [("label", "run", ""), ("model_evals", "evals", "d"), ("evals_skipped", "skipped evals", "d"),
                          ("evals_saved_pct", "evals saved %", ".1f"), ("run_s", "time s", ".2f"),
                          ("time_saved_pct", "time saved %", ".1f"), ("latents_rel_l2", "latents rel L2", ".2e"),
                          ("step_rel_l2_max", "max step rel L2", ".2e"), ("psnr_mean", "PSNR dB", ".2f"),
                          ("ssim_mean", "SSIM", ".4f"), ("identical", "= ref", "")])
    log(table)
    plan_lines = [f"- {k}: {v}" for k, v in result["skip_plans"].items()]
    md = [f"# Fast modes: {meta.get('checkpoint', '')}", "",
          f"Reference: the full run, {n} steps, {rows[0]['model_evals']} model evaluations, {rows[0]['run_s']:.2f} s "
          "(denoise + decode).", "", table, "", "Skipped steps:", *plan_lines, "", report["comparison"], "",
          "Timing: " + report["timing"], "", "Files: " + ", ".join(Path(v).name for v in files.values()), ""]
    _write_text(files["summary"], "\n".join(md))
    return report
