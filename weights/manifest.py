"""The conversion manifest: sha256 of every output file and of every tensor's stored bytes.

Written next to a converted checkpoint (`wanport_manifest.json`) so a later `wanport convert --verify`
can tell a complete, unmodified copy from a truncated download or a flipped bit, and name which file
and which tensor differ. File hashes catch any change; tensor hashes say where it is. The digests of
files and JSON values here also key resumable stages (`jax_impl.stages`, `weights.checkpoint.identity`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from weights.safetensors_io import CheckpointError, SafetensorsFile, dtype_name

MANIFEST_NAME = "wanport_manifest.json"
FORMAT = "wanport-manifest/1"
_CHUNK = 16 * 1024 * 1024


def new_manifest(**info: Any) -> dict[str, Any]:
    """An empty manifest; `info` (layout, source, dtype, ...) is recorded for people reading it."""
    return {"format": FORMAT, "info": info, "files": {}, "tensors": {}}


def add_file(manifest: dict[str, Any], rel: str, sha256: str, size: int, tensors: dict[str, dict] | None = None) -> None:
    manifest["files"][rel] = {"size": size, "sha256": sha256}
    if tensors is not None:
        manifest["tensors"][rel] = tensors


def tensor_record(dtype, shape, sha256: str) -> dict[str, Any]:
    return {"dtype": dtype_name(dtype), "shape": list(shape), "sha256": sha256}


def digest_json(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, no whitespace): equal values, equal digests."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (read in chunks)."""
    return hash_file(path)[0]


def hash_file(path: str | os.PathLike) -> tuple[str, int]:
    """sha256 and size of a file, read in chunks (never whole)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def copy_with_hash(src: Path, dst: Path) -> tuple[str, int]:
    """Copy a file and hash it in the same pass (pipeline components we pass through unchanged)."""
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(_CHUNK):
            fo.write(chunk)
            h.update(chunk)
            size += len(chunk)
    os.utime(dst, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))
    return h.hexdigest(), size


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no manifest; only folders written by `wanport convert` can be verified") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
        or not isinstance(manifest.get("tensors"), dict)
    ):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    return manifest


def verify(folder: str | os.PathLike, manifest: dict[str, Any] | None = None) -> list[str]:
    """Check every file and tensor against the manifest; returns one line per problem (empty: all good).

    `manifest` lets a caller check a folder against another copy's manifest (e.g. the original's).
    """
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    problems: list[str] = []
    for rel, want in sorted(manifest["files"].items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        sha, size = hash_file(path)
        if size != want.get("size"):
            problems.append(f"{rel}: size {size} bytes, manifest says {want.get('size')}")
        elif sha != want.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest")
    for rel, tensors in sorted(manifest["tensors"].items()):
        path = folder / rel
        if not path.is_file():
            continue  # already reported as missing
        try:
            f = SafetensorsFile(path)
            for name, want in tensors.items():
                if name not in f.tensors:
                    problems.append(f"{rel}: tensor {name!r} missing")
                    continue
                info = f.tensors[name]
                if dtype_name(info.dtype) != want.get("dtype") or list(info.shape) != want.get("shape"):
                    problems.append(
                        f"{rel}: tensor {name!r} is {dtype_name(info.dtype)}{list(info.shape)}, "
                        f"manifest says {want.get('dtype')}{want.get('shape')}"
                    )
                elif hashlib.sha256(f.raw(name)).hexdigest() != want.get("sha256"):
                    problems.append(f"{rel}: tensor {name!r} data differs from the manifest (sha256)")
            for name in f.tensors:
                if name not in tensors:
                    problems.append(f"{rel}: tensor {name!r} is not in the manifest")
        except CheckpointError as e:
            problems.append(f"{rel}: unreadable ({e})")
    listed = set(manifest["files"]) | {MANIFEST_NAME}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in listed:
            problems.append(f"{rel}: not in the manifest")
    return problems
