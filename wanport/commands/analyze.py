"""`wanport analyze {cfg,truncation,fast-modes}`: what classifier-free guidance does at each step, and what cutting
it, reusing it or skipping steps costs.

All take the same flags as `wanport generate` (checkpoint, image, prompt, sizes, steps, shift, guidance, ...).
Without --checkpoint they run the tiny default on any machine: a tiny random-weight pipeline (--preset) is
written into OUT/tiny/, the bundled demo image and prompt are used, and the sizes default to 17 frames of
64x64 with 10 steps (flags given explicitly still win). The tiny weights are random: the numbers show the
machinery, not what a trained model does.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from wanport.args import (GENERATE_SIZES, add_generate_arguments, encoders_from_args, model_options, parse_number_list,
                          settings_from_args, timesteps_from_args)
from wanport.commands.demo import DEMO_IMAGE, DEMO_PROMPT

TINY_DEFAULTS = {"frames": 17, "height": 64, "width": 64, "steps": 10}
FULL_DEFAULTS = GENERATE_SIZES
DEFAULT_PRESET = "tiny-wan2.1-i2v-14b"

CFG_DOC = __doc__ + """
analyze cfg: one generation with the given settings; at every denoising step it records the MSE between the
conditional (prompt) and unconditional (negative prompt) velocity predictions, tagged with the expert that made
them (Wan2.2 A14B: 0 = high-noise, 1 = low-noise expert). Steps without guidance (after --guidance-steps, or a
scale <= 1) make no unconditional prediction and record 0.

writes into OUT:
  cfg.csv        one row per step: i, t, sigma, expert, expert_name, guided, scale, cfg_mse, cfg_rel
                 (cfg_mse / mean(v_cond^2)), cond_ms, uncond_ms
  cfg.png        cfg_mse over the steps, one line per expert (log scale); cfg_t.png: over the timestep
  report.json    settings, device, timings, summary per expert, the steps; report.md: the same, readable
  video.mp4      the generated video (not with --no-video)

examples:
  wanport analyze cfg --out cfg-tiny                              # tiny default, CPU, about a minute
  wanport analyze cfg --preset tiny-wan2.2-i2v-a14b --out cfg-a14b  # two experts, one line each
  wanport analyze cfg --checkpoint Wan2.2-I2V-A14B-Diffusers --image cat.png --prompt "a cat" \\
      --guidance 3.5 --guidance-2 2.0 --out cfg-a14b-full
"""

TRUNCATION_DOC = __doc__ + """
analyze truncation: the reference is the full-guidance run at --frames. For every cut N in --cut (and every
frame count in --frames-list) it generates again with guidance only on steps 0..N-1 (N = 0: no guidance at
all, N = --steps: full guidance), same seed and inputs, and compares the video with the reference: PSNR and
SSIM (mean, min, per frame), temporal continuity (mean squared difference of adjacent frames, against the
reference's), bitwise identity of the latents. A guided step costs 2 model evaluations (conditional and
unconditional; one batch of 2, or two calls with --no-cfg-batch), an unguided step 1.

Time: every frame count is warmed up first (compiling the guided and unguided step and the decoder), then each
run's denoise + decode wall time is measured (the fastest of --repeats); time saved is relative to the
reference. Encoding is shared and not counted.

Fewer frames (--frames-list 81,49): a shorter video is compared on its common frames, the first F frames of
the reference (frame k is k/fps seconds after the image in both), and starts from the reference's noise cut to
its latent frames, so the common frames differ only through the length.

