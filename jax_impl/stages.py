"""Stage files of the generation pipeline: encode -> denoise -> decode, each result a safetensors file.

Each file holds the stage's arrays plus JSON metadata (which stage wrote it, the checkpoint, the settings
that shaped it), so a stage can be re-run alone from the previous stage's file, on another machine or
back-end. Arrays are stored as float32 whatever the model dtype: stage boundaries are where dtypes are
converted explicitly, never implicitly. Files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from weights.safetensors_io import CheckpointError, load_tensors, save_tensors

STAGES = ("encoded", "latents")
FORMAT_VERSION = 1
_META_KEY = "wanport"


def save_stage(path: str | os.PathLike, stage: str, arrays: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `arrays` (float arrays stored as float32) and `meta` (JSON-able) as stage `stage`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    tensors = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        tensors[name] = np.ascontiguousarray(a.astype(np.float32) if a.dtype.kind == "f" else a)
    header = {"stage": stage, "format": FORMAT_VERSION, **meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, tensors, metadata={_META_KEY: json.dumps(header, sort_keys=True)})
    return path


def load_stage(path: str | os.PathLike, stage: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a stage file, checking that it is one and of the expected stage."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stage file {path} does not exist; run the previous stage first")
    tensors, metadata = load_tensors(path)
    try:
        header = json.loads(metadata[_META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a wanport stage file (no '{_META_KEY}' metadata)") from None
    if header.get("stage") != stage:
        raise CheckpointError(
            f"{path} holds stage {header.get('stage')!r}, but {stage!r} is needed here; "
            f"pass the file written by the {'encode' if stage == 'encoded' else 'denoise'} stage"
        )
    if header.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: stage file format {header.get('format')}, this wanport reads {FORMAT_VERSION}")
    return tensors, header
