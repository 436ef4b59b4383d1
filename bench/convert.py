"""Benchmark `wanport convert` on a full-size random-weight checkpoint: seconds, GB/s, peak RSS.

The source checkpoint is streamed straight into safetensors (no torch model is built, nothing is
held in RAM), then converted in a fresh subprocess whose peak resident set (VmHWM / ru_maxrss) is the
number that matters: it must stay near the largest tensor, far below the checkpoint size.

    python bench/convert.py                 # Wan2.1-T2V-1.3B, float32, diffusers -> flax
    python bench/convert.py --a14b          # one Wan2.2-A14B expert (bf16, ~28.6 GB on disk)
    python bench/convert.py --tiny --json out.json   # seconds; keeps this script working in CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weights.configs.presets import get_preset  # noqa: E402
from weights.dit_map import dit_entries  # noqa: E402
from weights.safetensors_io import TensorSpec, write_safetensors  # noqa: E402

# Runs in the child: convert, then report time and peak memory of this process only.
_CHILD = r"""
import json, resource, sys, time
from weights.convert import convert
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = hwm()
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], sys.argv[3], dtype=(sys.argv[4] or None))
secs = time.perf_counter() - t
print(json.dumps({"seconds": secs, "peak_rss": hwm(), "rss_after_imports": base,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_random_checkpoint(folder: Path, preset: str, dtype: str, seed: int = 0) -> int:
    """A diffusers-layout model folder with random weights, written one tensor at a time."""
    import ml_dtypes

    cfg = get_preset(preset).transformer
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    pool = (np.random.default_rng(seed).standard_normal(1 << 22) * 0.02).astype(np_dtype)  # 4M values, reused
    entries = dit_entries(cfg)
    specs = [TensorSpec(e.diffusers, np_dtype, e.shape) for e in entries]
    shapes = {e.diffusers: e.shape for e in entries}

    def produce(name: str) -> np.ndarray:
        n = int(np.prod(shapes[name], dtype=np.int64))
        return np.resize(pool, n).reshape(shapes[name])

    write_safetensors(folder / "diffusion_pytorch_model.safetensors", specs, produce, metadata={"format": "pt"})
    return sum(int(np.prod(s.shape, dtype=np.int64)) * np_dtype.itemsize for s in specs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny model (seconds; for tests)")
    size.add_argument("--a14b", action="store_true", help="one Wan2.2-A14B expert instead of Wan2.1-T2V-1.3B")
    p.add_argument("--src-dtype", choices=("float32", "bfloat16"), help="dtype of the random source (default: float32, bf16 for --a14b)")
    p.add_argument("--to", default="flax", choices=("flax", "wan", "diffusers"))
    p.add_argument("--cast", choices=("float32", "bfloat16"), help="also cast during conversion (--dtype of convert)")
    p.add_argument("--workdir", help="where to write the checkpoints (default: a temp folder under /tmp)")
    p.add_argument("--verify", action="store_true", help="also time `convert --verify` on the output")
    p.add_argument("--keep", action="store_true", help="keep the files (deleted by default)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    preset = "tiny-wan2.1-t2v-1.3b" if args.tiny else "wan2.2-i2v-a14b" if args.a14b else "wan2.1-t2v-1.3b"
    src_dtype = args.src_dtype or ("bfloat16" if args.a14b else "float32")
    work = Path(tempfile.mkdtemp(prefix="wanport-bench-", dir=args.workdir))
    try:
        src, dst = work / "src", work / "dst"
        t = time.perf_counter()
        nbytes = write_random_checkpoint(src, preset, src_dtype)
        gen_s = time.perf_counter() - t
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(src), str(dst), args.to, args.cast or ""],
            capture_output=True, text=True, env=env, check=False,
        )
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        child = json.loads(out.stdout.strip().splitlines()[-1])
        result = {
            "preset": preset,
            "source_dtype": src_dtype,
            "direction": f"diffusers -> {args.to}",
            "cast": args.cast,
            "checkpoint_bytes": nbytes,
            "largest_tensor_bytes": max(
                int(np.prod(e.shape, dtype=np.int64)) for e in dit_entries(get_preset(preset).transformer)
            ) * (2 if src_dtype == "bfloat16" else 4),
            "generate_seconds": gen_s,
            "convert_seconds": child["seconds"],
            "convert_gb_per_s": nbytes / child["seconds"] / 1e9,
            "peak_rss_bytes": child["peak_rss"],
            "rss_after_imports_bytes": child["rss_after_imports"],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
            "note": "source written just before, so largely in the page cache (warm read)",
        }
        if args.verify:
            from weights.manifest import verify

            t = time.perf_counter()
            problems = verify(dst)
            result["verify_seconds"] = time.perf_counter() - t
            result["verify_ok"] = not problems
        rows = [
            ("model", f"{preset} ({src_dtype}), {result['direction']}"),
            ("checkpoint", f"{nbytes / 1e9:.3f} GB, largest tensor {result['largest_tensor_bytes'] / 1e6:.1f} MB"),
            ("write random source", f"{gen_s:.2f} s"),
            ("convert", f"{child['seconds']:.2f} s, {result['convert_gb_per_s']:.3f} GB/s"),
            ("peak RSS (convert)", f"{child['peak_rss'] / 2**20:.0f} MiB (after imports: {child['rss_after_imports'] / 2**20:.0f} MiB)"),
            ("machine", result["machine"]),
        ]
        if args.verify:
            rows.append(("verify", f"{result['verify_seconds']:.2f} s, {'OK' if result['verify_ok'] else 'MISMATCH'}"))
        w = max(len(r[0]) for r in rows)
        for k, v in rows:
            print(f"{k:<{w}}  {v}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
