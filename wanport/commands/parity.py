"""`wanport parity`: layer-by-layer comparison against diffusers, as a table and JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

MODELS = ("dit", "vae", "text-encoder", "image-encoder")


def _check_sizes(args: argparse.Namespace) -> None:
    """Every size option a positive integer, named by its flag (0 is refused, never replaced by a default)."""
    for name in ("batch", "frames", "height", "width", "text_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.model == "vae" and args.text_len is not None:
        raise ValueError("--text-len applies to --model dit only")


def _model_folder(path: Path, model: str) -> Path:
    """The model folder behind --checkpoint; a pipeline folder is refused with the subfolders to pass."""
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path} is not a folder")
    if (path / "model_index.json").is_file():
        subs = ["transformer", "transformer_2"] if model == "dit" else ["vae"]
        found = [str(path / s) for s in subs if (path / s).is_dir()]
        raise ValueError(f"--checkpoint {path} is a pipeline folder; pass one of its model folders: "
                         f"{', '.join(found) or 'none found'}")
    return path


def run(args: argparse.Namespace) -> int:
    # lazy: `wanport --help` must not start jax and torch (measured: 10.7 s -> 0.2 s)
    from parity import encoders, vae
    from parity.dit import folder_parity, preset_parity
    from weights.checkpoint import Checkpoint
    from weights.vae_map import VAE

    if args.model not in MODELS:
        raise ValueError(f"--model {args.model} is not available; choose from {', '.join(MODELS)}")
    if (args.preset is None) == (args.checkpoint is None):
        raise ValueError("give exactly one of --preset (a fresh tiny checkpoint) or --checkpoint DIR")
    _check_sizes(args)
    if args.model in ("text-encoder", "image-encoder"):
        common = dict(dtype=args.dtype, seed=args.seed, batch=args.batch, text_len=args.text_len)
        if args.preset:
            report = encoders.preset_parity(args.model, args.preset, **common)
        else:
            report = encoders.model_parity(args.model, args.checkpoint, **common)
    elif args.model == "vae":
        folder = _model_folder(Path(args.checkpoint), args.model) if args.checkpoint else None
        shape = dict(batch=args.batch, frames=5 if args.frames is None else args.frames, height=args.height,
                     width=args.width)
        if args.preset:
            report = vae.preset_parity(args.preset, dtype=args.dtype, seed=args.seed, **shape)
        else:
            layout = Checkpoint(folder, VAE).layout
            if layout != "diffusers":
                raise ValueError(f"--checkpoint {folder} holds a {layout}-layout VAE; diffusers reads only its own "
                                 "layout (wanport convert copies VAEs unchanged: use the original vae/ folder)")
            report = vae.vae_parity(folder, dtype=args.dtype, seed=args.seed, **shape)
    else:
        folder = _model_folder(Path(args.checkpoint), args.model) if args.checkpoint else None
        if args.prompt_len is not None and (args.prompt_len < 1 or (args.text_len and args.prompt_len > args.text_len)):
            raise ValueError(f"--prompt-len {args.prompt_len} must be between 1 and the text length (--text-len)")

        shape = dict(batch=args.batch, frames=2 if args.frames is None else args.frames,
                     height=8 if args.height is None else args.height, width=8 if args.width is None else args.width,
                     text_len=args.text_len, prompt_len=args.prompt_len)
        common = dict(dtype=args.dtype, attention_backend=args.attention)
        if args.preset:
            report = preset_parity(args.preset, seed=args.seed, **common, **shape)
        else:
            report = folder_parity(folder, seed=args.seed, **common, **shape)
    print(report.table())
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return 0 if report.passed else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity",
        help="compare our JAX model with diffusers layer by layer",
        description=(
            "Load the same weights into diffusers (PyTorch) and into our Flax model, run both on identical "
            "random inputs, and report max abs error, relative L2 error and cosine similarity for every captured "
            "layer, and the first layer past tolerance. float32: rel L2 <= 1e-5 per layer. bfloat16: the tolerance "
            "is measured: our error against diffusers-fp32 must be <= 2x diffusers-bf16's own error. "
            "Exit code 0 when parity holds, 1 when it fails, 2 on bad input."
        ),
        epilog=(
            "examples:\n  wanport parity --model dit --preset tiny-wan2.1-i2v-14b\n"
            "  wanport parity --model dit --checkpoint ckpt/transformer --dtype bfloat16 --json report.json\n"
            "  wanport parity --preset tiny-hd128-wan2.1-i2v-14b --batch 2 --frames 3 --height 10 --width 14 --prompt-len 9\n"
            "  wanport parity --model vae --preset tiny-wan2.2 --frames 9\n"
            "  wanport parity --model text-encoder --preset odd --batch 2 --text-len 300\n"
            "  wanport parity --model image-encoder --checkpoint Wan2.1-I2V-14B-480P-Diffusers --dtype bfloat16"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="dit", choices=MODELS,
                   help="the transformer (dit, default), the VAE (vae), UMT5 (text-encoder) or CLIP (image-encoder)")
    p.add_argument(
        "--preset",
        help="write a random-weight checkpoint of this preset to a temp folder and use it "
        "(dit: see `wanport presets`; vae: tiny-wan2.1, tiny-wan2.2, wan2.1, wan2.2; text-encoder, image-encoder: "
        "tiny, odd)",
    )
    p.add_argument("--checkpoint", help="a model folder (config.json + safetensors), e.g. ckpt/transformer or ckpt/vae; "
                   "DiT folders in any layout `wanport convert` writes (diffusers, wan, flax); for the encoders also "
                   "a pipeline folder (its text_encoder/ or image_encoder/ is used)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--attention", default="xla", help="attention back-end of our model (default xla)")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--seed", type=int, default=0, help="seed of weights (with --preset) and inputs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=None, help="dit: latent frames (default 2); vae: video frames, 4k+1 (default 5)")
    p.add_argument("--height", type=int, default=None, help="dit: latent height (default 8); vae: pixels (default 2 latents)")
    p.add_argument("--width", type=int, default=None, help="dit: latent width (default 8); vae: pixels (default 2 latents)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (dit: default 16, 512 for Wan2.1 I2V; text-encoder: 64)")
    p.add_argument(
        "--prompt-len", type=int, default=None,
        help="dit: zero the text rows past this many tokens, as the pipelines pad a short prompt (default: none zeroed)",
    )
    p.set_defaults(func=run)

