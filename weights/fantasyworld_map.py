"""The one name/layout map of FantasyWorld: our torch reference <-> the released `model.pth` <-> Flax.

Every tensor appears once as an `Entry` (`weights.entry`): `diffusers` holds the key in our PyTorch
reference (`torch_ref.fantasyworld`, whose Wan half is diffusers' WanTransformer3DModel under `wan.`),
`wan` the key in the released checkpoint (the public code's module tree: `pipe.dit.*`,
`IRGBlock.N.{x_dit,x_agg,bicross_attention}.*`, `vggt.*`, `camera_condition.pose_encoder.*`), `flax`
the parameter path in `jax_impl.fantasyworld` (our module tree, `kernel`/`scale` leaves). The one `Entry`
type (`weights.entry`) covers its 2D/1D/transposed convolutions and (C, 1, 1, 1) gains.

The per-module builders take path prefixes so one module can be mapped alone (parity tests).

The released file is the public model's `state_dict()`, which also holds the pipeline's other components
(`pipe.text_encoder.*`, `pipe.image_encoder.*`, `pipe.vae.*`): frozen copies of the base
Wan2.1-I2V-14B-480P's encoders and VAE. `fantasyworld_file_keys`, the map's hook, sets them aside with
one log line; the base checkpoint supplies those components (see `BASE_COMPONENTS`).
"""

from __future__ import annotations

import numpy as np

from weights.configs.fantasyworld import FantasyWorldConfig
from weights.dit_map import dit_entries
from weights.entry import Entry, FileKeys, WeightMap, describe_mismatch
from weights.safetensors_io import CheckpointError

TORCH, RELEASED, FLAX = "diffusers", "wan", "flax"  # Entry field names used for our three layouts


Entries = list[Entry]
_LEAF = {"linear": "kernel", "conv3d": "kernel", "conv2d": "kernel", "conv1d": "kernel", "conv_transpose2d": "kernel"}


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _add(e: Entries, t: str, r: str, shape, kind: str = "copy") -> None:
    """One tensor: torch path t, released path r; Flax path = t with `weight` renamed for its kind."""
    f = t
    if t.endswith(".weight"):
        f = t[: -len("weight")] + _LEAF.get(kind, "scale")
    e.append(Entry(t, r, f, tuple(shape), kind))


def _linear(e: Entries, t: str, r: str, d_in: int, d_out: int, bias: bool = True) -> None:
    _add(e, f"{t}.weight", f"{r}.weight", (d_out, d_in), "linear")
    if bias:
        _add(e, f"{t}.bias", f"{r}.bias", (d_out,))


def _norm(e: Entries, t: str, r: str, dim: int) -> None:
    _add(e, f"{t}.weight", f"{r}.weight", (dim,))
    _add(e, f"{t}.bias", f"{r}.bias", (dim,))


def _conv(e: Entries, t: str, r: str, shape, kind: str, bias: bool = True) -> None:
    _add(e, f"{t}.weight", f"{r}.weight", shape, kind)
    if bias:
        _add(e, f"{t}.bias", f"{r}.bias", (shape[1] if kind == "conv_transpose2d" else shape[0],))


