"""Single-file DiT checkpoints (`weights.single_file.open_dit` through the one engine, the DiT map's hooks in
`weights.dit_map`): layouts, prefixes, dtypes and shards as users have them.

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
from weights.dit_map import LAYOUTS, PREFIXES, TOP_LEVEL, dit_entries, dit_file_keys, infer_dit_config
from weights.safetensors_io import CheckpointError, save_tensors
from weights.single_file import is_single_file, open_dit
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
    ckpt = open_dit(path, num_heads=heads, log=lines.append)
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
    assert infer_dit_config(shapes, layout, heads) == cfg
    variants = [cfg.replace(patch_size=(2, 1, 3), out_channels=12, cross_attn_norm=False)]
    if cfg.has_image_tokens:
        variants.append(cfg.replace(pos_embed_seq_len=6))  # FLF2V's image positions
    for v in variants:
        assert infer_dit_config({e.name(layout): e.shape for e in dit_entries(v)}, layout, heads) == v


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
        open_dit(path, cfg)
    msg = str(err.value)
    assert "missing 1 tensor(s): blocks.1.ffn.2.bias" in msg and "unexpected 1 tensor(s): blocks.0.self_attn.extra.weight" in msg
    assert "'model.diffusion_model.'" in msg and "does the preset or config match" in msg


def test_wrong_config_is_named_by_shape(tmp_path, t2v_state):
    cfg = get_preset(T2V).transformer
    path = write_single_file(tmp_path / "m.safetensors", cfg, t2v_state)
    with pytest.raises(CheckpointError, match=r"mis-shaped .*blocks\.0\.ffn\.0\.weight: checkpoint \[64, 32\], config expects \[128, 32\]"):
        open_dit(path, cfg.replace(ffn_dim=128))
    with pytest.raises(CheckpointError, match="not a multiple of Wan's head width 128: give the head count"):
        open_dit(path)


@pytest.mark.parametrize("extra,match", [
    ({"model.diffusion_model.blocks.0.ffn.0.scale_weight": np.ones(1, np.float32)},
     r"m\.safetensors: scale tensor model\.diffusion_model\.blocks\.0\.ffn\.0\.scale_weight .* not FP8"),
    ({"first_stage_model.decoder.conv.weight": np.ones(1, np.float32)}, "bundles other models .*give the diffusion model file alone"),
    ({"blocks.0.ffn.0.weight": np.ones(1, np.float32)}, r"mixed prefixes: .* 1 do not \(blocks\.0\.ffn\.0\.weight\)"),
    ({"model.diffusion_model.proj_out.weight": np.ones(1, np.float32)}, r"prefix 'model\.diffusion_model\.' removed\): mixed layouts: .*\(diffusers: proj_out\.weight; wan: head\.head\.weight\)"),
])
def test_refused_files(tmp_path, t2v_state, extra, match):
    """Files that are not one DiT under one prefix in one layout: refused with the problem and the fix."""
    cfg = get_preset(T2V).transformer
    path = write_single_file(tmp_path / "m.safetensors", cfg, t2v_state, prefix="model.diffusion_model.", extra=extra)
    with pytest.raises(CheckpointError, match=match):
        open_dit(path, cfg)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickled checkpoint.*--allow-pickle"):
        open_dit(tmp_path / "m.pt")
    save_tensors(tmp_path / "vae.safetensors", {"decoder.conv1.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match="cannot tell the model checkpoint layout"):
        open_dit(tmp_path / "vae.safetensors")
    save_tensors(tmp_path / "net.safetensors", {"net.blocks.0.ffn.0.weight": np.ones(2, np.float32),
                                                "net.head.head.weight": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match="every key starts with 'net.', a prefix wanport does not know"):
        open_dit(tmp_path / "net.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a weights file"):
        open_dit(tmp_path / "notes.txt")


# --- round trips: every layout, prefix and container a single file comes in --------------------------------
def _stored(state: dict[str, np.ndarray], cfg: DitConfig, layout: str, dtype: str) -> dict[str, np.ndarray]:
    """The tensors `write_single_file` stores, under the map's names in `layout` (no prefix)."""
    return {e.name(layout): state[e.diffusers].astype(DTYPES[dtype]) for e in dit_entries(cfg)}


