"""The whole FantasyWorld forward: Flax (`jax_impl.fantasyworld.model`, the Wan DiT through its hooks) against
our PyTorch reference (`torch_ref.fantasyworld.model`, diffusers' Wan blocks) on one tiny released-layout
checkpoint with every weight perturbed; fp32, rel L2 <= 1e-5 at every tap (parity/fantasyworld.py).

The tiny config has 2 Wan blocks before the branch and 2 joint layers, the camera adapter on blocks 0-2, so
one joint layer carries the adapter and one does not (both scan segments run).
"""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.fantasyworld.model import load_fantasyworld
from parity.fantasyworld import compare_fantasyworld, layer_order, make_inputs, run_flax
from torch_ref.fantasyworld.checkpoint import PICKLE, write_tiny_fantasyworld
from torch_ref.fantasyworld.checkpoint import load_fantasyworld as load_reference
from weights.configs.fantasyworld import FantasyWorldConfig
from weights.safetensors_io import CheckpointError

CFG = FantasyWorldConfig.tiny()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_fantasyworld(tmp_path_factory.mktemp("fw") / "tiny", CFG, seed=3)


@pytest.fixture(scope="module")
def models(folder):
    return load_fantasyworld(folder, attention_backend="xla"), load_reference(folder)


def test_layer_order_covers_every_added_module():
    names = layer_order(CFG, heads=True)
    assert names[:3] == ["camera_features", "wan.blocks.0", "wan.blocks.1"]
    assert {f"layers.{j}.{s}" for j in range(CFG.joint_layers) for s in ("frame", "video", "geo")} <= set(names)
    assert names[-5:] == ["pred.pose_enc", "pred.depth", "pred.depth_conf", "pred.world_points", "pred.world_points_conf"]


def test_joint_forward_parity(models):
    report = compare_fantasyworld(*models, make_inputs(CFG, seed=1))
    print("\n" + report.table())
    assert [layer.name for layer in report.layers] == layer_order(CFG)
    assert report.passed, report.table()


@pytest.mark.slow
def test_joint_forward_parity_without_camera(models):
    """No rays: every adapter is skipped (the public code's all-zero features), the scans run without them."""
    inputs = make_inputs(CFG, seed=2, camera=False)
    report = compare_fantasyworld(*models, inputs)
    assert report.passed, report.table()
    with_camera = run_flax(models[0], make_inputs(CFG, seed=2))
    assert not np.allclose(with_camera["output"], run_flax(models[0], inputs)["output"], atol=1e-4)


@pytest.mark.slow
def test_heads_parity(models):
    report = compare_fantasyworld(*models, make_inputs(CFG, seed=4), heads=True)
    print("\n" + report.table())
    assert report.passed, report.table()


def test_flax_loads_the_released_pickle_only_when_allowed(folder, tmp_path):
    only_pth = tmp_path / "pth"
    only_pth.mkdir()
    shutil.copy(folder / "config.json", only_pth)
    shutil.copy(folder / PICKLE, only_pth)
    with pytest.raises(CheckpointError, match="allow-pickle|allow_pickle"):
        load_fantasyworld(only_pth)
    model = load_fantasyworld(only_pth, allow_pickle=True)
    assert model.frame_blocks.norm1.scale.value.shape == (CFG.joint_layers, CFG.geo_dim)


@pytest.mark.slow
def test_bfloat16_runs_close_to_float32(folder, models):
    """The Wan half in bf16, the geometry stream in float32 (its weights are): runs, and stays near fp32."""
    inputs = make_inputs(CFG, seed=5)
    fp32 = run_flax(models[0], inputs)
    bf16 = run_flax(load_fantasyworld(folder, dtype=jnp.bfloat16, attention_backend="xla"), inputs)
    assert bf16["output"].dtype == jnp.bfloat16 and bf16["layers.1.geo"].dtype == np.float32
    for name in ("wan.blocks.1", "layers.1.geo", "output"):
        err = np.linalg.norm(bf16[name].astype(np.float32) - fp32[name]) / np.linalg.norm(fp32[name])
        assert err < 3e-2, f"{name}: bf16 vs fp32 rel L2 {err:.2e}"
