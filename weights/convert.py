"""Convert Wan DiT (and FantasyWorld) checkpoints between the diffusers, original-Wan and Flax layouts.

The design goals, in order: never damage anything (the source is only read, the output appears
whole or not at all, an existing destination survives unless --force), be exact (re-laying is a
permutation, dtypes change only on request, and a manifest of sha256 hashes proves it), and stream
(one memory-mapped tensor at a time, so a 14B expert converts in a couple of hundred MB of RAM).

Sources open through the one checkpoint engine (`weights.checkpoint.Checkpoint`): a DiT model folder, a
pipeline folder, a single DiT file (`weights.single_file.open_dit`), or a FantasyWorld model (a folder with
its config.json, or the released `model.pth` alone; its layouts are named as the DiT's: `wan` = the
released names, `diffusers` = our torch reference's, `flax`), written as a folder of the same kind.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from weights import fp8 as wfp8
from weights import manifest as mf
from weights.atomic import TEMP_TAGS, atomic_folder, check_output_path
from weights.checkpoint import Checkpoint
from weights.configs.dit import DitConfig
from weights.dit_map import LAYOUTS
from weights.entry import FORMAT_KEY
from weights.fantasyworld_map import FANTASYWORLD
from weights.lora_apply import apply_loras
from weights.single_file import is_single_file, open_dit
from weights.safetensors_io import CheckpointError, TensorSpec, open_reader, validate_tree, write_safetensors

WEIGHT_STEM = {"diffusers": "diffusion_pytorch_model", "wan": "diffusion_pytorch_model", "flax": "flax_model"}
DIT_CLASSES = ("WanTransformer3DModel", "WanModel")
DELAY_ENV = "WANPORT_CONVERT_TENSOR_DELAY"  # test hook: seconds to sleep after each tensor
CAST_DTYPES = {"float32": np.float32, "fp32": np.float32, "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
               "float8_e4m3fn": ml_dtypes.float8_e4m3fn}

ProgressFn = Callable[[str, int], None]


# --- sizes and shards -----------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as diffusers' max_shard_size; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ValueError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {text!r}")
    return size


def plan_shards(specs: list[TensorSpec], limit: int | None) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `limit` bytes (a bigger tensor gets its own)."""
    if limit is None:
        return [specs]
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        n = int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += n
    return shards


def shard_file_names(layout: str, n: int, stem: str | None = None) -> list[str]:
    stem = stem or WEIGHT_STEM[layout]
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_weights(
    folder: Path,
    layout: str,
    specs: list[TensorSpec],
    produce: Callable[[str], np.ndarray],
    *,
    shard_size: int | None = None,
    on_tensor: ProgressFn | None = None,
    stem: str | None = None,
) -> dict[str, tuple[str, int, dict[str, dict]]]:
    """Write the weights (one file, or shards plus index json) into `folder`, named `stem` (default: the
    layout's usual name).

    Returns {file name: (file sha256, size, {tensor: manifest record})} for the manifest.
    """
    shards = plan_shards(specs, shard_size)
    names = shard_file_names(layout, len(shards), stem)
    meta = {FORMAT_KEY: layout, "format": "flax" if layout == "flax" else "pt"}
    out: dict[str, tuple[str, int, dict[str, dict]]] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, shards):
        hashes: dict[str, str] = {}
        sha = write_safetensors(folder / fname, shard, produce, metadata=meta, on_tensor=on_tensor, tensor_hashes=hashes)
        records = {s.name: mf.tensor_record(s.dtype, s.shape, hashes[s.name]) for s in shard}
        out[fname] = (sha, (folder / fname).stat().st_size, records)
        for s in shard:
            weight_map[s.name] = fname
            total += int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        iname = f"{stem or WEIGHT_STEM[layout]}.safetensors.index.json"
        (folder / iname).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        sha, size = mf.hash_file(folder / iname)
        out[iname] = (sha, size, {})
    return out


def config_dict(cfg: DitConfig, layout: str) -> dict:
    """The config.json of a layout: the original repository's format for "wan", diffusers' otherwise."""
    return cfg.to_wan_dict() if layout == "wan" else cfg.to_dict()


