"""Streaming safetensors I/O: validate the header before touching data, read one tensor at a time.

We parse the format ourselves (8-byte little-endian header length, JSON header, raw data) so that
bfloat16 reads into numpy through ml_dtypes, every offset is checked before use, and tensors are
memory-mapped views: reading a 14B checkpoint never holds more than the tensor being converted.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be read as it claims to be; the message names file and tensor."""


def dtype_name(dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header. Returns (tensors, metadata, data_start).

    Checks: header length within the file, valid JSON object, known dtypes, integer shapes whose byte
    size matches the offsets, offsets in bounds, tensors contiguous and non-overlapping.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} is impossible for a {size}-byte file (truncated or not safetensors)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, name, entry)
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != cursor:
            what = "overlaps the previous tensor" if info.begin < cursor else f"leaves a gap at byte {cursor}"
            raise CheckpointError(f"{path}: tensor {info.name!r} {what} (offsets {info.begin}..{info.end})")
        cursor = info.end
    if cursor != data_size:
        raise CheckpointError(
            f"{path}: tensors cover {cursor} bytes but the data section has {data_size} (truncated or padded file)"
        )
    return tensors, metadata, data_start


def _parse_entry(path: Path, name: str, entry) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: tensor {name!r} header entry is malformed: {entry!r}")
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} of shape {shape} {entry['dtype']} needs {expected} bytes "
            f"but its offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


class SafetensorsFile:
    """A validated, memory-mapped safetensors file; `get` returns one tensor as a numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors, self.metadata, self._data_start = read_header(self.path)
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _data(self) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap

    def get(self, name: str, copy: bool = True) -> np.ndarray:
        """The tensor `name`; `copy=False` gives a read-only view into the mapped file."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        start = self._data_start + info.begin
        raw = self._data()[start : start + info.nbytes]
        arr = raw.view(info.dtype).reshape(info.shape)
        return np.array(arr) if copy else arr

    def close(self) -> None:
        self._mmap = None


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs up front (the header comes first): name, dtype, shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


def write_safetensors(
    path: str | os.PathLike,
    specs: Iterable[TensorSpec],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> None:
    """Write tensors one at a time: `produce(name)` is called in order and its result written and dropped.

    The file appears at `path` only once complete (temporary file in the same folder, then rename).
    """
    path = Path(path)
    specs = list(specs)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        nbytes = math.prod(s.shape) * np.dtype(s.dtype).itemsize
        header[s.name] = {"dtype": dtype_name(s.dtype), "shape": list(s.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # keep data 8-byte aligned, as the reference writer does
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for s in specs:
                arr = np.ascontiguousarray(produce(s.name))
                if arr.shape != tuple(s.shape) or arr.dtype != np.dtype(s.dtype):
                    raise CheckpointError(
                        f"{path}: tensor {s.name!r} produced as {arr.dtype}{list(arr.shape)}, "
                        f"header promised {np.dtype(s.dtype)}{list(s.shape)}"
                    )
                f.write(arr.tobytes(order="C"))
                if on_tensor is not None:
                    on_tensor(s.name, arr.nbytes)
                del arr
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write a dict of in-memory arrays (small files: stage outputs, test fixtures)."""
    specs = [TensorSpec(k, np.asarray(v).dtype, tuple(np.shape(v))) for k, v in tensors.items()]
    write_safetensors(path, specs, lambda k: np.asarray(tensors[k]), metadata)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}, f.metadata


class CheckpointReader:
    """All tensors of one model folder: a single `*.safetensors` file, or shards listed by an index json."""

    def __init__(self, folder: str | os.PathLike, prefer: str = "diffusion_pytorch_model"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        index = sorted(self.folder.glob("*.safetensors.index.json"))
        if index:
            self._from_index(index[0])
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                pickled = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
                hint = f" (found pickled {pickled}: convert them with `wanport convert`)" if pickled else ""
                raise CheckpointError(f"{self.folder}: no .safetensors weights found{hint}")
            if len(files) > 1:
                preferred = [p for p in files if p.stem == prefer]
                if len(preferred) != 1:
                    raise CheckpointError(
                        f"{self.folder}: several .safetensors files {[p.name for p in files]} and no index json; "
                        "keep one file per model folder or add the shard index"
                    )
                files = preferred
            f = SafetensorsFile(files[0])
            self.files[files[0].name] = f
            self.where = {k: files[0].name for k in f.keys()}

    def _from_index(self, index_path: Path) -> None:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from None
        for shard in sorted(set(weight_map.values())):
            shard_path = self.folder / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index_path}: lists shard {shard!r}, which is missing from {self.folder}")
            self.files[shard] = SafetensorsFile(shard_path)
        for name, shard in weight_map.items():
            if name not in self.files[shard].tensors:
                raise CheckpointError(f"{index_path}: says {name!r} is in {shard!r}, but that shard has no such tensor")
            self.where[name] = shard
        for shard, f in self.files.items():
            extra = [k for k in f.keys() if self.where.get(k) != shard]
            if extra:
                raise CheckpointError(f"{self.folder / shard}: holds tensors the index does not list: {extra[:5]}")

    def keys(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> TensorInfo:
        return self.files[self.where[name]].tensors[name]

    def get(self, name: str, copy: bool = True) -> np.ndarray:
        if name not in self.where:
            raise KeyError(f"{self.folder}: no tensor named {name!r}")
        return self.files[self.where[name]].get(name, copy=copy)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)