@pytest.mark.parametrize("layout", ["wan", "diffusers"])
@pytest.mark.parametrize("prefix", ["", *PREFIXES])
def test_every_prefix_reads_back_bit_exact(tmp_path, t2v_state, layout, prefix):
    """Each tensor comes back exactly as stored, whatever the prefix (the engine reads the file's names through the
    hook's map: a prefix stripped twice or not at all would miss or mislabel tensors)."""
    cfg = get_preset(T2V).transformer
    path = write_single_file(tmp_path / "m.safetensors", cfg, t2v_state, layout=layout, prefix=prefix, shards=2)
    ckpt = open_dit(path, num_heads=cfg.num_attention_heads)
    assert (ckpt.layout, ckpt.prefix, ckpt.config, ckpt.single_file) == (layout, prefix, cfg, True)
    want = _stored(t2v_state, cfg, layout, "bf16")
    for e in ckpt.entries:
        got = ckpt.get(e, layout)
        assert got.dtype == want[e.name(layout)].dtype and np.array_equal(got, want[e.name(layout)]), e.name(layout)


def test_flax_single_file_opens_with_its_config_only(tmp_path, t2v_state):
    """A Flax-layout file has no shapes-to-config reading (Flax checkpoints are folders): with the config given
    it opens and re-lays exactly; without, the error says so."""
    cfg = get_preset(T2V).transformer
    entries = dit_entries(cfg)
    save_tensors(tmp_path / "flax.safetensors", {e.flax: e.to_flax(t2v_state[e.diffusers]) for e in entries})
    with pytest.raises(CheckpointError, match="flax-layout file: its config cannot be read off the shapes"):
        open_dit(tmp_path / "flax.safetensors")
    ckpt = open_dit(tmp_path / "flax.safetensors", cfg)
    assert ckpt.layout == "flax"
    for e in entries:
        assert np.array_equal(ckpt.get(e, "diffusers"), t2v_state[e.diffusers]), e.diffusers


def test_pickled_single_file_only_when_allowed(tmp_path, t2v_state):
    """A .pth DiT (the original release's own format): refused without allow_pickle, read weights-only with it."""
    import torch

    cfg = get_preset(T2V).transformer
    want = _stored(t2v_state, cfg, "wan", "fp32")
    torch.save({"model.diffusion_model." + k: torch.from_numpy(v) for k, v in want.items()}, tmp_path / "wan.pth")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_dit(tmp_path / "wan.pth", num_heads=2)
    ckpt = open_dit(tmp_path / "wan.pth", num_heads=2, allow_pickle=True)
    assert (ckpt.layout, ckpt.prefix, ckpt.config) == ("wan", "model.diffusion_model.", cfg)
    assert all(np.array_equal(ckpt.get(e, "wan"), want[e.wan]) for e in ckpt.entries)


