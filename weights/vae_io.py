"""Load a Wan VAE folder (diffusers `vae/` layout, or Flax layout) into `jax_impl.vae.WanVAE`.

Tensors stream one at a time through `weights.vae_map`: header-only validation first (every
missing, unexpected or mis-shaped tensor named with both shapes), then each tensor is re-laid and
placed on device before the next is read; the model is built abstractly, so no random weights are made.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from weights.configs.vae import VaeConfig
from weights.safetensors_io import CheckpointError, CheckpointReader
from weights.vae_map import Entry, check_keys, detect_layout, vae_entries


class VaeCheckpoint:
    """An opened VAE folder: config, layout and validated tensor list; reads only headers until asked."""

    def __init__(self, folder: str | os.PathLike, config: VaeConfig | None = None):
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if config is None:
            if not cfg_path.is_file():
                sub = self.folder / "vae"
                hint = f"; did you mean {sub}?" if (sub / "config.json").is_file() else ""
                raise CheckpointError(f"{self.folder}: no config.json, so this is not a VAE folder{hint}")
            config = VaeConfig.from_json(cfg_path)
        self.config = config
        self.reader = CheckpointReader(self.folder)
        keys = self.reader.keys()
        try:
            self.layout = detect_layout(keys)
        except ValueError as e:
            raise CheckpointError(f"{self.folder}: {e}") from None
        self.entries = vae_entries(config)
        check_keys(self.entries, {k: self.reader.info(k).shape for k in keys}, self.layout, str(self.folder))

    def get(self, entry: Entry, layout: str) -> np.ndarray:
        return entry.convert(self.reader.get(entry.name(self.layout)), self.layout, layout)


def load_vae(folder: str | os.PathLike, *, dtype=None, config: VaeConfig | None = None,
             progress: Callable[[str], None] | None = None):
    """Build `WanVAE` from a folder, float32 or bfloat16 (`dtype`), streaming tensor by tensor.

    `config` overrides the folder's config.json (it must still match the weights, which is checked).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.vae import WanVAE

    ckpt = VaeCheckpoint(folder, config)
    dtype = jnp.dtype(dtype or jnp.float32)
    abstract = nnx.eval_shape(lambda: WanVAE(ckpt.config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    by_flax = {en.flax: en for en in ckpt.entries}
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        key = ".".join(str(p) for p in path)
        target = var.get_value()
        if key not in by_flax:
            raise CheckpointError(f"{folder}: the model has {key} but the VAE map does not (a bug in weights.vae_map)")
        host = ckpt.get(by_flax[key], "flax").astype(target.dtype)
        if host.shape != target.shape:
            raise CheckpointError(f"{folder}: {key} has shape {list(host.shape)}, the model wants {list(target.shape)}")
        var.set_value(jax.device_put(host))
        del host
        if progress:
            progress(key)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


__all__ = ["VaeCheckpoint", "load_vae", "CheckpointError"]
