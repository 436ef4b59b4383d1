"""The one checkpoint engine: a model folder opened against its weight map, in whichever layout it is stored.

`Checkpoint(folder, weight_map)` reads config.json (type-checked), detects the layout from the tensor
names, validates every weights file's header (safetensors: one file or index-listed shards; pickled
.bin/.pt/.pth only with `allow_pickle`, and then weights-only) and checks every tensor's name and shape
against the map before any data is read. Then `get(entry, layout)` reads one tensor, re-laid into
`layout`: everything streams tensor by tensor from memory-mapped files. The DiT, the VAE and the
encoders (and FantasyWorld parts, as their maps come) all open through it; `jax_impl.loading` puts the
tensors into NNX modules, `weights.convert` writes them in another layout.

`identity()` (and `folder_identity`) is what resumable stages are keyed by: the converter's manifest
digest when the folder is exactly what the manifest lists (same file names and sizes, nothing modified
after it was written); otherwise (path, size, mtime) of every file: cheap, and changed by any copy or
rewrite in place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from weights import manifest as mf
from weights.configs.base import ConfigError, read_json
from weights.entry import Entry, WeightMap, check_keys
from weights.fp8 import dequantize_weight, find_fp8_pairs, normalize_scale
from weights.safetensors_io import CheckpointError, open_reader


class CheckpointConfigError(CheckpointError, ConfigError):
    """A model folder whose config.json is unreadable or invalid (both error kinds, so either catch works)."""


class Checkpoint:
    """An opened model folder: config, layout, validated tensor list. Reads nothing but headers until asked.

    `config` replaces the folder's config.json (it must still match the weights, which is checked).
    """

    def __init__(self, folder: str | os.PathLike, weight_map: WeightMap, *, config: Any = None,
                 allow_pickle: bool = False):
        self.folder = Path(folder)
        self.map = weight_map
        cfg_path = self.folder / "config.json"
        if config is None and not cfg_path.is_file():
            sub = self.folder / weight_map.subfolder
            hint = f"; did you mean {sub}?" if (sub / "config.json").is_file() else ""
            raise CheckpointError(f"{self.folder}: no config.json, so this is not a {weight_map.what} folder{hint}")
        self.reader = open_reader(self.folder, allow_pickle=allow_pickle, prefer=weight_map.prefer)
        infos = {k: self.reader.info(k) for k in self.reader.keys()}
        # FP8 weights and their scales (weights/fp8.py): scales and format markers are not model tensors
        self.fp8, companions = find_fp8_pairs(infos)
        keys = [k for k in infos if k not in companions]
        self.names = weight_map.canonical_keys(keys) if weight_map.canonical_keys else {k: k for k in keys}
        try:
            self.layout = weight_map.detect_layout(self.names)
        except ValueError as e:
            raise CheckpointError(f"{self.folder}: {e}") from None
        self.config = config if config is not None else self._read_config(cfg_path, keys)
        self.entries: list[Entry] = weight_map.entries(self.config)
        found = {k: infos[v].shape for k, v in self.names.items()}
        check_keys(self.entries, found, self.layout, str(self.folder), hint=weight_map.hint, ignore=weight_map.ignore)

    def _read_config(self, path: Path, keys: list[str]):
        try:
            return self.map.read_config(read_json(path), keys, str(path))
        except (OSError, ValueError, TypeError) as e:  # ConfigError and JSONDecodeError are ValueErrors
            msg = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
            raise CheckpointConfigError(f"{msg} (invalid {self.map.what} config)") from None

    def get(self, entry: Entry, layout: str) -> np.ndarray:
        """One tensor, re-laid into `layout` (a view into the mapped file where no re-lay is needed); an FP8
        weight comes back dequantised (float32, its scale applied)."""
        name = self.names[entry.name(self.layout)]
        x = self.reader.get(name, copy=False)
        if name in self.fp8:
            scale = self.fp8[name].scale
            x = dequantize_weight(x, None if scale is None else self.reader.get(scale), name)
        return entry.convert(x, self.layout, layout)

    def get_fp8(self, entry: Entry, layout: str) -> tuple[np.ndarray, np.ndarray | None]:
        """An FP8 weight as stored, re-laid into `layout`, and its scale as float32 [] or [out] (None: the file
        has none, the scale is 1)."""
        name = self.names[entry.name(self.layout)]
        q = self.reader.get(name, copy=False)
        scale = self.fp8[name].scale
        s = None if scale is None else normalize_scale(self.reader.get(scale), tuple(q.shape), name)
        return entry.convert(q, self.layout, layout), s

    def is_fp8(self, entry: Entry) -> bool:
        return self.names[entry.name(self.layout)] in self.fp8

    def dtype(self, entry: Entry) -> np.dtype:
        """The dtype `get` returns (float32 for an FP8 weight, which it dequantises)."""
        name = self.names[entry.name(self.layout)]
        return np.dtype(np.float32) if name in self.fp8 else self.reader.info(name).dtype

    def stored_dtype(self, entry: Entry) -> np.dtype:
        return self.reader.info(self.names[entry.name(self.layout)]).dtype

    def identity(self) -> str | None:
        """What the weights of this folder are, for resume keys (see the module docstring)."""
        return folder_identity(self.folder)


def _files(folder: Path) -> dict[str, os.stat_result]:
    return {p.relative_to(folder).as_posix(): p.stat() for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest_identity(folder: Path, files: dict[str, os.stat_result]) -> str | None:
    """The manifest digest of `folder`, if a manifest in it (single model) or in its parent (pipeline
    component) lists exactly its files with their sizes and no file is newer than the manifest."""
    for root, prefix in ((folder, ""), (folder.parent, folder.name + "/")):
        path = root / mf.MANIFEST_NAME
        if not path.is_file():
            continue
        try:
            manifest = mf.read_manifest(root)
        except CheckpointError:
            return None
        listed = {rel[len(prefix):]: rec for rel, rec in manifest["files"].items() if rel.startswith(prefix)}
        own = {rel: st for rel, st in files.items() if rel != mf.MANIFEST_NAME}
        written = path.stat().st_mtime_ns
        if (
            listed
            and set(listed) == set(own)
            and all(isinstance(rec, dict) and rec.get("size") == own[rel].st_size for rel, rec in listed.items())
            and all(st.st_mtime_ns <= written for st in own.values())
        ):
            return "manifest:" + mf.digest_json(sorted((rel, rec.get("sha256")) for rel, rec in listed.items()))
        return None
    return None


def folder_identity(folder: str | os.PathLike) -> str | None:
    """Identity of the weights in `folder` (None when it does not exist); see the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = _files(folder)
    return _manifest_identity(folder, files) or "stat:" + mf.digest_json(
        sorted((rel, st.st_size, st.st_mtime_ns) for rel, st in files.items())
    )


__all__ = ["Checkpoint", "CheckpointConfigError", "CheckpointError", "folder_identity"]
