"""FP8 on Hopper, measured: GEMMs, cuDNN FP8 attention, the A14B forward, and the per-layer error it costs.

Each part (and each variant of the forward) runs in its own subprocess with a timeout, so a crash, an
unsupported kernel or an out-of-memory is reported as that row's error and the other rows still run. Every
part prints a table and writes JSON under --out (fp8_<part>[_<size>].json).

  python bench/fp8.py gemm      --out DIR                    # (a) ~1.5 min on an H100
  python bench/fp8.py attention --out DIR                    # (b) ~2 min
  python bench/fp8.py forward   --out DIR --size 480x832     # (c) ~4 min: bf16 / fp8 linears / + fp8 attention
  python bench/fp8.py forward   --out DIR --size 720x1280    # (c) ~6 min
  python bench/fp8.py layers    --out DIR                    # (d) ~4 min
  python bench/fp8.py all --tiny --out DIR                   # every part on tiny shapes: CPU smoke run (CI)

(a) bf16 vs FP8 GEMMs at the A14B's shapes (fused q/k/v, o, fc1, fc2 at 480p's 32760 tokens): per-token x
    per-channel, per-tensor x per-tensor, the dequantise-then-dot pattern of bench/gpu_profile.py, and
    weight-only FP8; ms, TFLOP/s, rel L2 vs a float32 product, and whether the compiled HLO calls
    `__cublas$lt$matmul$f8`.
(b) cuDNN FP8 flash attention (kernels/cudnn_fp8.py) vs bf16 cuDNN at 40 heads x 128: self-attention over
    32760 and 75600 tokens, cross-attention 32760 x 512; ms, TFLOP/s, rel L2 vs a float32 reference computed
    on 2 heads x 1024 query rows (a full float32 reference at 75600 tokens would not fit).
(c) one A14B expert forward with random weights (bench/common.py), quantised after building
    (jax_impl.fp8.quantize_model): bf16, FP8 linears, FP8 linears + FP8 attention; seconds, speed-up, the
    compiled forward's memory (XLA memory analysis: arguments + temporaries) and the process peak (which
    includes the bf16 weights before quantisation), and each output's rel L2 vs the bf16 output.
(d) per-layer rel L2 (the DiT's capture taps: patch embedding, each block's self_attn / cross_attn / ffn /
    output, head, output) of the FP8 DiT and the bf16 DiT against the float32 DiT (matmuls at HIGHEST), all
    from the same full-size random weights, on a short clip (--layers-size, default 480x832x5 frames: 3120
    tokens) so 160 float32 taps fit in host memory. Random weights do not show what trained weights (with
    outlier channels) would.
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
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARTS = ("gemm", "attention", "forward", "layers")
VARIANTS = ("bf16", "fp8", "fp8-attn")  # forward: bf16; FP8 linears; FP8 linears + cuDNN FP8 attention
PRESET = "wan2.2-i2v-a14b"
TINY_PRESET = "tiny-wan2.2-i2v-a14b"
FP8_CALL = "__cublas$lt$matmul$f8"
FP8_ATTENTION_CALL = "__cudnn$fmhaSoftmaxF8"
LAYER_VARIANTS = ("fp32", "bf16", "fp8", "fp8-attn")  # layers: fp32 is the reference
OPTIONAL = ("fp8-attn", "fp8 cudnn", "fp8 kernel only")  # cuDNN FP8 attention: reported when unsupported, not fatal


def _bench(fn, repeats: int, warmup: int) -> float:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


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
                s = _bench(lambda: fn(*a), 3 if args.tiny else 10, 1 if args.tiny else 3)
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
                s = _bench(lambda: fn(*a), 3 if args.tiny else 10, 1 if args.tiny else 2)
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
            s = _bench(lambda: fn(q8, k8, v8, params), 3 if args.tiny else 10, 1 if args.tiny else 2)
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
    import jax.numpy as jnp

    from bench.common import random_dit
    from bench.dit import _inputs, latent_grid
    from jax_impl.presets import get_preset

    cfg = get_preset(TINY_PRESET if args.tiny else PRESET).transformer
    grid = latent_grid(*args.size, args.frames)
    model = random_dit(cfg, dtype=dtype, attention_backend=attention)
    act = jnp.dtype(dtype)
    lat, t, text, img = (None if a is None else jnp.asarray(a, act if a.ndim > 1 else jnp.float32)
                         for a in _inputs(cfg, grid, args.text_len))
    return cfg, grid, model, (lat, t, text, img)


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

    with fp8.dit_fused_dense_bridge():  # until jax_impl/dit.py fuses FP8 q/k/v itself
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
    res.update(times=times, median_s=sorted(times)[len(times) // 2], peak_bytes=_peak_bytes(), device=_device(),
               finite=bool(np.isfinite(np.asarray(out, np.float32)).all()))
    np.save(Path(args.out, f"forward_{variant}_{args.size[0]}x{args.size[1]}.npy"), np.asarray(out, np.float32))
    return res


def forward_summary(rows: list[dict], args) -> dict:
    import numpy as np

    from bench.dit import dit_flops, latent_grid
    from jax_impl.presets import get_preset

    cfg = get_preset(TINY_PRESET if args.tiny else PRESET).transformer
    grid = latent_grid(*args.size, args.frames)
    flops = dit_flops(cfg, grid, args.text_len)
    outs = {}
    for r in rows:
        f = Path(args.out, f"forward_{r['variant']}_{args.size[0]}x{args.size[1]}.npy")
        if "error" not in r and f.exists():
            outs[r["variant"]] = np.load(f)
    base = next((r["median_s"] for r in rows if r["variant"] == "bf16" and "median_s" in r), None)
    for r in rows:
        if "median_s" in r:
            r["tflops"] = flops / r["median_s"] / 1e12
            r["speedup_vs_bf16"] = base / r["median_s"] if base else None
            if "bf16" in outs and r["variant"] in outs:
                r["rel_l2_vs_bf16"] = _rel_l2(outs[r["variant"]], outs["bf16"])
    print(f"\nA14B expert forward {args.size[0]}x{args.size[1]}x{args.frames} (grid {grid}, {flops / 1e12:.1f} TFLOP)")
    print(f"{'variant':<10} {'median s':>9} {'TFLOP/s':>8} {'speed-up':>9} {'fwd GiB':>8} {'peak GiB':>9} "
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
        print(f"{r['variant']:<10} {r['median_s']:>9.3f} {r['tflops']:>8.1f} {speed:>9} {fwd / 2**30:>8.1f} {peak:>9} "
              f"{r['weights_bytes'] / 2**30:>11.1f} {r['fp8_gemms_in_hlo']:>9} {err:>14}")
    return {"grid": grid, "flops": flops, "rows": rows}


# ------------------------------------------------------------------------------------------------------------
# (d) per-layer error
def layers_child(args) -> dict:
    """One model (args.variant: one of LAYER_VARIANTS) on the short clip; taps saved as float32 .npz for the parent."""
    import jax
    import numpy as np
    from flax import nnx

    from jax_impl import fp8

    args = argparse.Namespace(**{**vars(args), "size": args.layers_size, "frames": args.layers_frames})
    dtype = "float32" if args.variant == "fp32" else "bfloat16"
    attention = {"fp32": "xla", "bf16": "cudnn", "fp8": "cudnn", "fp8-attn": "cudnn_fp8"}[args.variant]
    if args.tiny:
        attention = "xla"
    _, grid, model, inputs = _model_and_inputs(args, dtype, attention)
    if args.variant.startswith("fp8"):
        fp8.quantize_model(model, act_scaling=args.act_scaling)

    @nnx.jit
    def fwd(model, *a):
        return model(*a, capture=True)[1]

    # the float32 reference at HIGHEST: true float32 matmuls, not the GPU's default TF32
    precision = jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()
    with fp8.dit_fused_dense_bridge(), precision:
        t0 = time.perf_counter()
        taps = jax.block_until_ready(fwd(model, *inputs))
        run_s = time.perf_counter() - t0
    np.savez(Path(args.out, f"layers_{args.variant}.npz"), **{k: np.asarray(v, np.float32) for k, v in taps.items()})
    return {"variant": args.variant, "run_s": run_s, "taps": len(taps), "grid": grid, "device": _device()}


BLOCK_TAPS = ("self_attn", "cross_attn", "ffn", "output")


def layer_order(names) -> list[str]:
    """Taps in forward order: embeddings (as captured), blocks by index, then head and output."""
    def key(name: str) -> tuple[int, int, int]:
        if name.startswith("blocks."):
            _, index, part = name.split(".", 2)
            return (1, int(index), BLOCK_TAPS.index(part))
        if name in ("head", "output"):
            return (2, ("head", "output").index(name), 0)
        return (0, 0, 0)

    return sorted(names, key=key)


def layers_summary(rows: list[dict], args) -> dict:
    import numpy as np

    from parity.report import compare_layers

    taps = {}
    for v in LAYER_VARIANTS:
        f = Path(args.out, f"layers_{v}.npz")
        if f.exists() and any(r.get("variant") == v and "error" not in r for r in rows):
            with np.load(f) as z:
                taps[v] = {k: z[k] for k in z.files}
    if not {"fp32", "bf16", "fp8"} <= set(taps):
        print(f"layers: missing runs {sorted({'fp32', 'bf16', 'fp8'} - set(taps))}; no table")
        return {"rows": rows, "layers": []}
    order = layer_order(taps["fp32"])
    others = [v for v in LAYER_VARIANTS if v in taps and v != "fp32"]
    errs = {v: compare_layers(taps[v], taps["fp32"], float("inf"), order) for v in others}
    fp8_vs_bf16 = compare_layers(taps["fp8"], taps["bf16"], float("inf"), order)
    table = []
    print(f"\nper-layer rel L2 vs the float32 DiT ({'tiny' if args.tiny else 'full-size'} random weights, "
          f"{args.layers_size[0]}x{args.layers_size[1]}x{args.layers_frames})")
    print(f"{'layer':<26} " + " ".join(f"{v:>12}" for v in others) + f" {'fp8 / bf16':>10} {'fp8 vs bf16':>12}")
    for i, name in enumerate(order):
        row = {"name": name, "shape": list(errs["bf16"][i].shape)}
        row.update({f"{v}_vs_fp32": errs[v][i].rel_l2 for v in others})
        row["fp8_vs_bf16"] = fp8_vs_bf16[i].rel_l2
        b = row["bf16_vs_fp32"]
        row["fp8_over_bf16"] = row["fp8_vs_fp32"] / b if b > 0 else float("inf")
        table.append(row)
        print(f"{name:<26} " + " ".join(f"{row[f'{v}_vs_fp32']:>12.3e}" for v in others)
              + f" {row['fp8_over_bf16']:>10.1f} {row['fp8_vs_bf16']:>12.3e}")
    for v in others:
        worst = max(table, key=lambda r: r[f"{v}_vs_fp32"])
        print(f"worst {v} layer: {worst['name']} {worst[f'{v}_vs_fp32']:.3e}")
    return {"rows": rows, "layers": table}


# ------------------------------------------------------------------------------------------------------------
CHILDREN = {"gemm": gemm_child, "attention": attention_child, "forward": forward_child, "layers": layers_child}


def _child_cmd(args, part: str, variant: str | None) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), part, "--child", "--out", args.out, "--size",
           f"{args.size[0]}x{args.size[1]}", "--frames", str(args.frames), "--text-len", str(args.text_len),
           "--layers-size", f"{args.layers_size[0]}x{args.layers_size[1]}", "--layers-frames", str(args.layers_frames),
           "--warmup", str(args.warmup), "--iters", str(args.iters), "--act-scaling", args.act_scaling]
    if variant:
        cmd += ["--variant", variant]
    if args.tiny:
        cmd.append("--tiny")
    return cmd


def run_child(args, part: str, variant: str | None = None) -> dict:
    """Run one part (one variant) in a subprocess; its result, or {"error": ...} naming what went wrong."""
    label = f"{part}{' ' + variant if variant else ''}"
    print(f"[{label}] running (timeout {args.timeout} s)", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(_child_cmd(args, part, variant), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"did not finish within {args.timeout} s"}
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-4:])
        return {"variant": variant, "error": f"exit {p.returncode}: {tail}"}
    res = json.loads(line[-1][len("RESULT "):])
    print(f"[{label}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return res


def run_part(args, part: str) -> dict:
    if part == "gemm":
        res = run_child(args, "gemm")
        if "rows" in res:
            gemm_table(res)
        name = "fp8_gemm.json"
    elif part == "attention":
        res = run_child(args, "attention")
        if "rows" in res:
            attention_table(res)
        name = "fp8_attention.json"
    elif part == "forward":
        res = forward_summary([run_child(args, "forward", v) for v in args.variants], args)
        name = f"fp8_forward_{args.size[0]}x{args.size[1]}.json"
    else:
        variants = [v for v in LAYER_VARIANTS if not (args.tiny and v == "fp8-attn")]  # no cuDNN on a CPU
        res = layers_summary([run_child(args, "layers", v) for v in variants], args)
        name = "fp8_layers.json"
    meta = {"part": part, "date": datetime.date.today().isoformat(), "tiny": args.tiny,
            "preset": TINY_PRESET if args.tiny else PRESET, "act_scaling": args.act_scaling, "versions": _versions()}
    if part == "forward":
        meta.update(size=list(args.size), frames=args.frames, text_len=args.text_len)
    if part == "layers":
        meta.update(size=list(args.layers_size), frames=args.layers_frames, text_len=args.text_len)
    Path(args.out, name).write_text(json.dumps({**meta, **res}, indent=2, default=str) + "\n")
    print(f"wrote {Path(args.out, name)}", flush=True)
    return res


def _failed(res: dict) -> bool:
    """A part failed if its subprocess did, or any row did other than the optional cuDNN FP8 attention ones."""
    if "error" in res:
        return True
    rows = res.get("rows", [])
    return any("error" in r and r.get("impl", r.get("variant")) not in OPTIONAL for r in rows)


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("jax", "jaxlib", "flax"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


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
    ap.add_argument("part", choices=PARTS + ("all",), help="which measurement (all: every part in turn)")
    ap.add_argument("--out", default="fp8-bench", help="folder for the JSON (and the forward outputs / layer taps)")
    ap.add_argument("--size", type=_size, default=(480, 832), help="forward: HEIGHTxWIDTH in pixels (default 480x832)")
    ap.add_argument("--frames", type=int, default=81, help="forward: video frames, 4k+1 (default 81)")
    ap.add_argument("--text-len", type=int, default=512, help="text tokens (default 512, the UMT5 padding)")
    ap.add_argument("--layers-size", type=_size, default=(480, 832), help="layers: HEIGHTxWIDTH (default 480x832)")
    ap.add_argument("--layers-frames", type=int, default=5, help="layers: frames (default 5: 3120 tokens at 480x832)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"forward: comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--act-scaling", default="token", choices=("token", "tensor"), help="FP8 activation scaling")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=420, help="seconds per subprocess (default 420)")
    ap.add_argument("--tiny", action="store_true", help="tiny preset and shapes: a CPU smoke run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.frames, args.text_len = (32, 32), 5, 16
        args.layers_size, args.layers_frames = (32, 48), 5
        args.warmup, args.iters = 1, 2
    for frames in (args.frames, args.layers_frames):
        if (frames - 1) % 4:
            ap.error(f"frames must be 4k+1 (the VAE's causal time compression), got {frames}")
    if args.tiny and args.variants == ",".join(VARIANTS):
        args.variants = "bf16,fp8"  # a CPU has no cuDNN: fp8-attn would rerun fp8 with XLA attention
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown forward variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.child:
        print("RESULT " + json.dumps(CHILDREN[args.part](args), default=str), flush=True)
        return 0

    from jax_impl.runtime import configure_xla

    configure_xla()  # children inherit XLA_FLAGS
    parts = PARTS if args.part == "all" else (args.part,)
    results = {p: run_part(args, p) for p in parts}
    return 1 if any(_failed(r) for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
