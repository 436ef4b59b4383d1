"""`wanport compile`: compile a preset for a TPU slice on this host (no TPU needed) and report its memory.

Compiles, with abstract arguments only (no weights are created), the guided denoising step (CFG batch
of 2, FSDP weights + context-parallel tokens over every device of the slice, Splash attention) and the
VAE decode chunk steps for the named TPU slice, and prints per-device argument / output / temporary /
peak bytes against the chip's HBM, FLOPs, compile time, whether it fits, and a roofline ESTIMATE of
the step time. Needs libtpu: pip install -e '.[tpu]'.

examples:
  wanport compile --target v5p-8 --preset wan2.2-i2v-a14b --size 720x1280 --frames 81 --json a14b.json
  wanport compile --target v6e-8 --preset wan2.1-t2v-1.3b --size 480x832 --frames 81
  wanport compile --target v5e-16 --preset wan2.2-i2v-a14b --size 480x832 --no-vae

Slice names: v5p-N and v7x-N count TensorCores (2 per chip: v5p-8 is 4 chips); v5e-N and v6e-N count
chips. The logic lives in jax_impl/tpu_compile.py.
"""

# CLI glue only; everything else is in jax_impl/tpu_compile.py.

from __future__ import annotations

import argparse
import json
import os
import sys

from weights.atomic import atomic_write


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size wants HEIGHTxWIDTH in pixels, e.g. 720x1280; got {text!r}")
    return h, w


def run(args: argparse.Namespace) -> int:
    """Compile what `args` names, print the table, write the JSON; 2 with the reason if libtpu is missing."""
    from jax_impl import tpu_compile as tc  # lazy: `wanport --help` must not start jax

    target = tc.parse_target(args.target)  # name errors before anything heavy starts
    video = tc.Video(args.preset.lower(), *args.size, args.frames)
    video.check()
    reason = tc.libtpu_available()
    if not reason and args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        reason = f"--json {args.json}: its folder does not exist (create it first)"
    if reason:
        print(f"wanport compile: error: {reason}", file=sys.stderr)
        return 2
    try:
        report = tc.compile_report(target, video.preset, video.height, video.width, video.frames,
                                   text_len=args.text_len, vae_dtype=args.vae_dtype, vae_tile=args.vae_tile,
                                   steps=args.steps, vae=not args.no_vae)
    except Exception as e:  # XLA refuses to compile a program that cannot fit the device's HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"wanport compile: does NOT fit {target.name}: {str(e).splitlines()[0]}\n"
              f"try a larger slice (e.g. {tc.target_names(target.chip.generation)[-4]})", file=sys.stderr)
        return 1
    print(tc.format_table(report))
    if args.json:
        with atomic_write(args.json, "w", encoding="utf-8") as f:
            json.dump(report.as_dict(), f, indent=2)
        print(f"wrote {args.json}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `compile` to the `wanport` subcommands."""
    p = sub.add_parser("compile", help="compile a preset for a TPU slice here (no TPU) and report per-chip memory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, metavar="SLICE", help="TPU slice: v5p-8, v5p-16, v5e-8, v6e-8, v7x-8, ...")
    p.add_argument("--preset", required=True, help="model preset (see `wanport presets`)")
    p.add_argument("--size", type=_parse_size, default=(720, 1280), metavar="HxW",
                   help="video height x width in pixels (default 720x1280)")
    p.add_argument("--frames", type=int, default=81, help="video frames, 4k+1 (default 81)")
    p.add_argument("--text-len", type=int, default=512, help="text tokens (default 512, as the pipelines pad)")
    p.add_argument("--steps", type=int, default=40, help="sampling steps for the time estimate (default 40)")
    p.add_argument("--vae-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="VAE dtype (default float32, the pipeline's default)")
    p.add_argument("--vae-tile", choices=["auto", "on", "off"], default="auto",
                   help="VAE decode in diffusers' spatial tiles: auto (default) when whole frames do not fit a device")
    p.add_argument("--no-vae", action="store_true", help="compile the denoising step only")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON here")
    p.set_defaults(func=run)

