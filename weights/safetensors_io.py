"""Streaming safetensors I/O: validate the header before touching data, read one tensor at a time.

We parse the format ourselves (8-byte little-endian header length, JSON header, raw data) so that
bfloat16 reads into numpy through ml_dtypes, every offset is checked before use, and tensors are
memory-mapped views: reading a 14B checkpoint never holds more than the tensor being converted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
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
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", {})
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


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json object hook: a repeated tensor name would silently shadow the first, so refuse it."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_entry(path: Path, name: str, entry) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: tensor {name!r} header entry is malformed: {str(entry)[:200]}")
    if not name:
        raise CheckpointError(f"{path}: a tensor has an empty name")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {str(shape)[:200]}")
    if len(shape) > 32:
        raise CheckpointError(f"{path}: tensor {name!r} has {len(shape)} dimensions (at most 32 are supported)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {str(offsets)[:200]}")
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
        self._size = self.path.stat().st_size

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str, copy: bool = True) -> np.ndarray:
        """The tensor `name`; `copy=False` gives a read-only view into the mapped file.

        Each tensor gets its own mapping, released when the array is dropped, so the pages a
        conversion touched leave the process' resident set tensor by tensor instead of piling up.
        """
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype=info.dtype)
        try:
            if self.path.stat().st_size != self._size:  # a mapping past EOF would crash with SIGBUS
                raise CheckpointError(f"{self.path}: the file changed size while open (tensor {name!r})")
            arr = np.memmap(self.path, dtype=info.dtype, mode="r", offset=self._data_start + info.begin, shape=info.shape)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot map tensor {name!r} ({e})") from None
        return np.array(arr) if copy else arr

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` as a flat uint8 view (for hashing)."""
        arr = self.get(name, copy=False)
        return arr.reshape(-1).view(np.uint8)

    def close(self) -> None:
        """Nothing stays mapped between `get` calls; kept for API compatibility."""


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
    tensor_hashes: dict[str, str] | None = None,
) -> str:
    """Write tensors one at a time: `produce(name)` is called in order and its result written and dropped.

    The file appears at `path` only once complete (temporary file in the same folder, then rename).
    Returns the sha256 of the whole file, computed while writing; with `tensor_hashes` given, the
    sha256 of each tensor's stored bytes is put there too (the manifest needs both, in one pass).
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
    pool = None
    try:
        file_hash = hashlib.sha256()
        # The per-tensor hash runs in a second thread while this one writes and hashes the file
        # (hashlib and file writes release the GIL), so the manifest costs little extra time.
        pool = ThreadPoolExecutor(1) if tensor_hashes is not None else None
        with os.fdopen(fd, "wb") as f:
            for chunk in (struct.pack("<Q", len(blob)), blob):
                f.write(chunk)
                file_hash.update(chunk)
            for s in specs:
                arr = np.asarray(produce(s.name))
                arr = arr if arr.ndim == 0 else np.ascontiguousarray(arr)  # ascontiguousarray makes a scalar [1]
                if arr.shape != tuple(s.shape) or arr.dtype != np.dtype(s.dtype):
                    raise CheckpointError(
                        f"{path}: tensor {s.name!r} produced as {arr.dtype}{list(arr.shape)}, "
                        f"header promised {np.dtype(s.dtype)}{list(s.shape)}"
                    )
                raw = arr.reshape(-1).view(np.uint8)  # no copy: write and hash straight from the array
                pending = pool.submit(lambda b: hashlib.sha256(b).hexdigest(), raw) if pool else None
                f.write(raw)
                file_hash.update(raw)
                if pending is not None:
                    tensor_hashes[s.name] = pending.result()
                if on_tensor is not None:
                    on_tensor(s.name, arr.nbytes)
                del arr, raw
        if pool is not None:
            pool.shutdown()
        os.replace(tmp, path)
        return file_hash.hexdigest()
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True)
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


def validate_tree(path: str | os.PathLike) -> None:
    """Check a file, or every file under a folder, before anything uses or copies it: each `.safetensors`
    file gets the full header and size validation (`read_header`), each `.json` file must parse, and a
    folder with a shard index must hold every shard it lists. Raises CheckpointError naming the file."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f.name.endswith(".safetensors"):
            read_header(f)
        elif f.name.endswith(".json"):
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
                raise CheckpointError(f"{f}: not valid JSON ({e}); the file is damaged or truncated") from None
        if f.name.endswith(".safetensors.index.json"):
            CheckpointReader(f.parent)


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
                hint = f" (found pickled {pickled}: convert them with `wanport convert --allow-pickle`)" if pickled else ""
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

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "CheckpointReader":
        """The tensors of one `.safetensors` file, or of the shards a `*.safetensors.index.json` beside them
        lists (single-file checkpoints as users download them), under their names in the file(s)."""
        path = Path(path)
        reader = cls.__new__(cls)
        reader.folder, reader.files, reader.where = path.parent, {}, {}
        if path.name.endswith(".safetensors.index.json"):
            reader._from_index(path)
        else:
            f = SafetensorsFile(path)
            reader.files[path.name] = f
            reader.where = {k: path.name for k in f.keys()}
        return reader

    def _from_index(self, index_path: Path) -> None:
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values())):
            if shard in ("", ".", "..") or "/" in shard or "\\" in shard or not shard.endswith(".safetensors"):
                raise CheckpointError(f"{index_path}: shard name {shard!r} is not a .safetensors file in this folder")
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


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class PickleReader:
    """Tensors of pickled torch weights (a folder's .bin/.pt/.pth files, or one file), read with
    `torch.load(weights_only=True)` only.

    `weights_only` refuses arbitrary objects, so a malicious pickle cannot run code; `mmap=True` keeps
    the tensors file-backed so memory stays bounded. Same interface as `CheckpointReader`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        files = sorted(p for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if not files:
            raise CheckpointError(f"{self.folder}: no .safetensors or pickled ({', '.join(PICKLE_SUFFIXES)}) weights found")
        self._read(files)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "PickleReader":
        """The tensors of one pickled file (a single-file checkpoint such as a released `model.pth`)."""
        path = Path(path)
        reader = cls.__new__(cls)
        reader.folder = path.parent
        reader._read([path])
        return reader

    def _read(self, files: list[Path]) -> None:
        import torch

        self._tensors: dict[str, "torch.Tensor"] = {}
        self.where: dict[str, str] = {}
        for p in files:
            try:
                try:
                    sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
                    sd = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # unpickling raises many types; all mean "not a safe weights file"
                raise CheckpointError(f"{p}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {e})") from None
            for key in ("state_dict", "model", "module"):
                if isinstance(sd, dict) and len(sd) == 1 and isinstance(sd.get(key), dict):
                    sd = sd[key]
            if not isinstance(sd, dict):
                raise CheckpointError(f"{p}: holds a {type(sd).__name__}, not a dict of tensors")
            for name, t in sd.items():
                if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{p}: entry {name!r} is not a named tensor")
                if name in self.where:
                    raise CheckpointError(f"{p}: tensor {name!r} also appears in {self.where[name]}")
                self._tensors[name] = t
                self.where[name] = p.name

    def keys(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        dtype = _torch_to_numpy_dtype(t.dtype, f"{self.folder / self.where[name]}: tensor {name!r}")
        return TensorInfo(name, dtype, tuple(t.shape), 0, t.numel() * dtype.itemsize)

    def get(self, name: str, copy: bool = True) -> np.ndarray:
        import torch

        if name not in self._tensors:
            raise KeyError(f"{self.folder}: no tensor named {name!r}")
        t = self._tensors[name].contiguous()
        dtype = self.info(name).dtype
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).numpy().view(dtype)
        else:
            arr = t.numpy()
        return np.array(arr) if copy else arr

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)


def _torch_to_numpy_dtype(tdtype, what: str) -> np.dtype:
    import torch

    table = {
        torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
        torch.bfloat16: ml_dtypes.bfloat16, torch.int64: np.int64, torch.int32: np.int32,
        torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
    }
    if tdtype not in table:
        raise CheckpointError(f"{what} has dtype {tdtype}, which safetensors output cannot hold")
    return np.dtype(table[tdtype])


def is_weights_file(path: str | os.PathLike) -> bool:
    """Whether `path` names a file the readers take alone: a .safetensors file, a *.safetensors.index.json
    shard index, or a pickled .bin/.pt/.pth/.ckpt file."""
    p = Path(path)
    return p.suffix in (".safetensors", *PICKLE_SUFFIXES) or p.name.endswith(".safetensors.index.json")


def open_reader(source: str | os.PathLike, allow_pickle: bool = False, prefer: str = "diffusion_pytorch_model"):
    """The reader for a model folder or one weights file: safetensors always (`prefer`: the file stem to read
    when a folder holds several single files; a file: itself, or the shards its index lists); pickled
    weights only when explicitly allowed."""
    source = Path(source)
    if source.is_file():
        if not is_weights_file(source):
            raise CheckpointError(f"{source}: not a weights file (.safetensors, a *.safetensors.index.json shard index, "
                                  f"or with --allow-pickle {'/'.join(PICKLE_SUFFIXES)})")
        if source.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise CheckpointError(f"{source}: a pickled checkpoint; unpickling can run code, so it is read only with "
                                      "--allow-pickle (allow_pickle=True), and then weights-only")
            return PickleReader.from_file(source)
        return CheckpointReader.from_file(source)
    if allow_pickle and source.is_dir() and not any(source.glob("*.safetensors")) and not any(source.glob("*.safetensors.index.json")):
        if any(p.suffix in PICKLE_SUFFIXES for p in source.iterdir()):
            return PickleReader(source)
    return CheckpointReader(source, prefer=prefer)
