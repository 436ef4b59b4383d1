"""One DiT forward: our JAX model against diffusers eager and torch.compile, same GPU, same run.

Each implementation runs in its own subprocess (so JAX's and PyTorch's allocators never compete for
the card), with random bf16 weights of the full-size config. Prints seconds, TFLOP/s from an analytic
FLOP count and the ratio to torch.compile; writes JSON.

  python bench/dit.py --preset wan2.1-t2v-1.3b --json dit.json            # 480x832x81 on a GPU
  python bench/dit.py --preset wan2.2-i2v-a14b --size 720x1280 --json a.json
  python bench/dit.py --tiny                                              # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import functools
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.versions import versions  # noqa: E402  (after the path insert)

IMPLS = ("jax", "torch-eager", "torch-compile")


def latent_grid(preset: str, height: int, width: int, frames: int) -> tuple[int, int, int]:
    """Latent (frames, height, width) of a video for `preset`, from its VAE's config: `VaeConfig.latent_shape`
    is the one home of the compression factors (4x temporal with a causal first frame; 8x spatial, 16x for
    Wan2.2 TI2V-5B)."""
    from weights.configs.presets import get_preset
    from weights.configs.vae import get_vae_preset

    vae = get_vae_preset(get_preset(preset).vae)
    if (frames - 1) % vae.temporal_factor:
        raise ValueError(f"frames must be {vae.temporal_factor}k+1, got {frames}")
    return vae.latent_shape(frames, height, width)[:3]


def dit_flops_split(cfg, grid: tuple[int, int, int], text_len: int, image_len: int = 0) -> dict[str, float]:
    """Matmul FLOPs of one forward (2 per multiply-add), split into the attention kernels' share (scores and
    weighted sums) and the linear layers' (projections, feed-forward, patch embedding and head); elementwise
    work is ignored. The split lets a kernel profile give each kind of kernel its own TFLOP/s."""
    pt, ph, pw = cfg.patch_size
    L = (grid[0] // pt) * (grid[1] // ph) * (grid[2] // pw)
    D, F, S = cfg.inner_dim, cfg.ffn_dim, text_len
    linear = 2 * L * D * D * 4  # self-attn q, k, v, o
    linear += 2 * L * D * D * 2 + 2 * S * D * D * 2  # cross-attn q, o on video; k, v on text
    linear += 2 * L * D * F * 2  # feed-forward
    attention = 4 * L * L * D + 4 * L * S * D  # self-attn and cross-attn scores and weighted sums
    if image_len:
        linear += 2 * image_len * D * D * 2
        attention += 4 * L * image_len * D
    edges = 2 * L * D * (pt * ph * pw) * (cfg.in_channels + cfg.out_channels)
    return {"attention": float(cfg.num_layers * attention), "linear": float(cfg.num_layers * linear + edges)}


def dit_flops(cfg, grid: tuple[int, int, int], text_len: int, image_len: int = 0) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add); elementwise work is ignored."""
    return sum(dit_flops_split(cfg, grid, text_len, image_len).values())


