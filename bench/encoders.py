"""Encoder speed and memory: our JAX UMT5-XXL and CLIP ViT-H/14 against transformers, same GPU, same run.

UMT5-XXL encodes one 512-token prompt (every token real, the mask passed as the pipeline passes it); CLIP
ViT-H/14 encodes one 224 px image up to the penultimate layer (Wan's image tokens; transformers runs all 32
layers and returns hidden_states[-2], as the pipelines call it). Random bf16 weights of the full-size
configs; transformers keeps UMT5's `wo` in float32 as from_pretrained does, and so do we. Each (model,
implementation) runs in its own subprocess with a timeout, so the allocators never share the card and a
crash or hang costs one row. Prints median time after warm-up, setup time (weights + compile), weight
bytes and peak device memory; writes JSON.

  python bench/encoders.py --json bench/results/encoders.json      # on a GPU, full size
  python bench/encoders.py --models umt5 --batch 2                  # prompt + negative prompt, as the pipeline
  python bench/encoders.py --tiny                                   # CPU smoke run (CI)
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

from bench.versions import versions  # noqa: E402  (after the path insert)

MODELS = ("umt5", "clip")
IMPLS = ("jax", "torch")


def configs(tiny: bool):
    """(UMT5 config, CLIP vision config): Wan's full sizes, or small ones for a CPU smoke run."""
    from weights.configs.encoders import ClipVisionConfig, Umt5Config

    if tiny:
        return (Umt5Config(vocab_size=1000, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4),
                ClipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=56, patch_size=14, hidden_act="gelu"))
    return Umt5Config.umt5_xxl(), ClipVisionConfig.vit_h14()


def _inputs(model: str, cfg, batch: int, text_len: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    if model == "umt5":
        return (rng.integers(1, cfg.vocab_size, (batch, text_len)).astype(np.int32), np.ones((batch, text_len), np.int32))
    return (rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.num_channels), dtype=np.float32),)


def _timed(call, sync, warmup: int, iters: int) -> tuple[float, list[float]]:
    """(seconds of the first call, which compiles, per-iteration seconds after `warmup` more calls)."""
    t0 = time.perf_counter()
    sync(call())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - t0)
    return first, times


