"""The one checkpoint engine: a model folder or a single weights file, opened against its weight map.

`Checkpoint(source, weight_map)` takes a model folder (config.json + weights) or one weights file as users
download them (a .safetensors file, shards + a *.safetensors.index.json, or with `allow_pickle` a .pth).
It validates every weights file's header (pickles are read weights-only), turns the file's names into the
map's through the map's `canonical_keys` hook (a prefix stripped, other components' tensors set aside
with one log line; `weights.entry.FileKeys`), detects the layout from the names, takes the config (given,
the folder's config.json, or for a single file the map's `file_config`: read off the tensor shapes), and
checks every tensor's name and shape against the map before any data is read. Then `get(entry, layout)`
reads one tensor, re-laid into `layout`: everything streams tensor by tensor from memory-mapped files.
FP8 weights and their scales are paired here (weights/fp8.py), for folders and files alike. The DiT, the
VAE, the encoders and FantasyWorld all open through it; `jax_impl.loading` puts the tensors into NNX
modules, `weights.convert` writes them in another layout.

`identity()` (and `folder_identity`) is what resumable stages are keyed by: the converter's manifest
digest when the folder is exactly what the manifest lists (same file names and sizes, nothing modified
after it was written); otherwise (path, size, mtime) of every file: cheap, and changed by any copy or
rewrite in place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from weights import manifest as mf
from weights.configs.base import ConfigError, read_json
from weights.entry import Entry, FileConfig, FileKeys, WeightMap, check_keys
from weights.fp8 import dequantize_weight, find_fp8_pairs, normalize_scale
from weights.safetensors_io import CheckpointError, open_reader

logger = logging.getLogger("wanport.checkpoint")


class CheckpointConfigError(CheckpointError, ConfigError):
    """A model folder whose config.json is unreadable or invalid (both error kinds, so either catch works)."""


class Checkpoint:
    """An opened model folder or weights file: config, layout, validated tensor list. Reads nothing but
    headers until asked.

    `config` replaces the folder's config.json (it must still match the weights, which is checked);
    `file_config` replaces the map's (how a single file's config is made when none is given); `log` gets
    the one line saying what the map's hook set aside (default: the `wanport.checkpoint` logger).
    """

    def __init__(self, source: str | os.PathLike, weight_map: WeightMap, *, config: Any = None,
                 file_config: FileConfig | None = None, allow_pickle: bool = False,
                 log: Callable[[str], None] | None = None):
        self.source = Path(source)
        self.map = weight_map
        if not self.source.exists():
            raise CheckpointError(f"{self.source}: no such {weight_map.what} folder or file")
        self.single_file = self.source.is_file()
        self.folder = self.source.parent if self.single_file else self.source
        cfg_path = self.folder / "config.json"
        if not self.single_file and config is None and not cfg_path.is_file():
            sub = self.folder / weight_map.subfolder
            hint = f"; did you mean {sub}?" if (sub / "config.json").is_file() else ""
            raise CheckpointError(f"{self.folder}: no config.json, so this is not a {weight_map.what} folder{hint}")
        self.reader = open_reader(self.source, allow_pickle=allow_pickle, prefer=weight_map.prefer)
        infos = {k: self.reader.info(k) for k in self.reader.keys()}
        if not infos:
            raise CheckpointError(f"{self.source}: holds no tensors")
        # FP8 weights and their scales (weights/fp8.py): scales and format markers are not model tensors
        try:
            self.fp8, companions = find_fp8_pairs(infos)
        except CheckpointError as e:
            raise CheckpointError(f"{self.source}: {e}") from None
        keys = [k for k in infos if k not in companions]
        try:
            view = self._canonical(keys)
        except CheckpointError as e:
            raise CheckpointError(f"{self.source}: {e}") from None
        self.names, self.prefix, self.dropped = view.names, view.prefix, view.dropped
        if view.dropped:
            files = "" if self.single_file else f" ({', '.join(sorted(set(self.reader.where.values())))})"
            (log or logger.info)(f"{self.source}{files}: set aside {len(view.dropped)} tensor(s) "
                                 f"({_groups(view.dropped)}): {view.why}")
        try:
            self.layout = weight_map.detect_layout(self.names)
        except ValueError as e:
            removed = f" (prefix {self.prefix!r} removed)" if self.prefix else ""
            raise CheckpointError(f"{self.source}{removed}: {e}") from None
        found = {k: tuple(infos[v].shape) for k, v in self.names.items()}
        self.config, hint = self._config(config, file_config or weight_map.file_config, found, cfg_path)
        self.entries: list[Entry] = weight_map.entries(self.config)
        if self.prefix:
            hint = f"Names are shown without the file's prefix {self.prefix!r}. {hint}"
        check_keys(self.entries, found, self.layout, str(self.source), hint=hint, ignore=weight_map.ignore)

    def _config(self, given: Any, make: FileConfig | None, found: dict[str, tuple[int, ...]], cfg_path: Path):
        """(config, what the key check's error says it was compared with): the one given, the folder's
        config.json, or a single file's from the map's `file_config`."""
        if given is not None:
            return given, "Compared with the config given: does the preset or config match these weights?"
        if not self.single_file:
            return self._read_config(cfg_path, list(found)), self.map.hint
        if make is None:
            raise CheckpointError(f"{self.source}: a single {self.map.what} file has no config.json: put it in a folder "
                                  "with its config.json, or give the config")
        try:
            return make(found, self.layout), self.map.file_hint
        except (CheckpointError, ConfigError) as e:
            raise CheckpointError(f"{self.source}: {e}") from None

    def _canonical(self, keys: list[str]) -> FileKeys:
        """The map's hook applied to `keys`, checked: each file key named once or set aside, none lost."""
        view = self.map.file_keys(keys)
        used = list(view.names.values()) + list(view.dropped)
        if sorted(used) != sorted(keys):
            lost = sorted(set(keys) - set(used))
            twice = sorted({k for k in used if used.count(k) > 1})
            raise CheckpointError(f"the {self.map.what} key hook (canonical_keys) lost {lost[:5]} and used {twice[:5]} "
                                  "twice: a bug in the weight map, not in the file")
        return view

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

    def stored_dtypes(self) -> list[str]:
        """The dtypes of the model's tensors as stored (for log lines)."""
        return sorted({self.reader.info(v).dtype.name for v in self.names.values()})

    def identity(self) -> str | None:
        """What the weights are, for resume keys (see the module docstring); a single file: (name, size, mtime)
        of the file(s) read."""
        if not self.single_file:
            return folder_identity(self.folder)
        files = sorted({self.source.name, *self.reader.where.values()})
        return "stat:" + mf.digest_json([(f, (st := (self.folder / f).stat()).st_size, st.st_mtime_ns) for f in files])


def _groups(keys: tuple[str, ...], depth: int = 2) -> str:
    """'pipe.vae.* 12, pipe.text_encoder.* 3': keys counted by their first `depth` name parts."""
    counts: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:depth])
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{h}.* {n}" for h, n in counts.items())


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
