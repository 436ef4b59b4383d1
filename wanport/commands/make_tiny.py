"""`wanport make-tiny`: write a small random-weight pipeline folder in the real diffusers layout."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    # lazy: `wanport --help` must not start torch (measured: 10.7 s -> 0.2 s)
    if args.fantasyworld:
        if args.preset is not None or args.shard_size is not None:
            raise ValueError("--fantasyworld writes its own tiny base (tiny-wan2.1-i2v-14b with the FantasyWorld Wan "
                             "shape), unsharded: drop --preset and --shard-size")
        from torch_ref.fantasyworld.checkpoint import write_tiny_fantasyworld_pipeline

        out = write_tiny_fantasyworld_pipeline(args.out, seed=args.seed, force=args.force)
        print(f"wrote a tiny FantasyWorld checkpoint (seed {args.seed}) to {out}: Wan2.1-I2V pipeline + fantasyworld/")
        return 0
    if args.preset is None:
        raise ValueError("give --preset NAME (see `wanport presets`), or --fantasyworld")
    from torch_ref.checkpoints import write_tiny_checkpoint

    out = write_tiny_checkpoint(args.preset, args.out, seed=args.seed, max_shard_size=args.shard_size, force=args.force)
    print(f"wrote {args.preset} (seed {args.seed}) to {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny",
        help="write a deterministic random-weight pipeline folder (diffusers layout)",
        description=(
            "Write a whole pipeline folder: OUT/transformer/ (and transformer_2/ for two-expert models), vae/, "
            "scheduler/, text_encoder/ + tokenizer/ (a 2-layer UMT5 and a small SentencePiece-style vocabulary), "
            "image_encoder/ + image_processor/ (a small CLIP ViT, Wan2.1 I2V only) and model_index.json, produced "
            "by diffusers' and transformers' own classes from SEED, loadable by WanImageToVideoPipeline. Any preset "
            "works; full-size presets give full-size random transformers and VAE (tens of GB for 14B models)."
        ),
        epilog="examples: wanport make-tiny --preset tiny-wan2.2-i2v-a14b --out ckpt --shard-size 50KB; "
               "wanport make-tiny --fantasyworld --out fw (for `wanport generate --fantasyworld`)",
    )
    p.add_argument("--preset", help="preset name (see `wanport presets`); required unless --fantasyworld")
    p.add_argument("--fantasyworld", action="store_true",
                   help="write a tiny FantasyWorld checkpoint instead: the tiny Wan2.1-I2V pipeline with a random "
                        "FantasyWorld model in fantasyworld/ (released key layout; 9 frames of 48x64 by default)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--shard-size", default=None, help="split weights into shards of at most this size, e.g. 50KB, 5GB")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)
