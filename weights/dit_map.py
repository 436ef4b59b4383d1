"""The one name/layout map of the Wan DiT between diffusers, the original Wan repository and Flax.

Every tensor of a model appears once, as an `Entry` (`weights.entry`) naming it in each layout, with its
diffusers shape and the layout change to Flax. Loading, converting and the key checks all read this list
(through `DIT`, the map the checkpoint engine opens DiT folders with), so a missing, extra or mis-shaped
tensor is reported by name in whichever layout the user has.

Flax checkpoint keys are the paths of `jax_impl.dit.WanTransformer`'s parameters with the layer
index after "blocks" (`blocks.3.self_attn.q.kernel`); the model stores the blocks stacked.

What downloaded files do with these names is said here too, as the map's hooks: `dit_file_keys` strips
the prefix ComfyUI and others put on every key (and refuses "all in one" files and unknown prefixes),
`infer_dit_config` reads a config off the tensor shapes of a file that comes without config.json.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from weights.configs.base import ConfigError
from weights.configs.dit import DitConfig
from weights.entry import Entry, FileKeys, WeightMap
from weights.safetensors_io import CheckpointError


def _linear(entries: list[Entry], d: str, w: str, f: str, d_in: int, d_out: int) -> None:
    entries.append(Entry(f"{d}.weight", f"{w}.weight", f"{f}.kernel", (d_out, d_in), "linear"))
    entries.append(Entry(f"{d}.bias", f"{w}.bias", f"{f}.bias", (d_out,), "copy"))


def _norm(entries: list[Entry], d: str, w: str, f: str, dim: int, bias: bool) -> None:
    entries.append(Entry(f"{d}.weight", f"{w}.weight", f"{f}.scale", (dim,), "copy"))
    if bias:
        entries.append(Entry(f"{d}.bias", f"{w}.bias", f"{f}.bias", (dim,), "copy"))


def dit_entries(cfg: DitConfig) -> list[Entry]:
    """Every tensor of a Wan DiT with this config, in module order (diffusers' state dict lists each
    module's own `scale_shift_table` before its sub-modules; here it comes last)."""
    d, e = cfg.inner_dim, []
    pt, ph, pw = cfg.patch_size
    e.append(Entry("patch_embedding.weight", "patch_embedding.weight", "patch_kernel", (d, cfg.in_channels, pt, ph, pw), "conv3d"))
    e.append(Entry("patch_embedding.bias", "patch_embedding.bias", "patch_bias", (d,), "copy"))
    ce = "condition_embedder"
    _linear(e, f"{ce}.time_embedder.linear_1", "time_embedding.0", "time_embed.fc1", cfg.freq_dim, d)
    _linear(e, f"{ce}.time_embedder.linear_2", "time_embedding.2", "time_embed.fc2", d, d)
    _linear(e, f"{ce}.time_proj", "time_projection.1", "time_proj", d, 6 * d)
    _linear(e, f"{ce}.text_embedder.linear_1", "text_embedding.0", "text_embed.fc1", cfg.text_dim, d)
    _linear(e, f"{ce}.text_embedder.linear_2", "text_embedding.2", "text_embed.fc2", d, d)
    if cfg.has_image_tokens:
        ie, di = f"{ce}.image_embedder", cfg.image_dim
        _norm(e, f"{ie}.norm1", "img_emb.proj.0", "image_embed.norm1", di, bias=True)
        _linear(e, f"{ie}.ff.net.0.proj", "img_emb.proj.1", "image_embed.mlp.fc1", di, di)
        _linear(e, f"{ie}.ff.net.2", "img_emb.proj.3", "image_embed.mlp.fc2", di, d)
        _norm(e, f"{ie}.norm2", "img_emb.proj.4", "image_embed.norm2", d, bias=True)
        if cfg.pos_embed_seq_len:
            e.append(Entry(f"{ie}.pos_embed", "img_emb.emb_pos", "image_embed.pos_embed", (1, cfg.pos_embed_seq_len, di), "copy"))
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        for dn, wn, fn, cross in (("attn1", "self_attn", "self_attn", False), ("attn2", "cross_attn", "cross_attn", True)):
            for dp, wp in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o")):
                _linear(e, f"{b}.{dn}.{dp}", f"{b}.{wn}.{wp}", f"{b}.{fn}.{wp}", d, d)
            _norm(e, f"{b}.{dn}.norm_q", f"{b}.{wn}.norm_q", f"{b}.{fn}.norm_q", d, bias=False)
            _norm(e, f"{b}.{dn}.norm_k", f"{b}.{wn}.norm_k", f"{b}.{fn}.norm_k", d, bias=False)
            if cross and cfg.has_image_tokens:
                kv = cfg.added_kv_proj_dim
                _linear(e, f"{b}.{dn}.add_k_proj", f"{b}.{wn}.k_img", f"{b}.{fn}.k_img", kv, d)
                _linear(e, f"{b}.{dn}.add_v_proj", f"{b}.{wn}.v_img", f"{b}.{fn}.v_img", kv, d)
                _norm(e, f"{b}.{dn}.norm_added_k", f"{b}.{wn}.norm_k_img", f"{b}.{fn}.norm_k_img", d, bias=False)
        if cfg.cross_attn_norm:  # the original repo calls the cross-attention norm "norm3"
            _norm(e, f"{b}.norm2", f"{b}.norm3", f"{b}.norm_cross", d, bias=True)
        _linear(e, f"{b}.ffn.net.0.proj", f"{b}.ffn.0", f"{b}.ffn.fc1", d, cfg.ffn_dim)
        _linear(e, f"{b}.ffn.net.2", f"{b}.ffn.2", f"{b}.ffn.fc2", cfg.ffn_dim, d)
        e.append(Entry(f"{b}.scale_shift_table", f"{b}.modulation", f"{b}.modulation", (1, 6, d), "copy"))
    _linear(e, "proj_out", "head.head", "head", d, cfg.out_channels * pt * ph * pw)
    e.append(Entry("scale_shift_table", "head.modulation", "head_modulation", (1, 2, d), "copy"))
    return e


def read_dit_config(raw: dict[str, Any], keys: list[str], source: str) -> DitConfig:
    """diffusers' config.json, or the original repository's ("WanModel"; its image branch read from the weights)."""
    if raw.get("_class_name") == "WanModel":
        return DitConfig.from_wan_dict(raw, any(k.startswith("img_emb.") for k in keys), source=source)
    return DitConfig.from_dict(raw, source=source)


# --- names in downloaded files ---------------------------------------------------------------------------
# Longest first: "model.diffusion_model." must not be read as "model." + "diffusion_model.".
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
# Keys of other models bundled into "all in one" files, named so the error can say what they are.
OTHER_MODELS = ("first_stage_model.", "cond_stage_model.", "conditioner.", "vae.", "text_encoders.", "clip_vision.")
# First name parts of the DiT's own tensors in every layout (tests/test_single_file.py checks it against the map).
TOP_LEVEL = frozenset({
    "blocks", "patch_embedding", "condition_embedder", "proj_out", "scale_shift_table",  # diffusers
    "time_embedding", "time_projection", "text_embedding", "img_emb", "head",  # original Wan
    "patch_kernel", "patch_bias", "time_embed", "time_proj", "text_embed", "image_embed", "head_modulation",  # Flax
})


def dit_file_keys(keys: list[str]) -> FileKeys:
    """The `canonical_keys` hook of the DiT: the prefix most keys carry removed (`PREFIXES`).

    Refused, each with the fix: keys of other models bundled in ("all in one" files), a file where only some
    keys carry the prefix (two models, or one saved twice), every key under a prefix this map does not know."""
    bundled = sorted({p for k in keys for p in OTHER_MODELS if k.startswith(p)})
    if bundled:
        raise CheckpointError(f"bundles other models ({', '.join(bundled)} keys) with the DiT; give the diffusion model "
                              "file alone (ComfyUI's split_files/diffusion_models), and the VAE and encoders separately")
    prefix = next((p for p in PREFIXES if sum(k.startswith(p) for k in keys) > len(keys) // 2), "")
    if prefix:
        bare = [k for k in keys if not k.startswith(prefix)]
        if bare:
            raise CheckpointError(f"mixed prefixes: {len(keys) - len(bare)} keys start with {prefix!r}, {len(bare)} do not "
                                  f"({', '.join(bare[:3])}{' ...' if len(bare) > 3 else ''}); a DiT file holds one model under "
                                  "one prefix: save the DiT's tensors alone")
        return FileKeys({k[len(prefix):]: k for k in keys}, prefix=prefix)
    heads = {k.split(".", 1)[0] for k in keys}
    if len(heads) == 1 and len(keys) > 1 and not heads <= TOP_LEVEL:
        unknown = f"{heads.pop()}."
        raise CheckpointError(f"every key starts with {unknown!r}, a prefix wanport does not know (it strips "
                              f"{', '.join(PREFIXES)}): save the file with the DiT's tensors under one of those prefixes "
                              "or none")
    return FileKeys.identity(keys)


WAN_HEAD_DIM = 128  # attention head width of every published Wan DiT (1.3B: 12 heads, 14B: 40, 5B: 24)
# Per layout, the tensor names the config is read from.
_SIZE_NAMES = {
    "wan": dict(patch="patch_embedding.weight", ffn="blocks.0.ffn.0.weight", text="text_embedding.0.weight",
                time="time_embedding.0.weight", head="head.head.weight", norm3="blocks.0.norm3.weight",
                img="img_emb.proj.1.weight", k_img="blocks.0.cross_attn.k_img.weight", pos="img_emb.emb_pos"),
    "diffusers": dict(patch="patch_embedding.weight", ffn="blocks.0.ffn.net.0.proj.weight",
                      text="condition_embedder.text_embedder.linear_1.weight",
                      time="condition_embedder.time_embedder.linear_1.weight", head="proj_out.weight",
                      norm3="blocks.0.norm2.weight", img="condition_embedder.image_embedder.ff.net.0.proj.weight",
                      k_img="blocks.0.attn2.add_k_proj.weight", pos="condition_embedder.image_embedder.pos_embed"),
}


def infer_dit_config(shapes: Mapping[str, tuple[int, ...]], layout: str, num_heads: int | None = None) -> DitConfig:
    """A DitConfig read off the tensor shapes of a checkpoint in `layout` (wan or diffusers): the map's
    `file_config`. The head count is not in the shapes: `num_heads`, else width / 128 (every Wan release)."""
    if layout not in _SIZE_NAMES:
        raise CheckpointError(f"a {layout}-layout file: its config cannot be read off the shapes; {layout} checkpoints are "
                              "folders with their config.json (`wanport convert --to flax` writes one)")
    n = _SIZE_NAMES[layout]
    need = [n[k] for k in ("patch", "ffn", "text", "time", "head") if n[k] not in shapes]
    if need:
        raise CheckpointError(f"cannot read the model size off the tensors: missing {', '.join(need)}")
    dim, in_ch, *patch = shapes[n["patch"]]
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise CheckpointError(f"width {dim} is not a multiple of Wan's head width {WAN_HEAD_DIM}: give the head "
                                  "count (num_heads) or a config")
        num_heads = dim // WAN_HEAD_DIM
    if dim % num_heads:
        raise CheckpointError(f"width {dim} is not divisible by num_heads={num_heads}")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"^blocks\.(\d+)\.", k))}
    image = n["img"] in shapes
    try:
        return DitConfig(
            patch_size=tuple(patch),
            num_attention_heads=num_heads,
            attention_head_dim=dim // num_heads,
            in_channels=in_ch,
            out_channels=shapes[n["head"]][0] // math.prod(patch),
            text_dim=shapes[n["text"]][1],
            freq_dim=shapes[n["time"]][1],
            ffn_dim=shapes[n["ffn"]][0],
            num_layers=max(blocks) + 1 if blocks else 0,
            cross_attn_norm=n["norm3"] in shapes,
            image_dim=shapes[n["img"]][1] if image else None,
            added_kv_proj_dim=shapes[n["k_img"]][1] if image and n["k_img"] in shapes else (dim if image else None),
            pos_embed_seq_len=shapes[n["pos"]][1] if n["pos"] in shapes else None,
        )
    except ConfigError as e:
        raise CheckpointError(f"the tensor shapes do not make a Wan DiT config: {e}") from None


DIT = WeightMap(
    what="model",
    subfolder="transformer",
    signatures={
        "diffusers": ("proj_out.weight", "condition_embedder."),
        "wan": ("head.head.weight", "time_embedding."),
        "flax": ("patch_kernel",),
    },
    entries=dit_entries,
    read_config=read_dit_config,
    hint="Check that config.json belongs to these weights (preset, layer count, I2V vs T2V).",
    ignore=("norm_added_q.weight",),  # diffusers' I2V attention has it; Wan never uses it
    canonical_keys=dit_file_keys,
    file_config=infer_dit_config,
    file_hint="Compared with the config read off its tensor shapes: a file cut short, or another model's file "
              "(a VAE, a text encoder)?",
)
LAYOUTS = DIT.layouts
