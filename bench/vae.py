"""Benchmark the Flax Wan VAE against diffusers' AutoencoderKLWan: same random weights, same inputs, same run.

For every configuration (VAE version x size x dtype x tiling) and implementation: encode and decode time
(best of --repeats after one warm-up run), peak device memory, and the decoded frames' quality: PSNR/SSIM of
bf16 frames against fp32 frames of the same implementation (what a bf16 VAE costs), ours against diffusers,
tiled against whole frames.

Every process has a timeout and its own peak memory; one failure (out of memory, a crash, a timeout) loses
only its row, and the JSON is rewritten after every configuration:
  1. ours, compile (one process per VAE version and size, with --precompile): runs each configuration once,
     filling a persistent compilation cache in the work dir, so that the measuring process below loads its
     executables instead of compiling: XLA's autotuner allocates scratch buffers that would otherwise count
     in the measured peak. Also records compile time and the memory estimate (jax_impl.vae_memory).
  2. ours, measure (one process per configuration): decode, then encode; `decode_peak_bytes` is the peak
     after the decode, `encode_peak_bytes` the peak of the whole process (the encode's, when larger).
  3. diffusers (one process per configuration): decode, then encode, peak reset before each; tiled rows use
     enable_tiling with the same tile sizes.
Peaks include the weights and the input on the device, for both implementations.

  python bench/vae.py --quick --json vae.json        # Wan2.1, 480x832, bf16+fp32, whole frames (~5 min expected)
  python bench/vae.py --variants wan2.1 --sizes 720x1280 --tiling off,on --dtypes bfloat16 --json a.json --append
  python bench/vae.py --tiny                         # CPU smoke run of the whole flow (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
SSIM_FRAMES = 9  # SSIM over this many evenly spaced frames (float64 SSIM of 81 720p frames takes minutes)


@dataclasses.dataclass(frozen=True)
class Config:
    variant: str  # wan2.1 | wan2.2 (tiny-* with --tiny)
    height: int
    width: int
    dtype: str
    tiled: bool

    @property
    def key(self) -> str:
        return f"{self.variant}_{self.height}x{self.width}_{self.dtype}_{'tiled' if self.tiled else 'whole'}"


# ------------------------------------------------------------------------------------------------------------
# workers (child processes): one JSON spec in, one JSON result out


def _best(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), times


def _tiling(spec: dict):
    from jax_impl.vae_tiling import Tiling

    return Tiling(**spec["tiling"])


def _enable_compilation_cache(path: str) -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _jax_peak() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _load_ours(spec: dict, dtype: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.vae import ConvSettings
    from jax_impl.loading import load_vae

    model = load_vae(spec["folder"], dtype=jnp.dtype(dtype))
    model.set_conv_settings(ConvSettings(time_taps=spec["time_taps"], strict_fp32=spec["strict_fp32"]))
    weights = sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(model)))
    return model, weights


def _ours_call(model, op: str, x, tiled: bool, tiling):
    import jax

    tile = "on" if tiled else "off"
    if op == "encode":
        return jax.block_until_ready(model.encode(x, tile=tile, tiling=tiling))
    return jax.block_until_ready(model.decode(x, tile=tile, tiling=tiling))


def worker_ours(spec: dict) -> dict:
    """role "compile": run every config once (fills the compilation cache); role "measure": time one config."""
    import jax
    import jax.numpy as jnp

    from jax_impl import vae_memory
    from jax_impl.runtime import configure_xla

    configure_xla()
    _enable_compilation_cache(spec["cache_dir"])
    tiling = _tiling(spec)
    out: dict = {"device": str(jax.devices()[0].device_kind), "configs": {}}
    for c in spec["configs"]:
        row: dict = {}
        out["configs"][c["key"]] = row
        try:
            model, row["weights_bytes"] = _load_ours(spec, c["dtype"])
            for op in ("decode", "encode"):
                # converted on the host: a float32 copy on the device would count in the peak
                host = np.load(spec["latents" if op == "decode" else "video"]).astype(jnp.dtype(c["dtype"]))
                x = jax.device_put(host)
                del host
                t = time.perf_counter()  # the estimate compiles the chunk steps (or loads them from the cache)
                est = vae_memory.estimate(model, op, x.shape, dtype=x.dtype, tile=c["tiled"], tiling=tiling)
                row[f"{op}_compile_s"] = time.perf_counter() - t
                if est is not None:
                    row[f"{op}_estimate"] = est.as_dict() | {
                        "total_bytes": est.peak_bytes + row["weights_bytes"] + int(x.nbytes)}
                t = time.perf_counter()
                _ours_call(model, op, x, c["tiled"], tiling)  # the output is dropped: it would count in the peak
                row[f"{op}_first_s"] = time.perf_counter() - t
                if spec["role"] == "measure":
                    row[f"{op}_s"], row[f"{op}_times"] = _best(lambda: _ours_call(model, op, x, c["tiled"], tiling),
                                                               spec["repeats"])
                    row[f"{op}_peak_bytes"] = _jax_peak()
                    if op == "decode" and spec.get("save"):  # after the peak was read; converted on the host
                        video = np.asarray(_ours_call(model, op, x, c["tiled"], tiling))
                        np.save(spec["save"], video.astype(np.float32))
                        del video
                del x
            del model
        except Exception as e:  # noqa: BLE001 - record and go on with the next config
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    return out


def worker_diffusers(spec: dict) -> dict:
    import torch

    from torch_ref.vae import load_vae_torch

    (c,) = spec["configs"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, c["dtype"])
    model = load_vae_torch(spec["folder"], dtype).to(dev)
    if c["tiled"]:
        t = spec["tiling"]
        model.enable_tiling(tile_sample_min_height=t["tile_height"], tile_sample_min_width=t["tile_width"],
                            tile_sample_stride_height=t["stride_height"], tile_sample_stride_width=t["stride_width"])
    row: dict = {"weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                 "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                 "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                 "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def to_torch(path):
        a = np.load(path)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 4, 1, 2, 3))).to(dev, dtype)

    with torch.no_grad():
        for op in ("decode", "encode"):
            x = to_torch(spec["latents" if op == "decode" else "video"])
            if dev == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

            def call():
                y = model.decode(x).sample if op == "decode" else model.encode(x).latent_dist.mode()
                sync()
                return y

            t = time.perf_counter()
            call()
            row[f"{op}_first_s"] = time.perf_counter() - t
            row[f"{op}_s"], row[f"{op}_times"] = _best(call, spec["repeats"])
            row[f"{op}_peak_bytes"] = torch.cuda.max_memory_allocated() if dev == "cuda" else None
            if op == "decode" and spec.get("save"):
                y = call()
                np.save(spec["save"], y.float().cpu().numpy().transpose(0, 2, 3, 4, 1))
                del y
            del x
    return {"configs": {c["key"]: row}}


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    res = worker_ours(spec) if spec["impl"] == "ours" else worker_diffusers(spec)
    tmp = spec["result"] + ".tmp"
    Path(tmp).write_text(json.dumps(res, default=str))
    os.replace(tmp, spec["result"])
    return 0


# ------------------------------------------------------------------------------------------------------------
# parent


class Runner:
    """Starts worker processes with a timeout inside an overall time budget; remembers how long each took."""

    def __init__(self, work: Path, timeout: int, budget: float | None):
        self.work, self.timeout, self.budget = work, timeout, budget
        self.t0 = time.perf_counter()
        self.longest: dict[str, float] = {}
        self.n = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, kind: str, spec: dict) -> dict:
        """Result JSON of one worker, or {"error": ...}."""
        if self.budget and self.elapsed() + self.longest.get(kind, 0.0) > self.budget:
            return {"error": f"skipped: the --budget of {self.budget:.0f} s would be exceeded"}
        self.n += 1
        spec = dict(spec, result=str(self.work / f"result_{self.n}.json"))
        spec_path = self.work / f"spec_{self.n}.json"
        spec_path.write_text(json.dumps(spec))
        timeout = self.timeout
        if self.budget:
            timeout = max(10, min(timeout, int(self.budget - self.elapsed())))
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(spec_path)],
                               capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"did not finish within {timeout} s"}
        finally:
            self.longest[kind] = max(self.longest.get(kind, 0.0), time.perf_counter() - t)
        if p.returncode or not Path(spec["result"]).is_file():
            tail = [ln for ln in (p.stderr or p.stdout).strip().splitlines() if ln.strip()][-4:]
            return {"error": f"exit {p.returncode}: " + " | ".join(tail)[-600:]}
        res = json.loads(Path(spec["result"]).read_text())
        res["process_s"] = time.perf_counter() - t
        return res


def _inputs(cfg, variant: str, frames: int, h: int, w: int, work: Path, seed: int) -> tuple[str, str]:
    """The video to encode and the latents to decode (N(mean, std) of this VAE), saved once per size."""
    from parity.vae import make_video

    video_path, lat_path = work / f"video_{variant}_{h}x{w}_{frames}.npy", work / f"latents_{variant}_{h}x{w}.npy"
    if not video_path.is_file():
        np.save(video_path, make_video(cfg, frames=frames, height=h, width=w, seed=seed))
    if not lat_path.is_file():
        f, lh, lw, z = cfg.latent_shape(frames, h, w)
        rng = np.random.default_rng(seed + 1)
        lat = rng.standard_normal((1, f, lh, lw, z)) * np.array(cfg.latents_std) + np.array(cfg.latents_mean)
        np.save(lat_path, lat.astype(np.float32))
    return str(video_path), str(lat_path)


def _quality(a_path: str, b_path: str) -> dict:
    """PSNR over all frames, SSIM over SSIM_FRAMES evenly spaced frames, rel L2; [-1, 1] videos."""
    from parity import metrics

    a, b = np.load(a_path), np.load(b_path)
    idx = np.unique(np.linspace(0, a.shape[1] - 1, min(SSIM_FRAMES, a.shape[1])).round().astype(int))
    ssim = None
    if min(a.shape[2:4]) >= metrics.SSIM_WIN:
        ssim = metrics.video_ssim(a[:, idx], b[:, idx], metrics.RANGE_SIGNED).mean
    return {"psnr_db": metrics.psnr(a, b, metrics.RANGE_SIGNED), "ssim": ssim, "rel_l2": metrics.rel_l2(a, b)}


def _quality_rows(group: list[Config], saved: dict[tuple[str, str], str]) -> list[dict]:
    out = []
    by = {(c.dtype, c.tiled): c for c in group}

    def add(what, impl_a, ca, impl_b, cb):
        pa, pb = saved.get((impl_a, ca.key)), saved.get((impl_b, cb.key))
        if pa and pb:
            out.append({"variant": ca.variant, "size": f"{ca.height}x{ca.width}", "what": what,
                        "a": f"{impl_a} {ca.key}", "b": f"{impl_b} {cb.key}", **_quality(pa, pb)})

    for tiled in (False, True):
        bf, fp = by.get(("bfloat16", tiled)), by.get(("float32", tiled))
        tag = "tiled" if tiled else "whole"
        if bf and fp:
            for impl in ("ours", "diffusers"):
                add(f"{impl} bf16 vs fp32 ({tag})", impl, bf, impl, fp)
        for c in (fp, bf):
            if c:
                add(f"ours vs diffusers {c.dtype} ({tag})", "ours", c, "diffusers", c)
    for dtype in ("float32", "bfloat16"):
        t, w = by.get((dtype, True)), by.get((dtype, False))
        if t and w:
            add(f"ours tiled vs whole {dtype}", "ours", t, "ours", w)
    return out


def _gib(b) -> str:
    return f"{b / GIB:.2f}" if isinstance(b, (int, float)) and b else "-"


def table(rows: list[dict]) -> str:
    head = (f"{'variant':<11} {'size':<9} {'dtype':<8} {'tiles':<5} {'op':<6} {'ours s':>7} {'diff s':>7} "
            f"{'ours/diff':>9} {'ours GiB':>9} {'est GiB':>8} {'diff GiB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for op in ("encode", "decode"):
            o, d = r.get("ours", {}), r.get("diffusers", {})
            os_, ds = o.get(f"{op}_s"), d.get(f"{op}_s")
            ratio = f"{os_ / ds:.2f}" if os_ and ds else "-"
            peak = o.get("decode_peak_bytes") if op == "decode" else o.get("encode_peak_bytes")
            est = (o.get(f"{op}_estimate") or {}).get("total_bytes")
            line = (f"{r['variant']:<11} {r['size']:<9} {r['dtype'][:8]:<8} {'on' if r['tiled'] else 'off':<5} "
                    f"{op:<6} {os_ or 0:>7.3f} {ds or 0:>7.3f} {ratio:>9} {_gib(peak):>9} {_gib(est):>8} "
                    f"{_gib(d.get(f'{op}_peak_bytes')):>8}")
            errs = [f"{k}: {v['error'][:90]}" for k, v in (("ours", o), ("diffusers", d)) if "error" in v]
            lines.append(line + ("  " + "; ".join(errs) if errs and op == "encode" else ""))
    return "\n".join(lines)


def quality_table(rows: list[dict]) -> str:
    lines = [f"{'variant':<11} {'size':<9} {'comparison':<36} {'PSNR dB':>8} {'SSIM':>7} {'rel L2':>9}"]
    for q in rows:
        ssim = f"{q['ssim']:.4f}" if q.get("ssim") is not None else "-"
        lines.append(f"{q['variant']:<11} {q['size']:<9} {q['what']:<36} {q['psnr_db']:>8.2f} {ssim:>7} "
                     f"{q['rel_l2']:>9.2e}")
    return "\n".join(lines)


def _csv(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="Wan2.1, 480x832, bf16 and fp32, whole frames, 1 repeat, --budget 450: about 5 minutes on "
                         "an H100 (the flags below override it)")
    ap.add_argument("--tiny", action="store_true", help="tiny VAEs and frames on the CPU: a smoke run of the flow")
    ap.add_argument("--variants", help="comma list of wan2.1, wan2.2 (default both)")
    ap.add_argument("--sizes", help="comma list of HEIGHTxWIDTH (default 480x832,720x1280)")
    ap.add_argument("--dtypes", help="comma list of bfloat16, float32 (default both)")
    ap.add_argument("--tiling", help="comma list of off, on (default both): on = diffusers' tiles (--tile)")
    ap.add_argument("--impls", default="ours,diffusers", help="comma list of ours, diffusers (default both)")
    ap.add_argument("--frames", type=int, default=None, help="video frames, 4k+1 (default 81; tiny 5)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up, best kept (default 2)")
    ap.add_argument("--tile", default=None, metavar="TILE,STRIDE",
                    help="tile size and stride in pixels (default 256,192: diffusers'; tiny: 4 and 3 latents)")
    ap.add_argument("--time-taps", default="channels", choices=("channels", "conv3d"),
                    help="our conv formulation (jax_impl.vae.ConvSettings)")
    ap.add_argument("--strict-fp32", action="store_true", help="our float32 convs at HIGHEST precision (no TF32)")
    ap.add_argument("--precompile", choices=("on", "off"), default=None,
                    help="compile in a separate process first so measured peaks exclude the autotuner (default on; "
                         "off with --tiny)")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per process (default 900; quick 400)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run: a process that would likely end past it is skipped (default "
                         "none; quick 450)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep weights, inputs, compilation cache and videos here (default: a temp dir)")
    ap.add_argument("--json", default="bench_vae.json", help="results (rewritten after every configuration)")
    ap.add_argument("--append", action="store_true", help="keep the rows of an existing --json not measured now")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.variants = args.variants or "wan2.1"
        args.sizes = args.sizes or "480x832"
        args.tiling = args.tiling or "off"
        args.repeats = args.repeats or 1
        args.timeout = args.timeout or 400
        args.budget = args.budget or 450
    args.variants = _csv(args.variants or "wan2.1,wan2.2")
    args.dtypes = _csv(args.dtypes or "bfloat16,float32")
    args.tiling = _csv(args.tiling or "off,on")
    args.impls = _csv(args.impls)
    args.frames = args.frames or (5 if args.tiny else 81)
    args.repeats = args.repeats or (1 if args.tiny else 2)
    args.timeout = args.timeout or 900
    args.precompile = (args.precompile or ("off" if args.tiny else "on")) == "on"
    bad = ([v for v in args.variants if v not in ("wan2.1", "wan2.2")] + [d for d in args.dtypes if d not in
           ("bfloat16", "float32")] + [t for t in args.tiling if t not in ("off", "on")]
           + [i for i in args.impls if i not in ("ours", "diffusers")])
    if bad:
        ap.error(f"unknown value(s) {bad}; see --help")
    if (args.frames - 1) % 4:
        ap.error(f"--frames must be 4k+1, got {args.frames}")
    return args


def _sizes(args, cfg) -> list[tuple[int, int]]:
    if args.sizes:
        sizes = [tuple(int(v) for v in s.split("x")) for s in _csv(args.sizes)]
    elif args.tiny:
        sizes = [(6 * cfg.spatial_factor, 8 * cfg.spatial_factor)]
    else:
        sizes = [(480, 832), (720, 1280)]
    for h, w in sizes:
        if h % cfg.spatial_factor or w % cfg.spatial_factor:
            raise SystemExit(f"size {h}x{w} is not a multiple of {cfg.spatial_factor} (the {cfg.z_dim}-channel VAE)")
    return sizes


def _tile_spec(args, cfg) -> dict:
    if args.tile:
        t, s = (int(v) for v in args.tile.split(","))
    elif args.tiny:
        t, s = 4 * cfg.spatial_factor, 3 * cfg.spatial_factor
    else:
        t, s = 256, 192
    return {"tile_height": t, "tile_width": t, "stride_height": s, "stride_width": s}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)

    from weights.configs.vae import get_vae_preset
    from torch_ref.vae import write_vae_folder

    own_work = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_vae_"))
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work, args.timeout, args.budget)
    old = json.loads(Path(args.json).read_text()) if args.append and Path(args.json).is_file() else {}
    result = {"date": datetime.date.today().isoformat(), "frames": args.frames, "tiny": args.tiny,
              "time_taps": args.time_taps, "strict_fp32": args.strict_fp32, "precompile": args.precompile,
              "repeats": args.repeats, "versions": _versions(), "rows": [], "quality": [], "compile": []}
    measured: set[str] = set()

    def write() -> None:
        keep_rows = [r for r in old.get("rows", []) if r["key"] not in measured]
        keep_q = [q for q in old.get("quality", []) if q["a"].split(" ", 1)[1] not in measured]
        data = dict(result, rows=keep_rows + result["rows"], quality=keep_q + result["quality"])
        tmp = Path(str(args.json) + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, args.json)

    try:
        for variant in args.variants:
            preset = ("tiny-" if args.tiny else "") + variant
            cfg = get_vae_preset(preset)
            folder = work / f"weights_{preset}_seed{args.seed}"
            if not (folder / "config.json").is_file():
                print(f"[{preset}] writing random weights to {folder}", flush=True)
                write_vae_folder(cfg, folder, seed=args.seed, force=True)
            tiling = _tile_spec(args, cfg)
            for h, w in _sizes(args, cfg):
                video, latents = _inputs(cfg, preset, args.frames, h, w, work, args.seed)
                group = [Config(preset, h, w, d, t == "on") for t in args.tiling for d in args.dtypes]
                base = {"folder": str(folder), "video": video, "latents": latents, "tiling": tiling,
                        "repeats": args.repeats, "cache_dir": str(work / "jax_cache"),
                        "time_taps": args.time_taps, "strict_fp32": args.strict_fp32}
                cfg_dicts = {c.key: dict(dataclasses.asdict(c), key=c.key) for c in group}
                if "ours" in args.impls and args.precompile:
                    print(f"[{preset} {h}x{w}] compiling {len(group)} configuration(s)", flush=True)
                    res = runner.run("compile", dict(base, impl="ours", role="compile",
                                                     configs=list(cfg_dicts.values())))
                    result["compile"].append({"variant": preset, "size": f"{h}x{w}", **res})
                    precompiled = {k for k, v in res.get("configs", {}).items() if "error" not in v}
                else:
                    precompiled = set()
                saved: dict[tuple[str, str], str] = {}
                for c in group:
                    row = {"key": c.key, "variant": preset, "size": f"{h}x{w}", "dtype": c.dtype, "tiled": c.tiled,
                           "tiling": tiling if c.tiled else None}
                    for impl in args.impls:
                        save = str(work / f"decoded_{impl}_{c.key}.npy")
                        print(f"[{c.key}] {impl}", flush=True)
                        res = runner.run(impl, dict(base, impl=impl, role="measure", configs=[cfg_dicts[c.key]],
                                                    save=save))
                        row[impl] = res.get("configs", {}).get(c.key, {}) if "error" not in res else res
                        if "process_s" in res:
                            row[impl]["process_s"] = res["process_s"]
                        if impl == "ours":  # else the measured peak may include the autotuner's scratch
                            row[impl]["precompiled"] = c.key in precompiled
                        if Path(save).is_file():
                            saved[(impl, c.key)] = save
                    o, d = row.get("ours", {}), row.get("diffusers", {})
                    for op in ("encode", "decode"):
                        if o.get(f"{op}_s") and d.get(f"{op}_s"):
                            row[f"{op}_ratio"] = o[f"{op}_s"] / d[f"{op}_s"]
                    result["rows"].append(row)
                    measured.add(c.key)
                    write()
                result["quality"] += _quality_rows(group, saved)
                write()
                if own_work:
                    for p in saved.values():
                        Path(p).unlink(missing_ok=True)
    finally:
        rows = result["rows"]
        print(f"\nWan VAE, {args.frames} frames, elapsed {runner.elapsed():.0f} s")
        print(table(rows))
        print("ours GiB: peak after the decode (decode rows), of the whole process (encode rows: the larger of "
              "both); est GiB: jax_impl.vae_memory's estimate plus weights and input")
        if result["quality"]:
            print("\ndecoded-frame quality (same latents, same weights)")
            print(quality_table(result["quality"]))
        write()
        print(f"wrote {args.json}")
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r["key"] for r in result["rows"] if any("error" in r.get(i, {}) for i in args.impls)]
    return 1 if failed else 0


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("jax", "jaxlib", "flax", "torch", "diffusers"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
