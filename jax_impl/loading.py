"""The one loader of weights into Flax NNX modules, and the Flax-layout writer of the DiT.

`fill(module, get, shapes)` gives every parameter of a module (an abstract one from `nnx.eval_shape`:
no random weights are ever made) its tensor, one parameter at a time, each read, cast and put on the
device before the next, so the host holds at most one (layer-stacked) parameter. Parameters under
`stacked` carry a leading layer axis and are gathered from per-layer tensors `{stacked}.{i}.{rest}`
(how Flax checkpoints store the scanned blocks, so files stream tensor by tensor). The names and shapes
on offer must be exactly the module's, or one error lists every difference before anything is read.

`load_checkpoint` feeds it from an opened `weights.checkpoint.Checkpoint` (any layout, re-laid on the fly);
`load_dit`, `load_vae`, `load_umt5` and `load_clip_vision` are that plus the model to build;
`load_params` / `build_loaded` feed it from a dict of Flax-layout arrays (FantasyWorld's modules).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.dit import WanTransformer
from jax_impl.encoders.clip import ClipVisionEncoder
from jax_impl.encoders.umt5 import Umt5Encoder
from jax_impl.vae import WanVAE
from weights.checkpoint import Checkpoint
from weights.clip_map import CLIP
from weights.configs.dit import DitConfig
from weights.configs.vae import VaeConfig
from weights.convert import write_model_folder
from weights.dit_map import DIT, dit_entries
from weights.entry import describe_mismatch
from weights.safetensors_io import CheckpointError, TensorSpec
from weights.single_file import open_dit
from weights.umt5_map import UMT5
from weights.vae_map import VAE

Progress = Callable[[str], None]


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def _stacked_split(key: str, stacked: tuple[str, ...]) -> tuple[str, str] | None:
    """(stack prefix, rest of the path) when parameter `key` lies under one of the `stacked` prefixes."""
    for prefix in stacked:
        if key.startswith(prefix + "."):
            return prefix, key[len(prefix) + 1:]
    return None


def fill(module: nnx.Module, get: Callable[[str], np.ndarray], shapes: Mapping[str, tuple[int, ...]], *,
         source: str, stacked: str | tuple[str, ...] | None = None, progress: Progress | None = None) -> nnx.Module:
    """`module` with every parameter set from `get(name)` (see the module docstring); `shapes` is
    {name: shape} of what `get` serves; `stacked` is one or several (dotted) paths of layer-stacked modules.
    Returns the filled module (in the parameters' own dtypes)."""
    stacks = (stacked,) if isinstance(stacked, str) else tuple(stacked or ())
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    wanted: dict[str, tuple[int, ...]] = {}
    for path, var in flat:
        shape = tuple(var.get_value().shape)
        under = _stacked_split(_key(path), stacks)
        if under is not None:
            wanted.update({f"{under[0]}.{i}.{under[1]}": shape[1:] for i in range(shape[0])})
        else:
            wanted[_key(path)] = shape
    problems = describe_mismatch(wanted, shapes, unit="")
    if problems:
        raise CheckpointError(f"{source} do not fit {type(module).__name__}: {problems}")
    for path, var in flat:
        key, target = _key(path), var.get_value()
        under = _stacked_split(key, stacks)
        if under is not None:
            host = np.empty(target.shape, dtype=target.dtype)
            for i in range(target.shape[0]):
                host[i] = np.asarray(get(f"{under[0]}.{i}.{under[1]}")).astype(target.dtype)
        else:
            host = np.asarray(get(key)).astype(target.dtype)
        var.set_value(jax.device_put(host))
        del host
        if progress:
            progress(key)
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def checkpoint_source(ckpt) -> str:
    """Where an opened checkpoint came from, for messages: a model folder, a single file, or a LoRA-merged
    view of either."""
    while hasattr(ckpt, "base"):
        ckpt = ckpt.base
    return str(getattr(ckpt, "source", None) or getattr(ckpt, "folder", "checkpoint"))


def load_checkpoint(ckpt: Checkpoint, build: Callable[[], nnx.Module], *, stacked: str | tuple[str, ...] | None = None,
                    progress: Progress | None = None) -> nnx.Module:
    """`build()`, made abstractly, filled tensor by tensor from an opened checkpoint in any layout."""
    by_flax = {en.flax: en for en in ckpt.entries}
    return fill(nnx.eval_shape(build), lambda name: ckpt.get(by_flax[name], "flax"),
                {en.flax: en.flax_shape() for en in ckpt.entries}, source=f"{checkpoint_source(ckpt)}: the weights",
                stacked=stacked, progress=progress)


def load_dit(folder, *, dtype=None, attention_backend: str = "auto",
             progress: Progress | None = None) -> WanTransformer:
    """`WanTransformer` from a DiT folder (diffusers, original-Wan or Flax layout), a single-file checkpoint,
    or an opened checkpoint (`weights.single_file.open_dit`, or `weights.lora_apply.apply_loras` of one for
    LoRAs merged at load).

    `dtype` (float32 or bfloat16) sets the activation and weight dtype; float32 islands (norms,
    modulation tables, time embedder) stay float32 whatever the checkpoint holds.
    """
    ckpt = folder if hasattr(folder, "entries") else open_dit(folder)
    dtype = jnp.dtype(dtype or jnp.float32)
    build = lambda: WanTransformer(ckpt.config, dtype=dtype, attention_backend=attention_backend, rngs=nnx.Rngs(0))  # noqa: E731
    return load_checkpoint(ckpt, build, stacked="blocks", progress=progress)


def load_vae(folder: str | os.PathLike, *, dtype=None, config: VaeConfig | None = None,
             progress: Progress | None = None) -> WanVAE:
    """`WanVAE` from a VAE folder, float32 or bfloat16 (`dtype`). `config` overrides the folder's config.json
    (it must still match the weights, which is checked)."""
    ckpt = Checkpoint(folder, VAE, config=config)
    dtype = jnp.dtype(dtype or jnp.float32)
    return load_checkpoint(ckpt, lambda: WanVAE(ckpt.config, dtype=dtype, rngs=nnx.Rngs(0)), progress=progress)


def load_umt5(folder: str | os.PathLike, *, dtype=None, progress: Progress | None = None) -> Umt5Encoder:
    """`Umt5Encoder` from a `text_encoder/` folder, in float32 or bfloat16 (`dtype`); `wo` stays float32 either
    way (see the model's docstring)."""
    ckpt = Checkpoint(folder, UMT5)
    dtype = jnp.dtype(dtype or jnp.float32)
    return load_checkpoint(ckpt, lambda: Umt5Encoder(ckpt.config, dtype=dtype, rngs=nnx.Rngs(0)), stacked="layers",
                           progress=progress)


def load_clip_vision(folder: str | os.PathLike, *, dtype=None, attention_backend: str = "auto",
                     progress: Progress | None = None) -> ClipVisionEncoder:
    """`ClipVisionEncoder` from an `image_encoder/` folder, float32 or bfloat16 (`dtype`)."""
    ckpt = Checkpoint(folder, CLIP)
    dtype = jnp.dtype(dtype or jnp.float32)
    build = lambda: ClipVisionEncoder(ckpt.config, dtype=dtype, attention_backend=attention_backend, rngs=nnx.Rngs(0))  # noqa: E731
    return load_checkpoint(ckpt, build, stacked="layers", progress=progress)


def load_params(module: nnx.Module, tensors: Mapping[str, np.ndarray], source: str = "weights") -> nnx.Module:
    """`module` holding `tensors` ({Flax parameter path: array}); every parameter given, nothing left over."""
    return fill(module, tensors.__getitem__, {k: np.shape(v) for k, v in tensors.items()}, source=source)


def build_loaded(make: Callable[[], nnx.Module], tensors: Mapping[str, np.ndarray], source: str = "weights") -> nnx.Module:
    """`make()` built abstractly (no random init: shapes only) and filled from `tensors`."""
    return load_params(nnx.eval_shape(make), tensors, source)


def flax_tensors(model: WanTransformer) -> tuple[DitConfig, dict[str, Callable[[], np.ndarray]]]:
    """Per-layer Flax checkpoint keys of a DiT, each with a thunk producing its host array."""
    out: dict[str, Callable[[], np.ndarray]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[0] == "blocks":
            for i in range(model.cfg.num_layers):
                out[f"blocks.{i}.{_key(path[1:])}"] = lambda v=var, i=i: np.asarray(v.get_value()[i])
        else:
            out[_key(path)] = lambda v=var: np.asarray(v.get_value())
    return model.cfg, out


def save_dit(model: WanTransformer, folder: str | os.PathLike, *, force: bool = False) -> Path:
    """Save a DiT as a Flax-layout checkpoint folder (config.json + flax_model.safetensors + manifest)."""
    cfg, thunks = flax_tensors(model)
    specs = []
    for en in dit_entries(cfg):
        probe = thunks[en.flax]()
        specs.append(TensorSpec(en.flax, probe.dtype, probe.shape))
    return write_model_folder(folder, cfg, "flax", specs, lambda k: thunks[k](), source="save_dit", force=force)


__all__ = ["fill", "checkpoint_source", "load_checkpoint", "load_dit", "load_vae", "load_umt5", "load_clip_vision",
           "load_params", "build_loaded", "flax_tensors", "save_dit"]