def write_model(out: Path, cfg: DitConfig, layout: str, specs: list[TensorSpec], produce: Callable[[str], np.ndarray],
                manifest: dict, *, prefix: str = "", shard_size: int | None = None,
                on_tensor: ProgressFn | None = None, config_json: dict | None = None, stem: str | None = None) -> None:
    """config.json and the weights of one model in `layout` into `out`, every file recorded in `manifest`
    (under `prefix`, the model's folder inside a pipeline). `config_json` and `stem` default to the DiT's."""
    out.mkdir(parents=True, exist_ok=True)
    raw = config_json if config_json is not None else config_dict(cfg, layout)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    sha, size = mf.hash_file(out / "config.json")
    mf.add_file(manifest, prefix + "config.json", sha, size)
    for fname, (sha, size, records) in write_weights(out, layout, specs, produce, shard_size=shard_size,
                                                     on_tensor=on_tensor, stem=stem).items():
        mf.add_file(manifest, prefix + fname, sha, size, records if fname.endswith(".safetensors") else None)


def write_model_folder(dst: str | os.PathLike, cfg: DitConfig, layout: str, specs: list[TensorSpec],
                       produce: Callable[[str], np.ndarray], *, source: str, force: bool = False,
                       shard_size: int | None = None, on_tensor: ProgressFn | None = None) -> Path:
    """A model folder (config + weights + manifest) written whole or not at all (`weights.atomic`)."""
    with atomic_folder(dst, force=force) as tmp:
        manifest = mf.new_manifest(layout=layout, source=source)
        write_model(tmp, cfg, layout, specs, produce, manifest, shard_size=shard_size, on_tensor=on_tensor)
        mf.write_manifest(tmp, manifest)
    return Path(dst)


# --- conversion -----------------------------------------------------------------------------------
def _class_name(folder: Path) -> str | None:
    """The `_class_name` of a folder's config.json (None when there is none to read)."""
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw.get("_class_name") if isinstance(raw, dict) else None


def is_dit_folder(folder: Path) -> bool:
    """A model folder whose config.json names the Wan DiT (diffusers or original class)."""
    return _class_name(folder) in DIT_CLASSES


def is_fantasyworld(src: Path, allow_pickle: bool = False) -> bool:
    """A FantasyWorld model: a folder whose config.json says so, or a single file with its names."""
    if src.is_dir():
        return _class_name(src) == "FantasyWorld"
    try:
        FANTASYWORLD.detect_layout(open_reader(src, allow_pickle=allow_pickle).keys())
    except (ValueError, OSError):  # CheckpointError is a ValueError: opening the DiT will say what is wrong
        return False
    return True


def open_model(src: Path, allow_pickle: bool = False):
    """The DiT or FantasyWorld model at `src` (model folder or single file), opened and checked."""
    if is_fantasyworld(src, allow_pickle):
        return Checkpoint(src, FANTASYWORLD, allow_pickle=allow_pickle)
    return open_dit(src, allow_pickle=allow_pickle)


def cast_dtype(name: str | None) -> np.dtype | None:
    """The numpy dtype of a `--dtype` name (None: keep each tensor's dtype)."""
    if name is None:
        return None
    if name not in CAST_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use float32, bfloat16 or float8_e4m3fn")
    return np.dtype(CAST_DTYPES[name])


