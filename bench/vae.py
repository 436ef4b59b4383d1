"""Benchmark the Flax Wan VAE against diffusers' AutoencoderKLWan: same random weights, same inputs, one run.

The whole matrix of issue 19 in ONE invocation, about 8 minutes wall on one H100 (--budget 420 s for inputs,
compiling and measuring, then up to about a minute for the quality table):

  python bench/vae.py --json bench/results/vae_h100.json --workdir /tmp/vaework 2>&1 | tee vae.log

covers Wan2.1 and Wan2.2 VAE x 480x832 and 720x1280 x bf16 and fp32 x whole frames and diffusers' tiles
(256 pixels every 192), 81 frames, ours and diffusers, encode and decode: time, peak device memory, and the
decoded frames' quality (PSNR/SSIM of bf16 against fp32 frames of the same implementation, ours against
diffusers, tiled against whole) over 5 evenly spaced frames.

Phases (each process has a deadline from the global --budget; what a deadline cuts off is recorded as
"not measured (budget)", never dropped; the JSON is rewritten after every process):
  1. ours, compile: one process per VAE version, in parallel (--compile-jobs), each compiling its chunk steps
     in threads (--compile-threads) into a persistent compilation cache in the work dir, and recording compile
     time and the memory estimate (jax_impl.vae_memory), within 40% of the budget left. The measuring processes
     load the executables from the cache (XLA's autotuner scratch would otherwise count in their peaks; a pair
     compiled there is marked `precompiled: false`). A kept --workdir (or --cache) makes a second run skip
     compiling. On one H100 compiling the whole matrix takes about 5 minutes (48 chunk steps, 10-13 s each), so
     the whole matrix in one 10-minute call needs a cache filled beforehand:
       python bench/vae.py --compile-only --workdir /tmp/w            # then carry /tmp/w/jax_cache over
       python bench/vae.py --cache CACHE --budget 530 --json bench/results/vae_h100.json
  2. ours, measure: one process per VAE version (each dtype's weights loaded once); its (configuration, op)
     pairs run in increasing order of the estimated peak, so each pair's peak (`peak_bytes_in_use` cannot be
     reset in JAX) is its own; a pair whose peak stayed below an earlier one is marked `peak_masked`.
  3. diffusers: one process per VAE version; peak stats reset before each op.
Per op: one warm-up run (ours: the full video, which also compiles the small full-length programs; diffusers:
a 5-frame clip of the same size, which meets every conv shape of the full run: diffusers has no compile
step), then --repeats timed runs (default 1; best kept). Peaks include the weights and the input.

  python bench/vae.py --variants wan2.1 --sizes 480x832 --tiling off --json a.json   # a part of it
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

from bench.versions import versions  # noqa: E402  (after the path insert)

GIB = 2**30
QUALITY_FRAMES = 5  # quality (PSNR, SSIM) over this many evenly spaced decoded frames: saving 81 frames of 720p
# float32 video per run would cost seconds each, and float64 SSIM of them minutes


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
# workers (child processes): one JSON spec in, one JSON result out, rewritten after every measured op

BUDGET_SKIP = "not measured (budget)"
COMPILE_SHARE = 0.4  # of the budget left after the inputs are written: ours' compile phase
WARMUP_FRAMES = 5  # diffusers' warm-up clip: 5 frames = 2 latent frames meet every chunk shape of the full run


def _best(fn, repeats: int) -> tuple[float, list[float], object]:
    """(best time, all times, the last result) of `repeats` calls."""
    times, y = [], None
    for _ in range(repeats):
        y = None  # the previous result is freed before the next call (it would count in the peak)
        t = time.perf_counter()
        y = fn()
        times.append(time.perf_counter() - t)
    return min(times), times, y


def quality_frames(frames: int) -> np.ndarray:
    """The frame indices kept for the quality comparison (QUALITY_FRAMES evenly spaced)."""
    return np.unique(np.linspace(0, frames - 1, min(QUALITY_FRAMES, frames)).round().astype(int))


class Deadline:
    """Skips work predicted to end past `at` (epoch seconds): a step may start if `at` leaves room for
    `factor` times the longest step so far (or `first` seconds before any step has run)."""

    def __init__(self, at: float | None, first: float = 5.0, factor: float = 1.5):
        self.at, self.first, self.factor, self.longest = at, first, factor, 0.0

    def allows(self) -> bool:
        return self.at is None or time.time() + max(self.first, self.factor * self.longest) <= self.at

    def took(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


def _write_result(spec: dict, res: dict) -> None:
    tmp = spec["result"] + ".tmp"
    Path(tmp).write_text(json.dumps(res, default=str))
    os.replace(tmp, spec["result"])


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

    from jax_impl.loading import load_vae
    from jax_impl.vae import ConvSettings

    model = load_vae(spec["folder"], dtype=jnp.dtype(dtype))
    model.set_conv_settings(ConvSettings(time_taps=spec["time_taps"], strict_fp32=spec["strict_fp32"]))
    weights = sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(model)))
    return model, weights


def _ours_call(model, op: str, x, tiled: bool, tiling):
    import jax

    from jax_impl import vae_run

    tile = "on" if tiled else "off"
    if op == "encode":
        return jax.block_until_ready(vae_run.encode(model, x, tile=tile, tiling=tiling))
    return jax.block_until_ready(vae_run.decode(model, x, tile=tile, tiling=tiling))


def _host_input(c: dict, op: str, dtype) -> np.ndarray:
    """Configuration `c`'s input for `op`, converted on the host (a float32 copy on the device would count in
    the peak)."""
    return np.load(c["latents" if op == "decode" else "video"]).astype(dtype)


def _estimate_pair(model, weights: int, c: dict, op: str, tiling) -> dict:
    """Compile (or load from the persistent cache) configuration `c`'s chunk steps for `op` through
    jax_impl.vae_memory.estimate: {op_compile_s, op_estimate (with total_bytes: steps + weights + input)}."""
    import jax.numpy as jnp

    from jax_impl import vae_memory

    shape = np.load(c["latents" if op == "decode" else "video"], mmap_mode="r").shape
    t = time.perf_counter()
    est = vae_memory.estimate(model, op, shape, dtype=jnp.dtype(c["dtype"]), tile=c["tiled"], tiling=tiling)
    got: dict = {f"{op}_compile_s": time.perf_counter() - t}
    if est is not None:
        nbytes = int(np.prod(shape)) * jnp.dtype(c["dtype"]).itemsize
        got[f"{op}_estimate"] = est.as_dict() | {"total_bytes": est.peak_bytes + weights + nbytes}
    return got


def worker_ours_compile(spec: dict) -> dict:
    """Compile every chunk step of every configuration (threads: XLA compiles without the GIL) into the
    persistent cache; record compile time and the memory estimate per (configuration, op)."""
    import concurrent.futures as cf

    import jax

    tiling = _tiling(spec)
    out: dict = {"device": str(jax.devices()[0].device_kind), "configs": {c["key"]: {} for c in spec["configs"]}}
    models = {d: _load_ours(spec, d) for d in sorted({c["dtype"] for c in spec["configs"]})}

    def one(c: dict, op: str) -> None:
        row = out["configs"][c["key"]]
        model, row["weights_bytes"] = models[c["dtype"]]
        if spec.get("deadline") and time.time() > spec["deadline"]:
            row[f"{op}_compile_skipped"] = "the compile phase's share of the budget was spent"
            return
        try:
            row.update(_estimate_pair(model, row["weights_bytes"], c, op, tiling))
        except Exception as e:  # noqa: BLE001 - recorded; the measuring process reports it again
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"

    with cf.ThreadPoolExecutor(spec["threads"]) as pool:
        for f in [pool.submit(one, c, op) for c in spec["configs"] for op in ("encode", "decode")]:
            f.result()
    return out


def _pairs_by_estimate(configs: list[dict], estimates: dict) -> list[tuple[dict, str]]:
    """(configuration, op) pairs in increasing estimated peak; unknown estimates first in matrix order (tiled
    before whole, encode before decode), so that a pair's peak is most likely above every earlier one."""
    pairs = [(c, op) for c in configs for op in ("encode", "decode")]

    def key(i_pair):
        i, (c, op) = i_pair
        est = (estimates.get(c["key"]) or {}).get(f"{op}_estimate") or {}
        return (est.get("total_bytes", -1), not c["tiled"], i)

    return [p for _, p in sorted(enumerate(pairs), key=key)]


