"""`wanport demo`: the whole tiny default end to end on a CPU, in about a minute.

  1. write a tiny random-weight Wan2.1 I2V pipeline in the diffusers layout (transformer, VAE, UMT5 and
     CLIP encoders, tokenizer, scheduler), as no model hub is reachable
  2. convert the pipeline folder to the Flax layout (`wanport convert`)
  3. write the layer-by-layer parity report of the DiT against diffusers (JSON + table)
  4. generate a short video from the bundled image with the JAX pipeline on the converted folder (mp4)

The weights are random, so the video is coloured noise shaped by the image: it shows the machinery runs
end to end, not what a trained model makes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from jax_impl.settings import GenerateSettings
from weights.convert import convert

DEFAULT_PRESET = "tiny-wan2.1-i2v-14b"
DEMO_IMAGE = Path(__file__).parents[1] / "assets" / "beach.png"
DEMO_PROMPT = "a calm beach at sunset, waves rolling in, camera slowly panning"


def run_demo(out: str | Path, preset: str = DEFAULT_PRESET, seed: int = 0, force: bool = False, *,
             frames: int = 17, size: int = 64, steps: int = 10) -> dict[str, Any]:
    # lazy: `wanport --help` must not start jax and torch (measured: 10.7 s -> 0.2 s)
    from jax_impl.pipeline import generate
    from parity.dit import dit_parity
    from torch_ref.checkpoints import TRANSFORMER_DIRS, write_tiny_checkpoint

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = write_tiny_checkpoint(preset, out / "checkpoint", seed=seed, force=True)
    print(f"[1/4] wrote tiny {preset} pipeline (diffusers layout): {ckpt}")
    flax = convert(ckpt, out / "flax", to="flax", force=True)
    print(f"[2/4] converted the pipeline to the Flax layout: {flax}")
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
    print(f"[3/4] parity report(s): {', '.join(str(out / f'parity_{n}.json') for n in reports)}")
    settings = GenerateSettings(frames=frames, height=size, width=size, steps=steps, guidance=5.0, seed=seed)
    video = generate(flax, out / "video.mp4", prompt=DEMO_PROMPT, image_path=DEMO_IMAGE, settings=settings,
                     negative_prompt="blurry, low quality", log=lambda m: print("      " + m))
    print(f"[4/4] video ({video['frames']} frames, {size}x{size}, {settings.fps} fps): {video['video']}")
    print(f"done in {time.perf_counter() - t0:.1f} s; parity {'PASSED' if ok else 'FAILED'}")
    print(f"  video:         {video['video']}")
    print(f"  parity report: {out / 'parity_transformer.txt'} (JSON beside it)")
    return {"checkpoint": ckpt, "flax": flax, "report": out / "parity_transformer.json", "passed": ok,
            "video": video["video"], "frames": video["frames"]}


def run(args: argparse.Namespace) -> int:
    result = run_demo(args.out, args.preset, args.seed, args.force, frames=args.frames, size=args.size,
                      steps=args.steps)
    return 0 if result["passed"] else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the tiny default end to end (checkpoint, conversion, parity report, video)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="wanport-demo", help="output folder (default wanport-demo)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"tiny preset to use (default {DEFAULT_PRESET})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="reuse OUT if it exists")
    p.add_argument("--frames", type=int, default=17, help="video frames, 4k+1 (default 17)")
    p.add_argument("--size", type=int, default=64, help="video height and width, a multiple of 16 (default 64)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    p.set_defaults(func=run)
