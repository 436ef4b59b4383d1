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
projection too) is dequantised. The tensors go through `jax_impl.loading.fill` like every other model's (one
layer stack on the host at a time), the getter here quantising each layer of an FP8 stack once; the bf16
copies of the FP8 layers never exist on the device.
"""

from __future__ import annotations

import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.dit import WanTransformer
from jax_impl.fp8 import fp8_layers, quantize_model
from jax_impl.loading import checkpoint_source, fill, load_dit
from weights import fp8 as wfp8
from weights.checkpoint import Checkpoint
from weights.dit_map import DIT

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


def _fp8_getter(ckpt: Checkpoint, fp8_kernels: set[str]) -> Callable[[str], np.ndarray]:
    """`get(name)` for `jax_impl.loading.fill`: a checkpoint's tensors in the Flax layout, where the per-layer
    `KERNEL` of each name in `fp8_kernels` comes back as e4m3 and its `..._scale` as float32 [out].

    Each layer is read and quantised once; the half of its pair not asked for yet (the scale: `fill` reads a
    module's kernel stack before its scale stack) is kept until it is."""
    by_flax = {en.flax: en for en in ckpt.entries}
    waiting: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name in waiting:
            return waiting.pop(name)
        kernel = name.removesuffix("_scale")
        if kernel not in fp8_kernels:
            return ckpt.get(by_flax[name], "flax")
        pair = dict(zip((kernel, f"{kernel}_scale"), _fp8_linear(ckpt, by_flax[kernel])))
        asked = pair.pop(name)
        waiting.update(pair)
        return asked

    return get


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
    fp8_kernels = {f"blocks.{i}.{path[len('blocks.'):]}.kernel" for path, _ in fp8_layers(abstract)
                   for i in range(cfg.num_layers)}
    shapes = {en.flax: en.flax_shape() for en in ckpt.entries}
    shapes |= {f"{k}_scale": shapes[k][-1:] for k in fp8_kernels}
    return fill(abstract, _fp8_getter(ckpt, fp8_kernels), shapes, source=f"{checkpoint_source(ckpt)}: the weights",
                stacked="blocks", progress=progress)


def load_dit_precision(folder: str | os.PathLike, precision: str, *, attention_backend: str = "auto",
                       act_scaling: str | None = "token", progress: Callable[[str], None] | None = None):
    """The DiT for `--precision bf16|fp8`: bf16 (FP8 files dequantised) or FP8 block linears (any file)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp8":
        return load_dit_fp8(folder, act_scaling=act_scaling, attention_backend=attention_backend, progress=progress)
    return load_dit(folder, dtype="bfloat16", attention_backend=attention_backend, progress=progress)


__all__ = ["PRECISIONS", "load_dit_fp8", "load_dit_precision"]