def worker_ours_measure(spec: dict) -> dict:
    """One VAE version, both dtypes (weights loaded once each): every (configuration, op) pair, warm-up then timed,
    in increasing estimated peak."""
    import jax
    import jax.numpy as jnp

    from jax_impl.vae_tiling import Tiling

    deadline = Deadline(spec.get("deadline"))
    out: dict = {"device": str(jax.devices()[0].device_kind), "configs": {c["key"]: {} for c in spec["configs"]}}
    models = {(f, d): _load_ours(dict(spec, folder=f), d) for f, d in sorted({(c["folder"], c["dtype"])
                                                                              for c in spec["configs"]})}
    estimates = spec.get("estimates", {})
    if spec.get("estimate_here"):  # no compile phase ran: load (or compile) every step now, ordered by estimate
        estimates = {}
        for c in spec["configs"]:
            model, weights = models[(c["folder"], c["dtype"])]
            for op in ("encode", "decode"):
                try:
                    got = _estimate_pair(model, weights, c, op, Tiling(**c["tiling"]))
                except Exception as e:  # noqa: BLE001 - the pair reports it again when it runs
                    out["configs"][c["key"]]["error"] = f"{op}: {type(e).__name__}: {str(e)[:400]}"
                    continue
                estimates.setdefault(c["key"], {}).update(got)
                out["configs"][c["key"]].update(got, **{f"{op}_load_s": got[f"{op}_compile_s"]})
        _write_result(spec, out)
    top = 0
    for c, op in _pairs_by_estimate(spec["configs"], estimates):
        row = out["configs"][c["key"]]
        model, row["weights_bytes"] = models[(c["folder"], c["dtype"])]
        tiling = Tiling(**c["tiling"])
        if "error" in row:
            continue
        if not deadline.allows():
            row[f"{op}_skipped"] = BUDGET_SKIP
            continue
        # compiled here, not loaded from the cache: the peak may include XLA's autotuner scratch
        row[f"{op}_precompiled"] = f"{op}_compile_s" in (estimates.get(c["key"]) or {})
        t0 = time.perf_counter()
        try:
            # The chunk steps, looked up as the compile phase made them (same abstract arguments, so the same
            # persistent-cache keys): a load, not a compile. Looked up from the run itself, the concrete arrays'
            # shardings gave other keys, and every first call recompiled (10-13 s per step on an H100).
            loaded = _estimate_pair(model, row["weights_bytes"], c, op, tiling)
            row.setdefault(f"{op}_load_s", loaded[f"{op}_compile_s"])
            x = jax.device_put(_host_input(c, op, jnp.dtype(c["dtype"])))
            t = time.perf_counter()
            _ours_call(model, op, x, c["tiled"], tiling)  # warm-up (its output is dropped: it would count)
            row[f"{op}_first_s"] = time.perf_counter() - t
            row[f"{op}_s"], row[f"{op}_times"], y = _best(lambda: _ours_call(model, op, x, c["tiled"], tiling),
                                                          spec["repeats"])
            peak = _jax_peak()
            row[f"{op}_peak_bytes"] = peak
            row[f"{op}_peak_masked"] = bool(peak is not None and peak <= top)  # an earlier pair's peak
            top = max(top, peak or 0)
            if op == "decode" and spec.get("save"):  # after the peak was read; converted on the host
                idx = quality_frames(y.shape[1])
                np.save(spec["save"][c["key"]], np.asarray(y[:, idx]).astype(np.float32))
            del x, y
        except Exception as e:  # noqa: BLE001 - record and go on with the next pair
            row["error"] = f"{op}: {type(e).__name__}: {str(e)[:400]}"
        deadline.took(time.perf_counter() - t0)
        _write_result(spec, out)
    return out


