"""Process-wide XLA settings that make the Wan models faster on NVIDIA GPUs; call before JAX starts.

XLA reads `XLA_FLAGS` once, when the first JAX backend initialises, so these are set by the entry
points (the `wanport` command, the bench scripts) rather than by library code. Flags the user has
already set win. Measured on an H100 (bench/results/): routing the matmuls to cuBLAS instead of XLA's
Triton GEMMs made the Wan2.1-1.3B forward 3.8% faster; the A14B expert is unaffected or slightly faster.
"""

from __future__ import annotations

import os
import sys
import warnings

GPU_FLAGS = {"--xla_gpu_enable_triton_gemm": "false"}


def configure_xla(env: dict[str, str] | None = None) -> str:
    """Add GPU_FLAGS to XLA_FLAGS (keeping any flag the user set) and return the new value.

    The flags are GPU-only and harmless elsewhere. Warns if JAX has already started a backend.
    """
    env = os.environ if env is None else env
    current = env.get("XLA_FLAGS", "")
    present = {part.split("=", 1)[0] for part in current.split()}
    extra = [f"{k}={v}" for k, v in GPU_FLAGS.items() if k not in present]
    if extra:
        env["XLA_FLAGS"] = " ".join([current, *extra]).strip()
        jax = sys.modules.get("jax")
        if jax is not None and _backend_started(jax):
            warnings.warn("configure_xla() called after JAX started; the GPU flags apply to new processes only")
    return env.get("XLA_FLAGS", "")


def _backend_started(jax) -> bool:
    try:
        from jax._src import xla_bridge

        # Only a started GPU backend matters: the flags do nothing on CPU.
        return any(name != "cpu" for name in getattr(xla_bridge, "_backends", {}))
    except Exception:
        return False
