"""Bad input to the DiT gets an error that names the problem."""

import jax.numpy as jnp
import numpy as np
import pytest

from parity.dit import make_inputs
from jax_impl.loading import load_dit


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    return {
        p: load_dit(tiny_ckpt(p) / "transformer")
        for p in ["tiny-wan2.1-t2v-1.3b", "tiny-wan2.1-i2v-14b"]
    }


def test_wrong_channel_count(models):
    m = models["tiny-wan2.1-i2v-14b"]
    x = make_inputs(m.cfg)
    with pytest.raises(ValueError, match="16 channels, this model takes 36.*mask"):
        m(x.latents[..., :16], x.timestep, x.text, x.image)


def test_size_not_divisible_by_patch(models):
    m = models["tiny-wan2.1-t2v-1.3b"]
    x = make_inputs(m.cfg, height=5)
    with pytest.raises(ValueError, match="height=5 is not divisible by the patch size 2"):
        m(x.latents, x.timestep, x.text)


def test_image_tokens_required_and_refused(models):
    i2v, t2v = models["tiny-wan2.1-i2v-14b"], models["tiny-wan2.1-t2v-1.3b"]
    x = make_inputs(i2v.cfg)
    with pytest.raises(ValueError, match="pass `image`"):
        i2v(x.latents, x.timestep, x.text)
    y = make_inputs(t2v.cfg)
    with pytest.raises(ValueError, match="no image cross-attention"):
        t2v(y.latents, y.timestep, y.text, np.zeros((1, 257, 24), np.float32))


def test_text_width_and_timestep_shape(models):
    m = models["tiny-wan2.1-t2v-1.3b"]
    x = make_inputs(m.cfg)
    with pytest.raises(ValueError, match="text embeddings must be"):
        m(x.latents, x.timestep, x.text[..., :8])
    with pytest.raises(ValueError, match="per-token timesteps have 3 entries, the video has 32 tokens"):
        m(x.latents, jnp.zeros((1, 3)), x.text)


def test_output_shape_and_dtype(models):
    m = models["tiny-wan2.1-t2v-1.3b"]
    x = make_inputs(m.cfg, batch=2, frames=3, height=4, width=6)
    out = m(x.latents, x.timestep, x.text)
    assert out.shape == (2, 3, 4, 6, 16) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
