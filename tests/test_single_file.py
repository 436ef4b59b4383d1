"""Single-file DiT checkpoints (`weights.single_file`): layouts, prefixes, dtypes and shards as users have them.

Each file is written here from a diffusers model's state dict renamed to the original Wan keys (the names
`tests/wan_original_layout.py` derives from the Wan repositories' model code) under the prefix ComfyUI or
others use; our model loaded from it must compute what diffusers computes on the same (rounded) weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from weights.configs.dit import DitConfig, check_dit_inputs
from weights.configs.presets import PRESETS, get_preset
from weights.dit_map import dit_entries
from weights.safetensors_io import CheckpointError, save_tensors
from weights.single_file import SingleFileCheckpoint, infer_config, is_single_file
from tests.wan_original_layout import WanModelSpec, wan_state_dict_shapes

DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}


def base_state(cfg: DitConfig, seed: int = 0) -> dict[str, np.ndarray]:
    from torch_ref.models import build_transformer

    return {k: v.detach().numpy().copy() for k, v in build_transformer(cfg, seed=seed).state_dict().items()}


def write_single_file(
    path: Path, cfg: DitConfig, state: dict[str, np.ndarray], *, layout: str = "wan", prefix: str = "",
    dtype: str = "bf16", shards: int = 1, extra: dict | None = None, drop: tuple[str, ...] = (),
) -> Path:
    """`state` (diffusers names) written as a user's file: renamed to `layout`, prefixed, cast, optionally
    split into shards with an index json (the path returned is then the index)."""
    tensors = {prefix + e.name(layout): state[e.diffusers].astype(DTYPES[dtype]) for e in dit_entries(cfg)}
    for k in drop:
        del tensors[prefix + k]
    tensors.update(extra or {})
    if shards == 1:
        save_tensors(path, tensors)
        return path
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"{path.stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_tensors(path.parent / shard, {k: tensors[k] for k in part})
        weight_map.update({k: shard for k in part})
    index = path.parent / f"{path.stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def rounded(state: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    return {k: v.astype(DTYPES[dtype]).astype(np.float32) for k, v in state.items()}


def diffusers_on(cfg: DitConfig, state: dict[str, np.ndarray]):
    import torch

    from torch_ref.models import build_transformer

    model = build_transformer(cfg, seed=99)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return model.eval()


CASES = [  # preset, layout, prefix, dtype, shards, heads given (None: read off the width)
    ("tiny-wan2.1-t2v-1.3b", "wan", "model.diffusion_model.", "bf16", 1, 2),
    ("tiny-hd128-wan2.1-i2v-14b", "wan", "", "fp16", 3, None),
    ("tiny-wan2.2-ti2v-5b", "wan", "diffusion_model.", "fp32", 1, 2),
    ("tiny-hd128-wan2.2-i2v-a14b", "diffusers", "transformer.", "bf16", 2, None),
]


@pytest.mark.parametrize("preset,layout,prefix,dtype,shards,heads", CASES)
def test_single_file_forward_equals_diffusers(tmp_path, preset, layout, prefix, dtype, shards, heads):
    from parity.dit import compare_dit, make_inputs
    from jax_impl.loading import load_dit

    cfg = get_preset(preset).transformer
    state = base_state(cfg)
    path = write_single_file(tmp_path / "model.safetensors", cfg, state, layout=layout, prefix=prefix, dtype=dtype, shards=shards)
    assert is_single_file(path)
    lines: list[str] = []
    ckpt = SingleFileCheckpoint(path, num_heads=heads, log=lines.append)
    assert (ckpt.layout, ckpt.prefix, ckpt.config) == (layout, prefix, cfg)
    assert f"{layout} layout, prefix {prefix!r}, {shards} file(s)" in lines[0]
    model = load_dit(ckpt)
    inputs = make_inputs(cfg, frames=2, height=4, width=6)
    report = compare_dit({"jax": model, "torch_fp32": diffusers_on(cfg, rounded(state, dtype))}, inputs, "float32")
    assert report.passed and report.worst_rel_l2 < 1e-5, report.table()


def test_written_keys_are_the_original_wan_state_dict():
    """The writer above produces exactly the keys and shapes of the original `WanModel` of this size."""
    cfg = get_preset("tiny-wan2.1-t2v-1.3b").transformer
    spec = WanModelSpec("Wan2.1", "t2v", cfg.inner_dim, cfg.ffn_dim, cfg.num_attention_heads, cfg.num_layers,
                        cfg.in_channels, cfg.out_channels, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim)
    ours = {e.wan: e.shape for e in dit_entries(cfg)}
    assert ours == wan_state_dict_shapes(spec)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_config_read_off_shapes(name, layout):
    cfg = PRESETS[name].transformer
    shapes = {e.name(layout): e.shape for e in dit_entries(cfg)}
    heads = None if cfg.attention_head_dim == 128 else cfg.num_attention_heads
    assert infer_config(shapes, layout, heads) == cfg
    variants = [cfg.replace(patch_size=(2, 1, 3), out_channels=12, cross_attn_norm=False)]
    if cfg.has_image_tokens:
        variants.append(cfg.replace(pos_embed_seq_len=6))  # FLF2V's image positions
    for v in variants:
        assert infer_config({e.name(layout): e.shape for e in dit_entries(v)}, layout, heads) == v


# --- errors: named keys, the prefix, the fix -------------------------------------------------------------
T2V = "tiny-wan2.1-t2v-1.3b"


@pytest.fixture(scope="module")
def t2v_state():
    return base_state(get_preset(T2V).transformer)


def test_missing_and_unexpected_keys_are_named(tmp_path, t2v_state):
    cfg = get_preset(T2V).transformer
    path = write_single_file(tmp_path / "m.safetensors", cfg, t2v_state, prefix="model.diffusion_model.",
                             drop=("blocks.1.ffn.2.bias",),
                             extra={"model.diffusion_model.blocks.0.self_attn.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError) as err:
        SingleFileCheckpoint(path, cfg)
    msg = str(err.value)
    assert "missing 1 tensor(s): blocks.1.ffn.2.bias" in msg and "unexpected 1 tensor(s): blocks.0.self_attn.extra.weight" in msg
    assert "'model.diffusion_model.'" in msg and "does the preset or config match" in msg


def test_wrong_config_is_named_by_shape(tmp_path, t2v_state):
    cfg = get_preset(T2V).transformer
    path = write_single_file(tmp_path / "m.safetensors", cfg, t2v_state)
    with pytest.raises(CheckpointError, match=r"mis-shaped .*blocks\.0\.ffn\.0\.weight: checkpoint \[64, 32\], config expects \[128, 32\]"):
        SingleFileCheckpoint(path, cfg.replace(ffn_dim=128))
    with pytest.raises(CheckpointError, match="not a multiple of Wan's head width 128: give the head count"):
        SingleFileCheckpoint(path)


@pytest.mark.parametrize("extra,match", [
    ({"scaled_fp8": np.zeros(0, np.float32)}, "scaled-fp8 checkpoint"),
    ({"model.diffusion_model.blocks.0.ffn.0.scale_weight": np.ones(1, np.float32)}, "scaled-fp8 checkpoint"),
    ({"first_stage_model.decoder.conv.weight": np.ones(1, np.float32)}, "bundles other models"),
])
def test_refused_files(tmp_path, t2v_state, extra, match):
    cfg = get_preset(T2V).transformer
    path = write_single_file(tmp_path / "m.safetensors", cfg, t2v_state, prefix="model.diffusion_model.", extra=extra)
    with pytest.raises(CheckpointError, match=match):
        SingleFileCheckpoint(path, cfg)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickled"):
        SingleFileCheckpoint(tmp_path / "m.pt")
    save_tensors(tmp_path / "vae.safetensors", {"decoder.conv1.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match="cannot tell the model checkpoint layout"):
        SingleFileCheckpoint(tmp_path / "vae.safetensors")


def test_flf2v_original_file_forward_equals_diffusers(tmp_path):
    """Wan2.1 FLF2V in the original layout (`img_emb.emb_pos`, which diffusers' single-file renamer does not
    know): read off the shapes as a first-last-frame model, and with two images' CLIP tokens (first image's,
    then the last's, as the pipeline stacks them) our forward equals diffusers' on the same weights."""
    from parity.dit import DitInputs, compare_dit
    from jax_impl.loading import load_dit

    n = 3  # CLIP tokens per image (257 in the real model)
    cfg = get_preset("tiny-hd128-wan2.1-i2v-14b").transformer.replace(pos_embed_seq_len=2 * n)
    state = base_state(cfg, seed=5)
    pos = "condition_embedder.image_embedder.pos_embed"
    assert state[pos].std() > 0.01  # non-trivial (torch_ref perturbs diffusers' zero init)
    path = write_single_file(tmp_path / "flf2v.safetensors", cfg, state, prefix="model.diffusion_model.", dtype="fp32")
    lines: list[str] = []
    ckpt = SingleFileCheckpoint(path, log=lines.append)
    assert ckpt.config == cfg and "6-token image positions (FLF2V)" in lines[0]
    rng = np.random.default_rng(0)
    inputs = DitInputs(
        latents=rng.standard_normal((1, 2, 4, 6, cfg.in_channels), dtype=np.float32),
        timestep=np.array([640.0], np.float32),
        text=rng.standard_normal((1, 512, cfg.text_dim), dtype=np.float32),
        image=rng.standard_normal((2, n, cfg.image_dim), dtype=np.float32),  # [first, last] x tokens
    )
    model = load_dit(ckpt)
    report = compare_dit({"jax": model, "torch_fp32": diffusers_on(cfg, state)}, inputs, "float32")
    assert report.passed and report.worst_rel_l2 < 1e-5, report.table()
    with pytest.raises(ValueError, match=r"first-last-frame image tokens must be \[2, 3, 24\]"):
        check_dit_inputs(cfg, inputs.latents.shape, inputs.timestep.shape, inputs.text.shape,
                         inputs.image.reshape(1, 2 * n, -1).shape)
