"""Load Wan's encoders (UMT5 text encoder, CLIP vision tower) from transformers model folders into Flax.

The folder's config.json is read and checked, then every safetensors header (one file, or the shards an
index json lists, as diffusers pipelines store UMT5-XXL): each missing, unexpected or mis-shaped tensor is
named before any data is read. The model is built abstractly (`nnx.eval_shape`, no random weights) and
filled parameter by parameter: each tensor is read from its memory-mapped file, re-laid, cast and put on
the device before the next, so the host holds at most one (layer-stacked) parameter. No torch import.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np

from weights.configs.base import ConfigError
from weights.configs.encoders import ClipVisionConfig, Umt5Config
from weights import clip_map, umt5_map
from weights.dit_io import CheckpointConfigError
from weights.dit_map import Entry, check_keys
from weights.safetensors_io import CheckpointError, CheckpointReader


@dataclasses.dataclass(frozen=True)
class _Kind:
    what: str  # for messages
    subfolder: str  # where a pipeline folder keeps it
    config: type
    entries: Callable[..., list[Entry]]
    canonical_keys: Callable[[list[str]], dict[str, str]]


KINDS = {
    "umt5": _Kind("UMT5 text encoder", "text_encoder", Umt5Config, umt5_map.umt5_entries, umt5_map.canonical_keys),
    "clip": _Kind("CLIP vision tower", "image_encoder", ClipVisionConfig, clip_map.clip_vision_entries, clip_map.canonical_keys),
}


class EncoderCheckpoint:
    """An opened encoder folder (`kind` "umt5" or "clip"): config and validated tensor list; reads only headers."""

    def __init__(self, folder: str | os.PathLike, kind: str):
        spec = KINDS[kind]
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            sub = self.folder / spec.subfolder
            hint = f"; did you mean {sub}?" if (sub / "config.json").is_file() else ""
            raise CheckpointError(f"{self.folder}: no config.json, so this is not a {spec.what} folder{hint}")
        try:
            self.config = spec.config.from_json(cfg_path)
        except ConfigError as e:
            raise CheckpointConfigError(f"{e} (invalid {spec.what} config)") from None
        self.reader = CheckpointReader(self.folder, prefer="model")
        self.names = spec.canonical_keys(self.reader.keys())
        self.entries = spec.entries(self.config)
        check_keys(self.entries, {k: self.reader.info(v).shape for k, v in self.names.items()}, "diffusers", str(self.folder))

    def get(self, entry: Entry) -> np.ndarray:
        """One tensor in the Flax layout (a view into the mapped file where no re-lay is needed)."""
        return entry.to_flax(self.reader.get(self.names[entry.diffusers], copy=False))


def fill_abstract(abstract, entries: list[Entry], get: Callable[[Entry], np.ndarray], *, stacked: str, num_layers: int,
                  source: str, progress: Callable[[str], None] | None = None):
    """Give every parameter of an abstract NNX model its tensor, one at a time, and return the model.

    Parameters under `stacked` have a leading layer axis; their per-layer tensors (`{stacked}.{i}.{rest}` in
    `entries`) are gathered into one host array first. Every entry must be used exactly once.
    """
    import jax
    from flax import nnx

    graphdef, state = nnx.split(abstract)
    by_flax = {en.flax: en for en in entries}
    used = 0
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        key = ".".join(str(p) for p in path)
        target = var.get_value()
        names = [f"{stacked}.{i}.{key[len(stacked) + 1:]}" for i in range(num_layers)] if path[0] == stacked else [key]
        missing = [n for n in names if n not in by_flax]
        if missing:
            raise CheckpointError(f"{source}: the model has {missing[0]} but the weight map does not (a bug in the map)")
        if path[0] == stacked:
            host = np.empty(target.shape, dtype=target.dtype)
            for i, name in enumerate(names):
                host[i] = get(by_flax[name]).astype(target.dtype)
        else:
            host = np.asarray(get(by_flax[key])).astype(target.dtype)
        if host.shape != target.shape:
            raise CheckpointError(f"{source}: {key} has shape {list(host.shape)}, the model wants {list(target.shape)}")
        var.set_value(jax.device_put(host))
        used += len(names)
        del host
        if progress:
            progress(key)
    if used != len(entries):
        raise CheckpointError(f"{source}: the map lists {len(entries)} tensors, the model took {used} (a bug in the map)")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_umt5(folder: str | os.PathLike, *, dtype=None, progress: Callable[[str], None] | None = None):
    """`jax_impl.encoders.umt5.Umt5Encoder` from a `text_encoder/` folder, in float32 or bfloat16 (`dtype`);
    `wo` stays float32 either way (see the model's docstring)."""
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.encoders.umt5 import Umt5Encoder

    ckpt = EncoderCheckpoint(folder, "umt5")
    dtype = jnp.dtype(dtype or jnp.float32)
    abstract = nnx.eval_shape(lambda: Umt5Encoder(ckpt.config, dtype=dtype, rngs=nnx.Rngs(0)))
    return fill_abstract(abstract, ckpt.entries, ckpt.get, stacked="layers", num_layers=ckpt.config.num_layers,
                         source=str(ckpt.folder), progress=progress)


def load_clip_vision(folder: str | os.PathLike, *, dtype=None, attention_backend: str = "auto",
                     progress: Callable[[str], None] | None = None):
    """`jax_impl.encoders.clip.ClipVisionEncoder` from an `image_encoder/` folder, float32 or bfloat16 (`dtype`)."""
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.encoders.clip import ClipVisionEncoder

    ckpt = EncoderCheckpoint(folder, "clip")
    dtype = jnp.dtype(dtype or jnp.float32)
    abstract = nnx.eval_shape(
        lambda: ClipVisionEncoder(ckpt.config, dtype=dtype, attention_backend=attention_backend, rngs=nnx.Rngs(0))
    )
    return fill_abstract(abstract, ckpt.entries, ckpt.get, stacked="layers", num_layers=ckpt.config.num_hidden_layers,
                         source=str(ckpt.folder), progress=progress)


__all__ = ["EncoderCheckpoint", "load_umt5", "load_clip_vision", "fill_abstract", "CheckpointError"]