writes into OUT:
  truncation.csv     one row per run: label, frames, cut, steps, guided_steps, model_evals, model_calls,
                     evals_saved_pct, denoise_s, decode_s, run_s, time_saved_s, time_saved_pct,
                     denoise_saved_pct (the part guidance changes), compared_frames,
                     psnr_mean, psnr_min, ssim_mean, ssim_min, temporal_mse, temporal_mse_ref, identical
  truncation.png     quality (--quality) against time saved, Pareto front dashed
  truncation_frames.png   PSNR per frame of each run against the reference
  contact.png        the videos side by side, one row per run, 5 frames each
  report.json        settings, device, the rows with per-frame values; report.md: the table, readable
  videos/*.mp4       every run's video, f<frames>_cut<N>.mp4 (not with --no-videos)
(with --batch > 1 the metrics cover the whole batch; videos, contact sheet and per-frame plot show item 0)

examples:
  wanport analyze truncation --out trunc-tiny                     # tiny default: cuts 0,2,5,8,10
  wanport analyze truncation --out trunc-tiny --cut 0,3,6 --frames-list 17,9
  wanport analyze truncation --checkpoint Wan2.1-I2V-14B-480P-Diffusers --image cat.png --prompt "a cat" \\
      --steps 40 --cut 0,10,20,30,40 --frames-list 81,49 --out trunc-480p
"""


FAST_MODES_DOC = __doc__ + """
analyze fast-modes: the reference is the full run (full guidance, every step computed). Its per-step prediction
norms are recorded as a step-cache calibration (OUT/calibration.json, usable with `wanport generate --step-cache
THRESHOLD --step-cache-calibration FILE` for the same model and schedule). Then, same seed and inputs, it runs
every fast mode and compares it with the reference:
  truncation N/S   guidance on steps 0..N-1 only (--cut), then the conditional prediction alone
  CFG reuse N/S    the same cut, then v_cond + (guidance - 1) * (v_cond - v_uncond of step N-1) (--cfg-reuse)
  step cache T     skip the DiT where the calibration predicts a running error below T (--thresholds; the skipped
                   steps are fixed before the run and listed)
  skip I,J,..      skip exactly these steps (--skip-steps)
For each: model evaluations made and skipped (a guided step is 2, an unguided step 1, a skipped step 0), the
latents' relative L2 error against the reference after every step and at the end, PSNR and SSIM of the decoded
frames, and denoise + decode wall time (the fastest of --repeats, after an untimed run that compiled the mode).

writes into OUT:
  fast_modes.csv        one row per run: label, mode, cut, threshold, steps, model_evals, evals_skipped,
                        evals_saved_pct, skipped_steps, denoise_s, decode_s, run_s, time_saved_pct,
                        latents_rel_l2, step_rel_l2_max, psnr_mean, psnr_min, ssim_mean, ssim_min, identical
  fast_modes_steps.csv  one row per run and step: i, t, expert, guided, skipped, model_evals, latents_rel_l2
  fast_modes.png        quality against model evaluations saved; fast_modes_steps.png: per-step latent error
  contact.png           the videos side by side; calibration.json: the step-cache calibration
  report.json, report.md   settings, device, the rows, the skip plans; videos/*.mp4 (not with --no-videos)

examples:
  wanport analyze fast-modes --out fast-tiny                     # tiny default: cut 5, thresholds 0.02,0.05,0.1
  wanport analyze fast-modes --out fast-tiny --cut 3,6 --thresholds 0.05 --skip-steps 3,6,8
  wanport analyze fast-modes --checkpoint Wan2.1-T2V-1.3B-Diffusers --prompt "a cat" --steps 40 \\
      --guidance 5 --cut 20,30 --thresholds 0.05,0.1,0.2 --out fast-1.3b
"""


def _add_options(p: argparse.ArgumentParser, default_out: str) -> None:
    add_generate_arguments(p, tiny=TINY_DEFAULTS)
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"tiny preset written when --checkpoint is omitted (default {DEFAULT_PRESET}; "
                        "tiny-wan2.2-i2v-a14b has two experts, tiny-wan2.2-ti2v-5b conditions on the first frame)")
    p.add_argument("--out", default=default_out, metavar="DIR",
                   help=f"output folder (default {default_out}); files in it are replaced atomically")


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    # lazy: `wanport --help` must not start jax and torch (measured: 10.7 s -> 0.2 s)
    from jax_impl.media import load_image
    from jax_impl.pipeline import Pipeline
    from torch_ref.checkpoints import write_tiny_checkpoint
    from weights.safetensors_io import load_tensors

    out = Path(args.out)
    tiny = args.checkpoint is None
    options = model_options(args)  # first: --steps from --timesteps, fp8 against --dtype
    defaults = TINY_DEFAULTS if tiny else FULL_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if tiny:
        args.image = args.image or str(DEMO_IMAGE)
        if args.prompt is None and args.embeddings is None:
            args.prompt = DEMO_PROMPT
    settings = settings_from_args(args)
    # read every input before anything heavy runs, so bad input fails fast
    image = load_image(args.image) if args.image else None
    last_image = load_image(args.last_image) if args.last_image else None
    embeddings = None
    if args.embeddings:
        embeddings = load_tensors(args.embeddings)[0]
    checkpoint = Path(args.checkpoint) if not tiny else out / "tiny" / args.preset
    if tiny and not (checkpoint / "model_index.json").is_file():
        write_tiny_checkpoint(args.preset, checkpoint, seed=args.seed, force=True)
        print(f"wrote the tiny {args.preset} pipeline (random weights): {checkpoint}")
    dtype = options["dtype"]
    t0 = time.perf_counter()
    pipe = Pipeline(checkpoint, attention_backend=args.backend, load_encoders=embeddings is None,
                    encoders=encoders_from_args(args), **options)
    load_s = time.perf_counter() - t0
    pipe.check_settings(settings, image is not None)
    meta = {
        "checkpoint": str(checkpoint), "tiny_preset": args.preset if tiny else None,
        "image": args.image, "last_image": args.last_image, "prompt": args.prompt,
        "negative_prompt": args.negative_prompt, "embeddings": args.embeddings,
        "settings": dataclasses.asdict(settings), "num_experts": len(pipe.experts),
        "boundary_ratio": pipe.boundary_ratio, "conditioning": pipe.conditioning, "dtype": dtype,
        "attention_backend": args.backend, "encoders": args.encoders, "device": _device(), "load_s": load_s,
    }
    return {"out": out, "pipe": pipe, "settings": settings, "image": image, "last_image": last_image,
            "embeddings": embeddings, "meta": meta}


def _device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{jax.default_backend()}: {getattr(d, 'device_kind', str(d))} x{jax.device_count()}"


def _cfg(args: argparse.Namespace) -> int:
    # lazy: `wanport --help` must not start jax and torch (measured: 10.7 s -> 0.2 s)
    from jax_impl.media import to_uint8, write_mp4
    from parity.guidance import record_cfg, write_cfg_report

    ctx = _prepare(args)
    pipe, settings, out, meta = ctx["pipe"], ctx["settings"], ctx["out"], ctx["meta"]
    t0 = time.perf_counter()
    encoded = pipe.encode(settings, prompt=args.prompt, image=ctx["image"], last_image=ctx["last_image"],
                          negative_prompt=args.negative_prompt, embeddings=ctx["embeddings"])
    timings = {"load": meta.pop("load_s"), "encode": time.perf_counter() - t0}
    if "negative_prompt_embeds" not in encoded:
        print("note: no negative prompt embeddings: no step is guided, every gap is 0")
    records, latents, timings["denoise"] = record_cfg(pipe, encoded, settings, progress=True)
    if not args.no_video:
        t0 = time.perf_counter()
        video = pipe.decode(latents)
        write_mp4(out / "video.mp4", to_uint8(video[0]), fps=settings.fps)
        timings["decode"] = time.perf_counter() - t0
    meta["timings"] = timings
    report = write_cfg_report(out, records, meta, len(pipe.experts), settings.cfg_batch)
    for e, s in report["summary"]["per_expert"].items():
        if s["guided_steps"]:
            print(f"{s['name']} ({e}): {s['guided_steps']} guided steps, cond/uncond MSE first {s['cfg_mse_first']:.4g}"
                  f", last {s['cfg_mse_last']:.4g}, mean {s['cfg_mse_mean']:.4g}")
        else:
            print(f"{s['name']} ({e}): no guided steps")
    print(f"wrote {', '.join(Path(v).name for v in report['files'].values())}"
          f"{', video.mp4' if not args.no_video else ''} in {out}")
    return 0


def _truncation(args: argparse.Namespace) -> int:
    if args.guidance_steps is not None:
        raise ValueError("analyze truncation sets the guidance steps itself: give --cut N1,N2,... instead of "
                         "--guidance-steps")
    # validate the lists before the slow part (importing jax and torch included)
    cuts = parse_number_list(args.cut, "--cut") if args.cut is not None else None
    frames_list = parse_number_list(args.frames_list, "--frames-list") if args.frames_list is not None else None
    steps = _step_count(args)
    defaults = TINY_DEFAULTS if args.checkpoint is None else FULL_DEFAULTS
    frames = args.frames if args.frames is not None else defaults["frames"]
    if cuts is not None and any(not 0 <= c <= steps for c in cuts):
        raise ValueError(f"--cut {args.cut}: every cut must be in 0..{steps} (the step count); N keeps CFG on steps "
                         "0..N-1")
    if frames_list is not None and any(not 1 <= f <= frames or f % 4 != 1 for f in frames_list):
        raise ValueError(f"--frames-list {args.frames_list}: every count must be 4k+1 and at most --frames ({frames}), "
                         "the reference's length")
    repeats = _repeats(args)
    # lazy: `wanport --help` must not start jax and torch (measured: 10.7 s -> 0.2 s)
    from jax_impl.media import write_mp4
    from parity.guidance import default_cuts, run_truncation, write_truncation_report

    ctx = _prepare(args)
    pipe, settings, out, meta = ctx["pipe"], ctx["settings"], ctx["out"], ctx["meta"]
    cuts = cuts if cuts is not None else default_cuts(settings.steps)
    frames_list = frames_list if frames_list is not None else [settings.frames]
    print(f"cuts {cuts}, frames {frames_list}; reference: full guidance at {settings.frames} frames")

    def save(run):
        if not args.no_videos:
            write_mp4(out / "videos" / f"f{run.frames}_cut{run.cut}.mp4", run.video[0], fps=settings.fps)

    result = run_truncation(pipe, settings, cuts, frames_list, prompt=args.prompt, image=ctx["image"],
                            last_image=ctx["last_image"], negative_prompt=args.negative_prompt,
                            embeddings=ctx["embeddings"], on_video=save, repeats=repeats)
    meta.update(cuts=cuts, frames_list=frames_list)
    report = write_truncation_report(out, result, meta, quality=args.quality)
    print(f"wrote {', '.join(Path(v).name for v in report['files'].values())}"
          f"{', videos/' if not args.no_videos else ''} in {out}")
    return 0


def _step_count(args: argparse.Namespace) -> int:
    """The run's step count, known before anything loads: --steps, or the number of --timesteps (which also
    checks that the two agree, as `generate` does), else the default of the tiny pipeline or of a checkpoint."""
    timesteps_from_args(args)
    if args.steps is not None:
        return args.steps
    return (TINY_DEFAULTS if args.checkpoint is None else FULL_DEFAULTS)["steps"]


def _repeats(args: argparse.Namespace) -> int:
    """--repeats, checked: 3 timed runs on the tiny default (its runs are short and noisy), 1 on a real checkpoint."""
    repeats = args.repeats if args.repeats is not None else (3 if args.checkpoint is None else 1)
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    return repeats


def _fast_modes(args: argparse.Namespace) -> int:
    if args.guidance_steps is not None:
        raise ValueError("analyze fast-modes sets the guidance cut itself: give --cut N1,N2,... instead of "
                         "--guidance-steps")
    # validate the lists before the slow part (importing jax and torch included)
    cuts = parse_number_list(args.cut, "--cut") if args.cut is not None else None
    thresholds = (parse_number_list(args.thresholds, "--thresholds", float, positive=True)
                  if args.thresholds is not None else None)
    skip_lists = [parse_number_list(args.skip_list, "--skip-steps")] if args.skip_list is not None else []
    steps = _step_count(args)
    if cuts is not None and any(not 0 < c < steps for c in cuts):
        raise ValueError(f"--cut {args.cut}: every cut must be in 1..{steps - 1} ({steps} steps); N keeps CFG on steps "
                         "0..N-1")
    for flag, v, lo in (("--step-cache-max-skips", args.max_skips, 1), ("--step-cache-keep-first", args.keep_first, 0)):
        if v is not None and v < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {v}")
    repeats = _repeats(args)
    # lazy: `wanport --help` must not start jax and torch
    from jax_impl.media import write_mp4
    from parity.fast_modes import DEFAULT_THRESHOLDS, default_cuts, run_fast_modes, write_report

    thresholds = thresholds or list(DEFAULT_THRESHOLDS)
    ctx = _prepare(args)
    pipe, settings, out, meta = ctx["pipe"], ctx["settings"], ctx["out"], ctx["meta"]
    cuts = cuts if cuts is not None else default_cuts(settings.steps)
    print(f"cuts {cuts}, step-cache thresholds {thresholds}"
          f"{', skip list ' + args.skip_list if args.skip_list else ''}; reference: the full run")

    def save(run):
        if not args.no_videos:
            name = run.label.replace("/", "of").replace(",", "-").replace(" ", "_")
            write_mp4(out / "videos" / f"{name}.mp4", run.video[0], fps=settings.fps)

    result = run_fast_modes(pipe, settings, cuts=cuts, thresholds=thresholds, skip_lists=skip_lists,
                            calibration_path=out / "calibration.json", prompt=args.prompt, image=ctx["image"],
                            last_image=ctx["last_image"], negative_prompt=args.negative_prompt,
                            embeddings=ctx["embeddings"], max_skips=args.max_skips, keep_first=args.keep_first,
                            metric=args.metric,
                            repeats=repeats, on_video=save)
    meta.update(cuts=cuts, thresholds=thresholds, skip_lists=skip_lists, metric=args.metric,
                max_skips=args.max_skips, keep_first=args.keep_first)
    report = write_report(out, result, meta)
    print(f"wrote {', '.join(Path(v).name for v in report['files'].values())}"
          f"{', videos/' if not args.no_videos else ''} in {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser("analyze", help="guidance analyses: per-step CFG gap (cfg), guidance truncation (truncation), "
                                         "fast modes against the full run (fast-modes)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="examples:\n  wanport analyze cfg --out cfg-tiny\n"
                                "  wanport analyze truncation --out trunc-tiny --cut 0,5,10 --frames-list 17,9\n"
                                "  wanport analyze fast-modes --out fast-tiny   # truncation, CFG reuse, step cache\n"
                                "  wanport analyze cfg --help                 # what each analysis writes")
    top.set_defaults(func=lambda a: (top.print_help(), 2)[1])
    asub = top.add_subparsers(dest="analysis", metavar="ANALYSIS")

    p = asub.add_parser("cfg", help="MSE between conditional and unconditional predictions at every step",
                        description=CFG_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(p, "wanport-cfg")
    p.add_argument("--no-video", action="store_true", help="skip decoding and writing video.mp4")
    p.set_defaults(func=_cfg)

    p = asub.add_parser("truncation", help="quality and time of guidance switched off after step N",
                        description=TRUNCATION_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(p, "wanport-truncation")
    p.add_argument("--cut", metavar="N,N,...",
                   help="guidance on steps 0..N-1 only, for each N (0..--steps); default: 5 evenly spaced from 0 to "
                        "--steps (40 steps: 0,10,20,30,40)")
    p.add_argument("--frames-list", metavar="F,F,...",
                   help="also run with these frame counts (4k+1, at most --frames), each with every cut; compared "
                        "on their common frames (default: only --frames)")
    p.add_argument("--quality", choices=["ssim", "psnr"], default="ssim",
                   help="what truncation.png plots against time saved (default ssim; identical videos, PSNR inf, "
                        "are drawn 5 dB above the best finite one)")
    p.add_argument("--repeats", type=int, default=None, metavar="K",
                   help="time every run K times and keep the fastest (default 1 with --checkpoint, 3 without: tiny "
                        "runs last a fraction of a second and a busy CPU makes single timings noisy)")
    p.add_argument("--no-videos", action="store_true", help="do not write OUT/videos/*.mp4")
    p.set_defaults(func=_truncation)

    p = asub.add_parser("fast-modes", help="truncation, CFG reuse and step caching against the full run",
                        description=FAST_MODES_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(p, "wanport-fast-modes")
    p.add_argument("--cut", metavar="N,N,...",
                   help="guidance cuts for truncation and CFG reuse, each in 1..--steps-1 (default: --steps/2)")
    p.add_argument("--thresholds", metavar="T,T,...",
                   help="step-cache thresholds on the running predicted error (default 0.02,0.05,0.1)")
    # dests apart from generate's fast-mode flags: the reference run of this analysis has every mode off
    p.add_argument("--skip-steps", dest="skip_list", metavar="I,J,...", help="also run with exactly these steps skipped")
    p.add_argument("--step-cache-max-skips", dest="max_skips", type=int, default=None, metavar="K",
                   help="at most K skipped steps in a row (default 2)")
    p.add_argument("--step-cache-keep-first", dest="keep_first", type=int, default=None, metavar="N",
                   help="never skip the first N steps (default 20%% of --steps)")
    p.add_argument("--step-cache-metric", dest="metric", choices=["magnitude", "change"], default="magnitude",
                   help="step-cache decision: magnitude (default, MagCache-style) or change (TeaCache-like)")
    p.add_argument("--repeats", type=int, default=None, metavar="K",
                   help="time every run K times and keep the fastest (default 1 with --checkpoint, 3 without)")
    p.add_argument("--no-videos", action="store_true", help="do not write OUT/videos/*.mp4")
    p.set_defaults(func=_fast_modes)
