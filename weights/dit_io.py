"""Load a Wan DiT folder (diffusers, original-Wan or Flax layout) into Flax, save it, convert between layouts.

Everything streams tensor by tensor through `weights.dit_map`: the source is memory-mapped, each tensor
is re-laid (a permutation, bit-exact) and written or placed on device before the next one is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from jax_impl.config import ConfigError, DitConfig
from weights.dit_map import Entry, check_keys, detect_layout, dit_entries
from weights.safetensors_io import CheckpointError, TensorSpec, open_reader

FLAX_WEIGHTS = "flax_model.safetensors"
TORCH_WEIGHTS = "diffusion_pytorch_model.safetensors"
FORMAT_KEY = "wanport_layout"


class CheckpointConfigError(CheckpointError, ConfigError):
    """A model folder whose config.json is unreadable or invalid (both error kinds, so either catch works)."""


class DitCheckpoint:
    """An opened DiT folder: config, layout, validated tensor list. Reads nothing but headers until asked.

    Pickled weights (.bin/.pt/.pth) are refused unless `allow_pickle`, and even then loaded weights-only.
    """

    def __init__(self, folder: str | os.PathLike, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            sub = self.folder / "transformer"
            hint = f"; did you mean {sub}?" if (sub / "config.json").is_file() else ""
            raise CheckpointError(f"{self.folder}: no config.json, so this is not a model folder{hint}")
        self.reader = open_reader(self.folder, allow_pickle=allow_pickle)
        keys = self.reader.keys()
        try:
            self.layout = detect_layout(keys)
        except ValueError as e:
            raise CheckpointError(f"{self.folder}: {e}") from None
        cfg_path = self.folder / "config.json"
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ConfigError(f"{cfg_path}: expected a JSON object")
            if raw.get("_class_name") == "WanModel":
                has_img = any(k.startswith("img_emb.") for k in keys)
                self.config = DitConfig.from_wan_dict(raw, has_img, source=str(cfg_path))
            else:
                self.config = DitConfig.from_dict(raw, source=str(cfg_path))
        except (OSError, ValueError, TypeError) as e:  # ConfigError and JSONDecodeError are ValueErrors
            msg = str(e) if str(e).startswith(str(cfg_path)) else f"{cfg_path}: {e}"
            raise CheckpointConfigError(f"{msg} (invalid model config)") from None
        self.entries = dit_entries(self.config)
        found = {k: self.reader.info(k).shape for k in keys}
        check_keys(self.entries, found, self.layout, str(self.folder))

    def get(self, entry: Entry, layout: str) -> np.ndarray:
        """One tensor, re-laid into `layout`."""
        return entry.convert(self.reader.get(entry.name(self.layout), copy=False), self.layout, layout)

    def dtype(self, entry: Entry) -> np.dtype:
        return self.reader.info(entry.name(self.layout)).dtype


def open_dit(
    source: str | os.PathLike,
    config: DitConfig | None = None,
    *,
    num_heads: int | None = None,
    allow_pickle: bool = False,
):
    """A model folder (`DitCheckpoint`) or a single-file checkpoint (`weights.single_file`: one .safetensors
    or a *.safetensors.index.json, any of the prefixes users' files carry). `config` and `num_heads` apply
    to single files only (a folder has its config.json)."""
    from weights.single_file import SingleFileCheckpoint, is_single_file

    if is_single_file(source):
        return SingleFileCheckpoint(source, config, num_heads=num_heads)
    if config is not None or num_heads is not None:
        raise CheckpointError(f"{source}: a model folder has its own config.json; config/num_heads are for single files")
    return DitCheckpoint(source, allow_pickle=allow_pickle)


def load_dit(
    folder,
    *,
    dtype=None,
    attention_backend: str = "auto",
    progress: Callable[[str], None] | None = None,
):
    """Build `jax_impl.dit.WanTransformer` from a checkpoint without materialising random weights.

    `folder`: a model folder, a single-file checkpoint, or an opened checkpoint (`open_dit`, or
    `weights.lora_apply.apply_loras` of one for LoRAs merged at load).

    `dtype` (float32 or bfloat16) sets the activation and weight dtype; float32 islands (norms,
    modulation tables, time embedder) stay float32 whatever the checkpoint holds.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.dit import WanTransformer

    ckpt = folder if hasattr(folder, "entries") else open_dit(folder)
    cfg = ckpt.config
    dtype = jnp.dtype(dtype or jnp.float32)
    abstract = nnx.eval_shape(lambda: WanTransformer(cfg, dtype=dtype, attention_backend=attention_backend, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    by_flax = {en.flax: en for en in ckpt.entries}
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        key = ".".join(str(p) for p in path)
        target = var.value
        if path[0] == "blocks":  # stacked: gather layer tensors into one array
            rest = ".".join(str(p) for p in path[1:])
            host = np.empty(target.shape, dtype=target.dtype)
            for i in range(cfg.num_layers):
                host[i] = ckpt.get(by_flax[f"blocks.{i}.{rest}"], "flax").astype(target.dtype)
        else:
            host = ckpt.get(by_flax[key], "flax").astype(target.dtype)
        if host.shape != target.shape:
            src = getattr(ckpt, "folder", None) or getattr(ckpt, "path", folder)
            raise CheckpointError(f"{src}: {key} has shape {host.shape}, the model wants {target.shape}")
        var.value = jax.device_put(host)
        del host
        if progress:
            progress(key)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def flax_tensors(model) -> tuple[DitConfig, dict[str, Callable[[], np.ndarray]]]:
    """Per-layer Flax checkpoint keys of a model, each with a thunk producing its host array."""
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model))
    out: dict[str, Callable[[], np.ndarray]] = {}
    for path, var in flat:
        if path[0] == "blocks":
            rest = ".".join(str(p) for p in path[1:])
            for i in range(model.cfg.num_layers):
                out[f"blocks.{i}.{rest}"] = (lambda v=var, i=i: np.asarray(v.value[i]))
        else:
            out[".".join(str(p) for p in path)] = (lambda v=var: np.asarray(v.value))
    return model.cfg, out


def save_dit(model, folder: str | os.PathLike, *, force: bool = False) -> Path:
    """Save a Flax model as a Flax-layout checkpoint folder (config.json + flax_model.safetensors)."""
    cfg, thunks = flax_tensors(model)
    entries = dit_entries(cfg)
    specs = []
    for en in entries:
        probe = thunks[en.flax]()
        specs.append(TensorSpec(en.flax, probe.dtype, probe.shape))
    return _write_folder(folder, cfg, "flax", specs, lambda k: thunks[k](), force=force)


def convert_dit(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    dtype: str | None = None,
    force: bool = False,
    on_tensor: Callable[[str, int], None] | None = None,
    shard_size: str | int | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Convert a DiT folder (or pipeline folder) to layout `to` (diffusers | wan | flax), one tensor at a time.

    Without `dtype` every tensor keeps its dtype, so the conversion is bit-exact and reversible.
    See `weights.convert.convert` for sharding, the manifest and the atomic output.
    """
    from weights.convert import convert

    return convert(src, dst, to, dtype=dtype, shard_size=shard_size, force=force, allow_pickle=allow_pickle, progress=on_tensor or False)


def _np_dtype(name: str):
    import ml_dtypes

    table = {"float32": np.float32, "fp32": np.float32, "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16}
    if name not in table:
        raise ValueError(f"unsupported dtype {name!r}; use float32 or bfloat16")
    return table[name]


def _write_folder(dst, cfg: DitConfig, layout: str, specs, produce, *, force: bool, on_tensor=None, shard_size=None) -> Path:
    """Write config + weights + manifest into a temporary sibling folder, then rename it into place."""
    from weights import manifest as mf
    from weights.convert import config_dict, staged_output, write_weights

    with staged_output(dst, force=force) as tmp:
        manifest = mf.new_manifest(layout=layout, source="save_dit")
        (tmp / "config.json").write_text(json.dumps(config_dict(cfg, layout), indent=2) + "\n")
        mf.add_file(manifest, "config.json", *mf.hash_file(tmp / "config.json"))
        for fname, (sha, size, records) in write_weights(tmp, layout, list(specs), produce, shard_size=shard_size, on_tensor=on_tensor).items():
            mf.add_file(manifest, fname, sha, size, records if fname.endswith(".safetensors") else None)
        mf.write_manifest(tmp, manifest)
    return Path(dst)


__all__ = ["DitCheckpoint", "open_dit", "load_dit", "save_dit", "convert_dit", "ConfigError", "CheckpointError"]
