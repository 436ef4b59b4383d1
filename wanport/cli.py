"""`wanport`: one command, one module per subcommand (`wanport.commands`).

The command modules define their options with light imports only; each imports jax, torch and the models
inside its `run`, so `wanport --help` and `wanport presets` answer at once (measured on the 2-core CI machine:
10.7 s with the commands' heavy imports at module level, 0.2 s without; tests/test_cli.py checks that
`--help` leaves jax, flax and torch unimported). Errors from bad input are one
line and exit code 2, Ctrl-C one line and exit code 130, here for every subcommand. The library's log lines
(`wanport.*` loggers at INFO: what a checkpoint was opened as, what its hook set aside, LoRA keys skipped) go
to stdout with the commands' own progress lines, so stderr keeps holding the one error line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jax_impl.runtime import configure_xla
from wanport.commands import analyze, convert, convert_lora, demo, generate, make_tiny, parity, presets
from wanport.commands import compile as compile_tpu

EPILOG = """\
examples:
  wanport presets                                     # list model presets
  wanport make-tiny --preset tiny-wan2.1-i2v-14b --out ckpt
  wanport parity --model dit --preset tiny-wan2.1-t2v-1.3b --json report.json
  wanport parity --model dit --checkpoint ckpt/transformer --dtype bfloat16
  wanport generate --checkpoint ckpt --image cat.png --prompt "a cat" --out cat.mp4
  wanport generate --checkpoint a14b --image cat.png --prompt "a cat" --lora high.safetensors:0.8 \
      --lora-2 low.safetensors --timesteps 1000,750,500,250 --shift 5 --guidance 1 --out fast.mp4
  wanport convert-lora lora.safetensors lora-diffusers.safetensors --to diffusers
  wanport demo --out wanport-demo                     # the whole tiny default end to end
  wanport analyze truncation --out trunc --cut 0,5,10  # CFG per step (analyze cfg), guidance truncation
  wanport compile --target v5p-8 --preset wan2.2-i2v-a14b --size 720x1280 --frames 81  # TPU memory, no TPU
"""

COMMANDS = (presets, make_tiny, parity, convert, convert_lora, generate, demo, analyze, compile_tpu)  # in `wanport --help` order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wanport",
        description="Run Wan video diffusion models in PyTorch and JAX/Flax and prove they agree layer by layer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


class _Stdout(logging.Handler):
    """Log records as plain lines on the current stdout (looked up per record, so captured output sees them)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stdout, flush=True)


def show_logs() -> None:
    """`wanport.*` INFO log lines on stdout (once, however often `main` runs in one process)."""
    log = logging.getLogger("wanport")
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        log.addHandler(_Stdout())
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    configure_xla()
    show_logs()
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