def worker_diffusers(spec: dict) -> dict:
    """One VAE version: every configuration in the given (priority) order, warm-up clip then timed runs."""
    import torch

    from torch_ref.vae import load_vae_torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    deadline = Deadline(spec.get("deadline"))
    out: dict = {"configs": {c["key"]: {} for c in spec["configs"]}}
    model, model_key = None, None

    def to_torch(c: dict, op: str, dtype, frames: int | None = None):
        a = np.load(c["latents" if op == "decode" else "video"], mmap_mode="r")
        if frames is not None:
            a = a[:, :frames if op == "encode" else 1 + (frames - 1) // 4]
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 4, 1, 2, 3))).to(dev, dtype)

    with torch.no_grad():
        for c in spec["configs"]:
            row = out["configs"][c["key"]]
            dtype = getattr(torch, c["dtype"])
            for op in ("encode", "decode"):
                if not deadline.allows():
                    row[f"{op}_skipped"] = BUDGET_SKIP
                    continue
                t0 = time.perf_counter()
                try:
                    if model_key != (c["folder"], dtype):
                        model = None
                        if dev == "cuda":
                            torch.cuda.empty_cache()
                        model, model_key = load_vae_torch(c["folder"], dtype).to(dev), (c["folder"], dtype)
                    if c["tiled"]:
                        t = c["tiling"]
                        model.enable_tiling(tile_sample_min_height=t["tile_height"], tile_sample_min_width=t["tile_width"],
                                            tile_sample_stride_height=t["stride_height"],
                                            tile_sample_stride_width=t["stride_width"])
                    else:
                        model.disable_tiling()
                    row.update({"weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                                "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32})

                    def call(x):
                        y = model.decode(x).sample if op == "decode" else model.encode(x).latent_dist.mode()
                        sync()
                        return y

                    warm = to_torch(c, op, dtype, WARMUP_FRAMES)
                    t = time.perf_counter()
                    call(warm)
                    row[f"{op}_first_s"] = time.perf_counter() - t  # of the warm-up clip
                    del warm
                    x = to_torch(c, op, dtype)
                    if dev == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    row[f"{op}_s"], row[f"{op}_times"], y = _best(lambda: call(x), spec["repeats"])
                    row[f"{op}_peak_bytes"] = torch.cuda.max_memory_allocated() if dev == "cuda" else None
                    if op == "decode" and spec.get("save"):
                        idx = torch.from_numpy(quality_frames(y.shape[2])).to(y.device)
                        frames = y.index_select(2, idx).float().cpu().numpy().transpose(0, 2, 3, 4, 1)
                        np.save(spec["save"][c["key"]], frames)
                    del x, y
                except Exception as e:  # noqa: BLE001 - record and go on
                    row["error"] = f"{op}: {type(e).__name__}: {str(e)[:400]}"
                deadline.took(time.perf_counter() - t0)
                _write_result(spec, out)
    return out


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec["impl"] == "ours":
        import jax  # noqa: F401 - before the cache settings

        from jax_impl.runtime import configure_xla

        configure_xla()
        _enable_compilation_cache(spec["cache_dir"])
        res = worker_ours_compile(spec) if spec["role"] == "compile" else worker_ours_measure(spec)
    else:
        res = worker_diffusers(spec)
    _write_result(spec, res)
    return 0


