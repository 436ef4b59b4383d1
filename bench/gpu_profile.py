"""Where the GPU time and memory go, before changing code: the VAE's kernels, its conv variants, the DiT's
compiled memory, and whether FP8 GEMMs pay. Each part prints a table and writes JSON under --out.

  python bench/gpu_profile.py vae     --out DIR   # per-kernel time of one VAE decode/encode + conv variants
  python bench/gpu_profile.py dit-mem --out DIR   # memory_analysis of the A14B forward, largest live buffers
  python bench/gpu_profile.py dit-kernels --out DIR  # A14B forward's GPU time: attention, matmul, other kernels
  python bench/gpu_profile.py fp8     --out DIR   # bf16 vs fp8 (e4m3) GEMMs at the DiT's shapes, HLO check

Meant for an NVIDIA GPU; `--tiny` shrinks every shape so the script can be smoke-tested on a CPU.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median_time  # noqa: E402  (after the path insert)


def kernel_table(trace_dir: str, top: int = 30, classify=None) -> dict:
    """Sum device-side event durations by name from a perfetto trace written by jax.profiler; with
    `classify(name) -> str`, also the sum and call count per class."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
    if not files:
        return {"error": f"no trace json under {trace_dir}"}
    with gzip.open(sorted(files, key=os.path.getmtime)[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    pnames = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {p for p, n in pnames.items() if "gpu" in n.lower() or "device" in n.lower()}
    by_name: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    spans = []
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
            continue
        d = float(e.get("dur", 0))
        name = e.get("name", "?")
        by_name[name] += d
        count[name] += 1
        spans.append((float(e["ts"]), float(e["ts"]) + d))
    total = sum(by_name.values())
    busy = 0.0
    end = -1.0
    for s, t in sorted(spans):
        if t <= end:
            continue
        busy += t - max(s, end)
        end = t
    wall = (max(t for _, t in spans) - min(s for s, _ in spans)) if spans else 0.0
    rows = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    out = {"processes": sorted(pnames.values()), "sum_us": total, "busy_us": busy, "span_us": wall,
           "top": [{"name": n[:160], "us": u, "calls": count[n], "pct": 100 * u / max(total, 1)} for n, u in rows]}
    if classify is not None:
        classes: dict[str, dict] = {}
        for n, u in by_name.items():
            c = classes.setdefault(classify(n), {"us": 0.0, "calls": 0})
            c["us"] += u
            c["calls"] += count[n]
        out["classes"] = classes
    return out


def dit_kernel_class(name: str) -> str:
    """attention (cuDNN / flash kernels), matmul (cuBLAS, cutlass, XLA's Triton GEMM fusions), or other
    (XLA's elementwise / reduction fusions, copies): the three costs of a DiT forward."""
    n = name.lower()
    if any(k in n for k in ("sdpa", "flash", "fmha", "attention")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "cublas", "xmma", "matmul", "dot")):
        return "matmul"
    return "other"


# ------------------------------------------------------------------------------------------------------------
def vae_part(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.vae import WanVAE
    from weights.configs.vae import get_vae_preset

    out: dict = {"device": str(jax.devices()[0].device_kind)}
    cfg = get_vae_preset(("tiny-" if args.tiny else "") + "wan2.1")
    frames, (h, w) = (5, (32, 32)) if args.tiny else (args.frames, args.size)
    rng = jax.random.key(0)
    for dtype in args.dtypes.split(","):
        dt = jnp.dtype(dtype)
        model = WanVAE(cfg, dtype=dt, rngs=nnx.Rngs(0))
        video = jax.random.uniform(rng, (1, frames, h, w, 3), jnp.float32, -1, 1).astype(dt)
        z = jax.block_until_ready(model.encode(video))
        row = {"encode_s": median_time(lambda: model.encode(video), 2, 1),
               "decode_s": median_time(lambda: model.decode(z), 2, 1)}
        stats = jax.devices()[0].memory_stats() or {}
        row["peak_bytes"] = stats.get("peak_bytes_in_use")
        tdir = os.path.join(args.out, f"trace_vae_{dtype}")
        jax.profiler.start_trace(tdir, create_perfetto_trace=True)
        jax.block_until_ready(model.decode(z))
        jax.profiler.stop_trace()
        row["decode_kernels"] = kernel_table(tdir)
        out[dtype] = row
        print(f"[vae {dtype}] encode {row['encode_s']:.3f} s decode {row['decode_s']:.3f} s peak "
              f"{(row['peak_bytes'] or 0) / 2**30:.1f} GiB", flush=True)
        kt = row["decode_kernels"]
        if "top" in kt:
            print(f"  decode trace: kernel sum {kt['sum_us'] / 1e3:.1f} ms, busy {kt['busy_us'] / 1e3:.1f} ms, span "
                  f"{kt['span_us'] / 1e3:.1f} ms", flush=True)
            for r in kt["top"][:15]:
                print(f"  {r['pct']:5.1f}% {r['us'] / 1e3:9.2f} ms x{r['calls']:<5} {r['name'][:100]}", flush=True)
        del model
    out["conv_variants"] = conv_variants(args)
    return out


def conv_variants(args) -> list[dict]:
    """One causal 3x3x3 conv at VAE decoder shapes, written several ways, bf16 and fp32, JAX and torch."""
    import jax
    import jax.numpy as jnp

    H = jax.lax.Precision.HIGHEST
    shapes = [(6, 60, 104, 384, 384), (6, 120, 208, 384, 384), (6, 240, 416, 192, 192), (6, 480, 832, 96, 96)]
    if args.tiny:
        shapes = [(6, 8, 8, 16, 16)]
    rows = []

    def conv3d(x, k, prec, pref):
        return jax.lax.conv_general_dilated(x, k, (1, 1, 1), [(0, 0), (1, 1), (1, 1)],
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=prec,
                                            preferred_element_type=pref)

    def taps2d(x, k):  # sum over the 3 time taps of 2D convs over all output frames at once
        b, t, hh, ww, c = x.shape
        outs = None
        for i in range(3):
            xi = x[:, i:t - 2 + i].reshape(-1, hh, ww, c)
            y = jax.lax.conv_general_dilated(xi, k[i], (1, 1), [(1, 1), (1, 1)],
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             preferred_element_type=jnp.float32)
            outs = y if outs is None else outs + y
        return outs.astype(x.dtype)

    def cat2d(x, k):  # time taps folded into channels: one conv2d with 3C inputs
        b, t, hh, ww, c = x.shape
        xs = jnp.concatenate([x[:, i:t - 2 + i] for i in range(3)], axis=-1).reshape(-1, hh, ww, 3 * c)
        kk = k.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * c, -1)
        return jax.lax.conv_general_dilated(xs, kk, (1, 1), [(1, 1), (1, 1)],
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    for (t, hh, ww, ci, co) in shapes:
        flops = 2 * (t - 2) * hh * ww * ci * co * 27
        for dtype in ("bfloat16", "float32"):
            dt = jnp.dtype(dtype)
            x = jax.random.normal(jax.random.key(1), (1, t, hh, ww, ci), jnp.float32).astype(dt)
            k = (jax.random.normal(jax.random.key(2), (3, 3, 3, ci, co), jnp.float32) * 0.02).astype(dt)
            variants = {
                "current(HIGHEST,f32 out)": jax.jit(lambda x, k: conv3d(x, k, H, jnp.float32).astype(x.dtype)),
                "conv3d default prec": jax.jit(lambda x, k: conv3d(x, k, None, None)),
                "taps2d": jax.jit(taps2d),
                "cat2d": jax.jit(cat2d),
            }
            for name, fn in variants.items():
                try:
                    s = median_time(lambda: fn(x, k), 5, 2)
                    rows.append({"shape": [t, hh, ww, ci, co], "dtype": dtype, "impl": "jax " + name, "ms": s * 1e3,
                                 "tflops": flops / s / 1e12})
                except Exception as e:  # noqa: BLE001 - report and go on
                    rows.append({"shape": [t, hh, ww, ci, co], "dtype": dtype, "impl": "jax " + name,
                                 "error": str(e)[:200]})
            del x, k
    try:
        rows += torch_convs(shapes, args)
    except Exception as e:  # noqa: BLE001
        rows.append({"impl": "torch", "error": str(e)[:300]})
    print(f"{'shape':<26} {'dtype':<9} {'impl':<30} {'ms':>9} {'TFLOP/s':>8}")
    for r in rows:
        if "error" in r:
            print(f"{str(r.get('shape')):<26} {r.get('dtype', ''):<9} {r['impl']:<30} error {r['error'][:80]}")
        else:
            print(f"{str(r['shape']):<26} {r['dtype']:<9} {r['impl']:<30} {r['ms']:>9.2f} {r['tflops']:>8.1f}")
    return rows


def torch_convs(shapes, args) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    rows = []
    for (t, hh, ww, ci, co) in shapes:
        flops = 2 * (t - 2) * hh * ww * ci * co * 27
        for dtype in (torch.bfloat16, torch.float32):
            conv = torch.nn.Conv3d(ci, co, 3, padding=(0, 1, 1)).cuda().to(dtype)
            x = torch.randn(1, ci, t, hh, ww, device="cuda", dtype=dtype)
            for fmt in ("ncdhw", "channels_last_3d"):
                xx, cc = (x, conv) if fmt == "ncdhw" else (x.to(memory_format=torch.channels_last_3d),
                                                           conv.to(memory_format=torch.channels_last_3d))
                with torch.no_grad():
                    for _ in range(2):
                        cc(xx)
                    torch.cuda.synchronize()
                    ts = []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        cc(xx)
                        torch.cuda.synchronize()
                        ts.append(time.perf_counter() - t0)
                s = sorted(ts)[2]
                rows.append({"shape": [t, hh, ww, ci, co], "dtype": str(dtype).split(".")[-1],
                             "impl": f"torch {fmt} tf32={torch.backends.cudnn.allow_tf32}", "ms": s * 1e3,
                             "tflops": flops / s / 1e12})
            del conv, x
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------------------
def dit_mem_part(args) -> dict:
    """Compile the A14B expert forward from abstract arguments; report XLA's memory analysis and buffers."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.dit import WanTransformer
    from weights.configs.presets import get_preset

    preset = "tiny-wan2.2-i2v-a14b" if args.tiny else "wan2.2-i2v-a14b"
    cfg = get_preset(preset).transformer
    h, w = (32, 32) if args.tiny else args.size
    from weights.configs.vae import get_vae_preset

    f, lh, lw, _ = get_vae_preset(get_preset(preset).vae).latent_shape(args.frames if not args.tiny else 5, h, w)
    out: dict = {"preset": preset, "size": [h, w], "frames": args.frames}
    abstract = nnx.eval_shape(lambda: WanTransformer(cfg, dtype=jnp.bfloat16, attention_backend="auto",
                                                      rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    lat = jax.ShapeDtypeStruct((1, f, lh, lw, cfg.in_channels), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    text = jax.ShapeDtypeStruct((1, 512, cfg.text_dim), jnp.bfloat16)
    for batch in (1, 2):
        lat_b = jax.ShapeDtypeStruct((batch,) + lat.shape[1:], lat.dtype)
        t_b = jax.ShapeDtypeStruct((batch,), t.dtype)
        text_b = jax.ShapeDtypeStruct((batch,) + text.shape[1:], text.dtype)

        def fwd(state, lat, t, text):
            return nnx.merge(graphdef, state)(lat, t, text)

        t0 = time.perf_counter()
        compiled = jax.jit(fwd).lower(state, lat_b, t_b, text_b).compile()
        ma = compiled.memory_analysis()
        row = {"compile_s": time.perf_counter() - t0}
        for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
                  "generated_code_size_in_bytes", "host_temp_size_in_bytes"):
            row[k] = getattr(ma, k, None)
        out[f"batch{batch}"] = row
        print(f"[dit-mem batch {batch}] args {row['argument_size_in_bytes'] / 2**30:.2f} GiB temp "
              f"{row['temp_size_in_bytes'] / 2**30:.2f} GiB out {row['output_size_in_bytes'] / 2**30:.3f} GiB "
              f"(compile {row['compile_s']:.1f} s)", flush=True)
        if batch == 1:
            hlo = compiled.as_text()
            Path(args.out, "dit_a14b_optimized_hlo.txt.gz").write_bytes(gzip.compress(hlo.encode()))
            out["largest_hlo_shapes"] = largest_shapes(hlo)
            for r in out["largest_hlo_shapes"][:20]:
                print(f"  {r['bytes'] / 2**20:10.1f} MiB x{r['count']:<4} {r['shape']}", flush=True)
    return out


def dit_kernels_part(args) -> dict:
    """Where the A14B expert forward's GPU time goes: one traced forward, kernels summed as attention,
    matmul and other, each with the TFLOP/s its share of the FLOPs implies (bench.dit.dit_flops_split)."""
    import jax
    import jax.numpy as jnp

    from bench.common import random_dit
    from bench.dit import dit_flops_split, jax_inputs, latent_grid
    from jax_impl.frozen_jit import frozen_jit
    from weights.configs.presets import get_preset

    preset = "tiny-wan2.2-i2v-a14b" if args.tiny else "wan2.2-i2v-a14b"
    cfg = get_preset(preset).transformer
    (h, w), frames = ((32, 32), 5) if args.tiny else (args.size, args.frames)
    grid = latent_grid(preset, h, w, frames)
    text_len = 16 if args.tiny else 512
    split = dit_flops_split(cfg, grid, text_len, 257 if cfg.has_image_tokens else 0)
    model = random_dit(cfg, dtype=jnp.bfloat16)
    inputs = jax_inputs(cfg, grid, text_len)
    fwd = frozen_jit(lambda m, lat, t, text, img: m(lat, t, text, img))

    seconds = median_time(lambda: fwd(model, *inputs), 3, 2)
    tdir = os.path.join(args.out, "trace_dit")
    jax.profiler.start_trace(tdir, create_perfetto_trace=True)
    jax.block_until_ready(fwd(model, *inputs))
    jax.profiler.stop_trace()
    kt = kernel_table(tdir, classify=dit_kernel_class)
    out = {"preset": preset, "grid": grid, "device": str(jax.devices()[0].device_kind), "median_s": seconds,
           "flops": split, "tflops": sum(split.values()) / seconds / 1e12, "kernels": kt}
    print(f"[dit-kernels] {preset} grid {grid}: {seconds:.3f} s, {out['tflops']:.0f} TFLOP/s", flush=True)
    if "classes" in kt:
        print(f"  trace: kernel sum {kt['sum_us'] / 1e3:.1f} ms, busy {kt['busy_us'] / 1e3:.1f} ms, span "
              f"{kt['span_us'] / 1e3:.1f} ms", flush=True)
        for cls, c in sorted(kt["classes"].items(), key=lambda kv: -kv[1]["us"]):
            flops = split.get("linear" if cls == "matmul" else cls)
            c["tflops"] = flops / (c["us"] * 1e-6) / 1e12 if flops and c["us"] else None
            rate = f"{c['tflops']:.0f} TFLOP/s" if c["tflops"] else ""
            print(f"  {cls:<10} {c['us'] / 1e3:9.1f} ms {100 * c['us'] / kt['sum_us']:5.1f}% x{c['calls']:<6} {rate}",
                  flush=True)
        for r in kt["top"][:20]:
            print(f"  {r['pct']:5.1f}% {r['us'] / 1e3:9.2f} ms x{r['calls']:<5} {r['name'][:100]}", flush=True)
    return out


def largest_shapes(hlo: str, top: int = 40) -> list[dict]:
    """Distinct array shapes in an HLO module by size (a quick look at what could be a big temp buffer)."""
    import re

    sizes = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "f8e4m3fn": 1, "s8": 1, "u8": 1}
    seen: dict[str, int] = collections.Counter()
    for m in re.finditer(r"\b(bf16|f16|f32|s32|u32|pred|f8e4m3fn|s8|u8)\[([0-9,]+)\]", hlo):
        seen[f"{m.group(1)}[{m.group(2)}]"] += 1
    rows = []
    for shape, n in seen.items():
        dt, dims = shape.split("[")
        size = sizes[dt] * math.prod(int(d) for d in dims.rstrip("]").split(",") if d)
        rows.append({"shape": shape, "bytes": size, "count": n})
    return sorted(rows, key=lambda r: -r["bytes"])[:top]


# ------------------------------------------------------------------------------------------------------------
def fp8_part(args) -> dict:
    """bf16 vs e4m3 GEMMs at the DiT's shapes; checks that XLA lowers the scaled fp8 dot to cuBLASLt fp8."""
    import jax
    import jax.numpy as jnp

    F8 = jnp.float8_e4m3fn
    L = 256 if args.tiny else 32760
    shapes = [(L, 5120, 15360), (L, 5120, 5120), (L, 5120, 13824), (L, 13824, 5120)]
    if args.tiny:
        shapes = [(L, 64, 96)]
    rows = []

    def bf16_mm(x, w, b):
        return jnp.einsum("li,io->lo", x, w) + b

    def fp8_mm(x, w8, ws, b):
        """Per-token activation scale, per-output-channel weight scale; fp8 operands, f32 accumulate."""
        xs = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True) / 448.0 + 1e-12
        x8 = (x.astype(jnp.float32) / xs).astype(F8)
        y = jax.lax.dot_general(x8, w8, (((1,), (0,)), ((), ())), preferred_element_type=jnp.bfloat16)
        return (y.astype(jnp.float32) * xs * ws).astype(jnp.bfloat16) + b

    def fp8_mm_tensor(x, w8, ws, b):
        """Per-tensor scales written as dequantise-then-dot, the pattern XLA's GEMM rewriter turns into one
        cuBLASLt fp8 matmul with its scales."""
        xs = jnp.max(jnp.abs(x.astype(jnp.float32))) / 448.0 + 1e-12
        x8 = (x.astype(jnp.float32) / xs).astype(F8)
        xd = x8.astype(jnp.bfloat16) * xs.astype(jnp.bfloat16)
        wd = w8.astype(jnp.bfloat16) * ws.astype(jnp.bfloat16)
        return jnp.einsum("li,io->lo", xd, wd) + b

    for (m, k, n) in shapes:
        x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(jnp.bfloat16)
        w = (jax.random.normal(jax.random.key(1), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        b = jnp.zeros((n,), jnp.bfloat16)
        ws = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0) / 448.0
        w8 = (w.astype(jnp.float32) / ws).astype(F8)
        ws_t = jnp.max(jnp.abs(w.astype(jnp.float32))) / 448.0
        w8_t = (w.astype(jnp.float32) / ws_t).astype(F8)
        flops = 2 * m * k * n
        ref = jnp.einsum("li,io->lo", x.astype(jnp.float32), w.astype(jnp.float32))
        for name, fn, a in (("bf16", jax.jit(bf16_mm), (x, w, b)),
                            ("fp8 per-token x per-channel", jax.jit(fp8_mm), (x, w8, ws[None], b)),
                            ("fp8 per-tensor (dequant dot)", jax.jit(fp8_mm_tensor), (x, w8_t, ws_t, b))):
            try:
                s = median_time(lambda: fn(*a), 10, 3)
                y = fn(*a).astype(jnp.float32)
                err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
                hlo = fn.lower(*a).compile().as_text()
                kinds = sorted(set(k for k in ("__cublas$lt$matmul$f8", "__cublas$lt$matmul", "__cublas$gemm",
                                               "triton", "__cudnn") if k in hlo))
                rows.append({"shape": [m, k, n], "impl": name, "ms": s * 1e3, "tflops": flops / s / 1e12,
                             "rel_err_vs_f32": err, "hlo_calls": kinds})
            except Exception as e:  # noqa: BLE001
                rows.append({"shape": [m, k, n], "impl": name, "error": str(e)[:300]})
    print(f"{'shape':<22} {'impl':<30} {'ms':>8} {'TFLOP/s':>8} {'rel err':>9} hlo")
    for r in rows:
        if "error" in r:
            print(f"{str(r['shape']):<22} {r['impl']:<30} error {r['error'][:120]}")
        else:
            print(f"{str(r['shape']):<22} {r['impl']:<30} {r['ms']:>8.2f} {r['tflops']:>8.1f} "
                  f"{r['rel_err_vs_f32']:>9.2e} {','.join(r['hlo_calls'])}")
    return {"rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("vae", "dit-mem", "dit-kernels", "fp8"))
    ap.add_argument("--out", default="profile-out")
    ap.add_argument("--size", default="480x832")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    args.size = tuple(int(v) for v in args.size.split("x"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from jax_impl.runtime import configure_xla

    configure_xla()
    part = {"vae": vae_part, "dit-mem": dit_mem_part, "dit-kernels": dit_kernels_part, "fp8": fp8_part}[args.part]
    result = part(args)
    name = f"profile_{args.part}_{args.size[0]}x{args.size[1]}.json"
    Path(args.out, name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {Path(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