class _Job:
    """One DiT folder to convert: opened (validated) before any output exists."""

    def __init__(self, src: Path, rel: str, to: str, cast, allow_pickle: bool, loras=()):
        self.rel = rel
        # a model folder or a single file (.safetensors, an index json or a .pth; a DiT's config read off the shapes)
        self.ckpt = open_model(src, allow_pickle)
        self.fantasyworld = self.ckpt.map is FANTASYWORLD
        if self.fantasyworld and (loras or (cast is not None and cast == wfp8.E4M3)):
            raise ValueError(f"{src}: a FantasyWorld model; --lora and --dtype float8_e4m3fn are for Wan DiT checkpoints")
        if loras:  # merged in float32, written in each base tensor's dtype (or --dtype); every LoRA read now
            self.ckpt = apply_loras(self.ckpt, loras, dtype=None)
        self.specs: list[TensorSpec] = []
        self.by_name = {}
        self.cast = cast
        self.to = to
        self.scales: dict[str, str] = {}  # FP8 output: scale key -> weight key
        self._last: tuple[str | None, dict] = (None, {})  # FP8 output: the last weight quantised, with its scale
        for en in self.ckpt.entries:
            name = en.name(to)
            self.by_name[name] = en
            if cast is not None and cast == wfp8.E4M3:
                self._add_fp8_specs(en, name)
            else:
                self.specs.append(TensorSpec(name, cast if cast is not None else self.ckpt.dtype(en), en.layout_shape(to)))

    def _add_fp8_specs(self, en, name: str) -> None:
        """--dtype float8_e4m3fn: the block linears (weights.fp8.is_fp8_linear) as e4m3 with a float32 per-output-
        channel scale ([out, 1] next to a torch [out, in] weight, [out] next to a Flax [in, out] kernel); every
        other tensor in bfloat16 (the embeddings, head and norms stay high precision)."""
        shape = en.layout_shape(self.to)
        if en.kind == "linear" and wfp8.is_fp8_linear(name):
            self.specs.append(TensorSpec(name, wfp8.E4M3, shape))
            key = wfp8.scale_key(name)
            self.scales[key] = name
            self.specs.append(TensorSpec(key, np.dtype(np.float32), (shape[-1],) if self.to == "flax" else (shape[0], 1)))
        else:
            self.specs.append(TensorSpec(name, np.dtype(ml_dtypes.bfloat16), shape))

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in self.specs)

    def produce(self, name: str) -> np.ndarray:
        if self.cast is not None and self.cast == wfp8.E4M3:
            weight = self.scales.get(name, name)
            en = self.by_name[weight]
            if en.kind == "linear" and wfp8.is_fp8_linear(weight):
                if self._last[0] != weight:  # the weight and its scale are written one after the other
                    self._last = (weight, wfp8.quantize_for_file(weight, self.ckpt.get(en, self.to)))
                return self._last[1][name]
            return self.ckpt.get(en, self.to).astype(ml_dtypes.bfloat16)
        x = self.ckpt.get(self.by_name[name], self.to)
        return x.astype(self.cast) if self.cast is not None and x.dtype != self.cast else x

    def write(self, out: Path, manifest: dict, shard_size: int | None, on_tensor: ProgressFn | None) -> None:
        extra = dict(config_json=self.ckpt.config.to_dict(), stem=FANTASYWORLD.prefer) if self.fantasyworld else {}
        write_model(out, self.ckpt.config, self.to, self.specs, self.produce, manifest,
                    prefix=f"{self.rel}/" if self.rel else "", shard_size=shard_size, on_tensor=on_tensor, **extra)


