"""DiT parity at Wan's real head width (2 heads of 128) on odd, non-square token grids, batch 2.

The other parity tests use heads of 16, where some wrong rotary splits equal the right one (16 // 4 ==
2 * (16 // 6)); at 128 the split is 44/42/42 and any other split changes self-attention. The latent grid
3 x 10 x 14 gives 3 x 5 x 7 tokens, so a height/width mix-up (patch kernel, RoPE axes, unpatchify) cannot
cancel out, and batch 2 catches per-sample broadcasting slips. Text is shorter than the tokenizer's
512-token padding (7 tokens, or 512 with the rows past the prompt zeroed as the pipelines do) and longer
(600 tokens). Every weight, norms included, is non-trivial (`torch_ref.perturb`).
"""

import pytest

from parity.tolerances import FP32_TOL
from parity.dit import compare_dit, load_models, make_inputs

GRID = dict(batch=2, frames=3, height=10, width=14)  # latents; tokens 3 x 5 x 7 with patch (1, 2, 2)
T2V, I2V, A14B, TI2V = (f"tiny-hd128-{n}" for n in ("wan2.1-t2v-1.3b", "wan2.1-i2v-14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"))

# (preset, expert folder, text tokens, prompt tokens before zero padding)
FP32_CASES = [
    (T2V, "transformer", 7, None),
    (T2V, "transformer", 600, None),
    (I2V, "transformer", 512, 9),  # diffusers' Wan2.1 I2V assumes exactly 512 text tokens
    (A14B, "transformer", 7, None),
    (A14B, "transformer_2", 600, None),
    (TI2V, "transformer", 512, 11),  # per-token timesteps, first latent frame at t = 0
]
BF16_CASES = [(T2V, "transformer", 7), (I2V, "transformer", 512), (A14B, "transformer_2", 7), (TI2V, "transformer", 16)]


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    """models(preset, expert, dtype) -> loaded once per module."""
    cache: dict = {}

    def get(preset: str, expert: str, dtype: str) -> dict:
        key = (preset, expert, dtype)
        if key not in cache:
            cache[key] = load_models(tiny_ckpt(preset) / expert, dtype)
        return cache[key]

    return get


def _inputs(m: dict, text_len: int, prompt_len: int | None = None, seed: int = 0):
    return make_inputs(m["jax"].cfg, **GRID, text_len=text_len, prompt_len=prompt_len, seed=seed)


@pytest.mark.parametrize("preset, expert, text_len, prompt_len", FP32_CASES)
def test_fp32_real_head_width(models, preset, expert, text_len, prompt_len):
    m = models(preset, expert, "float32")
    cfg = m["jax"].cfg
    assert cfg.attention_head_dim == 128 and cfg.num_attention_heads == 2
    inputs = _inputs(m, text_len, prompt_len)
    assert inputs.timestep.ndim == (2 if preset == TI2V else 1)
    report = compare_dit(m, inputs, "float32")
    assert report.passed, report.table()
    assert report.worst_rel_l2 < FP32_TOL
    layers = {layer.name: layer for layer in report.layers}
    assert layers["patch_embedding"].shape == (2, 3 * 5 * 7, 256)
    assert layers["output"].shape == (2, 3, 10, 14, cfg.out_channels)
    assert ("image_embedding" in layers) == (preset == I2V)


@pytest.mark.parametrize("head_dim", [16, 64, 96, 128, 130])
def test_rope_split_equals_diffusers(head_dim):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from weights.configs.dit import DitConfig

    ref = WanRotaryPosEmbed(head_dim, (1, 2, 2), 16)
    assert DitConfig(attention_head_dim=head_dim).rope_split == (ref.t_dim, ref.h_dim, ref.w_dim)


@pytest.mark.parametrize("preset, expert, text_len", BF16_CASES)
def test_bf16_real_head_width_within_measured_rule(models, preset, expert, text_len):
    m = models(preset, expert, "bfloat16")
    report = compare_dit(m, _inputs(m, text_len), "bfloat16")
    assert report.passed, report.table()
    for layer in report.layers:
        assert layer.rel_l2 > 1e-4, f"{layer.name}: bf16 run looks like float32 (dtype not applied)"