# ------------------------------------------------------------------------------------------------------------
# parent


class Runner:
    """Starts worker processes, each with a deadline inside the global time budget.

    A worker stops starting work at its deadline and writes what it measured after every op, so a process
    that is killed at its timeout (deadline + grace) still returns its measured part."""

    GRACE = 45  # seconds past the deadline before a worker is killed (one op in flight, its writing)

    def __init__(self, work: Path, timeout: int, budget: float | None, t0: float | None = None):
        self.work, self.timeout, self.budget = work, timeout, budget
        self.t0 = time.perf_counter() if t0 is None else t0
        self.n = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float | None:
        return None if not self.budget else self.budget - self.elapsed()

    def _until(self, share: float) -> float | None:
        """Epoch seconds at which `share` of the budget left now is spent (None: no budget)."""
        left = self.left()
        return None if left is None else time.time() + max(0.0, left * share)

    def start(self, spec: dict, until: float | None) -> tuple[subprocess.Popen, dict, float]:
        """Start one worker with deadline `until` (epoch seconds, or None)."""
        self.n += 1
        spec = dict(spec, result=str(self.work / f"result_{self.n}.json"))
        timeout = self.timeout
        if until is not None:
            spec["deadline"] = until
            timeout = int(min(timeout, max(0.0, until - time.time()) + self.GRACE))
        Path(spec["result"]).unlink(missing_ok=True)
        spec_path = self.work / f"spec_{self.n}.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false") if spec.get("role") == "compile" else None
        with open(self.work / f"log_{self.n}.txt", "w") as log:  # a file: parallel workers never block on a pipe
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(spec_path)],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        spec["log"] = log.name
        return p, spec, timeout

    def finish(self, started: tuple[subprocess.Popen, dict, float], t_start: float) -> dict:
        """The worker's result JSON (partial if it was killed), with "error" when it did not end cleanly."""
        p, spec, timeout = started
        try:
            p.wait(timeout=max(1.0, timeout - (time.perf_counter() - t_start)))
            err = None if p.returncode == 0 else f"exit {p.returncode}"
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            err = f"killed at its timeout of {timeout:.0f} s"
        log = Path(spec["log"]).read_text(errors="replace")
        res = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).is_file() else {}
        if err:
            tail = [ln for ln in (log or "").strip().splitlines() if ln.strip()][-4:]
            res["error"] = err + (": " + " | ".join(tail)[-600:] if tail else "")
        res["process_s"] = time.perf_counter() - t_start
        return res

    def run(self, spec: dict, share: float = 1.0) -> dict:
        """One worker, with `share` of the budget left as its deadline."""
        t = time.perf_counter()
        return self.finish(self.start(spec, self._until(share)), t)

    def run_parallel(self, specs: list[dict], jobs: int, share: float = 1.0) -> list[dict]:
        """`specs` at most `jobs` at a time, all with one deadline: `share` of the budget left now."""
        until = self._until(share)
        results: list[dict | None] = [None] * len(specs)
        pending, running = list(enumerate(specs)), []
        while pending or running:
            while pending and len(running) < jobs:
                i, sp = pending.pop(0)
                running.append((i, self.start(sp, until), time.perf_counter()))
            i, started, t = running.pop(0)
            results[i] = self.finish(started, t)
        return results  # type: ignore[return-value]


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
    """PSNR, SSIM and rel L2 of two saved sets of decoded frames (QUALITY_FRAMES of each video, in [-1, 1])."""
    from parity import metrics

    a, b = np.load(a_path), np.load(b_path)
    ssim = None
    if min(a.shape[2:4]) >= metrics.SSIM_WIN:
        ssim = metrics.video_ssim(a, b, metrics.RANGE_SIGNED).mean
    return {"psnr_db": metrics.psnr(a, b, metrics.RANGE_SIGNED), "ssim": ssim, "rel_l2": metrics.rel_l2(a, b),
            "frames": int(a.shape[1])}


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


