"""Fast modes on one GPU: the full guided run against step caching, CFG reuse and guidance truncation.

Random bf16 weights of the full-size config (default Wan2.1-T2V-1.3B, 480x832x81, 40 UniPC steps at shift 5, CFG 5
as one batch of 2), random prompt embeddings, one process. Every step variant of every mode is compiled first
(`jax_impl.sampling.compile_steps`), so the timed runs hold no compilation. Then:
  * the full run (the reference), timed; it also records the step-cache calibration (four norms per step on the
    device, no host sync), from which each --thresholds value gives a skip plan fixed before its run;
  * each fast mode, timed: step cache at each threshold (and --skip-steps if given), CFG reuse at --cut (after
    step N: v_cond + (guidance - 1) * d_last), truncation at the same cut (after step N: v_cond alone).
Per run: denoise wall time (the sampling loop, blocked until done), DiT evaluations (guided step 2, unguided 1,
skipped 0), the speed-up over the full run, and the quality against it: relative L2, PSNR and SSIM of the final
latents (data range: the reference latents' max - min), and PSNR/SSIM of the decoded frames (random-weight Wan2.1
VAE, float32; data range 2) unless --no-decode. With random weights the quality numbers show how far each mode
moves the result, not what a trained model's video looks like.

  python bench/fast_modes.py                                # Wan2.1-1.3B 480x832x81, about 5 minutes on an H100
  python bench/fast_modes.py --preset wan2.2-i2v-a14b --guidance 3.5 --modes full,cache   # A14B: ~4 min per run
  python bench/fast_modes.py --tiny                         # CPU smoke run (CI)

Writes the JSON to --json (default bench/results/fast_modes_<date>/<preset>_<size>x<frames>.json; none with --tiny).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import OFFLOAD_HELP  # noqa: E402  (after the path insert)
from bench.versions import versions  # noqa: E402

MODES = ("full", "cache", "reuse", "truncation")


def _inputs(cfg, latent_shape, text_len: int):
    import jax.numpy as jnp
    import numpy as np

    from jax_impl import sampling
    from jax_impl.conditioning import ConcatCondition, NoCondition

    rng = np.random.default_rng(0)
    f, lh, lw, _ = latent_shape
    cond_ch = cfg.in_channels - cfg.out_channels
    return sampling.DenoiseInputs(
        text=jnp.asarray(rng.standard_normal((1, text_len, cfg.text_dim), np.float32)),
        negative_text=jnp.asarray(rng.standard_normal((1, text_len, cfg.text_dim), np.float32)),
        image=jnp.asarray(rng.standard_normal((1, 257, cfg.image_dim), np.float32)) if cfg.has_image_tokens else None,
        condition=ConcatCondition(jnp.asarray(rng.standard_normal((1, f, lh, lw, cond_ch), np.float32))) if cond_ch
        else NoCondition(),
    )


def _quality(x, ref, data_range: float) -> dict:
    from parity import metrics

    cmp = metrics.compare_videos(x, ref, data_range)
    return {"rel_l2": metrics.rel_l2(x, ref), "psnr": cmp["psnr_mean"], "psnr_min": cmp["psnr_min"],
            "ssim": cmp["ssim_mean"], "ssim_min": cmp["ssim_min"]}


def run(args) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench.common import peak_bytes, place_experts, random_dit
    from jax_impl import sampling, schedulers, step_cache
    from jax_impl.noise import initial_noise
    from weights.configs.presets import get_preset
    from weights.configs.scheduler import SchedulerConfig
    from weights.configs.vae import get_vae_preset

    compiles: list[str] = []  # XLA compilations, counted so the JSON can show that no timed run held one
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name.endswith("backend_compile_duration") else None)
    preset = get_preset(args.preset)
    cfg = preset.transformer
    h, w = (int(v) for v in args.size.split("x"))
    vae_cfg = get_vae_preset(args.vae)
    latent_shape = vae_cfg.latent_shape(args.frames, h, w)
    t0 = time.perf_counter()
    experts = [random_dit(cfg, dtype=args.dtype, attention_backend=args.attention, seed=s)
               for s in range(preset.num_experts)]
    jax.block_until_ready(nnx.state(experts[-1]))
    setup_s = time.perf_counter() - t0
    device = jax.devices()[0]
    inputs = _inputs(cfg, latent_shape, args.text_len)
    noise = initial_noise(0, (1, *latent_shape))
    schedule = schedulers.make_schedule(SchedulerConfig(kind="unipc", shift=args.shift), args.steps)
    placement = place_experts(experts, args.offload, schedule, noise, inputs, args.guidance)
    boundary = preset.boundary_ratio if preset.num_experts == 2 else None
    full = sampling.Guidance(args.guidance, args.guidance_2)
    kinds = sampling.step_kinds(schedule, full, boundary_ratio=boundary, num_experts=len(experts), has_negative=True)

    # the modes: (label, guidance, skip plan or a threshold waiting for the calibration)
    modes: list[tuple[str, sampling.Guidance, object]] = [("full", full, None)]
    wanted = set(args.modes.split(","))
    if "cache" in wanted:
        modes += [(f"step cache {t:g}", full, float(t)) for t in args.thresholds]
        if args.skip_steps:
            modes.append((f"skip {args.skip_steps}", full, step_cache.plan_from_list(
                [int(x) for x in args.skip_steps.split(",")], kinds)))
    if "reuse" in wanted:
        modes.append((f"CFG reuse {args.cut}/{args.steps}", dataclasses.replace(full, steps=args.cut, reuse_cfg=True),
                      None))
    if "truncation" in wanted:
        modes.append((f"truncation {args.cut}/{args.steps}", dataclasses.replace(full, steps=args.cut), None))

    decoder = None
    if not args.no_decode:
        from jax_impl.latents import decode_latents
        from jax_impl.vae import WanVAE

        vae = WanVAE(vae_cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
        n_lat = vae_cfg.latent_shape(args.decode_frames, h, w)[0]

        def decoder(latents):
            return np.asarray(decode_latents(vae, latents[:, :n_lat]), np.float32)

    # compile every step variant: the default step (guided, unguided), the fast step's guided / reuse / skipped forms
    tc, compiles_before = time.perf_counter(), len(compiles)
    for label, guidance, skip in modes:
        sampling.compile_steps(experts, schedule, noise, inputs, guidance, boundary_ratio=boundary,
                               skip=None if isinstance(skip, float) else skip)
    if any(isinstance(s, float) for _, _, s in modes):  # a threshold's plan exists only after the reference run:
        n = args.steps  # compile the skipped step now, from a plan skipping every step but the experts' first
        may = tuple(k.i for k in kinds if k.i > 0 and k.expert == kinds[k.i - 1].expert)
        sampling.compile_steps(experts, schedule, noise, inputs, full, boundary_ratio=boundary,
                               skip=step_cache.SkipPlan(n, may, (1.0,) * n, (1.0,) * n, (None,) * n, "warm-up"))
    warm = step_cache.CalibrationRecorder()  # compile the calibration's norms before the timed reference run
    v = jax.device_put(jnp.asarray(noise), device)  # committed, as the sampler's outputs are
    for i in range(2):
        warm({"i": i, "t": 0.0, "expert": 0, "guided": True, "v_cond": v, "v_uncond": v})
    warm.calibration({"steps": 2})
    if decoder is not None:
        decoder(noise)  # the decoder compiles per length: once at the decoded shape
    compile_s, compiled = time.perf_counter() - tc, len(compiles) - compiles_before

    rows = []
    ref = None
    for label, guidance, skip in modes:
        recorder = step_cache.CalibrationRecorder() if ref is None else None
        if isinstance(skip, float):
            skip = step_cache.plan_from_calibration(ref["calibration"], skip, kinds)
        evals = []

        def on_step(d, recorder=recorder, evals=evals):
            evals.append(d["model_evals"])
            if recorder is not None:
                recorder(d)

        compiles_before = len(compiles)
        t = time.perf_counter()
        latents = sampling.sample(experts, schedule, noise, inputs, guidance, boundary_ratio=boundary,
                                  on_step=on_step, progress=False, skip=skip)
        jax.block_until_ready(latents)
        denoise_s = time.perf_counter() - t
        latents = np.asarray(latents, np.float32)
        row = {"mode": label, "denoise_s": denoise_s, "model_evals": sum(evals),
               "compiles_while_timed": len(compiles) - compiles_before,
               "skipped_steps": list(skip.skipped) if skip is not None else [],
               "skip_plan": skip.describe() if skip is not None else None,
               "latents_finite": bool(np.isfinite(latents).all())}
        td = time.perf_counter()
        video = decoder(latents) if decoder is not None else None
        row["decode_s"] = time.perf_counter() - td if decoder is not None else None
        if ref is None:
            ref = {"latents": latents, "video": video, "denoise_s": denoise_s, "evals": row["model_evals"],
                   "calibration": recorder.calibration(step_cache.calibration_key(cfg, len(experts), schedule,
                                                                                   boundary)),
                   "latent_range": float(latents.max() - latents.min())}
        row["speedup"] = ref["denoise_s"] / denoise_s
        row["evals_ratio"] = row["model_evals"] / ref["evals"]
        row["latents"] = _quality(latents, ref["latents"], ref["latent_range"])
        row["frames"] = _quality(video, ref["video"], 2.0) if video is not None else None
        rows.append(row)
        print(f"  {label:<22} {denoise_s:8.2f} s  evals {row['model_evals']}"
              f"{'' if not row['compiles_while_timed'] else ', compiled while timed!'}", flush=True)
    cal = ref["calibration"]
    return {"device": str(getattr(device, "device_kind", device)), "setup_s": setup_s, "compile_s": compile_s,
            "compilations": compiled, **placement,
            "peak_bytes": peak_bytes(), "rows": rows,
            "calibration": {"cond_ratio": [cal.ratio(i, "cond") for i in range(args.steps)],
                            "uncond_ratio": [cal.ratio(i, "uncond") for i in range(args.steps)],
                            "cond_change": [s.cond_change for s in cal.steps]}}


def main(argv=None) -> int:
    from jax_impl.runtime import configure_xla

    configure_xla()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b", help="model preset (default wan2.1-t2v-1.3b; "
                                                                "wan2.2-i2v-a14b for the two experts)")
    ap.add_argument("--vae", default="wan2.1", help="VAE preset for the latent shape and decode (default wan2.1)")
    ap.add_argument("--size", default="480x832", help="HEIGHTxWIDTH in pixels (default 480x832)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--guidance-2", type=float, default=None, help="low-noise expert's guidance (A14B)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--offload", default="auto", choices=["auto", "yes", "no"], help=OFFLOAD_HELP)
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma list of {', '.join(MODES)} (the full run is always made: it is the reference)")
    ap.add_argument("--thresholds", default="0.1", help="step-cache thresholds, comma list (default 0.1)")
    ap.add_argument("--skip-steps", default="", metavar="I,J,..", help="also a step cache with this fixed list")
    ap.add_argument("--cut", type=int, default=None, help="guidance cut for CFG reuse and truncation (default steps/2)")
    ap.add_argument("--decode-frames", type=int, default=None,
                    help="decode the first N frames (4k+1) of each result for the frame metrics (default: all)")
    ap.add_argument("--no-decode", action="store_true", help="latent metrics only (no VAE decode)")
    ap.add_argument("--tiny", action="store_true", help="tiny preset, tiny video, 6 steps: a CPU smoke run")
    ap.add_argument("--json", help="write results here (default bench/results/fast_modes_<date>/...; none with --tiny)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.vae, args.size, args.frames, args.text_len = "tiny-wan2.1-t2v-1.3b", "tiny-wan2.1", "32x32", 9, 16
        args.steps, args.dtype = 6, "float32"
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        ap.error(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    try:
        args.thresholds = [float(x) for x in args.thresholds.split(",") if x]
    except ValueError:
        ap.error(f"--thresholds wants comma-separated numbers, got {args.thresholds!r}")
    args.cut = args.steps // 2 if args.cut is None else args.cut
    if not 0 < args.cut < args.steps:
        ap.error(f"--cut must be in 1..{args.steps - 1}")
    args.decode_frames = args.frames if args.decode_frames is None else min(args.decode_frames, args.frames)
    if args.decode_frames % 4 != 1:
        ap.error("--decode-frames must be 4k+1")
    if args.json is None and not args.tiny:
        today = datetime.date.today().isoformat()
        args.json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"fast_modes_{today}",
                                 f"{args.preset}_{args.size}x{args.frames}.json")

    res = run(args)
    gib = lambda b: f"{b / 2**30:.1f}" if b else "-"  # noqa: E731
    fmt = lambda v, spec: "-" if v is None else ("inf" if v == float("inf") else format(v, spec))  # noqa: E731
    print(f"\n{args.preset} {args.size}x{args.frames}, {args.steps} steps, CFG {args.guidance} (batch of 2), "
          f"{args.dtype}, device {res['device']}; warm-up {res['compilations']} XLA compilations in "
          f"{res['compile_s']:.1f} s; peak {gib(res['peak_bytes'])} GiB")
    frames_note = "" if args.no_decode else f" (frames 0..{args.decode_frames - 1})"
    print(f"{'mode':<22} {'denoise s':>9} {'speed-up':>8} {'evals':>6} {'latents rel L2':>14} {'latents PSNR':>12} "
          f"{'frames PSNR':>11} {'frames SSIM':>11}{frames_note}")
    for r in res["rows"]:
        fr = r["frames"] or {}
        print(f"{r['mode']:<22} {r['denoise_s']:>9.2f} {r['speedup']:>7.2f}x {r['model_evals']:>6} "
              f"{r['latents']['rel_l2']:>14.2e} {fmt(r['latents']['psnr'], '.2f'):>12} {fmt(fr.get('psnr'), '.2f'):>11} "
              f"{fmt(fr.get('ssim'), '.4f'):>11}")
        if r["skip_plan"]:
            print(f"{'':<22} {r['skip_plan']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        out = {"preset": args.preset, "size": args.size, "frames": args.frames, "steps": args.steps,
               "shift": args.shift, "guidance": args.guidance, "guidance_2": args.guidance_2, "dtype": args.dtype,
               "cut": args.cut, "thresholds": args.thresholds, "decode_frames": None if args.no_decode else
               args.decode_frames, "date": datetime.date.today().isoformat(),
               "versions": versions("jax", "jaxlib", "flax"),
               "method": ("denoise_s: the sampling loop's wall time, blocked until done, after every step variant was "
                          "compiled; the full run also recorded the calibration (device norms, no host sync). "
                          "Quality against the full run: latents (data range = reference max - min) and decoded "
                          "frames (random-weight VAE, data range 2). Random weights: quality shows how far a mode "
                          "moves the result, not a trained model's video."),
               **res}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=lambda o: None if o != o else str(o))
        print(f"wrote {args.json}")
    return 0 if all(r["latents_finite"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
