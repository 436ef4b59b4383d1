"""Which DiT tensors a LoRA key names: module names in the diffusers, original-Wan and kohya spellings.

A LoRA file addresses *modules* (`blocks.0.attn1.to_q`, `blocks.0.self_attn.q`,
`lora_unet_blocks_0_self_attn_q`) and says what it changes with a suffix (`.lora_A.weight`, `.diff_b`,
...). This module turns the one DiT map (`weights.dit_map`) into module indexes for each spelling, so a
LoRA in any layout lands on the same `Entry` objects and can be merged into a checkpoint in any layout.

A "module" here is either a layer with a `.weight` (and maybe a `.bias`) or a bare parameter such as a
block's modulation table or the image embedder's positional embedding; the latter has no bias and only
takes full deltas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from weights.dit_map import DitConfig, Entry, dit_entries

NAMINGS = ("diffusers", "wan", "kohya")
KOHYA_PREFIX = "lora_unet_"
# Prefixes seen on LoRA keys in the wild, longest first; the naming is decided from the module names.
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", KOHYA_PREFIX)


@dataclass(frozen=True)
class Module:
    """One LoRA-addressable module of a DiT config, in one naming."""

    name: str
    weight: Entry  # the layer's weight, or the bare parameter itself
    bias: Entry | None
    is_param: bool  # a bare parameter (modulation table, positional embedding), not a layer


def flatten(name: str) -> str:
    """kohya's module spelling: dots become underscores (`blocks.0.self_attn.q` -> `blocks_0_self_attn_q`)."""
    return name.replace(".", "_")


def module_index(entries: list[Entry], naming: str) -> dict[str, Module]:
    """Module name -> Module for one naming. kohya names are the flattened original-Wan names
    (musubi-tuner's `lora_unet_` keys); the flattening is checked to be unambiguous."""
    base = "wan" if naming == "kohya" else naming
    weights: dict[str, Entry] = {}
    biases: dict[str, Entry] = {}
    params: dict[str, Entry] = {}
    for e in entries:
        n = e.name(base)
        if n.endswith(".weight"):
            weights[n[: -len(".weight")]] = e
        elif n.endswith(".bias"):
            biases[n[: -len(".bias")]] = e
        else:
            params[n] = e
    index = {m: Module(m, w, biases.get(m), False) for m, w in weights.items()}
    index.update({m: Module(m, p, None, True) for m, p in params.items()})
    if naming == "kohya":
        flat = {flatten(m): Module(flatten(m), mod.weight, mod.bias, mod.is_param) for m, mod in index.items()}
        if len(flat) != len(index):
            raise AssertionError("kohya flattening maps two DiT modules onto one name")
        return flat
    return index


def modulation_module(path: str) -> str:
    """`.diff_m` (LightX2V's modulation delta) sits on the block or head: `blocks.3` -> `blocks.3.modulation`."""
    return f"{path}.modulation"


def names_only_config(module_paths: list[str]) -> DitConfig:
    """A DiT config just detailed enough to name every module the paths mention (layer count, image
    branch, positional embedding), for reading or converting a LoRA without its model. Shapes in it are
    placeholders: with this config nothing is checked against tensor shapes."""
    blocks = [int(m.group(1)) for p in module_paths if (m := re.search(r"blocks[._](\d+)(?:[._]|$)", p))]
    joined = " ".join(module_paths)
    image = re.search(r"k_img|v_img|img_emb|add_k_proj|add_v_proj|image_embedder|norm_added_k", joined) is not None
    pos = re.search(r"emb_pos|pos_embed", joined) is not None
    return DitConfig(
        num_attention_heads=1,
        attention_head_dim=2,
        ffn_dim=1,
        num_layers=max(blocks, default=0) + 1,
        text_dim=1,
        freq_dim=2,
        image_dim=1 if image else None,
        added_kv_proj_dim=1 if image else None,
        pos_embed_seq_len=1 if pos else None,
    )


def indexes(cfg: DitConfig) -> dict[str, dict[str, Module]]:
    """Module indexes of `cfg` for every naming."""
    entries = dit_entries(cfg)
    return {n: module_index(entries, n) for n in NAMINGS}
