"""I2V conditioning (`jax_impl.conditioning`) against diffusers' own code path, `prepare_latents` of
WanImageToVideoPipeline, on the same tiny VAE weights: the 4-slot mask, the normalised condition latents
and their channel order, with and without a last image, batch 1 and 2; and TI2V's first-frame latent
and keep mask (`expand_timesteps`). A mask that fills one slot instead of four for the first frame only
costs a few dB at the end of a pipeline run; here it fails on the first comparison.
"""

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline

from jax_impl.conditioning import ConcatCondition, FirstFrameCondition, encode_condition
from weights.configs.vae import get_vae_preset
from parity.metrics import rel_l2
from torch_ref.vae import load_vae_torch, write_vae_folder
from jax_impl.loading import load_vae

FRAMES, HEIGHT, WIDTH = 9, 32, 48  # 3 latent frames, non-square


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """{preset: (diffusers VAE, our VAE)} on the same seeded weights."""
    root = tmp_path_factory.mktemp("vae")
    out = {}
    for name in ("tiny-wan2.1", "tiny-wan2.2"):
        folder = write_vae_folder(get_vae_preset(name), root / name, seed=4)
        out[name] = (load_vae_torch(folder), load_vae(folder))
    return out


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (HEIGHT, WIDTH, 3)).astype(np.float32)


def _torch_image(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.transpose(2, 0, 1)[None].copy())  # [1, 3, H, W] as the video processor gives


def _diffusers(vae, expand_timesteps: bool, image, batch: int, last=None):
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=None, expand_timesteps=expand_timesteps
    )
    with torch.no_grad():
        return pipe.prepare_latents(
            _torch_image(image), batch, vae.config.z_dim, HEIGHT, WIDTH, FRAMES, torch.float32, torch.device("cpu"),
            torch.Generator().manual_seed(0), last_image=None if last is None else _torch_image(last),
        )


def _channels_last(t: torch.Tensor) -> np.ndarray:
    return t.numpy().transpose(0, 2, 3, 4, 1)


@pytest.mark.parametrize("batch, with_last", [(1, False), (2, False), (2, True)])
def test_concat_condition_equals_diffusers(vaes, batch, with_last):
    torch_vae, jax_vae = vaes["tiny-wan2.1"]
    image, last = _image(0), (_image(1) if with_last else None)
    _, ref = _diffusers(torch_vae, False, image, batch, last)
    ref = _channels_last(ref)  # [B, F, h, w, 4 + 16]
    ours = encode_condition(jax_vae, "concat", image, FRAMES, batch=batch, last_image=last)
    assert isinstance(ours, ConcatCondition) and ours.mask_latent.shape == ref.shape == (batch, 3, 4, 6, 20)
    np.testing.assert_array_equal(ours.mask_latent[..., :4], ref[..., :4])  # the mask, exactly
    assert rel_l2(ours.mask_latent[..., 4:], ref[..., 4:]) < 1e-5
    # what the mask says: frame 0 fills all 4 slots of latent frame 0; a last image the last slot
    assert ref[:, 0, ..., :4].min() == 1 and ref[:, 1, ..., :4].max() == 0
    assert ref[:, 2, ..., 3].min() == (1 if with_last else 0) and ref[:, 2, ..., :3].max() == 0


def test_first_frame_condition_equals_diffusers(vaes):
    torch_vae, jax_vae = vaes["tiny-wan2.2"]
    image = _image(2)
    _, ref, ref_keep = _diffusers(torch_vae, True, image, 2)
    ours = encode_condition(jax_vae, "first_frame", image, FRAMES, batch=2, patch=(1, 1, 1))
    ref = _channels_last(ref)
    assert isinstance(ours, FirstFrameCondition) and ours.latent.shape == ref.shape == (2, 1, 2, 3, 48)
    assert rel_l2(ours.latent, ref) < 1e-5
    np.testing.assert_array_equal(ours.denoise_mask, _channels_last(ref_keep))  # 1 on the frames denoised
    np.testing.assert_array_equal(ours.token_timestep_factors, np.repeat([0.0, 1.0, 1.0], 2 * 3))
