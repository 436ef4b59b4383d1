"""FP8 on Hopper, measured: the A14B expert forward bf16 vs FP8 and the per-layer error FP8 costs (also GEMMs and
cuDNN FP8 attention on request).

Every heavy piece (each forward variant at each size, the layer table, each optional part) runs in its own
subprocess with its own timeout, and the whole run stops starting new pieces when --budget runs out, so a
stall, a crash or an out-of-memory becomes that row's error while the rest still runs and the JSON is written.

  python bench/fp8.py --json bench/results/fp8_h100.json     # the lead's run: forward 480p+720p, layers 480p
  python bench/fp8.py --tiny --json /tmp/fp8_tiny.json       # the same on tiny shapes: a CPU smoke run (CI)
  python bench/fp8.py --parts gemm,attention --json X.json   # GEMMs and cuDNN FP8 attention (~3.5 min)

Default parts, on one H100 (estimates from the bf16 A14B forward at 480p: 3.0 s, setup ~20 s, compile ~30 s):
  forward 480x832x81  bf16 ~70 s, fp8 ~70 s (build 20 s, quantise ~10 s, compile ~30 s, 1 warm-up + 3 timed)
  forward 720x1280x81 bf16 ~110 s, fp8 ~100 s (about 3.5x the 480p forward: attention grows with tokens squared)
  layers  480x832x81  ~100 s (bf16 forward keeping the 40 block outputs, quantise in place, FP8 forward compared)
  total about 7-8 minutes; --budget 560 s keeps it inside a 10-minute call (pieces that would start later are
  reported as skipped). Each subprocess starts JAX and builds its own random weights.

forward: one A14B expert (wan2.2-i2v-a14b) with random N(0, 0.02) weights (bench/common.py random_module, filled
  leaf by leaf in bf16), FP8 by jax_impl.fp8.quantize_model (block linears e4m3, per-channel weights, per-token
  activations); per variant the best of --iters timed calls after --warmup, speed-up vs bf16, TFLOP/s, the compiled
  forward's memory (XLA memory analysis: arguments + temporaries), the process's peak device memory (includes the
  bf16 weights before quantisation), the count of cuBLASLt FP8 GEMMs in the compiled HLO, and rel L2 vs bf16.
  --variants bf16,fp8,fp8-attn adds FP8 linears + cuDNN FP8 attention (kernels/cudnn_fp8.py, not yet measured).
layers: parity.layer_error.fp8_layer_errors: rel L2 of every block's output (with --sublayers also self_attn /
  cross_attn / ffn), the head and the output, FP8 DiT vs bf16 DiT on the same full-size random weights and input.
  Random weights do not show what trained weights (with outlier channels) would.
gemm: bf16 vs FP8 GEMMs at the A14B's shapes (fused q/k/v, o, fc1, fc2 at 32760 tokens), several scalings.
attention: cuDNN FP8 flash attention vs bf16 cuDNN at 40 heads x 128, rel L2 vs a float32 reference sample.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import child_env, median_time  # noqa: E402  (after the path insert)
from bench.versions import versions  # noqa: E402

PARTS = ("gemm", "attention", "forward", "layers")
VARIANTS = ("bf16", "fp8", "fp8-attn")  # forward: bf16; FP8 linears; FP8 linears + cuDNN FP8 attention
PRESET = "wan2.2-i2v-a14b"
TINY_PRESET = "tiny-wan2.2-i2v-a14b"
FP8_CALL = "__cublas$lt$matmul$f8"
FP8_ATTENTION_CALL = "__cudnn$fmhaSoftmaxF8"
OPTIONAL = ("fp8-attn", "fp8 cudnn", "fp8 kernel only")  # cuDNN FP8 attention: reported when unsupported, not fatal


def _rel_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _peak_bytes() -> int | None:
    from bench.common import peak_bytes

    return peak_bytes()


def _device() -> str:
    import jax

    return str(jax.devices()[0].device_kind)


# ------------------------------------------------------------------------------------------------------------
# (a) GEMMs
def gemm_child(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jax_impl import fp8
    from jax_impl.layers import dense

    L = 256 if args.tiny else 32760
    shapes = [(L, 64, 96), (L, 96, 64)] if args.tiny else [
        (L, 5120, 15360),  # self-attention q, k, v fused
        (L, 5120, 5120),  # o, cross-attention q
        (L, 5120, 13824),  # ffn fc1
        (L, 13824, 5120),  # ffn fc2
    ]

    def dequant_dot(x, w8, ws, b):  # bench/gpu_profile.py's per-tensor pattern, for comparison
        x8, xs = fp8.quantize_activation(x, "tensor")
        xd = x8.astype(jnp.bfloat16) * xs.astype(jnp.bfloat16)
        return jnp.einsum("li,io->lo", xd, w8.astype(jnp.bfloat16) * ws.astype(jnp.bfloat16)) + b

    rows = []
    for m, k, n in shapes:
        kx, kw = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
        w = (0.02 * jax.random.normal(kw, (k, n), jnp.float32)).astype(jnp.bfloat16)
        b = jnp.zeros((n,), jnp.bfloat16)
        w8c, wsc = fp8.quantize_weight(w, "channel")
        w8t, wst = fp8.quantize_weight(w, "tensor")
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(lambda x, w: x.astype(jnp.float32) @ w.astype(jnp.float32))(x, w)
        impls = [
            ("bf16", lambda x, w, ws, b: dense(x, w, b), (x, w, None, b)),
            ("fp8 token x channel", lambda x, w, ws, b: fp8.fp8_dense(x, w, ws, b, act_scaling="token"), (x, w8c, wsc, b)),
            ("fp8 tensor x tensor", lambda x, w, ws, b: fp8.fp8_dense(x, w, ws, b, act_scaling="tensor"), (x, w8t, wst, b)),
            ("fp8 tensor dequant-dot", dequant_dot, (x, w8t, wst, b)),
            ("fp8 weight-only", lambda x, w, ws, b: fp8.fp8_dense(x, w, ws, b, act_scaling=None), (x, w8c, wsc, b)),
        ]
        for name, f, a in impls:
            row = {"shape": [m, k, n], "impl": name}
            try:
                fn = jax.jit(f)
                hlo = fn.lower(*a).compile().as_text()
                s = median_time(lambda: fn(*a), 3 if args.tiny else 10, 1 if args.tiny else 3)
                row.update(ms=s * 1e3, tflops=2 * m * k * n / s / 1e12, rel_l2_vs_f32=_rel_l2(fn(*a), ref),
                           fp8_gemm=FP8_CALL in hlo, cublas=sorted({c for c in ("__cublas$lt$matmul", "__cublas$gemm")
                                                                      if c in hlo}),
                           transposes=hlo.count(" transpose("))
            except Exception as e:  # noqa: BLE001 - one failing impl is a row, not the end of the run
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"rows": rows, "device": _device()}


def gemm_table(res: dict) -> None:
    print(f"{'shape':<22} {'impl':<24} {'ms':>8} {'TFLOP/s':>8} {'vs bf16':>8} {'rel L2':>9} {'fp8 GEMM':>8}")
    base = {}
    for r in res["rows"]:
        if r["impl"] == "bf16" and "ms" in r:
            base[tuple(r["shape"])] = r["ms"]
    for r in res["rows"]:
        if "error" in r:
            print(f"{str(r['shape']):<22} {r['impl']:<24} error: {r['error'][:100]}")
            continue
        b = base.get(tuple(r["shape"]))
        speed = f"{b / r['ms']:.2f}x" if b else "-"
        print(f"{str(r['shape']):<22} {r['impl']:<24} {r['ms']:>8.2f} {r['tflops']:>8.1f} {speed:>8} "
              f"{r['rel_l2_vs_f32']:>9.2e} {'yes' if r['fp8_gemm'] else 'no':>8}")


# ------------------------------------------------------------------------------------------------------------
# (b) attention
def attention_child(args) -> dict:
    import jax
    import jax.numpy as jnp

    import kernels
    from kernels.cudnn_fp8 import fp8_attention_params, quantize_per_tensor

    heads, hd = (2, 128) if args.tiny else (40, 128)
    cases = [("self", 256, 256), ("cross", 256, 64)] if args.tiny else [
        ("self 480p", 32760, 32760), ("self 720p", 75600, 75600), ("cross 480p", 32760, 512)]
    sample_heads, sample_rows = 2, 1024
    base = "cudnn" if jax.default_backend() == "gpu" else "xla"  # a CPU smoke run has no cuDNN
    rows = []
    for name, lq, lk in cases:
        keys = jax.random.split(jax.random.key(1), 3)
        q = jax.random.normal(keys[0], (1, lq, heads, hd), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(keys[1], (1, lk, heads, hd), jnp.float32).astype(jnp.bfloat16)
        v = jax.random.normal(keys[2], (1, lk, heads, hd), jnp.float32).astype(jnp.bfloat16)
        rq = min(sample_rows, lq)
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(lambda q, k, v: kernels.attention(q, k, v, backend="xla"))(
                q[:, :rq, :sample_heads].astype(jnp.float32), k[:, :, :sample_heads].astype(jnp.float32),
                v[:, :, :sample_heads].astype(jnp.float32))

        def fp8_kernel_only(q8, k8, v8, params):
            from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention

            return dot_product_attention(q8, k8, v8, fp8_params=params, scale=1 / math.sqrt(hd), use_fp8=True)[0]

        impls = [(f"bf16 {base}", lambda q, k, v: kernels.attention(q, k, v, backend=base), (q, k, v)),
                 ("fp8 cudnn", lambda q, k, v: kernels.attention(q, k, v, backend="cudnn_fp8"), (q, k, v))]
        for impl, f, a in impls:
            row = {"case": name, "q_len": lq, "kv_len": lk, "heads": heads, "head_dim": hd, "impl": impl}
            try:
                fn = jax.jit(f)
                s = median_time(lambda: fn(*a), 3 if args.tiny else 10, 1 if args.tiny else 2)
                out = fn(*a)
                row.update(ms=s * 1e3, tflops=4 * lq * lk * heads * hd / s / 1e12,
                           rel_l2_vs_f32=_rel_l2(out[:, :rq, :sample_heads], ref))
            except Exception as e:  # noqa: BLE001 - unsupported here: reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        row = {"case": name, "q_len": lq, "kv_len": lk, "heads": heads, "head_dim": hd, "impl": "fp8 kernel only"}
        try:  # the FP8 kernel on inputs quantised beforehand: what the quantisation passes cost
            (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t) for t in (q, k, v))
            params = fp8_attention_params(sq, sk, sv)
            fn = jax.jit(fp8_kernel_only)
            s = median_time(lambda: fn(q8, k8, v8, params), 3 if args.tiny else 10, 1 if args.tiny else 2)
            row.update(ms=s * 1e3, tflops=4 * lq * lk * heads * hd / s / 1e12)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows, "device": _device(), "reference": f"float32 xla, {sample_heads} heads x {sample_rows} query rows"}


def attention_table(res: dict) -> None:
    print(f"{'case':<12} {'impl':<16} {'ms':>9} {'TFLOP/s':>8} {'vs bf16':>8} {'rel L2':>9}")
    base = {r["case"]: r["ms"] for r in res["rows"] if r["impl"].startswith("bf16") and "ms" in r}
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['case']:<12} {r['impl']:<16} error: {r['error'][:110]}")
            continue
        b = base.get(r["case"])
        err = f"{r['rel_l2_vs_f32']:>9.2e}" if "rel_l2_vs_f32" in r else f"{'-':>9}"
        speed = f"{b / r['ms']:.2f}x" if b else "-"
        print(f"{r['case']:<12} {r['impl']:<16} {r['ms']:>9.2f} {r['tflops']:>8.1f} {speed:>8} {err}")


# ------------------------------------------------------------------------------------------------------------
# (c) forward
def _model_and_inputs(args, dtype: str, attention: str):
    from bench.common import random_dit
    from bench.dit import jax_inputs, latent_grid
    from weights.configs.presets import get_preset

    cfg = get_preset(TINY_PRESET if args.tiny else PRESET).transformer
    grid = latent_grid(TINY_PRESET if args.tiny else PRESET, *args.size, args.frames)
    model = random_dit(cfg, dtype=dtype, attention_backend=attention)
    return cfg, grid, model, jax_inputs(cfg, grid, args.text_len, dtype=dtype)


def forward_child(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jax_impl import fp8

    variant = args.variant
    attention = "xla" if args.tiny else ("cudnn_fp8" if variant == "fp8-attn" else "cudnn")
    t0 = time.perf_counter()
    cfg, grid, model, inputs = _model_and_inputs(args, "bfloat16", attention)
    build_s = time.perf_counter() - t0
    res: dict = {"variant": variant, "attention": attention, "build_s": build_s}
    if variant != "bf16":
        t0 = time.perf_counter()
        res["fp8_layers"] = len(fp8.quantize_model(model, act_scaling=args.act_scaling))
        jax.block_until_ready(nnx.state(model))
        res["quantize_s"] = time.perf_counter() - t0
    res["weights_bytes"] = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))

    t0 = time.perf_counter()
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a)).lower(state, *inputs).compile()
    res["compile_s"] = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    res["forward_bytes"] = {k: getattr(ma, k, None) for k in
                            ("argument_size_in_bytes", "temp_size_in_bytes", "output_size_in_bytes")}
    hlo = compiled.as_text()
    res["fp8_gemms_in_hlo"] = hlo.count(FP8_CALL)
    res["fp8_attention_in_hlo"] = hlo.count(FP8_ATTENTION_CALL)
    times = []
    for i in range(args.warmup + args.iters):
        s = time.perf_counter()
        out = jax.block_until_ready(compiled(state, *inputs))
        if i >= args.warmup:
            times.append(time.perf_counter() - s)
    res.update(times=times, best_s=min(times), median_s=sorted(times)[len(times) // 2], peak_bytes=_peak_bytes(),
               device=_device(),
               finite=bool(np.isfinite(np.asarray(out, np.float32)).all()))
    np.save(Path(args.out, f"forward_{variant}_{args.size[0]}x{args.size[1]}.npy"), np.asarray(out, np.float32))
    return res


def forward_summary(rows: list[dict], args) -> dict:
    import numpy as np

    from bench.dit import dit_flops, latent_grid
    from weights.configs.presets import get_preset

    cfg = get_preset(TINY_PRESET if args.tiny else PRESET).transformer
    grid = latent_grid(TINY_PRESET if args.tiny else PRESET, *args.size, args.frames)
    flops = dit_flops(cfg, grid, args.text_len)
    outs = {}
    for r in rows:
        f = Path(args.out, f"forward_{r['variant']}_{args.size[0]}x{args.size[1]}.npy")
        if "error" not in r and f.exists():
            outs[r["variant"]] = np.load(f)
    base = next((r["best_s"] for r in rows if r["variant"] == "bf16" and "best_s" in r), None)
    for r in rows:
        if "best_s" in r:
            r["tflops"] = flops / r["best_s"] / 1e12
            r["speedup_vs_bf16"] = base / r["best_s"] if base else None
            if "bf16" in outs and r["variant"] in outs:
                r["rel_l2_vs_bf16"] = _rel_l2(outs[r["variant"]], outs["bf16"])
    print(f"\nA14B expert forward {args.size[0]}x{args.size[1]}x{args.frames} (grid {grid}, {flops / 1e12:.1f} TFLOP)")
    print(f"{'variant':<10} {'best s':>9} {'TFLOP/s':>8} {'speed-up':>9} {'fwd GiB':>8} {'peak GiB':>9} "
          f"{'weights GiB':>11} {'fp8 GEMMs':>9} {'rel L2 vs bf16':>14}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<10} error: {r['error'][:200]}")
            continue
        fb = r["forward_bytes"]
        fwd = (fb["argument_size_in_bytes"] or 0) + (fb["temp_size_in_bytes"] or 0)
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "-"
        speed = f"{r['speedup_vs_bf16']:.2f}x" if r.get("speedup_vs_bf16") else "-"
        err = f"{r['rel_l2_vs_bf16']:.2e}" if "rel_l2_vs_bf16" in r else "-"
        print(f"{r['variant']:<10} {r['best_s']:>9.3f} {r['tflops']:>8.1f} {speed:>9} {fwd / 2**30:>8.1f} {peak:>9} "
              f"{r['weights_bytes'] / 2**30:>11.1f} {r['fp8_gemms_in_hlo']:>9} {err:>14}")
    return {"grid": grid, "flops": flops, "rows": rows}


# ------------------------------------------------------------------------------------------------------------
# (d) per-layer error
def layers_child(args) -> dict:
    """parity.layer_error.fp8_layer_errors on the layers size: the bf16 model, then the same one quantised in place."""
    import jax

    from parity.layer_error import fp8_layer_errors

    args = argparse.Namespace(**{**vars(args), "size": args.layers_size, "frames": args.layers_frames})
    t0 = time.perf_counter()
    _, grid, model, inputs = _model_and_inputs(args, "bfloat16", "xla" if args.tiny else "cudnn")
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    attention = None if args.tiny else args.variant  # the FP8 run's attention (the reference's stays cuDNN bf16)
    rows = fp8_layer_errors(model, inputs, sublayers=args.sublayers, act_scaling=args.act_scaling,
                            attention_backend=attention)
    return {"attention": attention or "xla", "grid": grid, "build_s": build_s, "run_s": time.perf_counter() - t0, "sublayers": args.sublayers,
            "layers": [{"name": r.name, "rel_l2": r.rel_l2} for r in rows], "peak_bytes": _peak_bytes(),
            "device": _device()}


def layers_summary(res: dict, args) -> dict:
    from parity.layer_error import LayerError, format_layer_errors

    if "layers" in res:
        h, w = args.layers_size
        print("\n" + format_layer_errors([LayerError(r["name"], r["rel_l2"]) for r in res["layers"]],
                                        f"per-layer rel L2, FP8 vs bf16 DiT ({'tiny' if args.tiny else 'full-size'} "
                                        f"random weights, {h}x{w}x{args.layers_frames}; FP8 run's attention: "
                                        f"{res.get('attention', '?')})"))
    return res


# ------------------------------------------------------------------------------------------------------------
CHILDREN = {"gemm": gemm_child, "attention": attention_child, "forward": forward_child, "layers": layers_child}


# Children run with bench.common.child_env(): JAX's default pool is 75% of the card (59 GiB of an H100), and the
# layer table at 480p x 81 frames (bf16 weights, 12.5 GiB of reference taps and the forward's temporaries) ran out
# of it; the card has room for it.


def _child_cmd(args, part: str, variant: str | None, size: tuple[int, int] | None) -> list[str]:
    size = size or args.size
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--child", "--out", args.out, "--size",
           f"{size[0]}x{size[1]}", "--frames", str(args.frames), "--text-len", str(args.text_len),
           "--layers-size", f"{args.layers_size[0]}x{args.layers_size[1]}", "--layers-frames", str(args.layers_frames),
           "--warmup", str(args.warmup), "--iters", str(args.iters), "--act-scaling", args.act_scaling]
    if variant:
        cmd += ["--variant", variant]
    if args.tiny:
        cmd.append("--tiny")
    if args.sublayers:
        cmd.append("--sublayers")
    return cmd


def run_child(args, part: str, variant: str | None = None, size: tuple[int, int] | None = None) -> dict:
    """Run one part (one variant, one size) in a subprocess with its own timeout (the smaller of --timeout and
    what is left of --budget); its result, or {"error": ...} naming what went wrong."""
    label = " ".join(x for x in (part, variant, size and f"{size[0]}x{size[1]}") if x)
    left = int(args.deadline - time.monotonic())
    timeout = min(args.timeout, left)
    if timeout < 30:
        return {"variant": variant, "error": f"skipped: {left} s left of the --budget of {args.budget} s"}
    print(f"[{label}] running (timeout {timeout} s)", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(_child_cmd(args, part, variant, size), capture_output=True, text=True, timeout=timeout,
                           env=child_env())
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"did not finish within {timeout} s"}
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-4:])
        return {"variant": variant, "error": f"exit {p.returncode}: {tail}"}
    res = json.loads(line[-1][len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    print(f"[{label}] done in {res['wall_s']:.0f} s", flush=True)
    return res


def run_part(args, part: str) -> dict:
    if part == "gemm":
        res = run_child(args, "gemm")
        if "rows" in res:
            gemm_table(res)
        return res
    if part == "attention":
        res = run_child(args, "attention")
        if "rows" in res:
            attention_table(res)
        return res
    if part == "forward":
        out = {}
        for size in args.sizes:
            sized = argparse.Namespace(**{**vars(args), "size": size})
            rows = [run_child(args, "forward", v, size) for v in args.variants]
            out[f"{size[0]}x{size[1]}"] = {"frames": args.frames, **forward_summary(rows, sized)}
        return out
    out = {}
    for attention in args.layers_attention:  # the first is "layers" in the JSON, others "layers_<backend>"
        res = layers_summary(run_child(args, "layers", attention), args)
        out[attention] = {"size": list(args.layers_size), "frames": args.layers_frames, **res}
    return out


def _failed(part: str, res: dict) -> bool:
    """A part failed if its subprocess did, or any row did other than the optional cuDNN FP8 attention ones."""
    if part == "forward":
        return any(_failed("rows", r) for r in res.values())
    if part == "layers_cudnn_fp8":  # optional, like the fp8-attn forward: an error is reported, not fatal
        return False
    if "error" in res:
        return True
    rows = res.get("rows", [])
    return any("error" in r and r.get("impl", r.get("variant")) not in OPTIONAL for r in rows)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH in pixels, e.g. 480x832; got {text!r}") from None
    if h % 16 or w % 16:
        raise argparse.ArgumentTypeError(f"height and width must be multiples of 16 (VAE 8x, patch 2x); got {text!r}")
    return h, w


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="forward,layers",
                    help=f"comma list of {', '.join(PARTS)} (default forward,layers: the lead's one GPU run)")
    ap.add_argument("--json", help="write every part's results here as one JSON file (e.g. bench/results/fp8_h100.json)")
    ap.add_argument("--out", help="scratch folder for the forward outputs (default: a temporary folder)")
    ap.add_argument("--sizes", default="480x832,720x1280", help="forward: comma list of HEIGHTxWIDTH in pixels")
    ap.add_argument("--frames", type=int, default=81, help="video frames, 4k+1 (default 81)")
    ap.add_argument("--text-len", type=int, default=512, help="text tokens (default 512, the UMT5 padding)")
    ap.add_argument("--layers-size", type=_size, default=(480, 832), help="layers: HEIGHTxWIDTH (default 480x832)")
    ap.add_argument("--layers-frames", type=int, default=81, help="layers: frames (default 81)")
    ap.add_argument("--sublayers", action="store_true",
                    help="layers: also compare each block's self_attn / cross_attn / ffn (4x the reference taps' memory: "
                         "use a short clip, e.g. --layers-frames 21, at full size)")
    ap.add_argument("--layers-attention", default="cudnn",
                    help="layers: comma list of the FP8 run's attention back-ends, one table each (cudnn: FP8 linears "
                         "only; cudnn_fp8: FP8 linears + cuDNN FP8 attention); the reference is always bf16 cuDNN")
    ap.add_argument("--variants", default="bf16,fp8", help=f"forward: comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--act-scaling", default="token", choices=("token", "tensor"), help="FP8 activation scaling")
    ap.add_argument("--warmup", type=int, default=1, help="forward calls before timing (default 1)")
    ap.add_argument("--iters", type=int, default=3, help="timed forward calls; the best counts (default 3)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per subprocess (default 240)")
    ap.add_argument("--budget", type=int, default=560,
                    help="seconds for the whole run (default 560, under a 10-minute call); later parts are skipped")
    ap.add_argument("--tiny", action="store_true", help="tiny preset and shapes: the whole script on a CPU in seconds")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=_size, default=(480, 832), help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.sizes, args.frames, args.text_len = "32x32", 5, 16
        args.layers_size, args.layers_frames, args.sublayers = (32, 48), 5, True
        args.warmup, args.iters = 1, 2
    for frames in (args.frames, args.layers_frames):
        if (frames - 1) % 4:
            ap.error(f"frames must be 4k+1 (the VAE's causal time compression), got {frames}")
    try:
        args.sizes = [_size(t) for t in args.sizes.split(",") if t.strip()]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.layers_attention = [v.strip() for v in args.layers_attention.split(",") if v.strip()]
    if set(args.layers_attention) - {"cudnn", "cudnn_fp8"}:
        ap.error(f"--layers-attention takes cudnn and/or cudnn_fp8, got {args.layers_attention}")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown forward variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        ap.error(f"unknown part(s) {sorted(set(parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
    if args.child:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print("RESULT " + json.dumps(CHILDREN[args.part](args), default=str), flush=True)
        return 0
    if args.json and Path(args.json).is_dir():
        ap.error(f"--json {args.json} is a folder; give a file name, e.g. {Path(args.json, 'fp8_h100.json')}")

    from jax_impl.runtime import configure_xla

    configure_xla()  # children inherit XLA_FLAGS
    args.deadline = time.monotonic() + args.budget
    with contextlib.ExitStack() as stack:
        if args.out is None:
            args.out = stack.enter_context(tempfile.TemporaryDirectory(prefix="fp8-bench-"))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        results = {p: run_part(args, p) for p in parts}
    if "layers" in results:  # one table per attention back-end: the first keeps the key "layers"
        tables = results.pop("layers")
        for i, (attention, res) in enumerate(tables.items()):
            results["layers" if i == 0 else f"layers_{attention}"] = res
    doc = {"date": datetime.date.today().isoformat(), "tiny": args.tiny, "preset": TINY_PRESET if args.tiny else PRESET,
           "act_scaling": args.act_scaling, "weight_scaling": "channel", "text_len": args.text_len,
           "warmup": args.warmup, "iters": args.iters, "versions": versions("jax", "jaxlib", "flax"), **results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        os.replace(tmp, args.json)
        print(f"wrote {args.json}", flush=True)
    failed = [p for p, r in results.items() if _failed(p, r)]
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
