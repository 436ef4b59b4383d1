"""`wanport demo`: the whole tiny default end to end on a CPU.

Today: write a tiny random-weight Wan2.1 I2V checkpoint in the diffusers layout, convert it to the Flax
layout, load the converted weights into our Flax model, and write the layer-by-layer parity report
against diffusers. Video generation joins once the VAE and the sampler land.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_PRESET = "tiny-wan2.1-i2v-14b"


def run_demo(out: str | Path, preset: str = DEFAULT_PRESET, seed: int = 0, force: bool = False) -> dict[str, Path]:
    from parity.dit import dit_parity
    from torch_ref.checkpoints import TRANSFORMER_DIRS, write_tiny_checkpoint
    from weights.dit_io import convert_dit

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = write_tiny_checkpoint(preset, out / "checkpoint", seed=seed, force=True)
    print(f"[1/3] wrote tiny {preset} checkpoint (diffusers layout): {ckpt}")
    flax_dirs = []
    for name in TRANSFORMER_DIRS:
        if (ckpt / name).is_dir():
            flax_dirs.append(convert_dit(ckpt / name, out / "flax" / name, to="flax", force=True))
    print(f"[2/3] converted to the Flax layout: {out / 'flax'}")
    reports = {}
    for name in TRANSFORMER_DIRS:
        if (ckpt / name).is_dir():
            report = dit_parity(ckpt / name, seed=seed)
            path = out / f"parity_{name}.json"
            report.write_json(path)
            (out / f"parity_{name}.txt").write_text(report.table() + "\n")
            reports[name] = report
            print(report.table())
    ok = all(r.passed for r in reports.values())
    print(f"[3/3] parity report(s): {', '.join(str(out / f'parity_{n}.json') for n in reports)}")
    print(f"done in {time.perf_counter() - t0:.1f} s; parity {'PASSED' if ok else 'FAILED'}")
    return {"checkpoint": ckpt, "flax": out / "flax", "report": out / "parity_transformer.json", "passed": ok}


def _demo(args: argparse.Namespace) -> int:
    result = run_demo(args.out, args.preset, args.seed, args.force)
    return 0 if result["passed"] else 1


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the tiny default end to end (checkpoint, conversion, parity report)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="wanport-demo", help="output folder (default wanport-demo)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"tiny preset to use (default {DEFAULT_PRESET})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="reuse OUT if it exists")
    p.set_defaults(func=_demo)
