"""One tensor of a model in every layout it is stored in, and what every weight map shares.

An `Entry` names a tensor in each layout (diffusers or transformers, the original release, our Flax
parameter path), gives its torch-side shape and how it is re-laid for Flax (`kind`). Re-laying is a pure
permutation or reshape, so conversions are bit-exact both ways. A `WeightMap` says what the checkpoint
engine (`weights.checkpoint`) needs to know about one model: its entries for a config, how its config.json
is read, and which key names tell its layouts apart; its `canonical_keys` hook says what a file's names
mean (`FileKeys`: a prefix removed, other components' tensors set aside). `check_keys` and
`describe_mismatch` are the one key check: every missing, unexpected and mis-shaped tensor named in one
error, before any data is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Mapping

import numpy as np

from weights.safetensors_io import CheckpointError

FORMAT_KEY = "wanport_layout"  # safetensors metadata: the layout a file written by this project is in

# kind -> how the torch-side shape becomes the Flax one
KINDS = ("copy", "linear", "conv3d", "conv2d", "conv1d", "conv_transpose2d", "flatten")
_TO_FLAX = {  # axis permutation torch -> Flax
    "conv3d": (2, 3, 4, 1, 0),  # (O, I, T, H, W) -> (T, H, W, I, O)
    "conv2d": (2, 3, 1, 0),  # (O, I, H, W) -> (H, W, I, O)
    "conv1d": (2, 1, 0),  # (O, I, K) -> (K, I, O)
    "conv_transpose2d": (2, 3, 0, 1),  # (I, O, H, W) -> (H, W, I, O)
}


def transpose2d(x: np.ndarray, rows: int = 128) -> np.ndarray:
    """A contiguous transpose done in bands of rows: about 3x faster than `ascontiguousarray(x.T)` on
    large matrices (the band stays in cache), and the same bits."""
    if x.ndim != 2 or x.size < 1 << 16:
        return np.ascontiguousarray(x.T)
    r, c = x.shape
    out = np.empty((c, r), dtype=x.dtype)
    for i in range(0, r, rows):
        out[:, i : i + rows] = x[i : i + rows].T
    return out


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: its name per layout (`wan` None where the model has no original-release layout), its
    torch-side shape (diffusers and the original release share layouts) and its re-lay `kind`:
    "linear" (transposed to [in, out]), "conv3d"/"conv2d"/"conv1d"/"conv_transpose2d" (channels-last),
    "flatten" (a (C, 1, ..., 1) gain to (C,)) or "copy"."""

    diffusers: str
    wan: str | None
    flax: str
    shape: tuple[int, ...]
    kind: str

    def name(self, layout: str) -> str:
        name = getattr(self, layout)
        if name is None:
            raise ValueError(f"{self.diffusers} has no {layout!r} name: this model is not stored in that layout")
        return name

    def flax_shape(self) -> tuple[int, ...]:
        s = self.shape
        if self.kind == "linear":
            return s[::-1]
        if self.kind in _TO_FLAX:
            return tuple(s[i] for i in _TO_FLAX[self.kind])
        if self.kind == "flatten":
            return (int(np.prod(s)),)
        return s

    def layout_shape(self, layout: str) -> tuple[int, ...]:
        return self.flax_shape() if layout == "flax" else self.shape

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return transpose2d(x)
        if self.kind in _TO_FLAX:
            return np.ascontiguousarray(x.transpose(_TO_FLAX[self.kind]))
        if self.kind == "flatten":
            return np.ascontiguousarray(x.reshape(-1))
        return x

    def from_flax(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return transpose2d(x)
        if self.kind in _TO_FLAX:
            return np.ascontiguousarray(x.transpose(np.argsort(_TO_FLAX[self.kind])))
        if self.kind == "flatten":
            return np.ascontiguousarray(x.reshape(self.shape))
        return x

    def convert(self, x: np.ndarray, src: str, dst: str) -> np.ndarray:
        """Re-lay a tensor from layout `src` to `dst`; a pure permutation, so bit-exact both ways."""
        if src == dst or {src, dst} == {"diffusers", "wan"}:
            return x
        return self.to_flax(x) if dst == "flax" else self.from_flax(x)


def describe_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], *,
                      unit: str = " tensor(s)", ignore: Collection[str] = ()) -> str:
    """'' when `found` ({name: shape}) has exactly the names and shapes of `expected`; else one line naming
    every missing, unexpected (names ending in one of `ignore` excepted) and mis-shaped tensor."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected and not k.endswith(tuple(ignore))]
    bad = [f"{k}: checkpoint {list(found[k])}, config expects {list(s)}"
           for k, s in expected.items() if k in found and tuple(found[k]) != tuple(s)]
    parts = []
    for what, items, sep in (("missing", missing, ", "), ("unexpected", extra, ", "), ("mis-shaped", bad, "; ")):
        if items:
            parts.append(f"{what} {len(items)}{unit}: {sep.join(items[:8])}{' ...' if len(items) > 8 else ''}")
    return " | ".join(parts)


def check_keys(entries: list[Entry], found: Mapping[str, tuple[int, ...]], layout: str, source: str, *,
               hint: str = "", ignore: Collection[str] = ()) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor of `found` (the
    checkpoint's {name: shape} in `layout`) against `entries`; `hint` says what to check."""
    problems = describe_mismatch({en.name(layout): en.layout_shape(layout) for en in entries}, found, ignore=ignore)
    if problems:
        raise CheckpointError(f"{source} ({layout} layout) does not match its config: {problems}. {hint}".rstrip())