def run_jax(model: str, cfg, batch: int, text_len: int, warmup: int, iters: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.common import peak_bytes, random_module
    from jax_impl.frozen_jit import frozen_jit
    from jax_impl.encoders.clip import ClipVisionEncoder
    from jax_impl.encoders.umt5 import Umt5Encoder

    t0 = time.perf_counter()
    if model == "umt5":
        net = random_module(lambda: Umt5Encoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
        fwd = frozen_jit(lambda m, ids, mask: m(ids, mask))
    else:
        net = random_module(lambda: ClipVisionEncoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
        fwd = frozen_jit(lambda m, px: m.penultimate(px))
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    weights = stats.get("bytes_in_use")
    args = [jnp.asarray(a, jnp.bfloat16 if a.dtype.kind == "f" else a.dtype) for a in _inputs(model, cfg, batch, text_len)]
    init_s = time.perf_counter() - t0
    first, times = _timed(lambda: fwd(net, *args), jax.block_until_ready, warmup, iters)
    return {"times": times, "init_s": init_s, "first_call_s": first, "weights_bytes": weights,
            "peak_bytes": peak_bytes(dev), "device": str(dev.device_kind)}


def run_torch(model: str, cfg, batch: int, text_len: int, warmup: int, iters: int) -> dict:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type", "is_gated_act")}
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        if model == "umt5":
            net = UMT5EncoderModel(UMT5Config(**fields)).eval()
            for block in net.encoder.block:  # what from_pretrained(torch_dtype=bf16) does: _keep_in_fp32_modules
                block.layer[1].DenseReluDense.wo.float()
        else:
            net = CLIPVisionModel(CLIPVisionConfig(**fields)).eval()
    torch.set_default_dtype(torch.float32)
    sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    sync(None)
    weights = torch.cuda.memory_allocated() if dev == "cuda" else None
    inputs = [torch.from_numpy(a).to(dev) for a in _inputs(model, cfg, batch, text_len)]
    if model == "umt5":
        call = lambda: net(input_ids=inputs[0].long(), attention_mask=inputs[1].long()).last_hidden_state  # noqa: E731
    else:
        px = inputs[0].permute(0, 3, 1, 2).contiguous().to(torch.bfloat16)
        call = lambda: net(pixel_values=px, output_hidden_states=True).hidden_states[-2]  # noqa: E731
    init_s = time.perf_counter() - t0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the forward's peak (weights included), not the init's
    with torch.no_grad():
        first, times = _timed(call, sync, warmup, iters)
    return {"times": times, "init_s": init_s, "first_call_s": first, "weights_bytes": weights,
            "peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}


def child(args) -> None:
    """Run one (model, implementation) and print one JSON line."""
    umt5, clip = configs(args.tiny)
    cfg = umt5 if args.model == "umt5" else clip
    run = run_jax if args.impl == "jax" else run_torch
    res = run(args.model, cfg, args.batch, args.text_len, args.warmup, args.iters)
    print("RESULT " + json.dumps(res), flush=True)


def _row(model: str, impl: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--impl", impl, "--batch", str(args.batch),
           "--text-len", str(args.text_len), "--warmup", str(args.warmup), "--iters", str(args.iters)]
    cmd += ["--tiny"] if args.tiny else []
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": model, "impl": impl, "error": f"did not finish within {args.timeout} s"}
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"model": model, "impl": impl, "error": " | ".join(tail) or f"exit code {p.returncode}"}
    res = json.loads(line[0][len("RESULT "):])
    times = sorted(res["times"])
    return {"model": model, "impl": impl, "median_s": times[len(times) // 2], "min_s": times[0], **res}


def main(argv=None) -> int:
    from jax_impl.runtime import configure_xla

    configure_xla()  # children inherit XLA_FLAGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    ap.add_argument("--batch", type=int, default=1, help="prompts / images per call (default 1)")
    ap.add_argument("--text-len", type=int, default=512, help="UMT5 tokens per prompt (default 512, as Wan pads to)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per (model, implementation) subprocess")
    ap.add_argument("--tiny", action="store_true", help="small configs, few iterations: a CPU smoke run")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny and not args.impl:
        args.text_len, args.warmup, args.iters = min(args.text_len, 64), 1, 2
    if args.impl:
        child(args)
        return 0
    models, impls = args.models.split(","), args.impls.split(",")
    bad = sorted(set(models) - set(MODELS)) + sorted(set(impls) - set(IMPLS))
    if bad or args.batch < 1 or args.text_len < 1:
        ap.error(f"unknown model/implementation {bad}" if bad else "--batch and --text-len must be positive")
    umt5, clip = configs(args.tiny)
    rows = [_row(m, i, args) for m in models for i in impls]
    gib = lambda b: f"{b / 2**30:.2f}" if b else "-"  # noqa: E731
    print(f"\nUMT5 {umt5.num_layers}x{umt5.d_model} ({umt5.param_count() / 1e9:.2f}B), {args.batch} x {args.text_len} tokens; "
          f"CLIP {clip.num_hidden_layers}x{clip.hidden_size} at {clip.image_size} px, {args.batch} image(s); bf16")
    print(f"{'model':<6} {'impl':<6} {'median ms':>10} {'min ms':>8} {'init s':>7} {'1st call s':>10} {'weights GiB':>11} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<6} {r['impl']:<6} error: {r['error'][:300]}")
            continue
        print(f"{r['model']:<6} {r['impl']:<6} {1e3 * r['median_s']:>10.2f} {1e3 * r['min_s']:>8.2f} {r['init_s']:>7.1f} "
              f"{r['first_call_s']:>10.1f} {gib(r['weights_bytes']):>11} {gib(r['peak_bytes']):>9}")
    if args.json:
        out = {"date": datetime.date.today().isoformat(), "tiny": args.tiny, "batch": args.batch, "text_len": args.text_len,
               "configs": {"umt5": umt5.to_dict(), "clip": clip.to_dict()}, "results": rows, "versions": versions("jax", "flax", "torch", "transformers")}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
