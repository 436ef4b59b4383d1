"""Opening a Wan DiT from whatever the user has: a model folder, or a single file as downloaded.

Single files (ComfyUI "repackaged" files, the original Wan release, community fine-tunes) come as one
`.safetensors`, shards + a `*.safetensors.index.json`, or a pickled `.pth` (read only with `allow_pickle`,
weights-only); original-Wan or diffusers names, often under a prefix; fp32, fp16, bf16 or FP8 (plain, or
ComfyUI's scaled files with their `scale_weight`s); no config.json. They open through the one engine,
`weights.checkpoint.Checkpoint`, as folders do: the DiT map's hooks (`weights.dit_map.dit_file_keys`,
`infer_dit_config`) strip the prefix and read the config off the shapes. `open_dit` adds the one log
line saying what was found (layout, prefix, files, dtypes, size), so `load_dit`, the LoRA merge and the
converter take either kind of source.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable

from weights.checkpoint import Checkpoint
from weights.configs.dit import DitConfig
from weights.dit_map import DIT, infer_dit_config
from weights.safetensors_io import CheckpointError, is_weights_file

logger = logging.getLogger("wanport.checkpoint")


def is_single_file(path: str | os.PathLike) -> bool:
    """Whether `path` names a single-file checkpoint (as opposed to a model folder)."""
    p = Path(path)
    return p.is_file() and is_weights_file(p)


def open_dit(source: str | os.PathLike, config: DitConfig | None = None, *, num_heads: int | None = None,
             allow_pickle: bool = False, log: Callable[[str], None] | None = None) -> Checkpoint:
    """A DiT model folder or single-file checkpoint, opened and checked (see the module docstring).

    `config` and `num_heads` apply to single files only (a folder has its config.json): `config` is checked
    against the file's shapes; `num_heads` is the head count to read the config with when the width is not
    128 per head. `log` gets the line saying what was opened (and what the hook set aside, if anything)."""
    if not is_single_file(source) and (config is not None or num_heads is not None):
        raise CheckpointError(f"{source}: a model folder has its own config.json; config/num_heads are for single files")
    infer = functools.partial(infer_dit_config, num_heads=num_heads) if num_heads is not None else None
    log = log or logger.info
    ckpt = Checkpoint(source, DIT, config=config, file_config=infer, allow_pickle=allow_pickle, log=log)
    cfg = ckpt.config
    log(f"checkpoint {ckpt.source}: {'single file' if ckpt.single_file else 'folder'}, {ckpt.layout} layout, "
        f"prefix {ckpt.prefix!r}, {len(set(ckpt.reader.where.values()))} file(s), {'/'.join(ckpt.stored_dtypes())}; "
        f"{cfg.num_layers} layers, width {cfg.inner_dim} ({cfg.num_attention_heads} heads), {cfg.in_channels} input "
        "channels" + (", CLIP image branch" if cfg.has_image_tokens else "")
        + (f", {cfg.pos_embed_seq_len}-token image positions (FLF2V)" if cfg.pos_embed_seq_len else ""))
    return ckpt


__all__ = ["is_single_file", "open_dit"]
