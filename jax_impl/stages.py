"""Stage files of the generation pipeline: encode -> denoise -> decode, each result a safetensors file.

Each file holds the stage's arrays plus JSON metadata: which stage wrote it, the `inputs` that determine
its content (settings, digests of input files, identity of the weights used, the key of the stage it was
computed from), their digest `key`, and a digest of the arrays themselves. `--resume` reuses a file only
when its key equals the key of the run at hand and its arrays are intact (`reuse_stage`); otherwise it
says which inputs changed and the stage (and, through the keys, every later one) is recomputed.

The encode stage's content is an `Encoded`: embeddings by name and the typed image condition
(`jax_impl.conditioning`), whose kind is in the metadata and whose arrays are stored as "condition.<name>",
so it is read back into the same type.

Arrays are stored as float32 whatever the model dtype: stage boundaries are where dtypes are converted
explicitly, never implicitly. Files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jax_impl.conditioning import Conditioning, NoCondition, condition_from_arrays
from weights.manifest import digest_json
from weights.safetensors_io import CheckpointError, load_tensors, save_tensors

STAGES = ("encoded", "latents")
FORMAT_VERSION = 3  # 3: the encode stage's condition is typed (kind in the metadata, arrays "condition.<name>")
_CONDITION = "condition."


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded(Mapping):
    """The encode stage: embeddings by name (prompt_embeds, negative_prompt_embeds, image_embeds; the mapping
    itself) and the typed image condition, built once here and used as is by the denoise stage."""

    embeddings: dict[str, np.ndarray]
    condition: Conditioning = NoCondition()

    def __getitem__(self, name: str) -> np.ndarray:
        return self.embeddings[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.embeddings)

    def __len__(self) -> int:
        return len(self.embeddings)

    def arrays(self) -> dict[str, Any]:
        """Everything to store, by name: the embeddings and the condition's arrays as "condition.<name>"."""
        return dict(self.embeddings) | {_CONDITION + k: v for k, v in self.condition.arrays().items()}

    def meta(self) -> dict[str, Any]:
        return {"conditioning": self.condition.KIND}

    @classmethod
    def from_stage(cls, arrays: dict[str, np.ndarray], header: dict[str, Any]) -> "Encoded":
        """The `Encoded` that `save_stage(path, "encoded", e.arrays(), inputs, e.meta())` wrote."""
        kind = header.get("conditioning")
        if not isinstance(kind, str):
            raise CheckpointError("encode stage file records no conditioning kind; recompute the encode stage")
        cond = {k[len(_CONDITION):]: v for k, v in arrays.items() if k.startswith(_CONDITION)}
        embeddings = {k: v for k, v in arrays.items() if not k.startswith(_CONDITION)}
        try:
            return cls(embeddings, condition_from_arrays(kind, cond))
        except ValueError as e:
            raise CheckpointError(f"encode stage file: {e}") from None
_META_KEY = "wanport"


def stage_key(inputs: dict[str, Any]) -> str:
    """The key of a stage computed from `inputs` (a JSON-able dict)."""
    return digest_json(inputs)


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes: tells an intact stage file from a damaged one."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def save_stage(path: str | os.PathLike, stage: str, arrays: dict[str, Any], inputs: dict[str, Any],
               meta: dict[str, Any] | None = None) -> Path:
    """Write `arrays` (float arrays stored as float32) as stage `stage`, keyed by `inputs` (JSON-able)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    tensors = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        tensors[name] = np.ascontiguousarray(a.astype(np.float32) if a.dtype.kind == "f" else a)
    header = {**(meta or {}), "stage": stage, "format": FORMAT_VERSION, "key": stage_key(inputs), "inputs": inputs,
              "content": content_digest(tensors)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, tensors, metadata={_META_KEY: json.dumps(header, sort_keys=True)})
    return path


def load_stage(path: str | os.PathLike, stage: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a stage file, checking that it is one, of the expected stage, and intact."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stage file {path} does not exist; run the previous stage first")
    tensors, metadata = load_tensors(path)
    try:
        header = json.loads(metadata[_META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a wanport stage file (no '{_META_KEY}' metadata)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a wanport stage file (metadata is not a JSON object)")
    if header.get("stage") != stage:
        raise CheckpointError(
            f"{path} holds stage {header.get('stage')!r}, but {stage!r} is needed here; "
            f"pass the file written by the {'encode' if stage == 'encoded' else 'denoise'} stage"
        )
    if header.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: stage file format {header.get('format')}, this wanport reads {FORMAT_VERSION}")
    if header.get("content") != content_digest(tensors):
        raise CheckpointError(f"{path}: the arrays do not match the digest stored with them (damaged file)")
    return tensors, header


def changed_inputs(old: Any, new: dict[str, Any], prefix: str = "") -> list[str]:
    """Names of the entries of `new` that differ from `old` (nested dicts as dotted names)."""
    if not isinstance(old, dict):
        return ["everything (the stage file records no inputs)"]
    names = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            names += changed_inputs(a, b, f"{prefix}{k}.")
        elif a != b:
            names.append(prefix + k)
    return names


def reuse_stage(path: str | os.PathLike, stage: str, inputs: dict[str, Any],
                log: Callable[[str], None] = print) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """(arrays, metadata) of the stage file at `path` if it was computed from exactly `inputs`, else None.

    Says why a file is not reused. A missing file is simply computed; an unreadable or damaged one is
    recomputed, never fatal.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        arrays, header = load_stage(path, stage)
    except (CheckpointError, OSError, ValueError) as e:
        log(f"[resume] {stage} stage {path} unreadable ({e}); recomputing")
        return None
    if header.get("key") != stage_key(inputs):
        as_stored = json.loads(json.dumps(inputs, default=str))  # tuples as lists, as in the file
        changed = changed_inputs(header.get("inputs"), as_stored) or ["its key"]
        log(f"[resume] {stage} stage is stale: {', '.join(changed)} changed; recomputing")
        return None
    if stage == "encoded":
        try:
            Encoded.from_stage(arrays, header)
        except CheckpointError as e:
            log(f"[resume] {stage} stage {path} unreadable ({e}); recomputing")
            return None
    log(f"[resume] reusing {stage} stage {path}")
    return arrays, header
