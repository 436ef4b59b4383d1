"""Single-file DiT checkpoints as users download them: one `.safetensors` (or shards + an index json), no config.

What is out there (ComfyUI "repackaged" files, the original Wan release, community fine-tunes):
- keys in the original Wan layout (`blocks.0.self_attn.q.weight`, `head.head.weight`), often under a
  prefix: `model.diffusion_model.` (ComfyUI checkpoints), `diffusion_model.`, `model.`; or in the
  diffusers layout, bare or under `transformer.`;
- fp32, fp16, bf16 or plain fp8 (e4m3fn / e5m2) tensors; ComfyUI's *scaled* fp8 files (a `scaled_fp8`
  marker and per-tensor `scale_weight`s) are refused: their weights are not usable without the scales;
- no config.json: the config is read off the tensor shapes (head count: `num_heads`, else width / 128,
  the head width of every published Wan model), or given by the caller and then checked against them.

`SingleFileCheckpoint` offers what `weights.checkpoint.Checkpoint` offers (config, layout, entries, get,
dtype), so `load_dit` and the LoRA merge take either.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from weights.checkpoint import Checkpoint
from weights.configs.base import ConfigError
from weights.configs.dit import DitConfig
from weights.dit_map import DIT, dit_entries
from weights.entry import Entry, check_keys
from weights.safetensors_io import CheckpointError, CheckpointReader

logger = logging.getLogger("wanport.checkpoint")

# Longest first: "model.diffusion_model." must not be read as "model." + "diffusion_model.".
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
WAN_HEAD_DIM = 128  # attention head width of every published Wan DiT (1.3B: 12 heads, 14B: 40, 5B: 24)
_SCALED_FP8 = re.compile(r"(^|\.)(scaled_fp8|scale_weight|scale_input)$")
# Keys of other models bundled into "all in one" files, named so the error can say what they are.
_OTHER_MODELS = ("first_stage_model.", "cond_stage_model.", "conditioner.", "vae.", "text_encoders.", "clip_vision.")

# Per layout, the tensor names the config is read from.
_NAMES = {
    "wan": dict(patch="patch_embedding.weight", ffn="blocks.0.ffn.0.weight", text="text_embedding.0.weight",
                time="time_embedding.0.weight", head="head.head.weight", norm3="blocks.0.norm3.weight",
                img="img_emb.proj.1.weight", k_img="blocks.0.cross_attn.k_img.weight", pos="img_emb.emb_pos",
                block=r"^blocks\.(\d+)\."),
    "diffusers": dict(patch="patch_embedding.weight", ffn="blocks.0.ffn.net.0.proj.weight",
                      text="condition_embedder.text_embedder.linear_1.weight",
                      time="condition_embedder.time_embedder.linear_1.weight", head="proj_out.weight",
                      norm3="blocks.0.norm2.weight", img="condition_embedder.image_embedder.ff.net.0.proj.weight",
                      k_img="blocks.0.attn2.add_k_proj.weight", pos="condition_embedder.image_embedder.pos_embed",
                      block=r"^blocks\.(\d+)\."),
}


def is_single_file(path: str | os.PathLike) -> bool:
    """Whether `path` names a single-file checkpoint (as opposed to a model folder)."""
    p = Path(path)
    return p.is_file() and _single_file_name(p)


def _single_file_name(p: Path) -> bool:
    return p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")


def strip_prefix(keys: list[str]) -> tuple[str, dict[str, str]]:
    """(prefix, {stripped name: key in the file}): the prefix most keys carry is removed; keys without
    it are kept whole (and then reported as unexpected by the key check)."""
    best = next((p for p in PREFIXES if sum(k.startswith(p) for k in keys) > len(keys) // 2), "")
    out: dict[str, str] = {}
    for k in keys:
        out[k[len(best):] if best and k.startswith(best) else k] = k
    return best, out


def infer_config(shapes: dict[str, tuple[int, ...]], layout: str, num_heads: int | None = None) -> DitConfig:
    """A DitConfig read off the tensor shapes of a checkpoint in `layout` (wan or diffusers)."""
    n = _NAMES[layout]
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
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(n["block"], k))}
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


class SingleFileCheckpoint:
    """A DiT in one .safetensors file (or shards listed by an index json) without a config.json.

    Layout and prefix are detected from the keys and said in one log line; every key is checked against
    the config (given, or read off the shapes) before any tensor is read, and the error names missing,
    unexpected and mis-shaped tensors with their names in the file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: DitConfig | None = None,
        *,
        num_heads: int | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such checkpoint file")
        if not _single_file_name(self.path):
            raise CheckpointError(
                f"{self.path}: a single-file checkpoint is a .safetensors file or a *.safetensors.index.json shard index "
                "(pickled .pt/.pth/.ckpt files can run code: convert them with `wanport convert --allow-pickle`)"
            )
        self.files = CheckpointReader.from_file(self.path)
        keys = self.files.keys()
        if not keys:
            raise CheckpointError(f"{self.path}: the file holds no tensors")
        scaled = [k for k in keys if _SCALED_FP8.search(k)]
        if scaled:
            raise CheckpointError(
                f"{self.path}: a ComfyUI scaled-fp8 checkpoint ({', '.join(scaled[:3])} ...): its fp8 weights need "
                "per-tensor scales wanport does not apply. Use the bf16 or fp16 release of the same model."
            )
        self.prefix, self.names = strip_prefix(keys)
        bundled = sorted({p for k in keys for p in _OTHER_MODELS if k.startswith(p)})
        if bundled:
            raise CheckpointError(
                f"{self.path}: bundles other models ({', '.join(bundled)} keys) with the DiT; give the diffusion "
                "model file alone (ComfyUI's split_files/diffusion_models), and the VAE and encoders separately"
            )
        try:
            self.layout = DIT.detect_layout(self.names)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e} (after removing the prefix {self.prefix!r})") from None
        if self.layout == "flax":
            raise CheckpointError(f"{self.path}: a Flax-layout file; Flax checkpoints are folders (`wanport convert --to flax`)")
        found = {k: tuple(self.files.info(v).shape) for k, v in self.names.items()}
        inferred = config is None
        self.config = infer_config(found, self.layout, num_heads) if inferred else config
        self.entries = dit_entries(self.config)
        where = "the config read off its tensor shapes" if inferred else "the config given"
        check_keys(
            self.entries, found, self.layout, f"{self.path}",
            hint=(f"Names are shown without the file's prefix {self.prefix!r}. Compared with {where}: "
                  + ("a file cut short or another model's file (a VAE, a text encoder)?" if inferred else
                     "does the preset or config match this file (size, I2V vs T2V, FLF2V)?")),
        )
        dtypes = sorted({self.files.info(v).dtype.name for v in self.names.values()})
        cfg = self.config
        (log or logger.info)(
            f"checkpoint {self.path}: single file, {self.layout} layout, prefix {self.prefix!r}, "
            f"{len(self.files.files)} file(s), {'/'.join(dtypes)}; {cfg.num_layers} layers, width {cfg.inner_dim} "
            f"({cfg.num_attention_heads} heads), {cfg.in_channels} input channels"
            + (", CLIP image branch" if cfg.has_image_tokens else "")
            + (f", {cfg.pos_embed_seq_len}-token image positions (FLF2V)" if cfg.pos_embed_seq_len else "")
        )

    def get(self, entry: Entry, layout: str) -> np.ndarray:
        """One tensor, re-laid into `layout`."""
        return entry.convert(self.files.get(self.names[entry.name(self.layout)], copy=False), self.layout, layout)

    def dtype(self, entry: Entry) -> np.dtype:
        return self.files.info(self.names[entry.name(self.layout)]).dtype


__all__ = ["SingleFileCheckpoint", "infer_config", "is_single_file", "strip_prefix", "PREFIXES", "open_dit"]


def open_dit(source: str | os.PathLike, config: DitConfig | None = None, *, num_heads: int | None = None,
             allow_pickle: bool = False):
    """A model folder (`weights.checkpoint.Checkpoint`) or a single-file checkpoint (one .safetensors or a
    *.safetensors.index.json, any of the prefixes users' files carry). `config` and `num_heads` apply to
    single files only (a folder has its config.json)."""
    if is_single_file(source):
        return SingleFileCheckpoint(source, config, num_heads=num_heads)
    if config is not None or num_heads is not None:
        raise CheckpointError(f"{source}: a model folder has its own config.json; config/num_heads are for single files")
    return Checkpoint(source, DIT, allow_pickle=allow_pickle)
