"""`wanport convert`: the checkpoint converter's command line.

Imports neither jax nor torch (the converter is numpy and safetensors only), which keeps its memory and
start-up small: a 14B expert converts in a couple of hundred MB of RAM.
"""

from __future__ import annotations

import argparse
import sys

from weights.convert import convert, verify
from weights.dit_map import LAYOUTS

_EPILOG = """\
examples:
  # diffusers pipeline folder (model_index.json, transformer/, transformer_2/, vae/ ...) -> Flax
  wanport convert Wan2.2-I2V-A14B-Diffusers wan22-flax --to flax

  # one transformer folder -> original-Wan layout, in 5 GB shards
  wanport convert ckpt/transformer wan-dit --to wan --shard-size 5GB

  # halve the size: cast to bfloat16 (only ever done when asked)
  wanport convert ckpt/transformer dit-bf16 --to diffusers --dtype bfloat16

  # a single-file DiT (ComfyUI / original Wan release) -> a diffusers model folder with its config.json
  wanport convert wan2.1_t2v_1.3B_bf16.safetensors wan-dit --to diffusers

  # FantasyWorld's released model.pth (a pickle: read weights-only) -> Flax; its copies of the base
  # model's text encoder, image encoder and VAE (pipe.text_encoder/image_encoder/vae.*) are set aside
  wanport convert FantasyWorld-Wan2.1-I2V-14B-480P/model.pth fantasyworld-flax --to flax --allow-pickle

  # merge a LoRA (strength 0.8) into the weights; FP8 for --precision fp8 (a LoRA merged first, then quantised)
  wanport convert ckpt merged --to diffusers --lora style.safetensors:0.8
  wanport convert ckpt ckpt-fp8 --to diffusers --dtype float8_e4m3fn --lora distill.safetensors

  # check a converted folder against its wanport_manifest.json (sha256 per file and per tensor)
  wanport convert --verify wan22-flax

The output is written to a temporary folder next to DST and renamed into place only when complete;
the source is never modified and an existing DST is kept unless --force. Every file of the source is
checked first (safetensors headers and sizes, JSON), so a damaged component is refused, not copied. Two
conversions to one DST exclude each other (a lock file .DST.wanport-lock next to it; delete it if no
conversion is running). Without --dtype every tensor keeps its dtype, so converting back reproduces the
original tensors bit for bit. Exit codes: 0 done, 1 --verify found differences, 2 bad input, 130 Ctrl-C.
"""


def add_parser(subparsers) -> None:
    """Register `convert` on an argparse subparsers object (from `parser.add_subparsers()`)."""
    p = subparsers.add_parser(
        "convert",
        help="convert a Wan DiT checkpoint between diffusers, original-Wan and Flax layouts",
        description="Convert a Wan DiT model folder or single file, a whole pipeline folder, or a FantasyWorld "
        "model between the diffusers, original-Wan (for FantasyWorld: the released names) and Flax layouts, "
        "streaming one tensor at a time, with a sha256 manifest.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", nargs="?", metavar="SRC",
                   help="model folder (config.json + weights), pipeline folder (model_index.json), a single-file DiT "
                        "(.safetensors or .safetensors.index.json, e.g. ComfyUI's, or .pth with --allow-pickle; its config "
                        "is read off the shapes), or FantasyWorld's model.pth (alone, or in a folder with its config.json)")
    p.add_argument("dst", nargs="?", metavar="DST", help="output folder (must not exist unless --force)")
    p.add_argument("--to", choices=LAYOUTS, help="output layout")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float8_e4m3fn"),
                   help="cast every tensor (default: keep each tensor's dtype); float8_e4m3fn: the DiT blocks' linear "
                        "weights as FP8 e4m3 with a float32 scale per output channel (scale_weight), everything else "
                        "bfloat16, for `wanport generate --precision fp8` (half the bf16 size)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA at strength SCALE (default 1) into the model folder, or a pipeline's "
                        "transformer/; repeatable. Merged in float32, written in each tensor's dtype (or --dtype)")
    p.add_argument("--lora-2", action="append", default=[], metavar="FILE[:SCALE]",
                   help="as --lora, into a pipeline's transformer_2/ (Wan2.2 A14B low-noise expert)")
    p.add_argument("--shard-size", metavar="SIZE", help="split weights into shards of at most SIZE (e.g. 5GB, 500MB) with an index json")
    p.add_argument("--force", action="store_true", help="replace an existing DST (only once the new output is complete)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin/.pt/.pth weights (read with torch.load(weights_only=True))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verify", metavar="DIR", help="check DIR against its wanport_manifest.json instead of converting")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `convert` (or `convert --verify`); returns the exit code (1: --verify found differences). Bad input
    raises, and `wanport.cli.main` prints it as one line with exit code 2."""
    if args.verify:
        if args.src or args.dst:
            raise ValueError("--verify takes only the folder to check")
        problems = verify(args.verify)
        for line in problems:
            print(f"MISMATCH {line}")
        if problems:
            print(f"{args.verify}: {len(problems)} problem(s) found", file=sys.stderr)
            return 1
        print(f"{args.verify}: OK, every file and tensor matches the manifest")
        return 0
    if not (args.src and args.dst and args.to):
        raise ValueError("convert needs SRC, DST and --to (or --verify DIR); see --help")
    out = convert(args.src, args.dst, args.to, dtype=args.dtype, shard_size=args.shard_size, force=args.force,
                  allow_pickle=args.allow_pickle, progress=not args.no_progress, loras=args.lora, loras_2=args.lora_2)
    print(f"wrote {out} ({args.to} layout)")
    return 0
