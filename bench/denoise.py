"""Denoising with classifier-free guidance: one step (batch of 2 vs two calls) and a whole A14B sampling run.

Measures, with random bf16 weights of the full-size config on one device:
  * one guided denoising step with the conditional and unconditional predictions as one batch of 2,
    and as two calls, against diffusers' WanTransformer3DModel doing the same (two calls, as its
    pipeline does; eager and torch.compile optional with --torch) in a separate subprocess;
  * the full sampling run (--steps, default 40, UniPC with shift 5, both A14B experts switched at
    t >= 900) with whichever guidance layout was faster, and peak device memory;
  * whether both experts stay resident, or (--offload, or automatically when both experts' weights plus
    XLA's memory analysis of one guided step would not fit in JAX's pool) the idle expert waits in host
    memory and is moved in at the switch;
  * VAE decode of the final latents (Wan2.1 VAE, random weights) for the whole-pipeline peak.

  python bench/denoise.py --json denoise.json                 # wan2.2-i2v-a14b, 480x832x81, GPU
  python bench/denoise.py --tiny                              # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import OFFLOAD_HELP, child_env  # noqa: E402  (after the path insert)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _timed(fn, iters: int) -> dict:
    """First call (compilation included) and `iters` timed calls of `fn`, which must block until done."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": _median(times), "times": times, "first_call_s": first}


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench.common import peak_bytes, place_experts, random_dit
    from jax_impl import sampling, schedulers
    from jax_impl.conditioning import ConcatCondition, NoCondition
    from jax_impl.noise import initial_noise
    from weights.configs.presets import get_preset
    from weights.configs.scheduler import SchedulerConfig
    from weights.configs.vae import get_vae_preset

    preset = get_preset(args.preset)
    cfg = preset.transformer
    h, w = (int(v) for v in args.size.split("x"))
    vae_cfg = get_vae_preset(args.vae)
    f, lh, lw, z = vae_cfg.latent_shape(args.frames, h, w)
    dtype = jnp.dtype(args.dtype)
    t0 = time.perf_counter()
    experts = [random_dit(cfg, dtype=dtype, attention_backend=args.attention, seed=s) for s in range(preset.num_experts)]
    jax.block_until_ready(nnx.state(experts[-1]))
    setup_s = time.perf_counter() - t0
    device = jax.devices()[0]

    rng = np.random.default_rng(0)
    cond_ch = cfg.in_channels - cfg.out_channels
    inputs = sampling.DenoiseInputs(
        text=jnp.asarray(rng.standard_normal((1, args.text_len, cfg.text_dim), np.float32)),
        negative_text=jnp.asarray(rng.standard_normal((1, args.text_len, cfg.text_dim), np.float32)),
        image=jnp.asarray(rng.standard_normal((1, 257, cfg.image_dim), np.float32)) if cfg.has_image_tokens else None,
        condition=ConcatCondition(jnp.asarray(rng.standard_normal((1, f, lh, lw, cond_ch), np.float32))) if cond_ch
        else NoCondition(),
    )
    noise = initial_noise(0, (1, f, lh, lw, z))
    sched = schedulers.make_schedule(SchedulerConfig(kind="unipc", shift=args.shift), args.steps)

    # Both experts resident, or the idle one in host memory (the layout's guided step must fit beside them).
    placement = place_experts(experts, args.offload, sched, noise, inputs, args.guidance,
                              cfg_batch=args.layout != "two_calls")
    graphdef, params = nnx.split(experts[0])

    # One guided step at the first timestep, in each layout asked for.
    step_times = {}
    layouts = {"auto": (True, False), "batch2": (True,), "two_calls": (False,)}[args.layout]
    for layout in layouts:
        def one():
            st = schedulers.init_state(sched, noise)
            out = sampling.denoise_step(graphdef, params, st, jnp.int32(0), jnp.float32(sched.timesteps[0]), inputs,
                                        jnp.float32(args.guidance), guided=True, cfg_batch=layout)
            return jax.block_until_ready(out[0].sample)
        step_times["batch2" if layout else "two_calls"] = _timed(one, args.iters)
    best = min(step_times, key=lambda k: step_times[k]["median_s"])
    del params, graphdef

    # The whole run: every step, both experts, with the faster layout.
    guidance = sampling.Guidance(args.guidance, args.guidance_2, None, cfg_batch=best == "batch2")
    experts_used = []

    def on_step(info):
        experts_used.append(info["expert"])

    ts = time.perf_counter()
    latents = sampling.sample(experts, sched, noise, inputs, guidance, boundary_ratio=preset.boundary_ratio,
                              on_step=on_step, progress=False)
    jax.block_until_ready(latents)
    sample_s = time.perf_counter() - ts
    peak_denoise = peak_bytes()

    decode_s = None
    if not args.no_vae:
        from flax import nnx as _nnx

        from jax_impl.latents import decode_latents
        from jax_impl.vae import WanVAE

        for m in experts:  # the pipeline's order: experts leave the device before the VAE decodes
            sampling.offload(m)
        vae = WanVAE(vae_cfg, dtype=jnp.float32, rngs=_nnx.Rngs(0))
        td = time.perf_counter()
        video = jax.block_until_ready(decode_latents(vae, latents))
        decode_s = time.perf_counter() - td
        assert video.shape[1] == args.frames
    return {
        "device": str(device.device_kind), "setup_s": setup_s, **placement,
        "step": step_times, "best_layout": best, "sample_s": sample_s, "steps": args.steps,
        "experts_used": sorted(set(experts_used)), "high_noise_steps": experts_used.count(0),
        "peak_bytes_denoise": peak_denoise, "decode_s": decode_s, "peak_bytes_total": peak_bytes(),
        "latents_finite": bool(np.isfinite(np.asarray(latents)).all()),
    }


