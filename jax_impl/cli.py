"""`wanport`: one command, with subcommands contributed by each package.

Heavy imports (torch, jax) happen inside the subcommands, so `wanport --help` and `wanport presets`
answer instantly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

EPILOG = """\
examples:
  wanport presets                                     # list model presets
  wanport make-tiny --preset tiny-wan2.1-i2v-14b --out ckpt
  wanport parity --model dit --preset tiny-wan2.1-t2v-1.3b --json report.json
  wanport parity --model dit --checkpoint ckpt/transformer --dtype bfloat16
  wanport generate --checkpoint ckpt --image cat.png --prompt "a cat" --out cat.mp4
  wanport demo --out wanport-demo                     # the whole tiny default end to end
  wanport analyze truncation --out trunc --cut 0,5,10  # CFG per step (analyze cfg), guidance truncation
  wanport compile --target v5p-8 --preset wan2.2-i2v-a14b --size 720x1280 --frames 81  # TPU memory, no TPU
"""

# Packages that contribute subcommands through `add_subcommands(subparsers)`.
SUBCOMMAND_MODULES = (
    "jax_impl.cli", "torch_ref.cli", "parity.cli", "weights.cli", "jax_impl.generate", "jax_impl.demo",
    "parity.analyze_cli", "jax_impl.tpu_compile_cli",
)


def _presets(args: argparse.Namespace) -> int:
    from jax_impl.presets import PRESETS

    for name, p in PRESETS.items():
        print(f"{name:<26} {p.description}" if args.verbose else name)
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the model presets, one per line", description="List preset names.")
    p.add_argument("-v", "--verbose", action="store_true", help="also print a one-line description")
    p.set_defaults(func=_presets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wanport",
        description="Run Wan video diffusion models in PyTorch and JAX/Flax and prove they agree layer by layer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a part not built yet: its subcommands simply do not exist
                continue
            raise
        module.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jax_impl.runtime import configure_xla

    configure_xla()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C: every writer has removed its temporary files on the way out (they clean up on any
        # exception, KeyboardInterrupt included); one line, and the conventional exit code 128 + SIGINT.
        print(f"wanport {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError) as e:
        # Bad input (or an unusable file): the message names the problem and the fix; no traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"wanport {args.command}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
