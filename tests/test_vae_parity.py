"""Layer-by-layer parity of the Flax Wan VAE with diffusers' AutoencoderKLWan (CPU, tiny configs)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from weights.configs.vae import TINY_WAN21_VAE, TINY_WAN22_VAE
from parity.tolerances import FP32_TOL
from parity.vae import psnr, vae_parity
from torch_ref.vae import write_vae_folder

CONFIGS = {"tiny-wan2.1": TINY_WAN21_VAE, "tiny-wan2.2": TINY_WAN22_VAE}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    return {name: write_vae_folder(cfg, root / name, seed=3) for name, cfg in CONFIGS.items()}


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_fp32_parity_every_layer(folders, variant, frames, tmp_path):
    report = vae_parity(folders[variant], dtype="float32", frames=frames, seed=frames)
    names = [layer.name for layer in report.layers]
    n_enc, n_dec = 1 + (frames - 1) // 4, 1 + (frames - 1) // 4
    # every stage, both mid blocks, the caches after every chunk, end-to-end encode and decode
    for must in ("encoder.conv_in", "encoder.down_blocks.0", "encoder.mid_block", "decoder.mid_block",
                 "decoder.up_blocks.0", "decoder.conv_out", "encode.mean", "decode.video",
                 f"encoder.cache.{n_enc - 1}", f"decoder.cache.{n_dec - 1}"):
        assert must in names
    assert sum(n.startswith("encoder.cache.") for n in names) == n_enc
    bad = [(l.name, l.rel_l2) for l in report.layers if not l.rel_l2 <= FP32_TOL]
    assert not bad and report.passed, report.table()
    assert report.meta["decode_psnr_db"] >= 60.0
    lat = report.meta["latent_shape"]
    assert lat[1] == n_enc and lat[-1] == CONFIGS[variant].z_dim
    # same JSON contract as the DiT report
    out = tmp_path / "r.json"
    report.write_json(out)
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["first_failure"] is None and len(data["layers"]) == len(names)


def test_bf16_parity_within_diffusers_own_error(folders):
    report = vae_parity(folders["tiny-wan2.1"], dtype="bfloat16", frames=5)
    assert report.passed, report.table()
    assert all(l.ref_rel_l2 is not None and l.ref_rel_l2 > 0 for l in report.layers)


def test_parity_detects_a_wrong_weight(folders, tmp_path):
    """The harness must fail when one tensor differs: perturb a decoder gain in the Flax model only."""
    import jax.numpy as jnp

    from parity import vae as pv
    from jax_impl.loading import load_vae

    real = pv.run_jax

    def broken(folder, video, dtype):
        model = load_vae(folder, dtype=jnp.dtype(dtype))
        g = model.decoder.mid_block.resnets[0].norm1.gamma
        g.set_value(g.get_value() * 1.01)
        mean, et = model.encode(jnp.asarray(video), capture=True)
        dec, dt = model.decode(mean, capture=True)
        f32 = lambda a: np.asarray(jnp.asarray(a, jnp.float32))  # noqa: E731
        taps = {k: f32(v) for k, v in {**et, **dt}.items() if not k.endswith(".caches")}
        taps["encoder.caches"] = [[f32(c) for c in ch] for ch in et["encoder.caches"]]
        taps["decoder.caches"] = [[f32(c) for c in ch] for ch in dt["decoder.caches"]]
        return f32(mean), f32(dec), taps, len(model.encoder.down_blocks), len(model.decoder.up_blocks)

    pv.run_jax = broken
    try:
        report = vae_parity(folders["tiny-wan2.1"], frames=5)
    finally:
        pv.run_jax = real
    assert not report.passed
    assert report.first_failure == "decoder.mid_block"
    assert report.layers[[l.name for l in report.layers].index("encode.mean")].passed


def test_psnr_metric():
    x = np.zeros((2, 3), np.float32)
    assert psnr(x, x) == math.inf
    assert abs(psnr(x + 0.02, x) - 10 * math.log10(4 / 0.0004)) < 1e-5