def run_torch(args, compile_: bool) -> dict:
    """diffusers' transformer doing one guided step as its pipeline does: two calls + mix."""
    import numpy as np
    import torch
    from diffusers import WanTransformer3DModel

    from weights.configs.presets import get_preset
    from weights.configs.vae import get_vae_preset

    cfg = get_preset(args.preset).transformer
    h, w = (int(v) for v in args.size.split("x"))
    f, lh, lw, z = get_vae_preset(args.vae).latent_shape(args.frames, h, w)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    torch.set_default_dtype(dt)
    with torch.device(dev):
        model = WanTransformer3DModel(**kwargs).eval()
    torch.set_default_dtype(torch.float32)
    fn = torch.compile(model) if compile_ else model
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((1, cfg.in_channels, f, lh, lw), np.float32)).to(dev, dt)
    text = [torch.from_numpy(rng.standard_normal((1, args.text_len, cfg.text_dim), np.float32)).to(dev, dt)
            for _ in range(2)]
    img = torch.from_numpy(rng.standard_normal((1, 257, cfg.image_dim), np.float32)).to(dev, dt) \
        if cfg.has_image_tokens else None
    t = torch.tensor([999.0], device=dev)

    def step():
        with torch.no_grad():
            c = fn(hidden_states=x, timestep=t, encoder_hidden_states=text[0], encoder_hidden_states_image=img,
                   return_dict=False)[0]
            u = fn(hidden_states=x, timestep=t, encoder_hidden_states=text[1], encoder_hidden_states_image=img,
                   return_dict=False)[0]
            out = u + args.guidance * (c - u)
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    res = _timed(step, args.iters)
    return {**res, "peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None}


def main(argv=None) -> int:
    from jax_impl.runtime import configure_xla

    configure_xla()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.2-i2v-a14b", help="model preset (default wan2.2-i2v-a14b)")
    ap.add_argument("--vae", default="wan2.1", help="VAE preset for the latent shape and decode (default wan2.1)")
    ap.add_argument("--size", default="480x832", help="HEIGHTxWIDTH in pixels (default 480x832)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40, help="sampling steps of the whole run (default 40)")
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--guidance-2", type=float, default=3.5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--offload", default="auto", choices=["auto", "yes", "no"], help=OFFLOAD_HELP)
    ap.add_argument("--iters", type=int, default=3, help="timed repeats of the single step")
    ap.add_argument("--layout", default="auto", choices=["auto", "batch2", "two_calls"],
                    help="guidance layout: time both for one step and run the faster (auto), or only this one "
                         "(saves two single-step timings: ~1.5 minutes at 720p)")
    ap.add_argument("--torch", default="", help="comma list of torch-eager,torch-compile to time as reference")
    ap.add_argument("--no-vae", action="store_true", help="skip the VAE decode")
    ap.add_argument("--tiny", action="store_true", help="tiny preset, tiny video, 3 steps: a CPU smoke run")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.vae, args.size, args.frames, args.text_len = "tiny-wan2.2-i2v-a14b", "tiny-wan2.1", "32x32", 5, 16
        args.steps, args.iters, args.dtype = 3, 1, "float32"
        args.shift = 5.0
    if args.impl:
        res = run_jax(args) if args.impl == "jax" else run_torch(args, args.impl == "torch-compile")
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    rows = {}
    for impl in ["jax"] + [x for x in args.torch.split(",") if x]:
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl] + [a for a in (argv or sys.argv[1:])
                                                                              if not a.startswith("--json")]
        if args.json:
            cmd = [c for c in cmd if c != args.json]
        p = subprocess.run(cmd, capture_output=True, text=True, env=child_env() if impl == "jax" else None)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        rows[impl] = json.loads(line[0][7:]) if line else {"error": (p.stderr or p.stdout)[-1500:]}
    jx = rows["jax"]
    if "error" in jx:
        print("jax run failed:\n" + jx["error"])
        return 1
    gib = lambda b: f"{b / 2**30:.1f}" if b else "-"  # noqa: E731
    print(f"\n{args.preset} {args.size}x{args.frames}, {args.dtype}, guidance {args.guidance}/{args.guidance_2}, "
          f"device {jx['device']}")
    print(f"{'one guided step':<34} {'median s':>9} {'vs torch eager':>15}")
    eager = rows.get("torch-eager", {}).get("median_s")
    for name, r in list(jx["step"].items()) + [(k, v) for k, v in rows.items() if k != "jax"]:
        if "error" in r:
            print(f"  {name:<32} error: {r['error'][-200:]}")
            continue
        ratio = f"{eager / r['median_s']:.2f}x" if eager else "-"
        print(f"  {name:<32} {r['median_s']:>9.3f} {ratio:>15}")
    print(f"whole run: {args.steps} steps ({jx['high_noise_steps']} on the high-noise expert, experts used "
          f"{jx['experts_used']}), {jx['best_layout']} guidance: {jx['sample_s']:.1f} s; "
          f"experts {'offloaded' if jx['offloaded'] else 'resident'} ({gib(jx['model_bytes'])} GiB of weights; "
          f"resident would need {gib(jx['resident_need_bytes'])} of {gib(jx['pool_bytes'])} GiB); "
          f"peak {gib(jx['peak_bytes_denoise'])} GiB while denoising")
    if jx["decode_s"] is not None:
        print(f"VAE decode {args.frames} frames: {jx['decode_s']:.1f} s; peak of the whole run {gib(jx['peak_bytes_total'])} GiB")
    if args.json:
        import importlib.metadata as md

        versions = {p: md.version(p) for p in ("jax", "flax", "torch", "diffusers")}
        with open(args.json, "w") as fh:
            json.dump({"preset": args.preset, "size": args.size, "frames": args.frames, "dtype": args.dtype,
                       "date": datetime.date.today().isoformat(), "versions": versions, "results": rows}, fh, indent=2)
    return 0 if jx["latents_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