def _secs(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and v else "-"


def table(rows: list[dict]) -> str:
    head = (f"{'variant':<11} {'size':<9} {'dtype':<8} {'tiles':<5} {'op':<6} {'ours s':>7} {'diff s':>7} "
            f"{'ours/diff':>9} {'ours GiB':>9} {'est GiB':>8} {'diff GiB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for op in ("encode", "decode"):
            o, d = r.get("ours", {}), r.get("diffusers", {})
            os_, ds = o.get(f"{op}_s"), d.get(f"{op}_s")
            ratio = f"{os_ / ds:.2f}" if os_ and ds else "-"
            peak = _gib(o.get(f"{op}_peak_bytes")) + ("<" if o.get(f"{op}_peak_masked") else "")
            est = (o.get(f"{op}_estimate") or {}).get("total_bytes")
            line = (f"{r['variant']:<11} {r['size']:<9} {r['dtype'][:8]:<8} {'on' if r['tiled'] else 'off':<5} "
                    f"{op:<6} {_secs(os_):>7} {_secs(ds):>7} {ratio:>9} {peak:>9} {_gib(est):>8} "
                    f"{_gib(d.get(f'{op}_peak_bytes')):>8}")
            notes = [f"{k}: {v[f'{op}_skipped']}" for k, v in (("ours", o), ("diffusers", d)) if f"{op}_skipped" in v]
            notes += [f"{k}: {v['error'][:90]}" for k, v in (("ours", o), ("diffusers", d))
                      if "error" in v and op == "encode"]
            lines.append(line + ("  " + "; ".join(notes) if notes else ""))
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
                    help="Wan2.1, 480x832, bf16 and fp32, whole frames (the flags below override it)")
    ap.add_argument("--tiny", action="store_true", help="tiny VAEs and frames on the CPU: a smoke run of the flow")
    ap.add_argument("--variants", help="comma list of wan2.1, wan2.2 (default both)")
    ap.add_argument("--sizes", help="comma list of HEIGHTxWIDTH (default 480x832,720x1280)")
    ap.add_argument("--dtypes", help="comma list of bfloat16, float32 (default both)")
    ap.add_argument("--tiling", help="comma list of off, on (default both): on = diffusers' tiles (--tile)")
    ap.add_argument("--impls", default="ours,diffusers", help="comma list of ours, diffusers (default both)")
    ap.add_argument("--frames", type=int, default=None, help="video frames, 4k+1 (default 81; tiny 5)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up, best kept (default 1)")
    ap.add_argument("--tile", default=None, metavar="TILE,STRIDE",
                    help="tile size and stride in pixels (default 256,192: diffusers'; tiny: 4 and 3 latents)")
    ap.add_argument("--time-taps", default="channels", choices=("channels", "conv3d"),
                    help="our conv formulation (jax_impl.vae.ConvSettings)")
    ap.add_argument("--strict-fp32", action="store_true", help="our float32 convs at HIGHEST precision (no TF32)")
    ap.add_argument("--compile-jobs", type=int, default=2,
                    help="ours' compile processes running at once (one per VAE version; default 2)")
    ap.add_argument("--compile-threads", type=int, default=4,
                    help="chunk steps compiled at once inside one compile process (default 4)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per process at most (default 900)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run, inputs included, quality table not (default 420; none with --tiny): "
                         "each process gets a deadline from what is left, and what it cannot start in time is "
                         "recorded as 'not measured (budget)'; 0 = no budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep weights, inputs, compilation cache and frames here (default: a temp dir;"
                                      " a kept compilation cache makes a second run skip compiling)")
    ap.add_argument("--json", default="bench_vae.json", help="results (rewritten after every process)")
    ap.add_argument("--skip-compile-phase", action="store_true",
                    help="no separate compile processes: the measuring process loads (or compiles) every chunk step "
                         "first and orders the pairs by their memory estimate; with a --cache filled by --compile-only "
                         "this saves the compile processes' start-up and weight loading (about 85 s on an H100)")
    ap.add_argument("--cache", help="JAX persistent compilation cache folder (default: WORKDIR/jax_cache); one filled "
                                    "by --compile-only on the same kind of GPU makes the compile phase a load")
    ap.add_argument("--append", action="store_true", help="keep the rows of an existing --json not measured now")
    ap.add_argument("--compile-only", action="store_true",
                    help="only ours' compile phase, into --workdir's persistent cache (no budget): a later run with the "
                         "same --workdir on the same machine then loads every chunk step instead of compiling it "
                         "(about 48 steps of 10-13 s each on an H100 for the whole matrix)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.variants = args.variants or "wan2.1"
        args.sizes = args.sizes or "480x832"
        args.tiling = args.tiling or "off"
    args.variants = _csv(args.variants or "wan2.1,wan2.2")
    args.dtypes = _csv(args.dtypes or "bfloat16,float32")
    args.tiling = _csv(args.tiling or "off,on")
    args.impls = _csv(args.impls)
    args.frames = args.frames or (5 if args.tiny else 81)
    if args.budget is None:
        args.budget = 0 if args.tiny or args.compile_only else 420
    if args.compile_only and (args.workdir is None or "ours" not in args.impls):
        ap.error("--compile-only fills --workdir's compilation cache for ours: give --workdir (kept) and keep ours in --impls")
    bad = ([v for v in args.variants if v not in ("wan2.1", "wan2.2")] + [d for d in args.dtypes if d not in
           ("bfloat16", "float32")] + [t for t in args.tiling if t not in ("off", "on")]
           + [i for i in args.impls if i not in ("ours", "diffusers")])
    if bad:
        ap.error(f"unknown value(s) {bad}; see --help")
    if (args.frames - 1) % 4:
        ap.error(f"--frames must be 4k+1, got {args.frames}")
    if args.repeats < 1 or args.compile_jobs < 1 or args.compile_threads < 1:
        ap.error("--repeats, --compile-jobs and --compile-threads must be at least 1")
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


@dataclasses.dataclass
class Variant:
    """One VAE version's weights, per-size inputs and configurations (in priority order)."""

    name: str
    folder: Path
    tiling: dict
    inputs: dict[tuple[int, int], tuple[str, str]]  # (h, w) -> (video, latents)
    configs: list[Config]


def _prepare(args, work: Path) -> list[Variant]:
    from weights.configs.vae import get_vae_preset
    from torch_ref.vae import write_vae_folder

    out = []
    for variant in args.variants:
        preset = ("tiny-" if args.tiny else "") + variant
        cfg = get_vae_preset(preset)
        folder = work / f"weights_{preset}_seed{args.seed}"
        if not (folder / "config.json").is_file():
            print(f"[{preset}] writing random weights to {folder}", flush=True)
            write_vae_folder(cfg, folder, seed=args.seed, force=True)
        sizes = _sizes(args, cfg)
        inputs = {(h, w): _inputs(cfg, preset, args.frames, h, w, work, args.seed) for h, w in sizes}
        # priority: whole frames before tiles, then the listed dtype and size order (a budget cuts the tail)
        configs = [Config(preset, h, w, d, t == "on") for t in args.tiling for d in args.dtypes for h, w in sizes]
        out.append(Variant(preset, folder, _tile_spec(args, cfg), inputs, configs))
    return out


def _spec(args, v: Variant, work: Path, configs: list[Config], **kw) -> dict:
    """A worker's spec: what every worker of variant `v` needs, and `configs` with their input files."""
    return {"folder": str(v.folder), "tiling": v.tiling, "repeats": args.repeats,
            "cache_dir": str(args.cache or work / "jax_cache"), "time_taps": args.time_taps, "strict_fp32": args.strict_fp32,
            "configs": [_config_spec(v, c) for c in configs], **kw}


def _config_spec(v: Variant, c: Config) -> dict:
    """One configuration as a worker reads it: with its VAE's folder, tiles and input files (a measuring process
    may hold configurations of both VAE versions)."""
    video, latents = v.inputs[(c.height, c.width)]
    return dict(dataclasses.asdict(c), key=c.key, video=video, latents=latents, folder=str(v.folder), tiling=v.tiling)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)

    own_work = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_vae_"))
    work.mkdir(parents=True, exist_ok=True)
    old = json.loads(Path(args.json).read_text()) if args.append and Path(args.json).is_file() else {}
    result = {"date": datetime.date.today().isoformat(), "frames": args.frames, "tiny": args.tiny,
              "time_taps": args.time_taps, "strict_fp32": args.strict_fp32, "repeats": args.repeats,
              "budget_s": args.budget or None, "versions": versions("jax", "jaxlib", "flax", "torch", "diffusers"), "rows": [], "quality": [], "compile": []}
    rows: dict[str, dict] = {}
    saved: dict[tuple[str, str], str] = {}
    t_start = time.perf_counter()

    def write() -> None:
        result["rows"] = list(rows.values())
        keep_rows = [r for r in old.get("rows", []) if r["key"] not in rows]
        keep_q = [q for q in old.get("quality", []) if q["a"].split(" ", 1)[1] not in rows]
        data = dict(result, rows=keep_rows + result["rows"], quality=keep_q + result["quality"],
                    elapsed_s=time.perf_counter() - t_start)
        tmp = Path(str(args.json) + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, args.json)

    def merge(impl: str, res: dict, configs: list[Config]) -> None:
        for c in configs:
            got = dict(res.get("configs", {}).get(c.key, {}))
            if "error" in res and not any(k.endswith("_s") for k in got):
                got["error"] = res["error"]
            for op in ("encode", "decode"):  # a process that never got to an op: the budget or its error
                if f"{op}_s" not in got and "error" not in got:
                    got.setdefault(f"{op}_skipped", BUDGET_SKIP)
            rows[c.key].setdefault(impl, {}).update(got)
            if Path(save_path(impl, c)).is_file():
                saved[(impl, c.key)] = save_path(impl, c)

    def save_path(impl: str, c: Config) -> str:
        return str(work / f"frames_{impl}_{c.key}.npy")

    runner = None
    try:
        variants = _prepare(args, work)
        runner = Runner(work, args.timeout, args.budget or None, t_start)
        for v in variants:
            for c in v.configs:
                rows[c.key] = {"key": c.key, "variant": v.name, "size": f"{c.height}x{c.width}", "dtype": c.dtype,
                               "tiled": c.tiled, "tiling": v.tiling if c.tiled else None}
                for p in (save_path("ours", c), save_path("diffusers", c)):
                    Path(p).unlink(missing_ok=True)
        write()
        groups = [(v, v.configs) for v in variants]
        if "ours" in args.impls and not args.skip_compile_phase:
            print(f"compiling ours: {sum(len(g) for _, g in groups)} configuration(s), {args.compile_jobs} process(es)"
                  f" x {args.compile_threads} thread(s)", flush=True)
            specs = [_spec(args, v, work, g, impl="ours", role="compile", threads=args.compile_threads) for v, g in groups]
            for (v, g), res in zip(groups, runner.run_parallel(specs, args.compile_jobs, COMPILE_SHARE)):
                result["compile"].append({"variant": v.name, "configs": res.get("configs", {}),
                                          "process_s": res.get("process_s"), "error": res.get("error")})
                for c in g:
                    rows[c.key].setdefault("ours", {}).update(res.get("configs", {}).get(c.key, {}))
            write()
            print(f"  compile phase done at {runner.elapsed():.0f} s", flush=True)
        if args.compile_only:
            return 0
        # measuring processes, ours then diffusers; each gets a share of what is left of the budget
        # one process per implementation, holding both VAE versions and dtypes: every process start (importing
        # JAX or torch, loading weights: 15-30 s) is paid once
        everything = [(v, c) for v, g in groups for c in g]
        jobs = [(impl, everything) for impl in ("ours", "diffusers") if impl in args.impls and everything]
        # shares of the budget per process: ours' pairs take about 1.3x diffusers' wall time in the H100 run of
        # 2026-11-25 (our warm-ups include the tiles' eager ops and loading 32 executables; diffusers warms up on a
        # 5-frame clip)
        weight = {"ours": 1.3, "diffusers": 1.0}
        for i, (impl, pairs) in enumerate(jobs):
            share = weight[impl] / sum(weight[j[0]] for j in jobs[i:])
            left = runner.left()
            configs = [c for _, c in pairs]
            print(f"{impl}: {len(configs)} configuration(s)"
                  + (f", deadline in {share * left:.0f} s" if left is not None else ""), flush=True)
            extra = {"save": {c.key: save_path(impl, c) for c in configs}}
            if impl == "ours":
                extra |= {"role": "measure", "estimate_here": args.skip_compile_phase,
                          "estimates": {c.key: rows[c.key].get("ours", {}) for c in configs}}
            spec = _spec(args, pairs[0][0], work, [], impl=impl, **extra)
            spec["configs"] = [_config_spec(v, c) for v, c in pairs]
            res = runner.run(spec, share)
            merge(impl, res, configs)
            write()
        for v in variants:
            for hw in v.inputs:
                result["quality"] += _quality_rows([c for c in v.configs if (c.height, c.width) == hw], saved)
        for r in rows.values():
            o, d = r.get("ours", {}), r.get("diffusers", {})
            for op in ("encode", "decode"):
                if o.get(f"{op}_s") and d.get(f"{op}_s"):
                    r[f"{op}_ratio"] = o[f"{op}_s"] / d[f"{op}_s"]
    finally:
        print(f"\nWan VAE, {args.frames} frames, elapsed {time.perf_counter() - t_start:.0f} s"
              + (f" (budget {args.budget:.0f} s after the inputs)" if args.budget else ""))
        print(table(list(rows.values())))
        print("ours GiB: peak of the op (weights and input included); '<' = below an earlier op's peak in the same "
              "process, so only an upper bound; est GiB: jax_impl.vae_memory's estimate plus weights and input")
        if result["quality"]:
            print(f"\ndecoded-frame quality (same latents, same weights; {QUALITY_FRAMES} evenly spaced frames)")
            print(quality_table(result["quality"]))
        write()
        skipped = sum(f"{op}_skipped" in r.get(i, {}) for r in rows.values() for i in args.impls
                      for op in ("encode", "decode"))
        if skipped:
            print(f"{skipped} op(s) not measured (budget): raise --budget or measure fewer configurations")
        print(f"wrote {args.json}")
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r["key"] for r in rows.values() if any("error" in r.get(i, {}) for i in args.impls)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
