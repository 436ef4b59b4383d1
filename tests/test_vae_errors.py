"""Clear errors for bad inputs, bad configs and configs that do not match the weights."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from weights.configs.base import ConfigError
from weights.configs.presets import PRESETS
from jax_impl.vae import VaeInputError, WanVAE
from weights.configs.vae import TINY_WAN21_VAE, TINY_WAN22_VAE, VaeConfig
from torch_ref.vae import write_vae_folder
from weights.safetensors_io import CheckpointError
from jax_impl.loading import load_vae
from weights.checkpoint import Checkpoint
from weights.vae_map import VAE


@pytest.fixture(scope="module")
def vae21():
    return nnx.eval_shape(lambda: WanVAE(TINY_WAN21_VAE, rngs=nnx.Rngs(0)))  # inputs are checked before any compute


@pytest.mark.parametrize("frames", [2, 4, 6, 8, 16])
def test_frames_not_4k_plus_1(vae21, frames):
    with pytest.raises(VaeInputError, match=f"frame count {frames} is not 4k\\+1"):
        vae21.encode(jnp.zeros((1, frames, 16, 16, 3)))


def test_size_not_divisible(vae21):
    with pytest.raises(VaeInputError, match="multiples of 8.*12x16"):
        vae21.encode(jnp.zeros((1, 5, 12, 16, 3)))
    m22 = nnx.eval_shape(lambda: WanVAE(TINY_WAN22_VAE, rngs=nnx.Rngs(0)))
    with pytest.raises(VaeInputError, match="multiples of 16"):
        m22.encode(jnp.zeros((1, 1, 24, 32, 3)))


def test_wrong_channels(vae21):
    with pytest.raises(VaeInputError, match="4 channels, this VAE takes 3"):
        vae21.encode(jnp.zeros((1, 5, 16, 16, 4)))
    with pytest.raises(VaeInputError, match="channels-last"):
        vae21.encode(jnp.zeros((1, 3, 5, 16, 16)))  # channels-first video
    with pytest.raises(VaeInputError, match="16"):
        vae21.decode(jnp.zeros((1, 2, 2, 2, 48)))
    with pytest.raises(VaeInputError):
        vae21.decode(jnp.zeros((2, 2, 2, 16)))


def test_config_validation():
    with pytest.raises(ConfigError, match="z_dim=48"):
        TINY_WAN21_VAE.replace(z_dim=48)  # Wan2.1 statistics with a Wan2.2 latent width
    with pytest.raises(ConfigError, match="temperal_downsample"):
        TINY_WAN21_VAE.replace(temperal_downsample=(True,))
    with pytest.raises(ConfigError, match="unknown"):
        VaeConfig.from_dict({"_class_name": "AutoencoderKLWan", "base_dimm": 3})
    with pytest.raises(ConfigError, match="AutoencoderKLWan"):
        VaeConfig.from_dict({"_class_name": "WanTransformer3DModel"})


def test_config_json_round_trip_matches_diffusers(tmp_path):
    from diffusers import AutoencoderKLWan

    for cfg in (TINY_WAN21_VAE, TINY_WAN22_VAE):
        folder = write_vae_folder(cfg, tmp_path / f"v{cfg.z_dim}")
        assert VaeConfig.from_json(folder / "config.json") == cfg
        assert dict(AutoencoderKLWan.from_config(cfg.to_dict()).config)["z_dim"] == cfg.z_dim


def test_config_does_not_match_weights(tmp_path):
    folder = write_vae_folder(TINY_WAN21_VAE, tmp_path / "vae")
    raw = json.loads((folder / "config.json").read_text())
    raw["base_dim"] = 16
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as e:
        load_vae(folder)
    msg = str(e.value)
    assert "encoder.conv_in.weight: checkpoint [8, 3, 3, 3, 3], config expects [16, 3, 3, 3, 3]" in msg
    # a Wan2.2 config on Wan2.1 weights: names missing and unexpected tensors
    with pytest.raises(CheckpointError, match="missing .*unexpected|mis-shaped"):
        Checkpoint(folder, VAE, config=TINY_WAN22_VAE)


def test_weights_loaded_bit_exact(tmp_path):
    import torch

    from torch_ref.vae import load_vae_torch
    from weights.vae_map import vae_entries

    folder = write_vae_folder(TINY_WAN22_VAE, tmp_path / "vae", seed=5)
    model = load_vae(folder)
    sd = load_vae_torch(folder).state_dict()
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for en in vae_entries(TINY_WAN22_VAE):
        t = sd[en.diffusers].numpy()
        np.testing.assert_array_equal(np.asarray(flat[en.flax]), en.to_flax(t))
        np.testing.assert_array_equal(en.from_flax(en.to_flax(t)), t)
    assert model.decoder.conv_in.kernel.get_value().dtype == jnp.float32
    assert load_vae(folder, dtype=jnp.bfloat16).decoder.conv_in.kernel.get_value().dtype == jnp.bfloat16


@pytest.mark.parametrize("name", sorted({p.vae for n, p in PRESETS.items() if not n.startswith("tiny-")}))
def test_map_covers_real_configs(name):
    """The full-size presets' VAEs: every diffusers tensor and every Flax parameter is mapped, shapes agree."""
    import torch
    from diffusers import AutoencoderKLWan

    from weights.configs.vae import get_vae_preset
    from weights.vae_map import vae_entries

    cfg = get_vae_preset(name)
    with torch.device("meta"):
        ref = AutoencoderKLWan(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
    sd = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    entries = vae_entries(cfg)
    assert {e.diffusers: e.shape for e in entries} == sd
    abstract = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    flat = {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    assert {e.flax: e.flax_shape() for e in entries} == flat
