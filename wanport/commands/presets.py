"""`wanport presets`: the model presets, one name per line (with -v, a description each)."""

from __future__ import annotations

import argparse

from weights.configs.presets import PRESETS


def run(args: argparse.Namespace) -> int:
    for name, p in PRESETS.items():
        print(f"{name:<26} {p.description}" if args.verbose else name)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the model presets, one per line", description="List preset names.")
    p.add_argument("-v", "--verbose", action="store_true", help="also print a one-line description")
    p.set_defaults(func=run)
