"""The DiT's hooks for models built around Wan's blocks (FantasyWorld): block halves, pre-projection
cross-attention and scans over a sub-range of the stacked blocks, checked against diffusers and the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_impl.dit import token_grid
from jax_impl.rope import rope_tables
from parity.dit import load_models, make_inputs
from parity.tolerances import FP32_TOL
from parity.metrics import rel_l2
from torch_ref.capture import run_dit


@pytest.fixture(scope="module")
def i2v(tiny_ckpt):
    """Wan2.1 I2V (text + image cross-attention) in float32, with inputs and diffusers' taps."""
    models = load_models(tiny_ckpt("tiny-wan2.1-i2v-14b") / "transformer", "float32")
    inputs = make_inputs(models["jax"].cfg, batch=2, frames=2, height=4, width=4, seed=3)
    _, ref = run_dit(models["torch_fp32"], inputs.latents, inputs.timestep, inputs.text, inputs.image)
    return models["jax"], inputs, ref


def _embedded(model, inputs):
    x, temb, mod, context, context_img, _ = model.embed(
        jnp.asarray(inputs.latents), jnp.asarray(inputs.timestep), jnp.asarray(inputs.text), jnp.asarray(inputs.image)
    )
    cfg = model.cfg
    rope = rope_tables(token_grid(cfg, *inputs.latents.shape[1:4]), cfg.rope_split, cfg.rope_max_seq_len)
    return x, mod, context, context_img, rope


def test_block_halves_with_cross_attend_match_diffusers(i2v):
    """attention_half -> ffn_half on block 0 taken from the stack, the cross-attention written as FantasyWorld
    writes it (output(cross_attend(...)), where the camera adapter sits), equals diffusers' block 0, per half."""
    model, inputs, ref = i2v
    x, mod, context, context_img, rope = _embedded(model, inputs)
    graphdef, state = model.block_stack(slice(0, 1))
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))

    def cross(attn, h):
        pre = attn.cross_attend(h, attn.context_kv(context, context_img))
        assert pre.shape == (*h.shape[:2], model.cfg.num_attention_heads, model.cfg.attention_head_dim)
        return attn.output(pre)

    taps = {}
    h, ffn_mod = block.attention_half(x, context, context_img, mod, rope, cross_attention=cross, taps=taps)
    assert len(ffn_mod) == 3 and all(m.dtype == jnp.float32 for m in ffn_mod)
    out = block.ffn_half(h, ffn_mod, taps=taps)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(taps["output"]))
    for name in ("self_attn", "cross_attn", "ffn", "output"):
        err = rel_l2(np.asarray(taps[name], np.float32), ref[f"blocks.0.{name}"])
        assert err < FP32_TOL, f"blocks.0.{name}: rel_l2 {err:.2e}"
    whole, _ = block(x, context, context_img, mod, rope)  # __call__ is the two halves
    np.testing.assert_allclose(np.asarray(whole), np.asarray(out), rtol=0, atol=1e-6)


def test_sub_range_scans_chain_to_the_full_stack(i2v):
    """Scanning blocks 0..k then k..n gives the full forward's block outputs; block_stack slices the right layers."""
    model, inputs, ref = i2v
    x, mod, context, context_img, rope = _embedded(model, inputs)
    n = model.cfg.num_layers
    assert n >= 2

    def step(block, x, _):
        x, _ = block(x, context, context_img, mod, rope)
        return x, x

    full, per_layer = model.scan_blocks(x, step)
    mid, _ = model.scan_blocks(x, step, layers=slice(0, 1))
    np.testing.assert_allclose(np.asarray(mid), np.asarray(per_layer[0]), rtol=0, atol=1e-5)
    end, rest = model.scan_blocks(mid, step, layers=slice(1, n))
    assert rest.shape[0] == n - 1
    np.testing.assert_allclose(np.asarray(end), np.asarray(full), rtol=0, atol=1e-5)
    assert rel_l2(np.asarray(end), ref[f"blocks.{n - 1}.output"]) < FP32_TOL

    _, whole = model.block_stack()
    _, tail = model.block_stack(slice(1, n))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(tail)):
        np.testing.assert_array_equal(np.asarray(a[1:]), np.asarray(b))
    with pytest.raises(ValueError, match="contiguous"):
        model.block_stack(slice(0, n, 2))
