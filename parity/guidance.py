"""Guidance analyses: how far apart the conditional and unconditional predictions are at each step, and what
switching classifier-free guidance (CFG) off after step N (guidance truncation) costs in quality and saves in time.

Both run the real JAX pipeline (`jax_impl.pipeline.Pipeline`) through its `on_step` callback; nothing about the
sampling loop is re-implemented here, and every metric comes from `parity.metrics`.

CFG gap (`record_cfg`): at step i the model predicts a velocity with the prompt (v_cond) and with the negative
prompt (v_uncond); guidance uses v = v_uncond + s (v_cond - v_uncond). The recorded `cfg_mse` is
`parity.metrics.mse(v_cond, v_uncond)` over the whole latent batch, computed in float64 on the host. On a step
without guidance (after truncation, scale <= 1, or no negative prompt) only v_cond is computed, v_uncond is
v_cond, and `cfg_mse` is 0 with `guided` False. Each step is tagged with the expert that ran it (0: the
high-noise expert of Wan2.2 A14B or the only model; 1: the low-noise expert).

Truncation (`run_truncation`): the reference is the full-guidance run at the full frame count. Every other run
uses the same seed, settings and encoded inputs with `guidance_steps = cut` (CFG on steps 0..cut-1 only) and
optionally fewer frames. Quality is measured on the decoded videos ([-1, 1] floats, data range 2) with
`parity.metrics.compare_videos`. Fewer-frames runs: frame k of every Wan video is the moment k / fps after the
conditioning image, so a shorter video is compared with the *first* `frames` frames of the reference (its common
frames); its starting noise is the reference's noise cut to its first latent frames, so the common frames start
from identical noise and differ only through the length (and the truncation). Wall time: each frame count is
warmed up first (both compiled step variants, guided and unguided, and the VAE decoder), so the measured
denoise + decode times of the runs hold no compilation. Model evaluations: a guided step costs 2 (conditional
and unconditional; one batch of 2 with cfg_batch, else two calls), an unguided step 1.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jax_impl.media import to_uint8
from jax_impl.noise import initial_noise
from jax_impl.sampling import Guidance, expert_for
from parity import metrics
from parity.plots import contact_sheet, frame_indices, plot_series, plot_tradeoff, write_csv, write_json
from weights.atomic import atomic_write

EXPERT_NAMES = {1: ("model",), 2: ("high-noise expert", "low-noise expert")}


def expert_name(expert: int, num_experts: int) -> str:
    names = EXPERT_NAMES.get(num_experts, ())
    return names[expert] if expert < len(names) else f"expert {expert}"


# ---------------------------------------------------------------------------------------------------------
# CFG gap per step


@dataclasses.dataclass
class CfgRecorder:
    """An `on_step` callback that records the cond/uncond gap of every step.

    Each record: i, t (timestep), sigma (noise level before the step), expert, guided, scale (the guidance
    scale of that expert, 1.0 on unguided steps), cfg_mse = mse(v_cond, v_uncond), cond_ms = mean(v_cond^2),
    uncond_ms = mean(v_uncond^2), cfg_rel = cfg_mse / cond_ms (0 when cond_ms is 0).
    """

    sigmas: Sequence[float] | None = None
    scales: Callable[[int], float] | None = None
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __call__(self, step: dict[str, Any]) -> None:
        v_cond = np.asarray(step["v_cond"])
        v_uncond = np.asarray(step["v_uncond"])
        i, expert, guided = int(step["i"]), int(step["expert"]), bool(step["guided"])
        cfg_mse = metrics.mse(v_cond, v_uncond)
        cond_ms = metrics.mse(v_cond, np.zeros_like(v_cond))
        self.records.append({
            "i": i,
            "t": float(step["t"]),
            "sigma": float(self.sigmas[i]) if self.sigmas is not None else None,
            "expert": expert,
            "guided": guided,
            "scale": float(self.scales(expert)) if guided and self.scales is not None else 1.0,
            "cfg_mse": cfg_mse,
            "cond_ms": cond_ms,
            "uncond_ms": metrics.mse(v_uncond, np.zeros_like(v_uncond)),
            "cfg_rel": cfg_mse / cond_ms if cond_ms > 0 else 0.0,
        })


def guidance_of(settings):
    return Guidance.from_settings(settings)


def record_cfg(pipe, encoded: dict[str, np.ndarray], settings, *, noise: np.ndarray | None = None,
               progress: bool = False) -> tuple[list[dict[str, Any]], np.ndarray, float]:
    """Denoise once with `settings`, recording the CFG gap of every step: (records, final latents, seconds)."""
    schedule = pipe.schedule(settings)
    recorder = CfgRecorder(sigmas=[float(s) for s in schedule.sigmas], scales=guidance_of(settings).scale_for)
    t0 = time.perf_counter()
    latents = pipe.denoise(encoded, settings, noise=noise, on_step=recorder, progress=progress)
    return recorder.records, latents, time.perf_counter() - t0


def model_cost(guided: Sequence[bool], cfg_batch: bool) -> dict[str, int]:
    """Model evaluations (a guided step: 2, else 1) and model calls (a guided step: 1 with cfg_batch, else 2)."""
    g = sum(bool(x) for x in guided)
    n = len(guided)
    return {"steps": n, "guided_steps": g, "model_evals": n + g, "model_calls": n + (0 if cfg_batch else g)}


def guided_steps(settings, schedule, num_experts: int, boundary_ratio, has_negative: bool) -> list[bool]:
    """Which steps the sampler will guide, decided exactly as `jax_impl.sampling.sample` decides it."""
    g = guidance_of(settings)
    out = []
    for i in range(schedule.num_steps):
        e = expert_for(float(schedule.timesteps[i]), boundary_ratio, num_experts, schedule.config.num_train_timesteps)
        out.append(g.active(i, e, has_negative))
    return out


def cfg_summary(records: list[dict[str, Any]], num_experts: int, cfg_batch: bool) -> dict[str, Any]:
    per_expert = {}
    for e in sorted({r["expert"] for r in records}):
        rows = [r for r in records if r["expert"] == e]
        guided = [r for r in rows if r["guided"]]
        vals = [r["cfg_mse"] for r in guided]
        per_expert[str(e)] = {
            "name": expert_name(e, num_experts),
            "steps": [r["i"] for r in rows],
            "guided_steps": len(guided),
            "t_range": [rows[0]["t"], rows[-1]["t"]],
            "cfg_mse_mean": float(np.mean(vals)) if vals else None,
            "cfg_mse_max": float(np.max(vals)) if vals else None,
            "cfg_mse_first": vals[0] if vals else None,
            "cfg_mse_last": vals[-1] if vals else None,
            "cfg_rel_mean": float(np.mean([r["cfg_rel"] for r in guided])) if guided else None,
        }
    return {"per_expert": per_expert, **model_cost([r["guided"] for r in records], cfg_batch)}


# ---------------------------------------------------------------------------------------------------------
# Guidance truncation


def default_cuts(steps: int, points: int = 5) -> list[int]:
    """Evenly spaced cuts from 0 (no guidance) to `steps` (full guidance): 40 -> 0, 10, 20, 30, 40."""
    return sorted({int(round(x)) for x in np.linspace(0, steps, points)})


class _StopWarmup(Exception):
    pass


def warm_up(pipe, encoded: dict[str, np.ndarray], settings, noise: np.ndarray) -> float:
    """Compile what the timed runs use, at this shape: the guided and the unguided step (two steps of a run
    truncated after one; the experts of an A14B share one compiled step) and the VAE decoder. Seconds spent."""
    t0 = time.perf_counter()
    seen = []

    def stop(step: dict[str, Any]) -> None:
        seen.append(step["guided"])
        if len(seen) >= 2:
            raise _StopWarmup

    warm = dataclasses.replace(settings, guidance_steps=1)
    try:
        pipe.denoise(encoded, warm, noise=noise, on_step=stop, progress=False)
    except _StopWarmup:
        pass
    pipe.decode(noise)  # the chunked decoder compiles per length: decode the full shape once
    return time.perf_counter() - t0


@dataclasses.dataclass
class TruncationRun:
    label: str
    frames: int
    cut: int  # CFG on steps 0..cut-1; `steps` means full guidance
    row: dict[str, Any]  # the table row (JSON-ready)
    video: np.ndarray  # uint8 [B, F, H, W, 3]
    latents: np.ndarray | None = None


def run_label(frames: int, cut: int, steps: int, ref_frames: int) -> str:
    g = "full CFG" if cut >= steps else ("no CFG" if cut == 0 else f"CFG {cut}/{steps}")
    return g if frames == ref_frames else f"{g}, {frames}f"


def run_truncation(pipe, settings, cuts: Sequence[int], frames_list: Sequence[int], *, prompt: str | None,
                   image=None, last_image=None, negative_prompt: str = "", embeddings=None,
                   keep_latents: bool = False, warmup: bool = True, repeats: int = 1,
                   log: Callable[[str], None] = print,
                   on_video: Callable[[TruncationRun], None] | None = None) -> dict[str, Any]:
    """Run the reference (full guidance, settings.frames) and every (frames, cut) pair; compare each with it.

    Returns {"reference": row, "runs": [TruncationRun, ...] (the reference first), "warmup_s": seconds,
    "encode_s": seconds}. `on_video(run)` is called as each run finishes (e.g. to write its mp4).
    Each run is timed `repeats` times and the fastest denoise and decode are kept (short runs, busy machines).
    """
    steps = settings.steps
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if settings.guidance_steps is not None:
        raise ValueError("truncation sets guidance_steps itself: give the cuts (--cut), not --guidance-steps")
    cuts = sorted(set(int(c) for c in cuts))
    bad = [c for c in cuts if not 0 <= c <= steps]
    if bad:
        raise ValueError(f"cuts {bad} are outside 0..{steps} (--steps); a cut N keeps CFG on steps 0..N-1")
    frames_list = sorted(set(int(f) for f in frames_list), reverse=True)
    longer = [f for f in frames_list if f > settings.frames]
    if longer:
        raise ValueError(f"--frames-list {longer} exceed --frames {settings.frames}: the reference is the "
                         "full-guidance run at --frames and the others are compared on their common frames")
    for f in frames_list:
        pipe.check_settings(dataclasses.replace(settings, frames=f), image is not None)

    t0 = time.perf_counter()
    ref_settings = settings
    encoded = {settings.frames: pipe.encode(settings, prompt=prompt, image=image, last_image=last_image,
                                            negative_prompt=negative_prompt, embeddings=embeddings)}
    # The text and image embeddings do not depend on the frame count: encode them once, redo only the VAE condition.
    shared = {k: v for k, v in encoded[settings.frames].items()
              if k in ("prompt_embeds", "negative_prompt_embeds", "image_embeds")}
    for f in frames_list:
        if f not in encoded:
            encoded[f] = pipe.encode(dataclasses.replace(settings, frames=f), image=image, last_image=last_image,
                                     embeddings=shared)
    encode_s = time.perf_counter() - t0
    has_negative = "negative_prompt_embeds" in encoded[settings.frames]
    if not has_negative:
        log("note: no negative prompt embeddings, so no step is guided and every cut gives the same video")
    ref_noise = initial_noise(settings.seed, pipe.latent_shape(settings))
    noises = {f: np.ascontiguousarray(ref_noise[:, : pipe.latent_shape(dataclasses.replace(settings, frames=f))[1]])
              for f in set(frames_list) | {settings.frames}}

    warmup_s = 0.0
    if warmup:
        for f in sorted(noises, reverse=True):
            warmup_s += warm_up(pipe, encoded[f], dataclasses.replace(settings, frames=f), noises[f])
        log(f"warm-up (compilation) {warmup_s:.1f} s")

    schedule = pipe.schedule(settings)
    n_exp = len(pipe.experts)

    def one(frames: int, cut: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        s = dataclasses.replace(ref_settings, frames=frames, guidance_steps=None if cut >= steps else cut)
        denoise_s = decode_s = float("inf")
        for _ in range(repeats):  # the fastest of `repeats` timings of the same (deterministic) run
            flags: list[bool] = []
            t = time.perf_counter()
            latents = pipe.denoise(encoded[frames], s, noise=noises[frames],
                                   on_step=lambda d: flags.append(d["guided"]), progress=False)
            denoise_s = min(denoise_s, time.perf_counter() - t)
            t = time.perf_counter()
            video = pipe.decode(latents)
            decode_s = min(decode_s, time.perf_counter() - t)
        expect = guided_steps(s, schedule, n_exp, pipe.boundary_ratio, has_negative)
        assert flags == expect, f"sampler guided {flags}, expected {expect}"
        row = {"label": run_label(frames, cut, steps, settings.frames), "frames": frames, "cut": min(cut, steps),
               **model_cost(flags, settings.cfg_batch), "denoise_s": denoise_s, "decode_s": decode_s,
               "run_s": denoise_s + decode_s}
        return row, latents, video

    runs: list[TruncationRun] = []
    ref_row, ref_latents, ref_video = one(settings.frames, steps)
    log(f"reference ({ref_row['label']}, {settings.frames} frames): denoise {ref_row['denoise_s']:.2f} s, "
        f"decode {ref_row['decode_s']:.2f} s, {ref_row['model_evals']} model evaluations")
    reference = (settings.frames, steps)
    plan = [reference] + [(f, c) for f in frames_list for c in cuts if (f, c) != reference]
    for frames, cut in plan:
        if (frames, cut) == (settings.frames, steps):
            row, latents, video = dict(ref_row), ref_latents, ref_video
        else:
            row, latents, video = one(frames, cut)
        cmp = metrics.compare_videos(video, ref_video[:, :frames], metrics.RANGE_SIGNED)
        same_shape = latents.shape == ref_latents.shape
        row.update({
            "evals_saved_pct": 100.0 * (1 - row["model_evals"] / ref_row["model_evals"]),
            "time_saved_s": ref_row["run_s"] - row["run_s"],
            "time_saved_pct": 100.0 * (1 - row["run_s"] / ref_row["run_s"]) if ref_row["run_s"] > 0 else 0.0,
            "denoise_saved_pct": (100.0 * (1 - row["denoise_s"] / ref_row["denoise_s"]) if ref_row["denoise_s"] > 0
                                  else 0.0),
            "compared_frames": frames,
            "psnr_mean": cmp["psnr_mean"], "psnr_min": cmp["psnr_min"],
            "ssim_mean": cmp["ssim_mean"], "ssim_min": cmp["ssim_min"],
            "temporal_mse": cmp["temporal_mse_a"], "temporal_mse_ref": cmp["temporal_mse_b"],
            "identical": bool(same_shape and np.array_equal(latents, ref_latents)),
            "psnr_per_frame": cmp["psnr_per_frame"], "ssim_per_frame": cmp["ssim_per_frame"],
            "temporal_per_pair": metrics.temporal_continuity(video).values.tolist() if frames > 1 else None,
            "notes": cmp["notes"],
        })
        run = TruncationRun(row["label"], frames, min(cut, steps), row, to_uint8(video),
                            latents if keep_latents else None)
        runs.append(run)
        if on_video is not None:
            on_video(run)
        log(f"  {row['label']:<18} {row['denoise_s'] + row['decode_s']:7.2f} s  saved {row['time_saved_pct']:5.1f}%  "
            f"PSNR {row['psnr_mean']:.2f} dB  SSIM {_fmt(row['ssim_mean'], '.4f')}")
    return {"reference": runs[0].row, "runs": runs, "warmup_s": warmup_s, "encode_s": encode_s, "repeats": repeats}


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# ---------------------------------------------------------------------------------------------------------
# Reports

CFG_COLUMNS = ("i", "t", "sigma", "expert", "expert_name", "guided", "scale", "cfg_mse", "cfg_rel", "cond_ms",
               "uncond_ms")
TRUNCATION_COLUMNS = ("label", "frames", "cut", "steps", "guided_steps", "model_evals", "model_calls",
                      "evals_saved_pct", "denoise_s", "decode_s", "run_s", "time_saved_s", "time_saved_pct",
                      "denoise_saved_pct", "compared_frames", "psnr_mean", "psnr_min", "ssim_mean", "ssim_min",
                      "temporal_mse", "temporal_mse_ref", "identical")


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (key, header, format spec)."""
    def cell(v, spec):
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float) and not np.isfinite(v):
            return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
        return format(v, spec)

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def _write_text(path, text: str):
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_cfg_report(out, records: list[dict[str, Any]], meta: dict[str, Any], num_experts: int,
                     cfg_batch: bool = True) -> dict[str, Any]:
    """cfg.csv, cfg.png (gap over steps), cfg_t.png (over timesteps), report.json, report.md under `out`.

    Returns the report (what report.json holds)."""
    out = Path(out)
    rows = [{**r, "expert_name": expert_name(r["expert"], num_experts)} for r in records]
    summary = cfg_summary(records, num_experts, cfg_batch)
    files = {"csv": out / "cfg.csv", "plot_steps": out / "cfg.png", "plot_timesteps": out / "cfg_t.png",
             "json": out / "report.json", "summary": out / "report.md"}
    write_csv(files["csv"], rows, CFG_COLUMNS)
    series = {}
    for e in sorted({r["expert"] for r in records}):
        series[f"{expert_name(e, num_experts)} ({e})" if num_experts > 1 else expert_name(e, num_experts)] = [
            r["cfg_mse"] if r["expert"] == e and r["guided"] else np.nan for r in records]
    finite = [v for y in series.values() for v in y if np.isfinite(v)]
    logy = bool(finite) and min(finite) > 0
    if not finite:  # nothing guided: draw the zeros that were recorded
        series = {k: [r["cfg_mse"] if r["expert"] == e else np.nan for r in records]
                  for k, e in zip(series, sorted({r["expert"] for r in records}))}
    title = "CFG gap: MSE(v_cond, v_uncond) per step" + (" (gaps: unguided steps)" if summary["guided_steps"] < len(
        records) else "")
    ylabel = "MSE(cond, uncond)" + (" (log)" if logy else "")
    plot_series(files["plot_steps"], [r["i"] for r in records], series, "denoising step", ylabel, title, logy=logy)
    plot_series(files["plot_timesteps"], [r["t"] for r in records], series, "timestep t (1000 = pure noise)",
                ylabel, title, logy=logy)
    report = {"kind": "cfg", **meta, "summary": summary, "steps": rows,
              "files": {k: str(v) for k, v in files.items()}}
    write_json(files["json"], report)
    md = [f"# CFG gap: {meta.get('checkpoint', '')}", "",
          "MSE between the conditional and unconditional velocity predictions at each denoising step "
          "(0 on steps without guidance). One line per expert in cfg.png (x = step) and cfg_t.png (x = timestep).",
          "", f"{summary['steps']} steps, {summary['guided_steps']} guided; {summary['model_evals']} model "
          f"evaluations in {summary['model_calls']} calls.", "",
          _table([{"expert": k, **v} for k, v in summary["per_expert"].items()],
                 [("expert", "expert", ""), ("name", "name", ""), ("guided_steps", "guided steps", "d"),
                  ("cfg_mse_first", "first", ".4g"), ("cfg_mse_last", "last", ".4g"),
                  ("cfg_mse_mean", "mean", ".4g"), ("cfg_mse_max", "max", ".4g"), ("cfg_rel_mean", "mean rel", ".4g")]),
          "", _table(rows, [("i", "step", "d"), ("t", "t", ".1f"), ("expert", "expert", "d"),
                            ("guided", "guided", ""), ("scale", "scale", ".2f"), ("cfg_mse", "cfg mse", ".6g"),
                            ("cfg_rel", "rel", ".4g")]), "",
          "Files: " + ", ".join(Path(v).name for v in files.values()), ""]
    _write_text(files["summary"], "\n".join(md))
    return report


