"""End-to-end parity of the JAX pipeline against diffusers' Wan pipelines (fp32, CPU, tiny components).

Both sides load the same tiny pipeline folder (written with diffusers/transformers classes), get the same
image, prompt, negative prompt and starting noise; the latents after every step and the final frames
must agree. The encoders are compared on their own too.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jax_impl.pipeline import GenerateSettings, Pipeline
from parity.encoders import TORCH_ENCODERS
from parity.pipeline import diffusers_pipeline, pipeline_parity
from parity.tolerances import FRAME_PSNR_MIN, SAMPLER_TOL as STEP_TOL


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))  # resized by both pipelines


CASES = {
    "tiny-wan2.1-i2v-14b": GenerateSettings(frames=5, height=32, width=32, steps=4, guidance=5.0, seed=1),
    # 6 steps at shift 5: timesteps 999, 983, 961, 929 (high-noise expert), then 880, 800 (low-noise).
    "tiny-wan2.2-i2v-a14b": GenerateSettings(frames=5, height=32, width=32, steps=6, guidance=3.5, guidance_2=2.0),
    "tiny-wan2.2-ti2v-5b": GenerateSettings(frames=5, height=64, width=64, steps=4, guidance=5.0, seed=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(CASES))
def test_pipeline_matches_diffusers_step_by_step(tiny_ckpt, image, preset):
    result = pipeline_parity(tiny_ckpt(preset), CASES[preset], image=image)
    assert max(result.step_rel_l2) <= STEP_TOL, result.summary()
    assert result.frames_psnr >= FRAME_PSNR_MIN, result.summary()
    assert result.ours_frames.shape == result.ref_frames.shape == (1, 5, CASES[preset].height, CASES[preset].width, 3)
    if preset == "tiny-wan2.2-i2v-a14b":
        assert set(result.experts) == {0, 1}, f"both experts must be used: {result.experts}"


@pytest.mark.slow
def test_ti2v_text_only_matches_wan_pipeline(tiny_ckpt):
    settings = GenerateSettings(frames=5, height=64, width=64, steps=3, guidance=4.0, seed=3)
    result = pipeline_parity(tiny_ckpt("tiny-wan2.2-ti2v-5b"), settings, image=None)
    assert result.passed, result.summary()


def test_encoders_match_diffusers(tiny_ckpt, image):
    import torch

    folder = tiny_ckpt("tiny-wan2.1-i2v-14b")
    ours = Pipeline(folder, encoders=TORCH_ENCODERS)  # the JAX encoders' parity: tests/test_encoders.py
    ref = diffusers_pipeline(folder)
    prompts = ["A cat   walks on the beach &amp; the sea", ""]
    with torch.no_grad():
        want = ref._get_t5_prompt_embeds(prompts, max_sequence_length=512, device="cpu").numpy()
        want_img = ref.encode_image(image, device="cpu").numpy()
    got = ours.text_encoder(prompts)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.shape == (2, 512, ours.dit_config.text_dim)
    assert not got[0, 20:].any(), "embeddings past the prompt's tokens must be zero"
    np.testing.assert_allclose(ours.image_encoder([image]), want_img, atol=1e-6)
