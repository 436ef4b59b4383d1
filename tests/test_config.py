import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from weights.configs.base import ConfigError
from weights.configs.dit import DitConfig
from weights.configs.presets import PRESETS, get_preset


def _meta_model(cfg: DitConfig) -> WanTransformer3DModel:
    kwargs = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    with torch.device("meta"):
        return WanTransformer3DModel(**kwargs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_in_diffusers_with_same_config_and_param_count(name):
    cfg = get_preset(name).transformer
    model = _meta_model(cfg)  # meta device: full-size shapes, no memory
    assert DitConfig.from_dict(dict(model.config), source=name) == cfg
    assert sum(p.numel() for p in model.parameters()) == cfg.param_count()


def test_published_shapes():
    p = {n: get_preset(n).transformer for n in ["wan2.1-t2v-1.3b", "wan2.1-i2v-14b", "wan2.2-ti2v-5b"]}
    assert (p["wan2.1-t2v-1.3b"].inner_dim, p["wan2.1-t2v-1.3b"].num_layers, p["wan2.1-t2v-1.3b"].ffn_dim) == (1536, 30, 8960)
    assert (p["wan2.1-i2v-14b"].inner_dim, p["wan2.1-i2v-14b"].in_channels, p["wan2.1-i2v-14b"].image_dim) == (5120, 36, 1280)
    assert (p["wan2.2-ti2v-5b"].inner_dim, p["wan2.2-ti2v-5b"].in_channels) == (3072, 48)
    a14b = get_preset("wan2.2-i2v-a14b")
    assert a14b.num_experts == 2 and a14b.boundary_ratio == 0.9 and not a14b.transformer.has_image_tokens
    assert 1.2e9 < p["wan2.1-t2v-1.3b"].param_count() < 1.5e9
    assert 13e9 < get_preset("wan2.1-t2v-14b").transformer.param_count() < 15e9


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("tiny-")])
def test_tiny_variant_keeps_structure(name):
    big, tiny = get_preset(name), get_preset("tiny-" + name)
    assert tiny.transformer.num_layers <= 2 and tiny.transformer.inner_dim < 64
    for attr in ("in_channels", "out_channels", "patch_size", "has_image_tokens", "cross_attn_norm"):
        assert getattr(tiny.transformer, attr) == getattr(big.transformer, attr)
    assert (tiny.num_experts, tiny.boundary_ratio, tiny.task) == (big.num_experts, big.boundary_ratio, big.task)


def test_json_round_trip(tmp_path):
    cfg = get_preset("tiny-wan2.1-i2v-14b").transformer
    cfg.to_json(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["_class_name"] == "WanTransformer3DModel" and raw["patch_size"] == [1, 2, 2]
    assert DitConfig.from_json(tmp_path / "config.json") == cfg


def test_wan_config_round_trip():
    for name in PRESETS:
        cfg = get_preset(name).transformer
        assert DitConfig.from_wan_dict(cfg.to_wan_dict(), cfg.has_image_tokens) == cfg


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown DitConfig config keys \\['num_heads'\\]"):
        DitConfig.from_dict({"num_heads": 3})
    with pytest.raises(ConfigError, match="AutoencoderKLWan"):
        DitConfig.from_dict({"_class_name": "AutoencoderKLWan"})
    with pytest.raises(ConfigError, match="image_dim and added_kv_proj_dim"):
        DitConfig(image_dim=1280)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DitConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not found"):
        DitConfig.from_json(tmp_path / "missing.json")
    with pytest.raises(KeyError, match="wanport presets"):
        get_preset("wan3-giant")
