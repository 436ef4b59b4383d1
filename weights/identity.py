"""Identity of what a result was computed from: digests of input files, of weight folders and of settings.

Resumable stages (`jax_impl.stages`) are keyed by these, so a stage file is reused only when every input
that shaped it is the same. A weight folder's identity is the converter's manifest digest when the folder
is exactly what the manifest lists (same file names and sizes, nothing modified after it was written);
otherwise (path, size, mtime) of every file: cheap, and changed by any copy or rewrite in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from weights import manifest as mf
from weights.safetensors_io import CheckpointError


def digest_json(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, no whitespace): equal values, equal digests."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (read in chunks)."""
    return mf.hash_file(path)[0]


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
            return "manifest:" + digest_json(sorted((rel, rec.get("sha256")) for rel, rec in listed.items()))
        return None
    return None


def folder_identity(folder: str | os.PathLike) -> str | None:
    """Identity of the weights in `folder` (None when it does not exist); see the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = _files(folder)
    return _manifest_identity(folder, files) or "stat:" + digest_json(
        sorted((rel, st.st_size, st.st_mtime_ns) for rel, st in files.items())
    )
