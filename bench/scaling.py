"""How the Wan DiT scales over N devices: weights split FSDP-style, video tokens split (context parallel).

For each device count N it builds the same random-weight model directly sharded over N devices (a 14B
model is never whole on one device or host), then times
  * one DiT forward (batch 1), and
  * one denoising step with classifier-free guidance: conditional and unconditional predictions as a
    batch of 2, guidance mix, Euler update of the latents,
checks both outputs against those of the first (smallest) N (relative L2; 1 device by default), and
prints seconds per step, speedup, scaling efficiency (speedup / N) and peak memory per device.
Each N runs in its own subprocess, so peak memory is that N's alone.

  python bench/scaling.py                                   # wan2.2-i2v-a14b expert, 720x1280x81, bf16, all GPUs
  python bench/scaling.py --devices 1,2,4,8 --json scaling.json
  python bench/scaling.py --preset wan2.1-t2v-1.3b --size 480x832
  python bench/scaling.py --tiny                            # CPU smoke run on 8 simulated devices

Timing is the median of --iters runs after --warmup runs; compile and weight creation are reported
separately as setup seconds. Different N add partial results in different orders, so the rel L2
against N=1 is rounding noise, not zero: about 2e-7 in float32 (tiny models on CPU); in bf16 it is
larger, and the table is where to read it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.versions import versions  # noqa: E402  (after the path insert)
from dit import latent_grid  # noqa: E402  (bench/dit.py, beside this script: one latent grid for the benches)

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


def _inputs(cfg, grid, text_len: int, seed: int = 0) -> dict:
    """Deterministic host inputs: noise, condition channels (I2V), text (cond + uncond), image tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    f, h, w = grid
    out = {
        "noise": rng.standard_normal((1, f, h, w, cfg.out_channels), dtype=np.float32),
        "cond": rng.standard_normal((1, f, h, w, cfg.in_channels - cfg.out_channels), dtype=np.float32)
        if cfg.in_channels > cfg.out_channels else None,
        "text": rng.standard_normal((2, text_len, cfg.text_dim), dtype=np.float32),  # [cond, uncond]
        "image": rng.standard_normal((1, 257, cfg.image_dim), dtype=np.float32) if cfg.has_image_tokens else None,
    }
    return out


def _timed(fn, args, warmup: int, iters: int) -> tuple[float, list[float], object]:
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        s = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - s)
    return first, times, out


