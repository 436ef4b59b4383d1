"""Attention back-ends: splash (Pallas interpreter on CPU) and cudnn against the XLA reference and torch SDPA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels.backends import resolve_backend
from kernels.splash import _splash_padded, fit_blocks
from parity.tolerances import FP32_TOL

BF16_FACTOR = 2.0  # splash in bf16 may be at most this many times as wrong as xla/torch in bf16
SMALL = dict(block_q=128, block_kv=128, block_kv_compute=128)  # small blocks keep interpret mode fast
ROOT = Path(__file__).resolve().parents[1]

# Lengths that stress padding: primes, block multiples, block multiples plus/minus one, tiny.
LENGTHS = st.sampled_from([1, 2, 7, 31, 127, 128, 129, 131, 200, 255, 256, 257])


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def qkv(batch: int, q_len: int, kv_len: int, heads: int, head_dim: int, seed: int = 0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = [(batch, q_len, heads, head_dim), (batch, kv_len, heads, head_dim), (batch, kv_len, heads, head_dim)]
    return [jax.random.normal(key, s, jnp.float32).astype(dtype) for key, s in zip(keys, shapes)]


def torch_sdpa(q, k, v) -> np.ndarray:
    """torch's SDPA on the same values (it wants [batch, heads, seq, head_dim])."""
    t = [torch.from_numpy(np.array(x.astype(jnp.float32))).transpose(1, 2) for x in (q, k, v)]
    if q.dtype == jnp.bfloat16:
        t = [x.to(torch.bfloat16) for x in t]
    with torch.no_grad():
        out = torch.nn.functional.scaled_dot_product_attention(*t)
    return out.transpose(1, 2).float().numpy()


