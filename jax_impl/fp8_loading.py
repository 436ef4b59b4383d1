"""Load a Wan DiT folder straight into the FP8 model (block linears as jax_impl.fp8.Fp8Dense), and pick the
loader for a `--precision`.

Which files: our own converted with `wanport convert --dtype float8_e4m3fn` (any layout, `scale_weight` [out, 1]
or `kernel_scale` [out]), community FP8 files in the original-Wan or diffusers key layout (ComfyUI / Kijai
`*_fp8_e4m3fn.safetensors` without scales, `*_fp8_scaled` with `scale_weight` or `weight_scale`), placed in a
folder with the model's config.json like any checkpoint here (weights.checkpoint reads the folder; ComfyUI's
`model.diffusion_model.` key prefix is not stripped). And bf16 / float32 checkpoints, quantised while loading.

Each FP8 layer's e4m3 weight is placed as stored (a per-tensor scale widened to one per output channel, the
same product); a weight the file holds in high precision is quantised per output channel (weights/fp8.py);
a tensor the file holds in FP8 that our model keeps in bf16 (Comfy-Org's files quantise the head and the time
projection too) is dequantised. One layer stack is on the host at a time; the bf16 copies of the FP8 layers
never exist on the device.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.dit import WanTransformer
from jax_impl.fp8 import fp8_layers, quantize_model
from jax_impl.loading import load_dit
from weights import fp8 as wfp8
from weights.checkpoint import Checkpoint
from weights.dit_map import DIT
from weights.safetensors_io import CheckpointError

PRECISIONS = ("bf16", "fp8")


def _fp8_linear(ckpt: Checkpoint, entry) -> tuple[np.ndarray, np.ndarray]:
    """One block linear as (e4m3 kernel [in, out], float32 scale [out])."""
    out = entry.flax_shape()[-1]
    if ckpt.is_fp8(entry) and ckpt.stored_dtype(entry) == wfp8.E4M3:
        q, s = ckpt.get_fp8(entry, "flax")
        s = np.ones((out,), np.float32) if s is None else np.broadcast_to(s, (out,)).astype(np.float32)
        return q, s
    q, s = wfp8.quantize_linear(ckpt.get(entry, "flax"), in_axis=0)  # bf16 / float32 (or e5m2) in the file
    return q, s.reshape(out)


def load_dit_fp8(
    folder: str | os.PathLike,
    *,
    act_scaling: str | None = "token",
    attention_backend: str = "auto",
    progress: Callable[[str], None] | None = None,
):
    """`jax_impl.dit.WanTransformer` in bf16 with its block linears in FP8, from any DiT folder (FP8 or not).

    Equals `load_dit(folder, dtype=bfloat16)` followed by `jax_impl.fp8.quantize_model(model)` for a bf16 file,
    bit for bit, without the bf16 block weights ever on the device; `act_scaling` as in `quantize_model`."""
    ckpt = Checkpoint(folder, DIT)
    cfg = ckpt.config

    def build():
        model = WanTransformer(cfg, dtype=jnp.bfloat16, attention_backend=attention_backend, rngs=nnx.Rngs(0))
        quantize_model(model, act_scaling=act_scaling)
        return model

    abstract = nnx.eval_shape(build)  # the quantised model's structure; no arrays made
    fp8_modules = {path for path, _ in fp8_layers(abstract)}
    graphdef, state = nnx.split(abstract)
    by_flax = {en.flax: en for en in ckpt.entries}
    flat = nnx.to_flat_state(state)
    done: dict[str, np.ndarray] = {}  # the other half (kernel or scale) of an FP8 layer stack read already
    for path, var in flat:
        key = ".".join(str(p) for p in path)
        target = var.value
        module, _, leaf = key.rpartition(".")
        if module in fp8_modules and leaf in ("kernel", "kernel_scale"):
            if key not in done:
                rest = module[len("blocks."):]
                parts = [_fp8_linear(ckpt, by_flax[f"blocks.{i}.{rest}.kernel"]) for i in range(cfg.num_layers)]
                done[f"{module}.kernel"] = np.stack([q for q, _ in parts])
                done[f"{module}.kernel_scale"] = np.stack([s for _, s in parts])
            host = done.pop(key)
        elif path[0] == "blocks":
            rest = ".".join(str(p) for p in path[1:])
            host = np.empty(target.shape, dtype=target.dtype)
            for i in range(cfg.num_layers):
                host[i] = ckpt.get(by_flax[f"blocks.{i}.{rest}"], "flax").astype(target.dtype)
        else:
            host = ckpt.get(by_flax[key], "flax").astype(target.dtype)
        if host.shape != target.shape or host.dtype != target.dtype:
            raise CheckpointError(f"{folder}: {key} is {host.dtype}{list(host.shape)}, the FP8 model wants "
                                  f"{target.dtype}{list(target.shape)}")
        var.value = jax.device_put(host)
        del host
        if progress:
            progress(key)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_dit_precision(folder: str | os.PathLike, precision: str, *, attention_backend: str = "auto",
                       act_scaling: str | None = "token", progress: Callable[[str], None] | None = None):
    """The DiT for `--precision bf16|fp8`: bf16 (FP8 files dequantised) or FP8 block linears (any file)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp8":
        return load_dit_fp8(folder, act_scaling=act_scaling, attention_backend=attention_backend, progress=progress)
    return load_dit(folder, dtype="bfloat16", attention_backend=attention_backend, progress=progress)


__all__ = ["PRECISIONS", "load_dit_fp8", "load_dit_precision"]
