"""diffusers' PyTorch DiT run on JAX through torchax, with attention from `kernels.attention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from weights.configs.presets import get_preset
from parity.dit import make_inputs
from parity.tolerances import FP32_TOL
from torch_ref.capture import run_dit
from torch_ref.models import build_transformer
from torch_ref.torchax_route import make_env, run_dit_torchax

SMALL = dict(block_q=128, block_kv=128, block_kv_compute=128)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=["tiny-wan2.1-t2v-1.3b", "tiny-wan2.1-i2v-14b"])
def tiny(request):
    cfg = get_preset(request.param).transformer
    model = build_transformer(cfg, seed=0)
    inputs = make_inputs(cfg, seed=1)
    ref, _ = run_dit(model, inputs.latents, inputs.timestep, inputs.text, inputs.image)
    return model, inputs, ref


@pytest.mark.parametrize("backend,options", [("xla", {}), ("splash", SMALL)])
def test_torchax_dit_matches_torch(tiny, backend, options):
    model, inputs, ref = tiny
    env = make_env(backend, **options)
    out = run_dit_torchax(model, inputs.latents, inputs.timestep, inputs.text, inputs.image, env=env)
    assert out.shape == ref.shape
    assert rel_l2(out, ref) <= FP32_TOL
    override = env.attention_override
    per_block = 3 if inputs.image is not None else 2  # self, text cross and (i2v) image cross-attention
    assert override.calls == per_block * model.config.num_layers  # every attention went through our kernels
    assert override.fallbacks == 0
    # the torch model is untouched: it still runs as plain PyTorch afterwards
    again, _ = run_dit(model, inputs.latents, inputs.timestep, inputs.text, inputs.image)
    np.testing.assert_array_equal(again, ref)


def test_unsupported_sdpa_arguments_fall_back_to_reference():
    """A masked or causal SDPA call cannot be expressed by our kernels: it must use torchax's
    reference (and be counted), not be run unmasked."""
    import torchax.tensor
    from torchax.interop import jax_view

    env = make_env("splash", **SMALL)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 9, 64), dtype=np.float32) for _ in range(3))
    want_plain = torch.nn.functional.scaled_dot_product_attention(*(torch.from_numpy(x) for x in (q, k, v)))
    want_causal = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x) for x in (q, k, v)), is_causal=True
    )
    tq, tk, tv = (torchax.tensor.Tensor(jnp.asarray(x), env) for x in (q, k, v))
    with env:
        plain = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
        causal = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    assert env.attention_override.calls == 1 and env.attention_override.fallbacks == 1
    assert rel_l2(np.asarray(jax_view(plain)), want_plain.numpy()) <= FP32_TOL
    assert rel_l2(np.asarray(jax_view(causal)), want_causal.numpy()) <= FP32_TOL


def test_bad_inputs_are_refused(tiny):
    model, inputs, _ = tiny
    with pytest.raises(ValueError, match="latents must be"):
        run_dit_torchax(model, inputs.latents[0], inputs.timestep, inputs.text, inputs.image)
    with pytest.raises(ValueError, match="text must be"):
        run_dit_torchax(model, inputs.latents, inputs.timestep, inputs.text[0], inputs.image)
    with pytest.raises(ValueError, match="unknown attention backend"):
        run_dit_torchax(model, inputs.latents, inputs.timestep, inputs.text, inputs.image, backend="nope")


gpu_only = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs JAX on an NVIDIA GPU")


@pytest.mark.parametrize("backend", ["xla", pytest.param("cudnn", marks=[pytest.mark.gpu, gpu_only])])
def test_torchax_dit_bf16(backend):
    """bf16 (with diffusers' float32 islands): error against fp32 torch at most twice torch's own in bf16."""
    cfg = get_preset("tiny-wan2.1-t2v-1.3b").transformer
    inputs = make_inputs(cfg, seed=1)
    exact, _ = run_dit(build_transformer(cfg, seed=0), inputs.latents, inputs.timestep, inputs.text, inputs.image)
    half = build_transformer(cfg, seed=0, dtype=torch.bfloat16)
    torch_bf16, _ = run_dit(half, inputs.latents, inputs.timestep, inputs.text, inputs.image)
    env = make_env(backend)
    out = run_dit_torchax(half, inputs.latents, inputs.timestep, inputs.text, inputs.image, env=env)
    assert env.attention_override.calls > 0
    assert rel_l2(out, exact) <= 2 * max(rel_l2(torch_bf16, exact), 1e-3)