# ------------------------------------------------------------------------------------------ modules
def geometry_block_entries(t: str, r: str, dim: int, mlp_ratio: int, heads: int, qk_norm: bool) -> Entries:
    e: Entries = []
    _norm(e, f"{t}.norm1", f"{r}.norm1", dim)
    _linear(e, f"{t}.attn.qkv", f"{r}.attn.qkv", dim, 3 * dim)
    if qk_norm:
        _norm(e, f"{t}.attn.q_norm", f"{r}.attn.q_norm", dim // heads)
        _norm(e, f"{t}.attn.k_norm", f"{r}.attn.k_norm", dim // heads)
    _linear(e, f"{t}.attn.proj", f"{r}.attn.proj", dim, dim)
    _add(e, f"{t}.ls1", f"{r}.ls1.gamma", (dim,))
    _norm(e, f"{t}.norm2", f"{r}.norm2", dim)
    _linear(e, f"{t}.fc1", f"{r}.mlp.fc1", dim, mlp_ratio * dim)
    _linear(e, f"{t}.fc2", f"{r}.mlp.fc2", mlp_ratio * dim, dim)
    _add(e, f"{t}.ls2", f"{r}.ls2.gamma", (dim,))
    _add(e, f"{t}.modulation", f"{r}.modulation", (1, 6, dim))
    return e


def geo_block_entries(t: str, r: str, cfg: FantasyWorldConfig) -> Entries:
    return geometry_block_entries(t, r, cfg.geo_dim, cfg.geo_mlp_ratio, cfg.geo_heads, qk_norm=True)


def geometry_embed_entries(t: str, r: str, cfg: FantasyWorldConfig) -> Entries:
    """Projection Conv3d, time embedding, learned camera/register tokens, unused camera-token projector."""
    e: Entries = []
    d = cfg.geo_dim
    _conv(e, _join(t, "proj_in"), _join(r, "projection_head"), (d, cfg.wan_dim, 1, 1, 1), "conv3d")
    _linear(e, _join(t, "time_fc1"), _join(r, "time_embedding.0"), cfg.geo_freq_dim, d)
    _linear(e, _join(t, "time_fc2"), _join(r, "time_embedding.2"), d, d)
    _linear(e, _join(t, "time_proj"), _join(r, "time_projection.1"), d, 6 * d)
    _add(e, _join(t, "camera_token"), _join(r, "aggregator.camera_token"), (1, 2, 1, d))
    _add(e, _join(t, "register_token"), _join(r, "aggregator.register_token"), (1, 2, cfg.register_tokens, d))
    _linear(e, _join(t, "cam_fc1"), _join(r, "aggregator.CamTokenProjector.mlp.0"), cfg.cam_token_in, cfg.cam_token_hidden)
    _linear(e, _join(t, "cam_fc2"), _join(r, "aggregator.CamTokenProjector.mlp.2"), cfg.cam_token_hidden, d)
    return e


def bicross_entries(t: str, r: str, cfg: FantasyWorldConfig) -> Entries:
    e: Entries = []
    dv, dg, d = cfg.wan_dim, cfg.geo_dim, cfg.bicross_dim
    c = _join(r, "cross_attn")
    _linear(e, _join(t, "q_proj"), _join(c, "m1_proj"), dv, d)
    _linear(e, _join(t, "k_proj"), _join(c, "m2_proj"), dg, d)
    _linear(e, _join(t, "v_video"), _join(c, "values_m1_proj"), dv, d)
    _linear(e, _join(t, "v_geo"), _join(c, "values_m2_proj"), dg, d)
    _linear(e, _join(t, "out_video"), _join(c, "out_m1_proj"), d, dv)
    _linear(e, _join(t, "out_geo"), _join(c, "out_m2_proj"), d, dg)
    _add(e, _join(t, "gate_video"), _join(r, "gamma_m1"), (dv,))
    _add(e, _join(t, "gate_geo"), _join(r, "gamma_m2"), (dg,))
    return e


def adapter_entries(t: str, r: str, cfg: FantasyWorldConfig) -> Entries:
    """r: the released cross-attention processor path (`...cross_attn.processor`)."""
    e: Entries = []
    ctx, d = cfg.camera_context_dim, cfg.wan_dim
    _linear(e, _join(t, "context_proj"), _join(r, "k_proj.group1"), ctx, ctx)
    _linear(e, _join(t, "attn_down"), _join(r, "k_proj.group2.0"), d, cfg.adapter_hidden)
    _linear(e, _join(t, "attn_up"), _join(r, "k_proj.group2.2"), cfg.adapter_hidden, ctx)
    _linear(e, _join(t, "shift_down"), _join(r, "v_proj.group2.0"), ctx, cfg.adapter_shift_hidden)
    _linear(e, _join(t, "shift_up"), _join(r, "v_proj.group2.2"), cfg.adapter_shift_hidden, d)
    return e


def pose_encoder_entries(t: str, r: str, cfg: FantasyWorldConfig) -> Entries:
    e: Entries = []
    c, d, ctx = cfg.camera_unshuffled, cfg.camera_dim, cfg.camera_context_dim
    first, second = _join(r, "controlnet_encode_first"), _join(r, "controlnet_encode_second")
    _conv(e, _join(t, "conv1"), f"{first}.0", (c, c, 1, 1), "conv2d")
    _norm(e, _join(t, "norm1"), f"{first}.1", c)
    _conv(e, _join(t, "conv2"), f"{first}.2", (c, c, 1, 1), "conv2d")
    _norm(e, _join(t, "norm2"), f"{first}.3", c)
    _conv(e, _join(t, "conv3"), f"{second}.0", (2 * c, c, 1, 1), "conv2d")
    _norm(e, _join(t, "norm3"), f"{second}.1", 2 * c)
    _conv(e, _join(t, "patch_embed"), _join(r, "patch_embedding"), (d, 2 * c, 1, 2, 2), "conv3d")
    _linear(e, _join(t, "fc1"), _join(r, "fc.0"), d, d // 2)
    _norm(e, _join(t, "fc_norm1"), _join(r, "fc.1"), d // 2)
    _linear(e, _join(t, "fc2"), _join(r, "fc.3"), d // 2, ctx)
    _norm(e, _join(t, "fc_norm2"), _join(r, "fc.4"), ctx)
    return e


def camera_head_entries(t: str, r: str, cfg: FantasyWorldConfig) -> Entries:
    e: Entries = []
    d = cfg.head_dim_in
    for n in range(cfg.head_trunk_depth):
        e += geometry_block_entries(_join(t, f"trunk.{n}"), _join(r, f"trunk.{n}"), d, 4, cfg.head_heads, qk_norm=False)
    _norm(e, _join(t, "token_norm"), _join(r, "token_norm"), d)
    _norm(e, _join(t, "trunk_norm"), _join(r, "trunk_norm"), d)
    _add(e, _join(t, "empty_pose"), _join(r, "empty_pose_tokens"), (1, 1, 9))
    _linear(e, _join(t, "embed_pose"), _join(r, "embed_pose"), 9, d)
    _linear(e, _join(t, "pose_modulation"), _join(r, "poseLN_modulation.1"), d, 3 * d)
    _conv(e, _join(t, "time_upsample"), _join(r, "camera_time_upsample.expand_channels"), (4 * d, d, 1), "conv1d")
    _linear(e, _join(t, "pose_fc1"), _join(r, "pose_branch.fc1"), d, d // 2)
    _linear(e, _join(t, "pose_fc2"), _join(r, "pose_branch.fc2"), d // 2, 9)
    return e


def upsampler_entries(t: str, r: str, c: int) -> Entries:
    e: Entries = []
    ups = _join(r, "decoder.upsamples")
    _conv(e, _join(t, "conv_in"), _join(r, "conv2"), (c, c, 1, 1, 1), "conv3d")
    for i in (1, 2):
        _conv(e, _join(t, f"time_conv{i}"), f"{ups}.{2 * i - 2}.time_conv", (2 * c, c, 3, 1, 1), "conv3d")
        _add(e, _join(t, f"res{i}_gamma"), f"{ups}.{2 * i - 1}.residual.0.gamma", (c, 1, 1, 1), "flatten")
        _conv(e, _join(t, f"res{i}_conv"), f"{ups}.{2 * i - 1}.residual.2", (c, c, 3, 3, 3), "conv3d")
    return e


def dpt_entries(t: str, r: str, cfg: FantasyWorldConfig, out_dim: int) -> Entries:
    e: Entries = []
    d, ch, fe = cfg.head_dim_in, cfg.dpt_channels, cfg.dpt_features
    _norm(e, _join(t, "norm"), _join(r, "norm"), d)
    for k, c in enumerate(ch):
        _conv(e, _join(t, f"projects.{k}"), _join(r, f"projects.{k}"), (c, d, 1, 1), "conv2d")
    _conv(e, _join(t, "resize0"), _join(r, "resize_layers.0"), (ch[0], ch[0], 4, 4), "conv_transpose2d")
    _conv(e, _join(t, "resize1"), _join(r, "resize_layers.1"), (ch[1], ch[1], 2, 2), "conv_transpose2d")
    _conv(e, _join(t, "resize3"), _join(r, "resize_layers.3"), (ch[3], ch[3], 3, 3), "conv2d")
    for k, c in enumerate(ch):
        e += upsampler_entries(_join(t, f"upsamplers.{k}"), _join(r, f"temporal_upsamplers.{k}"), c)
    s = _join(r, "scratch")
    for k, c in enumerate(ch):
        _conv(e, _join(t, f"layer_rn.{k}"), f"{s}.layer{k + 1}_rn", (fe, c, 3, 3), "conv2d", bias=False)
    for k in range(4):
        tk, rk = _join(t, f"refine.{k}"), f"{s}.refinenet{k + 1}"
        units = (("unit1", "resConfUnit1"), ("unit2", "resConfUnit2")) if k < 3 else (("unit2", "resConfUnit2"),)
        for ours, theirs in units:
            for conv in ("conv1", "conv2"):
                _conv(e, f"{tk}.{ours}.{conv}", f"{rk}.{theirs}.{conv}", (fe, fe, 3, 3), "conv2d")
        _conv(e, f"{tk}.out_conv", f"{rk}.out_conv", (fe, fe, 1, 1), "conv2d")
    _conv(e, _join(t, "out_conv1"), f"{s}.output_conv1", (fe // 2, fe, 3, 3), "conv2d")
    _conv(e, _join(t, "out_conv2"), f"{s}.output_conv2.0", (cfg.dpt_hidden, fe // 2, 3, 3), "conv2d")
    _conv(e, _join(t, "out_conv3"), f"{s}.output_conv2.2", (out_dim, cfg.dpt_hidden, 1, 1), "conv2d")
    return e


def _released_wan_block(cfg: FantasyWorldConfig, i: int) -> str:
    """Where Wan block i lives in the released tree: its own slot, or inside joint layer i - branch_start."""
    return f"pipe.dit.blocks.{i}" if i < cfg.branch_start else f"IRGBlock.{i - cfg.branch_start}.x_dit"


def wan_entries(cfg: FantasyWorldConfig) -> Entries:
    """The Wan DiT: diffusers names under `wan.` <-> original-Wan names in the released tree."""
    out: Entries = []
    for en in dit_entries(cfg.wan):
        r = en.wan
        if r.startswith("blocks."):
            _, i, rest = r.split(".", 2)
            r = f"{_released_wan_block(cfg, int(i))}.{rest}"
        else:
            r = f"pipe.dit.{r}"
        out.append(Entry(f"wan.{en.diffusers}", r, f"wan.{en.flax}", en.shape, en.kind))
    return out


def fantasyworld_entries(cfg: FantasyWorldConfig) -> Entries:
    """Every tensor of the model, grouped by module."""
    e = wan_entries(cfg)
    for i in cfg.adapter_layers():
        e += adapter_entries(f"adapters.{i}", f"{_released_wan_block(cfg, i)}.cross_attn.processor", cfg)
    e += pose_encoder_entries("pose_encoder", "camera_condition.pose_encoder", cfg)
    e += geometry_embed_entries("geometry", "vggt", cfg)
    for j in range(cfg.joint_layers):
        e += geo_block_entries(f"frame_blocks.{j}", f"vggt.aggregator.frame_blocks.{j}", cfg)
        e += geo_block_entries(f"global_blocks.{j}", f"IRGBlock.{j}.x_agg", cfg)
        e += bicross_entries(f"bicross.{j}", f"IRGBlock.{j}.bicross_attention", cfg)
    e += camera_head_entries("camera_head", "vggt.camera_head", cfg)
    e += dpt_entries("depth_head", "vggt.depth_head", cfg, 2)
    e += dpt_entries("point_head", "vggt.point_head", cfg, 4)
    return e


def relayout(tensors: dict[str, np.ndarray], entries: Entries, src: str, dst: str, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Rename and re-lay every tensor from layout `src` to `dst` (TORCH, RELEASED or FLAX).

    Raises one error listing missing, unexpected and mis-shaped tensors (names in the source layout)."""
    by_src = {en.name(src): en for en in entries}
    problems = describe_mismatch({k: en.layout_shape(src) for k, en in by_src.items()},
                                 {k: np.shape(v) for k, v in tensors.items()}, unit="")
    if problems:
        raise CheckpointError(f"{source} does not match the FantasyWorld config ({src} layout): {problems}")
    return {en.name(dst): en.convert(np.asarray(tensors[en.name(src)]), src, dst) for en in entries}


# The public model (`FantasyWorldFusionModel`) holds a DiffSynth `WanVideoPipeline` as `pipe`, whose modules
# are `text_encoder`, `image_encoder`, `dit` and `vae` (motion_controller and vace stay None for this model).
# Its inference script builds the whole pipeline from the base Wan2.1-I2V-14B-480P files, then loads
# model.pth over it with strict=False, asserting no unexpected key: so the only `pipe.*` tensors besides
# `pipe.dit.*` a released file can hold are these three components. The VAE is built frozen
# (requires_grad_(False)); nothing in the public code trains or replaces the encoders. wanport runs them from
# the base checkpoint folder (diffusers layout), so their copies here are set aside, with one log line.
BASE_COMPONENTS = ("pipe.text_encoder.", "pipe.image_encoder.", "pipe.vae.")


def fantasyworld_file_keys(keys: list[str]) -> FileKeys:
    """The `canonical_keys` hook of FantasyWorld: the base components' tensors set aside, every other name kept
    (an unknown `pipe.*` module then shows up as unexpected in the key check)."""
    dropped = tuple(k for k in keys if k.startswith(BASE_COMPONENTS))
    return FileKeys({k: k for k in keys if not k.startswith(BASE_COMPONENTS)}, dropped=dropped,
                    why="the text encoder, CLIP image encoder and VAE of the base Wan2.1-I2V-14B-480P, which the public "
                        "model saves with its own weights; wanport takes them from the base checkpoint")


# The checkpoint engine's view (weights.checkpoint.Checkpoint): a FantasyWorld folder holds config.json
# (FantasyWorldConfig) and `model.safetensors` (or the released `model.pth`, read only with allow_pickle) in
# the released layout, our torch reference's names or the Flax names. The released `model.pth` alone (no
# config.json) is checked against the released model's config.
FANTASYWORLD = WeightMap(
    what="FantasyWorld model",
    subfolder="fantasyworld",
    signatures={RELEASED: ("pipe.dit.patch_embedding.weight",), TORCH: ("wan.patch_embedding.weight",),
                FLAX: ("wan.patch_kernel",)},
    entries=fantasyworld_entries,
    read_config=lambda raw, keys, source: FantasyWorldConfig.from_dict(raw, source=source),
    hint="Check that config.json (FantasyWorldConfig) belongs to these weights (branch_start, adapter_blocks, widths).",
    prefer="model",
    canonical_keys=fantasyworld_file_keys,
    file_config=lambda shapes, layout: FantasyWorldConfig.full(),
    file_hint="Compared with the released FantasyWorld-Wan2.1-I2V-14B-480P config (FantasyWorldConfig.full()); for "
              "another model put the file in a folder with its config.json.",
)
