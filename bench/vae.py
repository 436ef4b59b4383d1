"""Benchmark the Flax Wan VAE against diffusers' AutoencoderKLWan in the same run, same random weights.

Times encode and decode (after one warm-up run that also compiles) for each dtype, with peak device
memory, prints a table with the JAX/torch time ratio and writes JSON. Default: the real Wan2.1 VAE
configuration at 480x832, 81 frames (meant for a GPU). `--tiny` runs a tiny VAE on a tiny video (CPU).

    python bench/vae.py [--tiny] [--variant wan2.1|wan2.2] [--dtypes float32,bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _jax_peak() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def bench(folder: Path, video: np.ndarray, dtype: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from torch_ref.vae import load_vae_torch
    from weights.vae_io import load_vae

    row: dict = {"dtype": dtype}
    model = load_vae(folder, dtype=jnp.dtype(dtype))
    x = jnp.asarray(video, jnp.dtype(dtype))
    z = jax.block_until_ready(model.encode(x))
    row["jax_encode_s"] = _timeit(lambda: jax.block_until_ready(model.encode(x)), repeats)
    row["jax_decode_s"] = _timeit(lambda: jax.block_until_ready(model.decode(z)), repeats)
    row["jax_peak_bytes"] = _jax_peak()
    del model
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tm = load_vae_torch(folder, getattr(torch, dtype)).to(dev)
    tx = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3))).to(dev, getattr(torch, dtype))
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.no_grad():
        tz = tm.encode(tx).latent_dist.mode()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def t_enc():
            tm.encode(tx)
            sync()

        def t_dec():
            tm.decode(tz)
            sync()

        row["torch_encode_s"] = _timeit(t_enc, repeats)
        row["torch_decode_s"] = _timeit(t_dec, repeats)
    row["torch_peak_bytes"] = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    row["encode_ratio"] = row["jax_encode_s"] / row["torch_encode_s"]
    row["decode_ratio"] = row["jax_decode_s"] / row["torch_decode_s"]
    return row


def _mib(b) -> str:
    return f"{b / 2**20:9.0f}" if b else f"{'-':>9}"


def table(rows: list[dict]) -> str:
    head = f"{'dtype':<9} {'op':<7} {'jax s':>9} {'torch s':>9} {'jax/torch':>9} {'jax MiB':>9} {'torch MiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        for op in ("encode", "decode"):
            lines.append(
                f"{r['dtype']:<9} {op:<7} {r[f'jax_{op}_s']:>9.3f} {r[f'torch_{op}_s']:>9.3f} {r[f'{op}_ratio']:>9.2f} "
                f"{_mib(r['jax_peak_bytes'])} {_mib(r['torch_peak_bytes'])}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny VAE and video, for CPU smoke runs")
    ap.add_argument("--variant", default="wan2.1", choices=("wan2.1", "wan2.2"))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench_vae.json")
    args = ap.parse_args(argv)

    import jax

    from jax_impl.vae_config import get_vae_preset
    from parity.vae import make_video
    from torch_ref.vae import write_vae_folder

    cfg = get_vae_preset(("tiny-" if args.tiny else "") + args.variant)
    frames = args.frames or (5 if args.tiny else 81)
    height = args.height or (2 * cfg.spatial_factor if args.tiny else 480)
    width = args.width or (2 * cfg.spatial_factor if args.tiny else 832)
    repeats = args.repeats or (1 if args.tiny else 2)
    video = make_video(cfg, frames=frames, height=height, width=width, seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_vae_folder(cfg, Path(tmp) / "vae", seed=args.seed)
        for dtype in args.dtypes.split(","):
            rows.append(bench(folder, video, dtype.strip(), repeats))
    result = {
        "variant": args.variant,
        "tiny": args.tiny,
        "video_shape": list(video.shape),
        "jax_device": str(jax.devices()[0]),
        "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": rows,
    }
    print(f"Wan VAE ({args.variant}{', tiny' if args.tiny else ''}) video {list(video.shape)} on {result['jax_device']}")
    print(table(rows))
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