def child(args) -> None:
    """Run one device count; save outputs under --out-dir, print one RESULT JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jax_impl import sharding as S
    from jax_impl.dit import WanTransformer
    from weights.configs.presets import get_preset

    cfg = get_preset(args.preset).transformer
    h, w = (int(v) for v in args.size.split("x"))
    grid = latent_grid(args.preset, h, w, args.frames)
    dtype = jnp.dtype(DTYPES[args.dtype])
    mesh = S.make_mesh(args.n)

    t0 = time.perf_counter()
    model = S.create_sharded(
        lambda: WanTransformer(cfg, dtype=dtype, attention_backend=args.attention, rngs=nnx.Rngs(0)), mesh
    )
    leaves = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(leaves)
    create_s = time.perf_counter() - t0
    dev0 = mesh.devices.flat[0]
    param_total = sum(a.nbytes for a in leaves)
    param_dev0 = sum(s.data.nbytes for a in leaves for s in a.addressable_shards if s.device == dev0)

    inp = _inputs(cfg, grid, args.text_len)
    t_now, dt_sigma, guidance = 900.0, -0.02, args.guidance

    def model_input(noise, cond):
        x = noise if cond is None else jnp.concatenate([noise, cond], axis=-1)
        return x.astype(dtype)

    def forward(model, split, noise, cond, text, image):
        return model(model_input(noise, cond), jnp.full((1,), t_now), text[:1].astype(dtype),
                     None if image is None else image.astype(dtype), seq_split=split).astype(jnp.float32)

    def cfg_step(model, split, noise, cond, text, image):
        x = model_input(noise, cond)
        x2 = jnp.concatenate([x, x], axis=0)
        img2 = None if image is None else jnp.concatenate([image, image], axis=0).astype(dtype)
        v = model(x2, jnp.full((2,), t_now), text.astype(dtype), img2, seq_split=split).astype(jnp.float32)
        v = v[1:] + guidance * (v[:1] - v[1:])
        return noise + dt_sigma * v

    fwd = S.sharded_call(model, mesh, forward)
    step = S.sharded_call(model, mesh, cfg_step)
    del model
    call_args = (inp["noise"], inp["cond"], inp["text"], inp["image"])
    fwd_first, fwd_times, fwd_out = _timed(fwd, call_args, args.warmup, args.iters)
    step_first, step_times, step_out = _timed(step, call_args, args.warmup, args.iters)
    np.save(os.path.join(args.out_dir, f"forward_{args.n}.npy"), np.asarray(fwd_out))
    np.save(os.path.join(args.out_dir, f"step_{args.n}.npy"), np.asarray(step_out))

    peaks = []
    for d in mesh.devices.flat:
        try:
            peaks.append((d.memory_stats() or {}).get("peak_bytes_in_use"))
        except Exception:  # CPU devices may not report
            peaks.append(None)
    peaks = [p for p in peaks if p is not None]
    res = {
        "devices": args.n,
        "forward_times": fwd_times,
        "step_times": step_times,
        "setup_s": create_s + fwd_first + step_first,
        "create_s": create_s,
        "param_bytes_total": param_total,
        "param_bytes_per_device": param_dev0,
        "peak_bytes_per_device": max(peaks) if peaks else None,
        "device": str(dev0.device_kind),
        "platform": dev0.platform,
    }
    print("RESULT " + json.dumps(res), flush=True)


def _count_devices(env: dict) -> tuple[int, str]:
    """Visible devices, asked of a throwaway process (this one never starts JAX, so it holds no GPU)."""
    code = "import jax; print('COUNT', jax.device_count(), jax.default_backend())"
    env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("COUNT ")]
    if p.returncode or not line:
        raise RuntimeError("could not start JAX to count devices: " + (p.stderr or p.stdout)[-500:])
    _, n, platform = line[0].split()
    return int(n), platform


def _rel_l2(x, ref) -> float:
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / den) if den else float(np.linalg.norm(x))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.2-i2v-a14b", help="model preset (default: one Wan2.2 A14B expert)")
    ap.add_argument("--size", default="720x1280", help="HEIGHTxWIDTH in pixels (default 720x1280)")
    ap.add_argument("--frames", type=int, default=81, help="video frames, 4k+1 (default 81: 75600 tokens at 720p)")
    ap.add_argument("--text-len", type=int, default=512, help="text tokens (default 512, as the pipelines pad)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights and activations (default bf16)")
    ap.add_argument("--devices", help="comma list of device counts (default: 1,2,4,8 up to the visible count)")
    ap.add_argument("--attention", default="auto", help="attention back-end (auto: cuDNN on GPU, xla on CPU)")
    ap.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale of the step")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs after the compiling one (default 1)")
    ap.add_argument("--iters", type=int, default=3, help="timed runs; the median is reported (default 3)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per device count")
    ap.add_argument("--simulate", type=int, default=0,
                    help="run on CPU with this many simulated devices (XLA_FLAGS host device count)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny preset, small video, float32, 8 simulated CPU devices: a smoke run (CI)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)  # child mode: one device count
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.size, args.frames, args.text_len = "tiny-wan2.2-i2v-a14b", "48x48", 9, 16
        args.dtype, args.warmup, args.iters = "float32", 1, 2
        args.simulate = args.simulate or 8
    if args.n:
        child(args)
        return 0

    env = dict(os.environ)
    if args.simulate:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=(env.get("XLA_FLAGS", "") +
                   f" --xla_force_host_platform_device_count={args.simulate}").strip())
    visible, platform = _count_devices(env)
    if args.devices:
        counts = [int(v) for v in args.devices.split(",")]
    else:
        counts = [n for n in (1, 2, 4, 8) if n <= visible] + ([visible] if visible > 8 else [])
    too_many = [n for n in counts if n > visible]
    if too_many:
        ap.error(f"asked for {too_many} devices but {visible} are visible; on CPU use --simulate N")

    from weights.configs.presets import get_preset

    cfg = get_preset(args.preset).transformer
    h, w = (int(v) for v in args.size.split("x"))
    grid = latent_grid(args.preset, h, w, args.frames)
    pt, ph, pw = cfg.patch_size
    tokens = (grid[0] // pt) * (grid[1] // ph) * (grid[2] // pw)
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for n in counts:
            cmd = [sys.executable, os.path.abspath(__file__), "--n", str(n), "--out-dir", out_dir,
                   "--preset", args.preset, "--size", args.size, "--frames", str(args.frames),
                   "--text-len", str(args.text_len), "--dtype", args.dtype, "--attention", args.attention,
                   "--guidance", str(args.guidance), "--warmup", str(args.warmup), "--iters", str(args.iters)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            except subprocess.TimeoutExpired:
                rows.append({"devices": n, "error": f"did not finish within {args.timeout} s"})
                continue
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
                rows.append({"devices": n, "error": " | ".join(tail)})
                continue
            res = json.loads(line[0][7:])
            res["forward_s"] = sorted(res["forward_times"])[len(res["forward_times"]) // 2]
            res["step_s"] = sorted(res["step_times"])[len(res["step_times"]) // 2]
            rows.append(res)
        _compare(rows, out_dir)

    ok = [r for r in rows if "error" not in r]
    base = ok[0] if ok else None
    for r in ok:
        r["speedup"] = round(base["step_s"] / r["step_s"], 4) if r is not base else 1.0
        r["efficiency"] = r["speedup"] * base["devices"] / r["devices"]
    print(f"\n{args.preset} {args.size}x{args.frames} {args.dtype}: {tokens} tokens, grid {grid}, "
          f"{platform} ({visible} visible devices)")
    print(f"{'N':>3} {'fwd s':>8} {'step s':>8} {'speedup':>8} {'scaling efficiency':>18} "
          f"{'peak GiB/dev':>12} {'params MiB/dev':>14} {'rel L2 fwd':>10} {'rel L2 step':>11} {'setup s':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['devices']:>3} error: {r['error'][:200]}")
            continue
        peak = f"{r['peak_bytes_per_device'] / 2**30:.2f}" if r.get("peak_bytes_per_device") else "-"
        print(f"{r['devices']:>3} {r['forward_s']:>8.3f} {r['step_s']:>8.3f} {r['speedup']:>7.2f}x "
              f"{r['efficiency']:>17.0%} {peak:>12} {r['param_bytes_per_device'] / 2**20:>14.1f} "
              f"{r['forward_rel_l2']:>10.2e} {r['step_rel_l2']:>11.2e} {r['setup_s']:>8.1f}")
    if args.json:
        out = {"preset": args.preset, "size": args.size, "frames": args.frames, "grid": grid, "tokens": tokens,
               "dtype": args.dtype, "attention": args.attention, "guidance": args.guidance,
               "platform": platform, "visible_devices": visible, "date": datetime.date.today().isoformat(),
               "results": rows, "versions": versions("jax", "jaxlib", "flax")}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if len(ok) == len(rows) else 1


def _compare(rows: list[dict], out_dir: str) -> None:
    """rel L2 of each N's forward and step outputs against the first N that ran."""
    import numpy as np

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    ref_n = ok[0]["devices"]
    for kind in ("forward", "step"):
        ref = np.load(os.path.join(out_dir, f"{kind}_{ref_n}.npy"))
        for r in ok:
            r[f"{kind}_rel_l2"] = _rel_l2(np.load(os.path.join(out_dir, f"{kind}_{r['devices']}.npy")), ref)
            r["reference_devices"] = ref_n


if __name__ == "__main__":
    sys.exit(main())
