"""`wanport convert-lora`: rewrite a LoRA file in another key layout (diffusers/PEFT, original Wan, ComfyUI).

Only names change: the tensors are written with the bits they were read with (weights/lora_convert.py),
so a round trip through any layouts gives the original tensors back. No jax or torch.
"""

from __future__ import annotations

import argparse

from weights.lora_convert import LORA_LAYOUTS, convert_lora

_EPILOG = """\
layouts written:
  diffusers  transformer.blocks.0.attn1.to_q.lora_A.weight / lora_B.weight, alphas in PEFT metadata
             (what diffusers' load_lora_weights reads); norm/modulation deltas as .diff keys, which
             diffusers refuses (the conversion says so)
  wan        diffusion_model.blocks.0.self_attn.q.lora_down.weight / lora_up.weight + .alpha, .diff,
             .diff_b, modulation as blocks.N.diff_m (LightX2V)
  comfy      as wan, modulation as blocks.N.modulation.diff (ComfyUI's loader)
Read: any of these, and kohya/musubi-tuner (lora_unet_blocks_0_...) files, and PEFT folders.

examples:
  wanport convert-lora lightx2v.safetensors distill-diffusers.safetensors --to diffusers
  wanport convert-lora lora.safetensors lora-comfy.safetensors --to comfy --model ckpt/transformer

Exit codes: 0 done, 2 bad input (unknown keys, shapes that do not fit --model, DST exists without --force).
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-lora", help="rewrite a LoRA in the diffusers, original-Wan or ComfyUI key layout",
        description=__doc__, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="LoRA .safetensors file (or PEFT folder) in any layout wanport reads")
    p.add_argument("dst", metavar="DST", help="output .safetensors file (must not exist unless --force)")
    p.add_argument("--to", required=True, choices=LORA_LAYOUTS, help="output layout")
    p.add_argument("--model", metavar="DIT",
                   help="a DiT folder or single-file checkpoint to check the LoRA against first (module names and "
                        "shapes); default: convert on the names alone")
    p.add_argument("--ignore-missing", action="store_true",
                   help="with --model: drop (and list) keys for modules the model lacks instead of refusing")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weights.single_file import open_dit

    if args.ignore_missing and not args.model:
        raise ValueError("--ignore-missing needs --model (the model whose modules the LoRA keys are checked against)")
    cfg = open_dit(args.model).config if args.model else None
    out = convert_lora(args.src, args.dst, args.to, cfg, force=args.force, ignore_missing=args.ignore_missing,
                       log=print)
    print(f"wrote {out} ({args.to} layout)")
    return 0
