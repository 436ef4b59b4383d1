"""LoRAs merged into a DiT checkpoint at load time (`wanport generate --lora FILE[:SCALE]`, `--lora-2`).

`apply_loras(checkpoint, [(path, scale), ...])` reads every LoRA against the checkpoint's config (all
refusals happen here, before any tensor is read) and returns a checkpoint with the same interface
(`config`, `layout`, `entries`, `get`, `dtype`) whose `get` hands out merged tensors, one at a time:
`jax_impl.loading.load_dit` builds the model from it and `weights.convert` could write it. For Wan2.2 A14B
each expert is its own checkpoint: `--lora` goes to the high-noise expert (`transformer`), `--lora-2` to
the low-noise one (`transformer_2`), as diffusers' `load_into_transformer_2` does. No jax or torch here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

from weights.configs.dit import DitConfig
from weights.entry import Entry
from weights.single_file import open_dit
from weights.lora import Lora, LoraError, merged_tensor, parse_lora_arg
from weights.lora_read import read_lora

LoraSpec = Union[str, os.PathLike, Lora, tuple[Union[str, os.PathLike, Lora], float]]


class LoraCheckpoint:
    """A checkpoint seen with LoRAs merged: untouched tensors come straight from the base; touched ones
    are summed in float32 and cast to `dtype` (default: the base tensor's dtype)."""

    def __init__(self, base, loras: list[tuple[Lora, float]], dtype=None):
        self.base = base
        self.loras = loras
        self.out_dtype = None if dtype is None else np.dtype(dtype)
        self.config, self.layout, self.entries = base.config, base.layout, base.entries
        self.touched = {e for lora, _ in loras for e in lora.targets}

    def get(self, entry: Entry, layout: str) -> np.ndarray:
        x = self.base.get(entry, layout)
        if entry not in self.touched:
            return x
        return merged_tensor(entry, x, self.loras, layout, dtype=self.out_dtype)

    def dtype(self, entry: Entry) -> np.dtype:
        if entry in self.touched and self.out_dtype is not None:
            return self.out_dtype
        return self.base.dtype(entry)

    def __getattr__(self, name: str):  # folder / path / reader of the base, for messages
        return getattr(self.base, name)


def read_loras(
    cfg: DitConfig, loras: Sequence[LoraSpec], *, ignore_missing: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[tuple[Lora, float]]:
    """Every LoRA spec read against `cfg` with its strength (all refusals happen here)."""
    scaled: list[tuple[Lora, float]] = []
    for spec in loras:
        src, scale = spec if isinstance(spec, tuple) else (spec, None)
        if isinstance(src, str) and scale is None:
            src, scale = parse_lora_arg(src)
        scale = 1.0 if scale is None else float(scale)
        if not np.isfinite(scale):
            raise LoraError(f"{src}: LoRA strength must be a finite number, got {scale}")
        if isinstance(src, Lora):
            if src.checked is False:
                raise LoraError(f"{src.source}: read without a model config; read it against this model to merge it")
            lora = src
        else:
            lora = read_lora(Path(src), cfg, ignore_missing=ignore_missing, log=log)
        scaled.append((lora, scale))
    return scaled


def apply_loras(
    checkpoint,
    loras: Sequence[LoraSpec],
    *,
    ignore_missing: bool = False,
    dtype=np.float32,
    log: Callable[[str], None] | None = None,
) -> LoraCheckpoint:
    """`checkpoint` (from `weights.single_file.open_dit`, or a path, opened with it) with `loras` merged.

    Each LoRA is a path, `"FILE:SCALE"` as the CLI takes it, a `Lora`, or a (path or Lora, scale) pair.
    `dtype` float32 (default) keeps the merged sum unrounded for a float32 model even when the checkpoint
    is bf16 (a bf16 model rounds once, when it is built); None writes merged tensors in the base's dtype,
    as a converter writing a merged checkpoint wants. `ignore_missing` skips (and logs) LoRA keys for
    modules the model lacks, e.g. Wan2.1 I2V image-branch keys on Wan2.2.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = open_dit(checkpoint)
    scaled = read_loras(checkpoint.config, loras, ignore_missing=ignore_missing, log=log)
    return LoraCheckpoint(checkpoint, scaled, dtype=dtype)


__all__ = ["LoraCheckpoint", "apply_loras", "read_loras"]
