"""`wanport make-tiny`: write a small random-weight checkpoint in the real diffusers layout."""

from __future__ import annotations

import argparse


def _make_tiny(args: argparse.Namespace) -> int:
    from torch_ref.checkpoints import write_tiny_checkpoint

    out = write_tiny_checkpoint(args.preset, args.out, seed=args.seed, max_shard_size=args.shard_size, force=args.force)
    print(f"wrote {args.preset} (seed {args.seed}) to {out}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny",
        help="write a deterministic random-weight checkpoint (diffusers layout)",
        description=(
            "Write OUT/transformer/{config.json,*.safetensors} (and transformer_2/ for two-expert models) plus "
            "OUT/model_index.json, produced by diffusers' own classes from SEED. Any preset works; "
            "full-size presets give full-size random checkpoints (tens of GB for 14B models)."
        ),
        epilog="example: wanport make-tiny --preset tiny-wan2.2-i2v-a14b --out ckpt --shard-size 50KB",
    )
    p.add_argument("--preset", required=True, help="preset name (see `wanport presets`)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--shard-size", default=None, help="split weights into shards of at most this size, e.g. 50KB, 5GB")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_make_tiny)
