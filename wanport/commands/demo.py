"""`wanport demo`: the whole tiny default end to end on a CPU, in about a minute.

  1. write a tiny random-weight Wan2.1 I2V pipeline in the diffusers layout (transformer, VAE, UMT5 and
     CLIP encoders, tokenizer, scheduler), as no model hub is reachable
  2. convert the pipeline folder to the Flax layout (`wanport convert`)
  3. write the layer-by-layer parity report of the DiT against diffusers (JSON + table)
  4. generate a short video from the bundled image with the JAX pipeline on the converted folder (mp4)

The weights are random, so the video is coloured noise shaped by the image: it shows the machinery runs
end to end, not what a trained model makes.

With --fantasyworld it runs FantasyWorld instead (video + depth, point cloud and cameras along a camera path):
  1. write a tiny random FantasyWorld checkpoint (`wanport make-tiny --fantasyworld`)
  2. generate 9 frames of 48x64 along the bundled trajectory (wanport/assets/fantasyworld_dolly_9.json):
     video.mp4, video_depth.npy, video_depth_conf.npy, video.ply, video_cameras.json
The models are tiny, so the run is all compilation; it asks XLA for less optimisation
(--xla_backend_optimization_level=0), which halves the compile time. Its parity report is a separate
command: `python -m parity.fantasyworld --heads`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from jax_impl.settings import GenerateSettings
from weights.convert import convert

DEFAULT_PRESET = "tiny-wan2.1-i2v-14b"
DEMO_FRAMES, DEMO_SIZE, DEMO_STEPS = 17, 64, 10
DEMO_IMAGE = Path(__file__).parents[1] / "assets" / "beach.png"
DEMO_TRAJECTORY = Path(__file__).parents[1] / "assets" / "fantasyworld_dolly_9.json"
DEMO_PROMPT = "a calm beach at sunset, waves rolling in, camera slowly panning"


def run_demo(out: str | Path, preset: str = DEFAULT_PRESET, seed: int = 0, force: bool = False, *,
             frames: int = DEMO_FRAMES, size: int = DEMO_SIZE, steps: int = DEMO_STEPS) -> dict[str, Any]:
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


def run_fantasyworld_demo(out: str | Path, seed: int = 0, force: bool = False, *, steps: int = DEMO_STEPS) -> dict[str, Any]:
    """The tiny FantasyWorld checkpoint, then one run along the bundled 9-frame trajectory, into `out`."""
    from jax_impl.fantasyworld.pipeline import default_settings, generate_fantasyworld
    from torch_ref.fantasyworld.checkpoint import write_tiny_fantasyworld_pipeline
    from weights.configs.fantasyworld import FantasyWorldConfig

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = FantasyWorldConfig.tiny()
    ckpt = write_tiny_fantasyworld_pipeline(out / "checkpoint", cfg, seed=seed, force=True)
    print(f"[1/2] wrote a tiny random FantasyWorld checkpoint (Wan2.1-I2V pipeline + fantasyworld/): {ckpt}")
    settings = GenerateSettings(**(default_settings(cfg) | {"steps": steps, "seed": seed}))
    result = generate_fantasyworld(ckpt, out / "video.mp4", prompt=DEMO_PROMPT, image_path=DEMO_IMAGE,
                                   camera_path=DEMO_TRAJECTORY, settings=settings, negative_prompt="blurry, low quality",
                                   log=lambda m: print("      " + m))
    paths = result["paths"]
    print(f"[2/2] FantasyWorld run ({result['frames']} frames, {settings.width}x{settings.height}, {steps} steps) "
          f"along {DEMO_TRAJECTORY.name}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    print(f"  video:        {paths.video}")
    print(f"  depth:        {paths.depth} (+ {paths.depth_conf.name})")
    print(f"  point cloud:  {paths.points} ({result['points']} points)")
    print(f"  cameras:      {paths.cameras}")
    print("  parity:       python -m parity.fantasyworld --heads  (Flax vs the torch reference, per layer)")
    return {"checkpoint": ckpt, **dataclasses.asdict(paths), "points": result["points"], "frames": result["frames"]}


def prefer_fast_compile() -> None:
    """Less XLA optimisation for the tiny FantasyWorld run (its time is compilation); only before JAX starts."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


def run(args: argparse.Namespace) -> int:
    if args.fantasyworld:
        for flag in ("frames", "size", "preset"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} does not go with --fantasyworld: its demo runs the tiny FantasyWorld "
                                 "config's 48x64 along the bundled 9-frame trajectory")
        prefer_fast_compile()
        run_fantasyworld_demo(args.out, args.seed, args.force, steps=args.steps)
        return 0
    result = run_demo(args.out, args.preset or DEFAULT_PRESET, args.seed, args.force, frames=args.frames or DEMO_FRAMES,
                      size=args.size or DEMO_SIZE, steps=args.steps)
    return 0 if result["passed"] else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the tiny default end to end (checkpoint, conversion, parity report, video)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="wanport-demo", help="output folder (default wanport-demo)")
    p.add_argument("--preset", default=None, help=f"tiny preset to use (default {DEFAULT_PRESET})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="reuse OUT if it exists")
    p.add_argument("--frames", type=int, default=None, help=f"video frames, 4k+1 (default {DEMO_FRAMES})")
    p.add_argument("--size", type=int, default=None,
                   help=f"video height and width, a multiple of 16 (default {DEMO_SIZE})")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"denoising steps (default {DEMO_STEPS})")
    p.add_argument("--fantasyworld", action="store_true",
                   help="run the tiny FantasyWorld end to end instead: video, depth maps, point cloud (.ply) and "
                        "cameras (JSON) along the bundled 9-frame trajectory")
    p.set_defaults(func=run)