def random_inputs(cfg, grid, text_len, seed=0):
    """(latents, timestep, text, image tokens or None) of one forward as float32 numpy, seeded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    f, h, w = grid
    lat = rng.standard_normal((1, f, h, w, cfg.in_channels), dtype=np.float32)
    text = rng.standard_normal((1, text_len, cfg.text_dim), dtype=np.float32)
    img = rng.standard_normal((1, 257, cfg.image_dim), dtype=np.float32) if cfg.has_image_tokens else None
    return lat, np.array([500.0], np.float32), text, img


def jax_inputs(cfg, grid, text_len, seed=0, dtype="bfloat16"):
    """`random_inputs` on the default device: latents and embeddings in `dtype`, a float32 timestep."""
    import jax.numpy as jnp

    return tuple(None if a is None else jnp.asarray(a, jnp.dtype(dtype) if a.ndim > 1 else jnp.float32)
                 for a in random_inputs(cfg, grid, text_len, seed))


def run_jax(cfg, grid, text_len, warmup: int, iters: int, backend: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.common import memory_analysis, random_dit

    t0 = time.perf_counter()
    model = random_dit(cfg, dtype=jnp.bfloat16, attention_backend=backend)
    weights = jax.devices()[0].memory_stats() or {}
    lat, t, text, img = jax_inputs(cfg, grid, text_len)

    # As the sampler calls it (jax_impl.sampling): parameters in, prediction out. `nnx.jit` would also
    # return the model's state, and the measured peak then held a second copy of the weights (57.5 GiB
    # for the A14B expert on an H100, 2026-11-25), which production never pays.
    graphdef, state = nnx.split(model)
    del model

    @functools.partial(jax.jit, static_argnums=0)
    def fwd(graphdef, state, lat, t, text, img):
        return nnx.merge(graphdef, state)(lat, t, text, img)

    compiled = fwd.lower(graphdef, state, lat, t, text, img).compile()
    mem = memory_analysis(compiled)
    jax.block_until_ready(compiled(state, lat, t, text, img))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(compiled(state, lat, t, text, img))
    times = []
    for _ in range(iters):
        s = time.perf_counter()
        jax.block_until_ready(compiled(state, lat, t, text, img))
        times.append(time.perf_counter() - s)
    stats = {}
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        pass
    return {"times": times, "setup_s": compile_s, "peak_bytes": stats.get("peak_bytes_in_use"),
            "weights_bytes": weights.get("bytes_in_use"), "compiled_memory": mem, "device": str(jax.devices()[0].device_kind)}


def run_torch(cfg, grid, text_len, warmup: int, iters: int, compile_: bool) -> dict:
    import torch
    from diffusers import WanTransformer3DModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = WanTransformer3DModel(**kwargs).eval()
    torch.set_default_dtype(torch.float32)
    lat, t, text, img = random_inputs(cfg, grid, text_len)
    x = torch.from_numpy(lat.transpose(0, 4, 1, 2, 3).copy()).to(dev, torch.bfloat16)
    args = dict(
        hidden_states=x,
        timestep=torch.from_numpy(t).to(dev),
        encoder_hidden_states=torch.from_numpy(text).to(dev, torch.bfloat16),
        return_dict=False,
    )
    if img is not None:
        args["encoder_hidden_states_image"] = torch.from_numpy(img).to(dev, torch.bfloat16)
    fn = torch.compile(model) if compile_ else model

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        fn(**args)
        sync()
        setup = time.perf_counter() - t0
        for _ in range(warmup):
            fn(**args)
        sync()
        times = []
        for _ in range(iters):
            s = time.perf_counter()
            fn(**args)
            sync()
            times.append(time.perf_counter() - s)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return {"times": times, "setup_s": setup, "peak_bytes": peak, "device": name}


def child(args) -> None:
    """Run one implementation and print one JSON line."""
    from weights.configs.presets import get_preset

    cfg = get_preset(args.preset).transformer
    h, w = (int(v) for v in args.size.split("x"))
    grid = latent_grid(args.preset, h, w, args.frames)
    if args.impl == "jax":
        res = run_jax(cfg, grid, args.text_len, args.warmup, args.iters, args.attention)
    else:
        res = run_torch(cfg, grid, args.text_len, args.warmup, args.iters, args.impl == "torch-compile")
    print("RESULT " + json.dumps(res), flush=True)


def main(argv=None) -> int:
    from jax_impl.runtime import configure_xla

    configure_xla()  # children inherit XLA_FLAGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--size", default="480x832", help="HEIGHTxWIDTH in pixels (default 480x832)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    ap.add_argument("--attention", default="auto", help="attention back-end of the JAX model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per implementation")
    ap.add_argument("--tiny", action="store_true", help="tiny preset, tiny video: a CPU smoke run")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--impl", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.size, args.frames, args.text_len = "tiny-wan2.1-t2v-1.3b", "32x32", 5, 16
        args.warmup, args.iters = 1, 2
    if args.impl:
        child(args)
        return 0

    from weights.configs.presets import get_preset

    cfg = get_preset(args.preset).transformer
    h, w = (int(v) for v in args.size.split("x"))
    grid = latent_grid(args.preset, h, w, args.frames)
    flops = dit_flops(cfg, grid, args.text_len, 257 if cfg.has_image_tokens else 0)
    rows = []
    for impl in args.impls.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--preset", args.preset, "--size", args.size,
               "--frames", str(args.frames), "--text-len", str(args.text_len), "--warmup", str(args.warmup),
               "--iters", str(args.iters), "--attention", args.attention]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
                rows.append({"impl": impl, "error": " | ".join(tail)})
                continue
            res = json.loads(line[0][7:])
        except subprocess.TimeoutExpired:
            rows.append({"impl": impl, "error": f"did not finish within {args.timeout} s"})
            continue
        times = sorted(res["times"])
        med = times[len(times) // 2]
        rows.append({"impl": impl, "median_s": med, "min_s": times[0], "tflops": flops / med / 1e12, **res})
    base = next((r["median_s"] for r in rows if r["impl"] == "torch-compile" and "median_s" in r), None)
    print(f"\n{args.preset} {args.size}x{args.frames} (grid {grid}, {flops / 1e12:.1f} TFLOP per forward)")
    print(f"{'impl':<15} {'median s':>9} {'TFLOP/s':>8} {'vs compile':>10} {'setup s':>8} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<15} error: {r['error'][:200]}")
            continue
        ratio = f"{base / r['median_s']:.2f}x" if base else "-"
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "-"
        print(f"{r['impl']:<15} {r['median_s']:>9.3f} {r['tflops']:>8.1f} {ratio:>10} {r['setup_s']:>8.1f} {peak:>9}")
    if args.json:
        out = {"preset": args.preset, "size": args.size, "frames": args.frames, "grid": grid, "flops": flops,
               "date": datetime.date.today().isoformat(), "results": rows, "versions": versions("jax", "flax", "torch", "diffusers")}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