@settings(max_examples=10, deadline=None)
@given(
    q_len=LENGTHS,
    kv_len=LENGTHS,
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([64, 128]),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_splash_matches_xla_and_torch_fp32(q_len, kv_len, heads, head_dim, batch, seed):
    q, k, v = qkv(batch, q_len, kv_len, heads, head_dim, seed)
    ref = kernels.attention(q, k, v, backend="xla")
    out = kernels.attention(q, k, v, backend="splash", **SMALL)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_l2(out, ref) <= FP32_TOL
    assert rel_l2(out, torch_sdpa(q, k, v)) <= FP32_TOL


@settings(max_examples=5, deadline=None)
@given(
    q_len=LENGTHS,
    kv_len=LENGTHS,
    heads=st.integers(1, 2),
    head_dim=st.sampled_from([64, 128]),
    seed=st.integers(0, 2**16),
)
def test_splash_bf16_error_is_bf16_sized(q_len, kv_len, heads, head_dim, seed):
    """In bf16 the tolerance is measured: splash's error against an fp32 reference (on the same,
    bf16-rounded inputs) may be at most BF16_FACTOR times what xla and torch SDPA make in bf16."""
    q, k, v = qkv(1, q_len, kv_len, heads, head_dim, seed, dtype=jnp.bfloat16)
    exact = kernels.attention(*(x.astype(jnp.float32) for x in (q, k, v)), backend="xla")
    out = kernels.attention(q, k, v, backend="splash", **SMALL)
    assert out.dtype == jnp.bfloat16
    allowed = BF16_FACTOR * max(
        rel_l2(kernels.attention(q, k, v, backend="xla").astype(jnp.float32), exact),
        rel_l2(torch_sdpa(q, k, v), exact),
        1e-3,  # floor: a lucky bf16 reference must not make the bound meaningless
    )
    assert rel_l2(out.astype(jnp.float32), exact) <= allowed


@settings(max_examples=6, deadline=None)
@given(kv_len=st.sampled_from([1, 7, 127, 129, 131, 200, 257]), seed=st.integers(0, 2**16))
def test_unmasked_key_padding_is_caught(kv_len, seed):
    """Regression: padding keys with zeros and NOT masking them gives them softmax weight.
    The unmasked variant must fail the fp32 tolerance, and the real path must pass it."""
    q, k, v = qkv(1, 64, kv_len, 2, 64, seed)
    ref = kernels.attention(q, k, v, backend="xla")
    blocks = dict(block_q=128, block_kv=128, block_kv_compute=128, interpret=True)
    unmasked = _splash_padded(q, k, v, mask_padded_keys=False, **blocks)
    masked = _splash_padded(q, k, v, mask_padded_keys=True, **blocks)
    assert rel_l2(unmasked, ref) > FP32_TOL * 100
    assert rel_l2(masked, ref) <= FP32_TOL


@pytest.mark.parametrize(
    "q_len,kv_len",
    [(300, 512), (200, 257), (129, 769), (5, 512)],  # text (512) and image (257) / image+text (769) cross-attention
)
def test_splash_cross_attention(q_len, kv_len):
    q, k, v = qkv(2, q_len, kv_len, 2, 128, seed=q_len)
    ref = kernels.attention(q, k, v, backend="xla")
    out = kernels.attention(q, k, v, backend="splash", block_q=128, block_kv=256, block_kv_compute=128)
    assert out.shape == (2, q_len, 2, 128)
    assert rel_l2(out, ref) <= FP32_TOL


def test_splash_default_blocks_under_jit():
    """Default block sizes, traced inside jit the way the models call it."""
    q, k, v = qkv(1, 40, 20, 2, 64)
    out = jax.jit(lambda q, k, v: kernels.attention(q, k, v, backend="splash"))(q, k, v)
    assert rel_l2(out, kernels.attention(q, k, v, backend="xla")) <= FP32_TOL


@pytest.mark.parametrize(
    "q_len,kv_len,want",
    [
        (32760, 32760, (512, 1024, 512, 32768, 32768)),  # Wan 480p self-attention
        (75600, 75600, (512, 1024, 512, 75776, 75776)),  # Wan 720p self-attention
        (32760, 512, (512, 512, 512, 32768, 512)),  # text cross-attention: no padding of the 512 tokens
        (32760, 257, (512, 384, 384, 32768, 384)),  # image cross-attention
    ],
)
def test_default_blocks_fit_wan_shapes(q_len, kv_len, want):
    from kernels.splash import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_KV_COMPUTE, DEFAULT_BLOCK_Q

    bq, bkv, bkvc = fit_blocks(q_len, kv_len, DEFAULT_BLOCK_Q, DEFAULT_BLOCK_KV, DEFAULT_BLOCK_KV_COMPUTE)
    q_pad, kv_pad = -(-q_len // bq) * bq, -(-kv_len // bkv) * bkv
    assert (bq, bkv, bkvc, q_pad, kv_pad) == want
    assert bkv % bkvc == 0 and kv_pad - kv_len < 128 + bkv and q_pad - q_len < bq


def test_bad_inputs_have_clear_errors():
    q, k, v = qkv(1, 8, 8, 2, 64)
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        kernels.attention(q[0], k[0], v[0], backend="xla")
    with pytest.raises(ValueError, match="do not agree"):
        kernels.attention(q, k[:, :, :1], v[:, :, :1], backend="xla")
    with pytest.raises(ValueError, match="do not agree"):
        kernels.attention(q, k, v[:, :4], backend="xla")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        kernels.attention(q, k, v, backend="flash")
    with pytest.raises(TypeError, match="block_q"):
        kernels.attention(q, k, v, backend="xla", block_q=128)
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.attention(q, k, v, backend="splash", block_q=100)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.attention(q, k.astype(jnp.bfloat16), v, backend="xla")


def test_auto_picks_platform_backend_and_drops_foreign_options():
    q, k, v = qkv(1, 9, 9, 1, 64)
    platform = jax.default_backend()
    want = {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
    assert resolve_backend("auto", jnp.bfloat16) == want
    if platform == "gpu":
        assert resolve_backend("auto", jnp.float32) == "xla"  # cuDNN has no fp32 kernel
    out = kernels.attention(q, k, v, backend="auto", block_q=128, cast_fp32=False)  # tuning for other platforms
    assert rel_l2(out, kernels.attention(q, k, v, backend="xla")) <= FP32_TOL
    assert set(kernels.available_backends()) >= {"xla", "splash"}


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the message shown without a GPU")
def test_cudnn_without_gpu_says_so():
    q, k, v = qkv(1, 8, 8, 1, 64, dtype=jnp.bfloat16)
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        kernels.attention(q, k, v, backend="cudnn")


gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs JAX on an NVIDIA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (257, 257), (1000, 512), (4097, 257)])
def test_cudnn_matches_xla_bf16(q_len, kv_len):
    q, k, v = qkv(2, q_len, kv_len, 4, 128, dtype=jnp.bfloat16)
    exact = kernels.attention(*(x.astype(jnp.float32) for x in (q, k, v)), backend="xla")
    out = kernels.attention(q, k, v, backend="cudnn")
    ref = kernels.attention(q, k, v, backend="xla")
    assert out.dtype == jnp.bfloat16
    assert rel_l2(out.astype(jnp.float32), exact) <= BF16_FACTOR * max(rel_l2(ref.astype(jnp.float32), exact), 1e-3)


@pytest.mark.gpu
@gpu
def test_cudnn_fp32_refused_unless_cast():
    q, k, v = qkv(1, 64, 64, 2, 64)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        kernels.attention(q, k, v, backend="cudnn")
    out = kernels.attention(q, k, v, backend="cudnn", cast_fp32=True)
    assert out.dtype == jnp.float32
    assert rel_l2(out, kernels.attention(q, k, v, backend="xla")) <= 2e-2


@pytest.mark.parametrize("preset", ["tiny-wan2.1-t2v-1.3b", "tiny-wan2.1-i2v-14b"])  # i2v: 257 image tokens pad
def test_flax_tiny_dit_with_splash_matches_diffusers(tiny_ckpt, preset):
    from parity.dit import dit_parity

    report = dit_parity(tiny_ckpt(preset) / "transformer", attention_backend="splash")
    assert report.meta["attention"] == "splash"
    assert report.passed, report


def test_bench_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "attention.py"), "--tiny", "--repeats", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {r["impl"] for r in rows} >= {"jax-xla", "torch-math"}
    assert all(r["tflops"] > 0 and r["median_ms"] > 0 for r in rows if r["status"] == "ok")
    assert any(r["status"] == "ok" for r in rows)
    assert "TFLOP/s" in proc.stdout


def test_mask_restricts_keys_and_is_never_dropped():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32) for _ in range(3))
    keep = 4  # every query sees only the first 4 keys
    mask = jnp.broadcast_to(jnp.arange(6) < keep, (1, 1, 6, 6))
    masked = kernels.attention(q, k, v, backend="xla", mask=mask)
    cut = kernels.attention(q, k[:, :keep], v[:, :keep], backend="xla")
    np.testing.assert_allclose(np.asarray(masked), np.asarray(cut), atol=1e-6)
    with pytest.raises(ValueError, match="cannot apply a mask"):
        kernels.attention(q, k, v, backend="splash", mask=mask)
