"""Decode memory is flat in the number of frames; the benchmark runs on CPU with --tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_DECODE = textwrap.dedent(
    """
    import resource, sys
    import jax, jax.numpy as jnp
    from flax import nnx
    from jax_impl.vae import WanVAE
    from weights.configs.vae import TINY_WAN21_VAE
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


def _bench(tmp_path, *flags: str):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "bench/vae.py", "--tiny", "--variants", "wan2.1", "--frames", "1",
                        "--json", str(out), *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return r, (json.loads(out.read_text()) if out.is_file() else None)


@pytest.mark.slow
def test_bench_tiny_runs_on_cpu(tmp_path):
    """The whole GPU flow on a CPU: a compile process, then measuring processes per implementation, the table,
    the JSON and the bf16-vs-fp32 quality rows."""
    r, data = _bench(tmp_path, "--dtypes", "float32,bfloat16", "--tiling", "off")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "ours/diff" in r.stdout and "bf16 vs fp32" in r.stdout
    assert data["tiny"] is True and [row["dtype"] for row in data["rows"]] == ["float32", "bfloat16"]
    for row in data["rows"]:
        for op in ("encode", "decode"):
            assert row["ours"][f"{op}_s"] > 0 and row["diffusers"][f"{op}_s"] > 0 and row[f"{op}_ratio"] > 0
            est = row["ours"][f"{op}_estimate"]
            assert est["total_bytes"] > est["peak_bytes"] > 0 and est["tiled"] is False
            assert row["ours"][f"{op}_precompiled"] is True  # loaded from the compile phase's cache
    (compile_run,) = data["compile"]
    assert set(compile_run["configs"]) == {row["key"] for row in data["rows"]}
    q = {x["what"]: x for x in data["quality"]}
    assert 20 < q["ours bf16 vs fp32 (whole)"]["psnr_db"] < 90  # bf16 differs from fp32, but not wildly
    assert 20 < q["diffusers bf16 vs fp32 (whole)"]["psnr_db"] < 90
    assert q["ours vs diffusers float32 (whole)"]["psnr_db"] > 100  # same weights, same latents: parity
    assert 0 < q["ours bf16 vs fp32 (whole)"]["ssim"] <= 1


@pytest.mark.slow
def test_bench_failure_keeps_the_other_rows(tmp_path):
    """A configuration that fails in one implementation is reported with its error; the other rows and the
    other implementation still run, the JSON is written and the exit status says something failed.
    (Tiles of 100 pixels are no whole number of latents: ours refuses them; diffusers runs the 48x64 frames
    untiled, as they are smaller than one tile.)"""
    r, data = _bench(tmp_path, "--dtypes", "float32", "--tiling", "off,on", "--tile", "100,20")
    assert r.returncode == 1
    whole, tiled = data["rows"]
    assert "multiples of 8" in tiled["ours"]["error"] and tiled["diffusers"]["decode_s"] > 0
    assert whole["ours"]["decode_s"] > 0 and whole["diffusers"]["decode_s"] > 0
    assert "multiples of 8" in r.stdout


@pytest.mark.slow
def test_bench_budget_records_what_it_could_not_measure(tmp_path):
    """A budget spent before anything ran: every row is still in the JSON and the table, each op marked
    'not measured (budget)' for both implementations, nothing silently dropped."""
    r, data = _bench(tmp_path, "--dtypes", "float32", "--tiling", "off,on", "--budget", "1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert [row["tiled"] for row in data["rows"]] == [False, True]
    for row in data["rows"]:
        for impl in ("ours", "diffusers"):
            for op in ("encode", "decode"):
                assert row[impl][f"{op}_skipped"] == "not measured (budget)" and f"{op}_s" not in row[impl]
    lines = [ln for ln in r.stdout.splitlines() if "ours: not measured (budget); diffusers: not measured" in ln]
    assert len(lines) == 4  # one table line per (row, op)
    assert "8 op(s) not measured (budget)" in r.stdout
