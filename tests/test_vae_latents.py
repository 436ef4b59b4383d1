"""Latent normalisation uses the VAE's own config statistics (guards against the "black video" bug)."""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
import pytest

import jax_impl.latents as latents
from jax_impl.latents import decode_latents, denormalize, encode_video, normalize
from weights.configs.vae import TINY_WAN21_VAE, TINY_WAN22_VAE, VaeConfig, WAN21_MEAN, WAN21_STD, WAN22_MEAN, WAN22_STD


def _z(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, 3, 2, 2, cfg.z_dim)) * np.array(cfg.latents_std) + np.array(cfg.latents_mean)).astype(np.float32)


@pytest.mark.parametrize("cfg", [TINY_WAN21_VAE, TINY_WAN22_VAE])
def test_round_trip_and_statistics(cfg):
    z = _z(cfg)
    n = normalize(z, cfg)
    np.testing.assert_allclose(denormalize(n, cfg), z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(n, (z - np.array(cfg.latents_mean, np.float32)) / np.array(cfg.latents_std, np.float32), rtol=1e-6)
    # jax arrays take the same path
    np.testing.assert_allclose(np.asarray(normalize(jnp.asarray(z), cfg)), n, rtol=1e-6)


@pytest.mark.parametrize("cfg", [TINY_WAN21_VAE, TINY_WAN22_VAE])
def test_swapped_or_foreign_statistics_differ(cfg):
    z = _z(cfg, 1)
    n = normalize(z, cfg)
    swapped = cfg.replace(latents_mean=cfg.latents_std, latents_std=tuple(abs(m) + 0.1 for m in cfg.latents_mean))
    assert np.max(np.abs(denormalize(n, swapped) - z)) > 0.1
    unit = cfg.replace(latents_mean=(0.0,) * cfg.z_dim, latents_std=(1.0,) * cfg.z_dim)  # "no normalisation"
    assert np.max(np.abs(denormalize(n, unit) - z)) > 0.1
    other = TINY_WAN22_VAE if cfg.z_dim == 16 else TINY_WAN21_VAE
    with pytest.raises(ValueError, match="z_dim"):
        normalize(z, other)


def test_presets_carry_the_published_statistics():
    assert TINY_WAN21_VAE.latents_mean == WAN21_MEAN and TINY_WAN21_VAE.latents_std == WAN21_STD
    assert TINY_WAN22_VAE.latents_mean == WAN22_MEAN and TINY_WAN22_VAE.latents_std == WAN22_STD
    assert len(WAN22_MEAN) == 48 and len(WAN21_MEAN) == 16


def test_config_json_statistics_are_used(tmp_path):
    cfg = TINY_WAN21_VAE.replace(latents_mean=tuple(np.linspace(-1, 1, 16)), latents_std=tuple(np.linspace(0.5, 3, 16)))
    cfg.to_json(tmp_path / "config.json")
    back = VaeConfig.from_json(tmp_path / "config.json")
    assert back == cfg
    z = _z(cfg)
    np.testing.assert_allclose(normalize(z, back), (z - np.linspace(-1, 1, 16)) / np.linspace(0.5, 3, 16), rtol=1e-5)


def test_pipeline_helpers_use_the_vae_config():
    cfg = TINY_WAN21_VAE.replace(latents_mean=tuple(float(i) for i in range(16)), latents_std=tuple(float(i + 2) for i in range(16)))

    class FakeVae:
        def __init__(self):
            self.cfg = cfg
            self.seen = None

        def encode(self, video):
            return np.full((1, 1, 1, 1, 16), 5.0, np.float32)

        def decode(self, z):
            self.seen = z
            return z

    vae = FakeVae()
    out = encode_video(vae, None)
    np.testing.assert_allclose(out[0, 0, 0, 0], (5.0 - np.arange(16)) / (np.arange(16) + 2), rtol=1e-6)
    decode_latents(vae, np.zeros((1, 1, 1, 1, 16), np.float32))
    np.testing.assert_allclose(vae.seen[0, 0, 0, 0], np.arange(16), rtol=1e-6)
    # no hard-coded statistics in the module
    src = inspect.getsource(latents)
    assert "0.7571" not in src and "0.2289" not in src


def test_vae_options_validated_and_bound(monkeypatch):
    from jax_impl import vae_run
    from jax_impl.latents import VaeOptions

    with pytest.raises(ValueError, match="dtype must be one of"):
        VaeOptions(dtype="float16")
    with pytest.raises(ValueError, match="tile must be one of"):
        VaeOptions(tile="always")

    class FakeVae:
        cfg = TINY_WAN21_VAE

    calls = []
    monkeypatch.setattr(vae_run, "encode", lambda model, video, **kw: calls.append(("encode", model, kw))
                        or np.zeros((1, 1, 1, 1, 16), np.float32))
    monkeypatch.setattr(vae_run, "decode", lambda model, z, **kw: calls.append(("decode", model, kw)) or z)
    vae = FakeVae()
    opts = VaeOptions(tile="on", tiling="T")
    bound = opts.bind(vae)
    assert bound.cfg is TINY_WAN21_VAE
    encode_video(bound, None)
    decode_latents(bound, np.zeros((1, 1, 1, 1, 16), np.float32))
    assert calls == [("encode", vae, {"tile": "on", "tiling": "T"}), ("decode", vae, {"tile": "on", "tiling": "T"})]


def test_pipeline_and_cli_pass_vae_options(tiny_ckpt, monkeypatch, tmp_path):
    """`wanport generate --vae-tile on` reaches the pipeline; the pipeline loads the VAE in the options' dtype
    and decodes with their tile mode."""
    import jax_impl.pipeline as pipeline
    from wanport.cli import main
    from jax_impl import vae_run
    from jax_impl.latents import VaeOptions

    seen = {}
    monkeypatch.setattr(pipeline, "generate", lambda *a, **kw: seen.update(kw) or {
        "video": "x.mp4", "frames": 1, "timings": dict.fromkeys(("load", "encode", "denoise", "decode"), 0.0)})
    assert main(["generate", "--checkpoint", "c", "--prompt", "p", "--out", str(tmp_path / "x.mp4"),
                 "--vae-tile", "on"]) == 0
    assert seen["vae_options"] == VaeOptions(tile="on")

    pipe = pipeline.Pipeline(tiny_ckpt("tiny-wan2.1-t2v-1.3b"), load_encoders=False,
                             vae_options=VaeOptions(dtype="bfloat16", tile="off"))
    assert pipe.vae.dtype == jnp.bfloat16 and pipe.vae.decoder.conv_in.kernel.get_value().dtype == jnp.bfloat16
    calls = []
    monkeypatch.setattr(vae_run, "decode", lambda model, z, **kw: calls.append(kw) or jnp.zeros((1, 1, 8, 8, 3)))
    pipe.decode(np.zeros((1, 1, 1, 1, 16), np.float32))
    assert calls == [{"tile": "off", "tiling": None}]
    assert pipeline.Pipeline(tiny_ckpt("tiny-wan2.1-t2v-1.3b"), load_encoders=False).vae.dtype == jnp.float32
