"""Where our VAE's first call goes on a GPU: lowering, XLA compile (or a persistent-cache load), the first run,
the steady run, and how many programs were compiled on the way. bench/vae.py's matrix (16 configurations) did
not fit a 10-minute call because of this first-call cost; run this twice with the same --cache to see what a
warm compilation cache and autotune cache leave.

  python bench/vae_startup.py --cache /tmp/c --autotune-cache /tmp/a --json first.json    # cold
  python bench/vae_startup.py --cache /tmp/c --autotune-cache /tmp/a --json second.json   # same caches
  python bench/vae_startup.py --tiny                                                       # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _CompileCounter(logging.Handler):
    """Counts JAX's "Finished XLA compilation" log lines (jax_log_compiles), i.e. programs compiled (cache misses)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.compiled: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "Finished XLA compilation of" in msg:
            self.compiled.append(msg.split("Finished XLA compilation of", 1)[1].split(" in ")[0].strip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="wan2.1")
    ap.add_argument("--size", default="480x832")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--op", default="decode", choices=("encode", "decode"))
    ap.add_argument("--tile", default="off", choices=("off", "on"))
    ap.add_argument("--cache", help="JAX persistent compilation cache folder")
    ap.add_argument("--autotune-cache", help="XLA per-fusion autotune cache folder (xla_gpu_per_fusion_autotune_cache_dir)")
    ap.add_argument("--autotune-level", type=int, help="xla_gpu_autotune_level (XLA's default: 4)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    flags = []
    if args.autotune_cache:
        flags.append(f"--xla_gpu_per_fusion_autotune_cache_dir={args.autotune_cache}")
    if args.autotune_level is not None:
        flags.append(f"--xla_gpu_autotune_level={args.autotune_level}")
    if flags:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    t_import = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_impl.runtime import configure_xla

    configure_xla()
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    counter = _CompileCounter()
    jax.config.update("jax_log_compiles", True)
    for name in ("jax._src.interpreters.pxla", "jax._src.dispatch", "jax"):
        logging.getLogger(name).addHandler(counter)
    from flax import nnx

    from jax_impl import vae_run
    from jax_impl.vae import WanVAE, chunk_bounds, step_table
    from weights.configs.vae import get_vae_preset

    res: dict = {"args": vars(args), "xla_flags": os.environ.get("XLA_FLAGS", ""), "import_s": time.perf_counter() - t_import}
    cfg = get_vae_preset(("tiny-" if args.tiny else "") + args.variant)
    h, w = (48, 64) if args.tiny else (int(v) for v in args.size.split("x"))
    frames = 5 if args.tiny else args.frames
    dtype = jnp.dtype(args.dtype)
    t = time.perf_counter()
    model = WanVAE(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    res["build_s"] = time.perf_counter() - t
    if args.op == "decode":
        f, lh, lw, z = cfg.latent_shape(frames, h, w)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((1, f, lh, lw, z)), dtype)
    else:
        x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, frames, h, w, 3)), dtype)
    call = (lambda: vae_run.decode(model, x, tile=args.tile)) if args.op == "decode" else \
        (lambda: vae_run.encode(model, x, tile=args.tile))
    if args.tile == "off":  # the two chunk steps, compiled ahead of the run (what bench/vae.py's compile phase does)
        graphdef, state = nnx.split(model)
        table = step_table(graphdef, args.op, False)
        caches = None
        for i, (a, b) in enumerate(chunk_bounds(args.op, x.shape[1])[:2]):
            xs = jax.ShapeDtypeStruct((1, b - a, *x.shape[2:]), dtype)
            t = time.perf_counter()
            table.jitted.lower(state, xs, caches)
            res[f"step{i}_lower_s"] = time.perf_counter() - t
            t = time.perf_counter()
            compiled = table.get(state, xs, caches)  # lowers again, then compiles or loads from the cache
            res[f"step{i}_lower_compile_s"] = time.perf_counter() - t
            caches = compiled.out_info[1]
    for name in ("first", "second", "third"):
        t = time.perf_counter()
        jax.block_until_ready(call())
        res[f"{name}_s"] = time.perf_counter() - t
        res[f"compiled_after_{name}"] = len(counter.compiled)
    res["compiled"] = counter.compiled[:60]
    print(json.dumps({k: v for k, v in res.items() if k != "compiled"}, indent=1, default=str))
    print(f"{len(counter.compiled)} programs compiled; first 20: {counter.compiled[:20]}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
