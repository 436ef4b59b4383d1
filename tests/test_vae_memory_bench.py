"""Decode memory is flat in the number of frames; the benchmark runs on CPU with --tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_DECODE = textwrap.dedent(
    """
    import resource, sys
    import jax, jax.numpy as jnp
    from flax import nnx
    from jax_impl.vae import WanVAE
    from jax_impl.vae_config import TINY_WAN21_VAE
    frames = int(sys.argv[1])
    m = WanVAE(TINY_WAN21_VAE, rngs=nnx.Rngs(0))
    z = jnp.ones((1, (frames - 1) // 4 + 1, 8, 8, 16)) * 0.1   # 64x64 pixels
    jax.block_until_ready(m.decode(z[:, :2]))  # compile both chunk steps first
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = jax.block_until_ready(m.decode(z))
    assert out.shape == (1, frames, 64, 64, 3), out.shape
    print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def _rss_growth_kib(frames: int) -> int:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _DECODE, str(frames)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    base, peak = map(int, r.stdout.split()[-2:])
    return peak - base


def test_decode_peak_memory_flat_in_frames():
    """81 frames may only add the output video itself (64 more frames x 64x64x3 fp32 = 3 MiB) plus slack.

    A decode that materialised every frame's activations at once would add >80 MiB here.
    """
    g17, g81 = _rss_growth_kib(17), _rss_growth_kib(81)
    output_kib = 64 * 64 * 64 * 3 * 4 // 1024
    assert g81 - g17 < output_kib + 16 * 1024, (g17, g81)


def test_bench_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "bench/vae.py", "--tiny", "--dtypes", "float32", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "jax/torch" in r.stdout
    data = json.loads(out.read_text())
    row = data["rows"][0]
    assert data["tiny"] is True and row["dtype"] == "float32"
    assert row["jax_decode_s"] > 0 and row["torch_decode_s"] > 0 and row["decode_ratio"] > 0