def test_comfyui_scaled_fp8_single_file_is_dequantised(tmp_path, t2v_state):
    """ComfyUI's scaled-fp8 files (a `scaled_fp8` marker, scalar `scale_weight` and `scale_input` per block
    linear, under `model.diffusion_model.`) open as folders do: the scales are paired before the prefix is
    stripped and `get` returns weight * scale."""
    from weights import fp8 as wfp8

    cfg = get_preset(T2V).transformer
    tensors = {"model.diffusion_model." + k: v for k, v in _stored(t2v_state, cfg, "wan", "bf16").items()}
    scales = {}
    for k in [k for k in tensors if wfp8.is_fp8_linear(k) and k.endswith(".weight")]:
        q, s = wfp8.quantize_linear(tensors[k].astype(np.float32), scaling="tensor")
        tensors[k], scales[k] = q, s
        tensors[k[: -len("weight")] + "scale_weight"] = s
        tensors[k[: -len("weight")] + "scale_input"] = np.float32(1.0)
    tensors["scaled_fp8"] = np.zeros((0,), wfp8.E4M3)
    save_tensors(tmp_path / "wan_fp8_scaled.safetensors", tensors)
    ckpt = open_dit(tmp_path / "wan_fp8_scaled.safetensors", num_heads=2)
    assert ckpt.prefix == "model.diffusion_model." and len(ckpt.fp8) == len(scales) > 0
    for e in ckpt.entries:
        key = "model.diffusion_model." + e.wan
        want = wfp8.dequantize(tensors[key], scales[key]) if key in scales else tensors[key]
        assert np.array_equal(ckpt.get(e, "wan"), want), e.wan


@pytest.mark.parametrize("container", ["safetensors", "shards", "pth"])
@pytest.mark.parametrize("layout,prefix", [("wan", "model.diffusion_model."), ("diffusers", "transformer."), ("wan", "")])
def test_convert_single_file_round_trips_bit_exact(tmp_path, container, layout, prefix):
    """`wanport convert FILE` in each container and layout -> a Flax folder -> back to the file's layout: every
    tensor as stored, the config the one read off the shapes (head width 128)."""
    import torch

    from weights.convert import convert

    cfg = get_preset("tiny-hd128-wan2.1-i2v-14b").transformer
    state = base_state(cfg, seed=1)
    if container == "pth":
        src = tmp_path / "model.pth"
        torch.save({prefix + k: torch.from_numpy(v) for k, v in _stored(state, cfg, layout, "fp32").items()}, src)
        dtype = "fp32"
    else:
        dtype = "bf16"
        src = write_single_file(tmp_path / "model.safetensors", cfg, state, layout=layout, prefix=prefix, dtype=dtype,
                                shards=2 if container == "shards" else 1)
    flax = convert(src, tmp_path / "flax", "flax", allow_pickle=container == "pth")
    back = open_dit(convert(flax, tmp_path / "back", layout))
    assert (back.config, back.layout, back.single_file) == (cfg, layout, False)
    want = _stored(state, cfg, layout, dtype)
    for e in back.entries:
        got = back.get(e, layout)
        assert got.dtype == want[e.name(layout)].dtype and np.array_equal(got, want[e.name(layout)]), e.name(layout)


# --- the DiT map's key hook -----------------------------------------------------------------------------------
def test_top_level_names_are_the_maps():
    """`TOP_LEVEL` (what a real key may start with, so a shared first part that is not one is a prefix) is the set
    of first name parts of every preset's entries in every layout."""
    firsts = {e.name(layout).split(".")[0] for p in PRESETS.values() for cfg in [p.transformer]
              for e in dit_entries(cfg) for layout in LAYOUTS}
    assert firsts == TOP_LEVEL


def test_dit_file_keys_strips_the_longest_prefix_once():
    keys = ["model.diffusion_model.blocks.0.ffn.0.weight", "model.diffusion_model.head.head.weight"]
    view = dit_file_keys(keys)
    assert view.prefix == "model.diffusion_model." and view.names == {k[22:]: k for k in keys} and not view.dropped
    # a name that itself starts like a prefix keeps it: only the file's prefix, once
    keys = ["model.model.x", "model.blocks.0.ffn.0.weight"]
    assert dit_file_keys(keys).names == {"model.x": "model.model.x", "blocks.0.ffn.0.weight": keys[1]}
    assert dit_file_keys(["blocks.0.ffn.0.weight", "head.head.weight"]).prefix == ""
    assert dit_file_keys(["blocks.0.ffn.0.weight", "blocks.1.ffn.0.weight"]).prefix == ""  # blocks only: no prefix


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
    ckpt = open_dit(path, log=lines.append)
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