def _copy_tree(src: Path, dst: Path, rel: str, manifest: dict) -> None:
    """Copy a file or folder unchanged, recording every file's hash."""
    if src.is_dir():
        dst.mkdir(exist_ok=True)
        for child in sorted(src.iterdir()):
            _copy_tree(child, dst / child.name, f"{rel}/{child.name}", manifest)
    elif src.is_file():
        sha, size = mf.copy_with_hash(src, dst)
        mf.add_file(manifest, rel, sha, size)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    dtype: str | None = None,
    shard_size: str | int | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool | ProgressFn = False,
    loras=(),
    loras_2=(),
) -> Path:
    """Convert a DiT model folder, a single-file DiT checkpoint (one .safetensors, an index json, e.g.
    ComfyUI's, or with `allow_pickle` a .pth; written as a model folder with its config), a FantasyWorld model
    (folder, or the released model.pth alone), or a whole pipeline folder (model_index.json +
    transformer[_2]/) to layout `to`; other pipeline components and files are copied through unchanged.

    `loras` ("FILE[:SCALE]" or (file, scale)) are merged into the model folder, or a pipeline's
    transformer/; `loras_2` into its transformer_2/ (Wan2.2 A14B's low-noise expert).

    `progress=True` shows a tqdm bar over bytes; a callable gets (tensor name, bytes) per tensor.
    """
    if to not in LAYOUTS:
        raise ValueError(f"unknown layout {to!r}; choose one of {', '.join(LAYOUTS)}")
    src, dst = Path(src), Path(dst)
    limit = parse_size(shard_size) if shard_size is not None else None
    cast = cast_dtype(dtype)
    single = is_single_file(src)
    if not (src.is_dir() or single):
        raise CheckpointError(f"{src}: not a folder, a .safetensors file, a .safetensors.index.json or a .pth "
                              "(with --allow-pickle)")
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ValueError(f"destination {dst} overlaps the source {src}; choose a folder outside it")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")
    if not (force and (dst.exists() or dst.is_symlink())):  # --force may replace an existing DST of any kind
        check_output_path(dst, flag="DST", folder=True)

    # Open and validate every model before creating anything.
    jobs: list[_Job] = []
    copies: list[Path] = []
    if single or (src / "config.json").is_file():
        if loras_2:
            raise ValueError(f"{src}: --lora-2 goes to transformer_2/ of a pipeline folder; this is one model folder: "
                             "use --lora")
        jobs.append(_Job(src, "", to, cast, allow_pickle, loras))
    elif (src / "model_index.json").is_file():
        if loras_2 and not is_dit_folder(src / "transformer_2"):
            raise ValueError(f"{src}: --lora-2 goes to transformer_2/, which this pipeline folder does not have")
        for child in sorted(src.iterdir()):
            if child.name == mf.MANIFEST_NAME or any(tag in child.name for tag in TEMP_TAGS):
                continue
            if child.is_dir() and is_dit_folder(child):
                merged = {"transformer": loras, "transformer_2": loras_2}.get(child.name, ())
                jobs.append(_Job(child, child.name, to, cast, allow_pickle, merged))
            else:
                copies.append(child)
        if not jobs:
            raise CheckpointError(f"{src}: model_index.json found but no transformer folder with a Wan DiT config.json")
        # Everything copied through gets the transformer's checks: a damaged VAE or encoder is refused here,
        # not copied and then vouched for by the manifest.
        for c in copies:
            validate_tree(c)
        if not isinstance(json.loads((src / "model_index.json").read_text(encoding="utf-8")), dict):
            raise CheckpointError(f"{src / 'model_index.json'}: expected a JSON object (component -> [library, class])")
    else:
        raise CheckpointError(f"{src}: neither a model folder (config.json) nor a pipeline folder (model_index.json)")

    manifest = mf.new_manifest(
        layout=to, source=str(src), dtype=dtype or "unchanged", models=[j.rel or "." for j in jobs],
        **({"loras": [str(x) for x in loras], "loras_2": [str(x) for x in loras_2]} if loras or loras_2 else {}), created=time.strftime("%Y-%m-%dT%H:%M:%S%z")
    )
    bar, on_tensor = None, None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=sum(j.nbytes for j in jobs), unit="B", unit_scale=True, unit_divisor=1024, desc=f"convert -> {to}", dynamic_ncols=True)
        on_tensor = lambda name, n: bar.update(n)  # noqa: E731
    elif callable(progress):
        on_tensor = progress
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay > 0:
        inner = on_tensor

        def on_tensor(name: str, n: int) -> None:  # noqa: F811
            if inner:
                inner(name, n)
            time.sleep(delay)

    try:
        with atomic_folder(dst, force=force) as tmp:
            for job in jobs:
                job.write(tmp / job.rel if job.rel else tmp, manifest, limit, on_tensor)
            for c in copies:
                _copy_tree(c, tmp / c.name, c.name, manifest)
            mf.write_manifest(tmp, manifest)
    finally:
        if bar is not None:
            bar.close()
    return dst


def verify(folder: str | os.PathLike) -> list[str]:
    """Problems found checking `folder` against its manifest (empty list: intact)."""
    return mf.verify(folder)