def _quality(row: dict[str, Any], kind: str) -> float | None:
    return row["ssim_mean"] if kind == "ssim" else row["psnr_mean"]


def tradeoff_points(rows: Sequence[dict[str, Any]], quality: str) -> tuple[list[dict[str, Any]], str]:
    """Points for `plot_tradeoff`; PSNR of identical videos (inf) is drawn at 5 dB above the best finite one."""
    if quality == "ssim" and any(r["ssim_mean"] is None for r in rows):
        quality = "psnr"  # frames smaller than the SSIM window
    vals = [_quality(r, quality) for r in rows]
    finite = [v for v in vals if np.isfinite(v)]
    cap = (max(finite) if finite else 0.0) + 5.0
    points = []
    for r, v in zip(rows, vals):
        label = r["label"] + (" (=ref)" if r["identical"] else "")
        points.append({"label": label, "time_saved": r["time_saved_pct"], "quality": v if np.isfinite(v) else cap})
    return points, quality


def write_truncation_report(out, result: dict[str, Any], meta: dict[str, Any], *, quality: str = "ssim",
                            log: Callable[[str], None] = print) -> dict[str, Any]:
    """truncation.csv, truncation.png (quality vs time saved), truncation_frames.png (PSNR per frame),
    contact.png (side by side), report.json, report.md under `out`; prints the table. Returns the report."""
    out = Path(out)
    runs: list[TruncationRun] = result["runs"]
    rows = [r.row for r in runs]
    files = {"csv": out / "truncation.csv", "plot": out / "truncation.png",
             "plot_frames": out / "truncation_frames.png",
             "contact": out / "contact.png", "json": out / "report.json", "summary": out / "report.md"}
    write_csv(files["csv"], [{k: r[k] for k in TRUNCATION_COLUMNS} for r in rows], TRUNCATION_COLUMNS)
    points, used = tradeoff_points(rows, quality)
    plot_tradeoff(files["plot"], points, xlabel="time saved vs full guidance (%)",
                  ylabel=f"{'SSIM' if used == 'ssim' else 'PSNR (dB)'} vs full guidance (mean over frames)",
                  title="guidance truncation: quality vs time saved")
    longest = max(r.frames for r in runs)
    per_frame = {}  # batch item 0; identical runs (inf dB) left out
    for r in runs:
        if not r.row["identical"]:
            v = np.asarray(r.row["psnr_per_frame"], np.float64).reshape(-1, r.frames)[0]
            v = np.where(np.isfinite(v), v, np.nan)
            per_frame[r.label] = np.concatenate([v, np.full(longest - r.frames, np.nan)])
    if per_frame:
        plot_series(files["plot_frames"], list(range(longest)), per_frame, "frame",
                    "PSNR vs full guidance (dB)", "per-frame PSNR against the full-guidance video")
    else:
        files.pop("plot_frames")
    h, w = runs[0].video.shape[2:4]
    scale = max(1, min(4, 128 // max(h, w)))
    # the same frame indices in every row (spread over the shortest run), so the columns line up in time
    shortest = min(r.frames for r in runs)
    columns = frame_indices(shortest, 5)
    contact_sheet(files["contact"], {r.label: r.video[0] for r in runs}, frames=columns, scale=scale, label_width=130)
    ref = result["reference"]
    report = {
        "kind": "truncation", **meta,
        "comparison": ("Each run is compared with the reference (full guidance at --frames) on decoded videos in "
                       "[-1, 1] (data range 2). Runs with fewer frames are compared on their common frames: the first "
                       "`frames` frames of the reference (frame k is k/fps seconds after the image in every run), and "
                       "they start from the reference's noise cut to their latent frames. The contact sheet shows "
                       "the same frame indices (contact_frames) in every row."),
        "timing": ("denoise + decode wall seconds (the fastest of `repeats` runs) after a warm-up that compiled every "
                   "step variant and the decoder at each frame count; encode (shared) is not included."),
        "repeats": result.get("repeats", 1),
        "contact_frames": columns,
        "warmup_s": result["warmup_s"], "encode_s": result["encode_s"],
        "quality_plotted": used, "reference": {k: ref[k] for k in TRUNCATION_COLUMNS},
        "runs": rows,
        "files": {k: str(v) for k, v in files.items()},
    }
    write_json(files["json"], report)
    table = _table(rows, [("label", "run", ""), ("frames", "frames", "d"), ("cut", "cut", "d"),
                          ("model_evals", "evals", "d"), ("run_s", "time s", ".2f"),
                          ("time_saved_pct", "saved %", ".1f"), ("denoise_saved_pct", "denoise saved %", ".1f"),
                          ("psnr_mean", "PSNR dB", ".2f"),
                          ("ssim_mean", "SSIM", ".4f"), ("temporal_mse", "temporal mse", ".4g"),
                          ("identical", "= ref", "")])
    log(table)
    md = [f"# Guidance truncation: {meta.get('checkpoint', '')}", "",
          f"Reference: full guidance, {ref['frames']} frames, {ref['steps']} steps, {ref['model_evals']} model "
          f"evaluations, {ref['run_s']:.2f} s (denoise + decode). A cut N keeps CFG on steps 0..N-1.", "",
          table, "", report["comparison"], "", "Timing: " + report["timing"], "",
          "Files: " + ", ".join(Path(v).name for v in files.values()), ""]
    _write_text(files["summary"], "\n".join(md))
    return report