@dataclasses.dataclass(frozen=True)
class FileKeys:
    """What a `canonical_keys` hook makes of a file's tensor names.

    `names` maps each name the weight map uses to the file's name for it. Every file key lands in `names` or
    in `dropped` (the engine checks that nothing is lost on the way): a prefix is stripped (`prefix`, said in
    the log and in key errors, so a user can find the names in the file), tensors of other components are
    set aside with `why` (one log line), anything else stays and the key check reports it as unexpected."""

    names: dict[str, str]
    prefix: str = ""
    dropped: tuple[str, ...] = ()
    why: str = ""

    @classmethod
    def identity(cls, keys: Collection[str]) -> "FileKeys":
        return cls({k: k for k in keys})


# config read off a file without config.json: ({canonical name: shape}, layout) -> config
FileConfig = Callable[[Mapping[str, tuple[int, ...]], str], Any]


@dataclasses.dataclass(frozen=True)
class WeightMap:
    """What the checkpoint engine needs to know about one model.

    `signatures`: layout -> key names (a trailing "." marks a prefix) only that layout uses; a model stored
    in one layout only has one entry with no names. `read_config(raw, keys, source)` makes the config from
    the folder's config.json (the tensor names may decide a detail, e.g. the original Wan format's image
    branch). `canonical_keys(keys) -> FileKeys` turns a file's names into the map's where files vary
    (prefixes, buffers, other components bundled in). `file_config(shapes, layout)` gives the config of a
    single weights file that comes without config.json (read off the shapes, or the one released model),
    and `file_hint` says in key errors what it was compared with.
    """

    what: str  # in messages: "model" (the DiT), "VAE", "UMT5 text encoder", ...
    subfolder: str  # where a pipeline folder keeps it (the hint when handed the pipeline folder)
    signatures: dict[str, tuple[str, ...]]
    entries: Callable[[Any], list[Entry]]
    read_config: Callable[[dict, list[str], str], Any]
    hint: str = "Check that config.json belongs to these weights."
    ignore: tuple[str, ...] = ()  # suffixes of tensors a file may hold that the model does not use
    canonical_keys: Callable[[list[str]], FileKeys] | None = None
    prefer: str = "diffusion_pytorch_model"  # weights file stem when a folder holds several single files
    file_config: FileConfig | None = None
    file_hint: str = ""

    @property
    def layouts(self) -> tuple[str, ...]:
        return tuple(self.signatures)

    def file_keys(self, keys: list[str]) -> FileKeys:
        """The hook's view of `keys` (all names kept as they are without a hook)."""
        return self.canonical_keys(keys) if self.canonical_keys else FileKeys.identity(keys)

    def detect_layout(self, keys: Collection[str]) -> str:
        """Which layout a set of checkpoint keys is in, from names only one layout uses; names of two layouts
        in one set are refused (a file or folder holds one layout)."""
        if len(self.signatures) == 1:
            return self.layouts[0]
        keys = set(keys)
        found = {layout: hit for layout, names in self.signatures.items()
                 if (hit := next((k for k in names if _has(keys, k)), None))}
        if len(found) > 1:
            both = "; ".join(f"{layout}: {hit}" for layout, hit in found.items())
            raise ValueError(f"mixed layouts: the {self.what} checkpoint holds key names of several layouts ({both}). "
                             "One checkpoint holds one layout: keep the tensors of one and convert the others with "
                             "`wanport convert`")
        if found:
            return next(iter(found))
        markers = ", ".join(n for names in self.signatures.values() for n in names)
        raise ValueError(f"cannot tell the {self.what} checkpoint layout ({', '.join(self.layouts)}): none of the "
                         f"key names {markers} found")


def _has(keys: set[str], marker: str) -> bool:
    """`marker` is a key of `keys`, or (ending in ".") a prefix of one."""
    return any(x.startswith(marker) for x in keys) if marker.endswith(".") else marker in keys
