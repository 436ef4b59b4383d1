"""The typed image condition: what each kind makes of the latents, and its trip through the encode stage file
(kind in the metadata, arrays by name) back into the same type."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.conditioning import (
    ConcatCondition, FirstFrameCondition, NoCondition, condition_from_arrays, i2v_condition,
)
from jax_impl.stages import Encoded, load_stage, reuse_stage, save_stage
from weights.safetensors_io import CheckpointError

RNG = np.random.default_rng(0)
B, F, H, W, Z = 2, 3, 4, 6, 5


def _latents(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _first_frame():
    return FirstFrameCondition.build(_latents(B, 1, H, W, Z), F, (1, 2, 2))


def test_first_frame_keeps_frame_zero_and_its_tokens_clean():
    cond, x = _first_frame(), _latents(B, F, H, W, Z)
    assert cond.denoise_mask.shape == (1, F, H, W, 1) and cond.denoise_mask[0, 0].max() == 0
    assert cond.denoise_mask[0, 1:].min() == 1  # 1 on the frames that are denoised
    inp, t = jax.jit(lambda c, x: c.model_input(x, jnp.float32(700.0)))(cond, x)  # a pytree: goes through jit
    np.testing.assert_array_equal(np.asarray(inp)[:, :1], cond.latent)
    np.testing.assert_array_equal(np.asarray(inp)[:, 1:], x[:, 1:])
    tokens = (H // 2) * (W // 2)
    assert t.shape == (B, F * tokens)
    np.testing.assert_array_equal(np.asarray(t)[:, :tokens], 0.0)
    np.testing.assert_array_equal(np.asarray(t)[:, tokens:], 700.0)
    np.testing.assert_array_equal(np.asarray(cond.finalize(x)), np.asarray(inp))
    with pytest.raises(ValueError, match="first-frame"):
        cond.frames(slice(0, 1))


def test_concat_and_none():
    mask_latent = i2v_condition(_latents(B, F, H, W, Z))
    cond, x = ConcatCondition(mask_latent), _latents(B, F, H, W, Z)
    inp, t = cond.model_input(jnp.asarray(x), 500.0)
    np.testing.assert_array_equal(np.asarray(inp), np.concatenate([x, mask_latent], -1))
    np.testing.assert_array_equal(np.asarray(t), [500.0, 500.0])
    np.testing.assert_array_equal(cond.frames(slice(1, 3)).mask_latent, mask_latent[:, 1:3])
    assert cond.finalize(x) is x
    inp, t = NoCondition().model_input(jnp.asarray(x), 500.0)
    np.testing.assert_array_equal(np.asarray(inp), x)
    assert t.shape == (B,)


@pytest.mark.parametrize("make", [NoCondition, lambda: ConcatCondition(_latents(B, F, H, W, 4 + Z)), _first_frame])
def test_encode_stage_round_trip_keeps_the_type(tmp_path, make):
    cond = make()
    enc = Encoded({"prompt_embeds": _latents(B, 7, 8)}, cond)
    path = save_stage(tmp_path / "e.safetensors", "encoded", enc.arrays(), {"k": 1}, {"x": 1} | enc.meta())
    arrays, header = load_stage(path, "encoded")
    assert header["conditioning"] == cond.KIND
    back = Encoded.from_stage(arrays, header)
    assert type(back.condition) is type(cond) and set(back) == {"prompt_embeds"}
    for a, b in zip(jax.tree.leaves(cond), jax.tree.leaves(back.condition), strict=True):
        np.testing.assert_array_equal(a, b)
    found = reuse_stage(path, "encoded", {"k": 1}, log=lambda _: None)
    assert found is not None and Encoded.from_stage(*found).condition.KIND == cond.KIND


def test_stage_without_kind_or_with_wrong_arrays_is_refused(tmp_path):
    enc = Encoded({"prompt_embeds": _latents(1, 2, 3)}, _first_frame())
    path = save_stage(tmp_path / "e.safetensors", "encoded", enc.arrays(), {"k": 1})  # kind not recorded
    arrays, header = load_stage(path, "encoded")
    with pytest.raises(CheckpointError, match="no conditioning kind"):
        Encoded.from_stage(arrays, header)
    lines = []
    assert reuse_stage(path, "encoded", {"k": 1}, log=lines.append) is None and "recomputing" in lines[0]
    with pytest.raises(ValueError, match="has the arrays"):
        condition_from_arrays("concat", {"latent": arrays["condition.latent"]})
    with pytest.raises(ValueError, match="unknown conditioning kind"):
        condition_from_arrays("last_frame", {})
