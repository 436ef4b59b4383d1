"""LoRA updates of a Wan DiT, keyed by the DiT map, and merging them into checkpoint tensors.

A `Lora` (read by `weights.lora_read.read_lora` from any layout found in the wild) maps `Entry` objects
of the one DiT map to `Target`s: a low-rank pair and/or a full delta. Because targets are keyed by
entry, a LoRA in any layout merges into a base in any layout (diffusers, original Wan, Flax).

Pairs stay factored until merge time: each update is made in float32 for one tensor at a time,
`scale * alpha / rank * up @ down` (rank = rows of down; alpha absent: factor 1, as diffusers/PEFT and
ComfyUI do; PEFT's rsLoRA: alpha / sqrt(rank)), full deltas `scale * diff`, added to the base in float32
and cast back to the base's dtype (or one asked for). No jax or torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from weights.entry import Entry
from weights.safetensors_io import CheckpointError


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied as it is; the message names the file, the keys and the fix."""


@dataclass(frozen=True)
class Pair:
    """A low-rank update `up @ down` with its alpha (None: absent, factor 1)."""

    up: np.ndarray  # (out, rank) or (out, rank, 1, 1, 1) for the patch convolution
    down: np.ndarray  # (rank, in) or (rank, in, kt, kh, kw)
    alpha: float | None
    rslora: bool = False  # PEFT's rank-stabilised scaling alpha / sqrt(rank)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass(frozen=True)
class Target:
    """What one LoRA does to one DiT tensor: a low-rank pair, a full delta, or (refused) both."""

    entry: Entry
    pair: Pair | None = None
    full: np.ndarray | None = None  # `.diff`, `.diff_b`, `.diff_m` or PEFT's `lora_B.bias`
    full_scale: float = 1.0  # PEFT multiplies lora_B.bias by its module's alpha / rank; diffs are unscaled

    def delta(self, scale: float = 1.0) -> np.ndarray:
        """The float32 update at LoRA strength `scale`, in the torch-side shape `entry.shape` (one
        temporary of the tensor's size: a 14B FFN weight is 283 MB in float32)."""
        out = None
        if self.pair is not None:
            up = np.asarray(self.pair.up, np.float32).reshape(self.pair.up.shape[0], self.pair.rank)
            down = np.asarray(self.pair.down, np.float32).reshape(self.pair.rank, -1)
            out = up @ down
            out *= np.float32(scale * self.pair.factor)
            out = out.reshape(self.entry.shape)
        if self.full is not None:
            full = np.asarray(self.full, np.float32).reshape(self.entry.shape) * np.float32(scale * self.full_scale)
            out = full if out is None else out + full
        return np.zeros(self.entry.shape, np.float32) if out is None else out


@dataclass
class Lora:
    """A LoRA file read against a DiT config: its targets keyed by DiT map entry."""

    source: str
    naming: str  # diffusers | wan | kohya
    targets: dict[Entry, Target]
    ignored: list[str] = field(default_factory=list)  # keys skipped with ignore_missing
    description: str = ""
    checked: bool = True  # read against a model config (False: names only, good for conversion, not merging)

    def __len__(self) -> int:
        return len(self.targets)


ScaledLora = tuple[Lora, float]


# --- merging ------------------------------------------------------------------------------------------
def merged_tensor(
    entry: Entry, base: np.ndarray, loras: Sequence[ScaledLora], layout: str = "diffusers", dtype=None,
) -> np.ndarray:
    """`base` (one tensor, in `layout`: diffusers, wan or flax) with every LoRA's update for it added in
    float32, cast to `dtype` (default: the base's dtype). Returns `base` itself when no LoRA touches the
    tensor and no dtype is asked for. A loader whose model is float32 while the checkpoint is bf16 passes
    dtype=float32, so the sum is not rounded to bf16 on the way."""
    unchecked = [lora.source for lora, _ in loras if not lora.checked]
    if unchecked:
        raise LoraError(f"{', '.join(unchecked)}: read without the model's config (names only); read it with the "
                        "config to merge it, so its shapes are checked")
    hits = [(lora.targets[entry], s) for lora, s in loras if entry in lora.targets]
    out = np.dtype(dtype) if dtype is not None else base.dtype
    if not hits:
        return base if out == base.dtype else base.astype(out)
    acc = np.array(base, np.float32)  # a copy: the base may be a read-only memory map
    for target, s in hits:
        acc += _layout_view(entry, target.delta(s), layout)
    return acc.astype(out)


def _layout_view(entry: Entry, x: np.ndarray, layout: str) -> np.ndarray:
    """`entry.convert(x, "diffusers", layout)` as a view (no copy): the values are the same, and adding a
    strided view saves the merge a tensor-sized transpose. test_merge_into_flax_layout_and_bfloat16 ties it
    to `Entry.to_flax`, the one home of the layout permutation."""
    if layout != "flax" or entry.kind == "copy":
        return x
    return x.T if entry.kind == "linear" else x.transpose(2, 3, 4, 1, 0)


def merge_lora(
    get_base_tensor: Callable[[Entry], np.ndarray],
    loras: Lora | Sequence[ScaledLora],
    scale: float = 1.0,
    *,
    layout: str = "diffusers",
) -> Iterator[tuple[Entry, np.ndarray]]:
    """Yield (entry, merged tensor) for every tensor the LoRA(s) change, one at a time, in the base's
    layout and dtype. `loras` is one Lora (at strength `scale`) or a list of (Lora, strength)."""
    scaled = [(loras, scale)] if isinstance(loras, Lora) else list(loras)
    touched = list(dict.fromkeys(e for lora, _ in scaled for e in lora.targets))
    for entry in touched:
        yield entry, merged_tensor(entry, get_base_tensor(entry), scaled, layout)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` as the CLI's --lora takes it (`a.safetensors:0.8`); a path with a colon keeps it."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0
