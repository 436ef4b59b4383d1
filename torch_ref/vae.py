"""diffusers' AutoencoderKLWan as the VAE reference: build from `VaeConfig`, write tiny folders, capture layers.

Captured tensors are channels-last float32 numpy, named as `jax_impl.vae` taps. Modules called once
per chunk are concatenated over chunks along time, so both sides compare whole-video tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from weights.configs.vae import VaeConfig
from torch_ref.capture import to_numpy
from torch_ref.perturb import perturb_constant_parameters
from weights.atomic import atomic_folder


def build_vae(cfg: VaeConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """A diffusers AutoencoderKLWan with deterministic random weights from `seed`.

    diffusers' init leaves the RMS-norm gains at one; they get seeded noise (`torch_ref.perturb`) so that
    a swapped or mis-shaped gain cannot hide.
    """
    kwargs = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKLWan(**kwargs)
        perturb_constant_parameters(model)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def write_vae_folder(cfg: VaeConfig, out: str | os.PathLike, *, seed: int = 0, force: bool = False) -> Path:
    """Write `out/{config.json, diffusion_pytorch_model.safetensors}` as `save_pretrained` does."""
    out = Path(out)
    with atomic_folder(out, force=force) as tmp:
        build_vae(cfg, seed=seed).save_pretrained(tmp, safe_serialization=True)
    return out


def load_vae_torch(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    return AutoencoderKLWan.from_pretrained(os.fspath(folder), torch_dtype=dtype).eval()


def _cl(t: torch.Tensor) -> np.ndarray:
    return to_numpy(t).transpose(0, 2, 3, 4, 1)  # NCTHW -> NTHWC


def vae_hooks(model: AutoencoderKLWan) -> dict[str, torch.nn.Module]:
    """Modules whose per-chunk outputs are captured, by tap name (matching `jax_impl.vae`)."""
    hooks = {"encoder.conv_in": model.encoder.conv_in}
    for i, blk in enumerate(model.encoder.down_blocks):
        hooks[f"encoder.down_blocks.{i}"] = blk
    hooks["encoder.mid_block"] = model.encoder.mid_block
    hooks["encoder.conv_out"] = model.encoder.conv_out
    hooks["quant_conv"] = model.quant_conv
    hooks["post_quant_conv"] = model.post_quant_conv
    hooks["decoder.conv_in"] = model.decoder.conv_in
    hooks["decoder.mid_block"] = model.decoder.mid_block
    for i, blk in enumerate(model.decoder.up_blocks):
        hooks[f"decoder.up_blocks.{i}"] = blk
    hooks["decoder.conv_out"] = model.decoder.conv_out
    return hooks


def _snapshot(cache: list) -> list:
    """Copy of a diffusers feat_cache list: tensors channels-last, 'Rep'/None kept as markers."""
    return [_cl(c) if isinstance(c, torch.Tensor) else c for c in cache]


@torch.no_grad()
def run_vae(model: AutoencoderKLWan, video: np.ndarray, latents: np.ndarray | None = None):
    """Encode `video` (channels-last) to the posterior mean, decode `latents` (default: that mean).

    Returns (mean, decoded, taps); taps also hold 'encoder.caches' / 'decoder.caches': per chunk, the
    feat_cache list after it.
    """
    dtype, dev = model.encoder.conv_in.weight.dtype, model.encoder.conv_in.weight.device
    chunks: dict[str, list[np.ndarray]] = {}
    caches: dict[str, list] = {"encoder.caches": [], "decoder.caches": []}
    handles = []
    for name, mod in vae_hooks(model).items():
        def hook(_m, _i, out, name=name):
            chunks.setdefault(name, []).append(_cl(out))
        handles.append(mod.register_forward_hook(hook))
    for side, mod in (("encoder", model.encoder), ("decoder", model.decoder)):
        def chook(_m, _a, kwargs, _out, side=side):
            caches[f"{side}.caches"].append(_snapshot(kwargs["feat_cache"]))
        handles.append(mod.register_forward_hook(chook, with_kwargs=True))
    try:
        x = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3))).to(dev, dtype)
        mean_t = model.encode(x).latent_dist.mode()
        mean = _cl(mean_t)
        z = mean_t if latents is None else torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 4, 1, 2, 3))).to(dev, dtype)
        dec = _cl(model.decode(z).sample)
    finally:
        for h in handles:
            h.remove()
    taps: dict = {k: np.concatenate(v, axis=1) for k, v in chunks.items()}
    taps.update(caches)
    return mean, dec, taps


@torch.no_grad()
def run_vae_tiled(model: AutoencoderKLWan, tiling, video: np.ndarray | None = None,
                  latents: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """diffusers' tiled path: (posterior mean of `video`, decoded `latents`), channels-last float32 numpy.

    `tiling` has tile_height/tile_width/stride_height/stride_width in pixels (a `jax_impl.vae_tiling.Tiling`),
    passed to `enable_tiling` as tile_sample_min_* and tile_sample_stride_*; tiling is switched off after.
    """
    dtype, dev = model.encoder.conv_in.weight.dtype, model.encoder.conv_in.weight.device
    model.enable_tiling(tile_sample_min_height=tiling.tile_height, tile_sample_min_width=tiling.tile_width,
                        tile_sample_stride_height=tiling.stride_height, tile_sample_stride_width=tiling.stride_width)
    try:
        mean = dec = None
        if video is not None:
            x = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3))).to(dev, dtype)
            mean = _cl(model.encode(x).latent_dist.mode())
        if latents is not None:
            z = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 4, 1, 2, 3))).to(dev, dtype)
            dec = _cl(model.decode(z).sample)
    finally:
        model.disable_tiling()
    return mean, dec
