"""Layer-by-layer parity of the Flax Wan VAE against diffusers' AutoencoderKLWan (same weights, same video).

Captured per chunk and concatenated over time: every encoder/decoder stage, the mid blocks, the
quant convs, the conv caches after each chunk (`encoder.cache.{k}`, `decoder.cache.{k}`), the
posterior mean (`encode.mean`) and the decoded video (`decode.video`). Same report contract as
`parity.dit`: fp32 within `FP32_TOL` relative L2; bf16 within `BF16_FACTOR` x diffusers-bf16's own error.
The decoded video's PSNR against diffusers is in `meta["decode_psnr_db"]`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch

from jax_impl import vae_run, vae_tiling
from jax_impl.loading import load_vae
from parity import metrics
from parity.metrics import RANGE_SIGNED
from parity.report import Report, compare_layers, measured_bf16_layers
from parity.tolerances import BF16_FACTOR, BF16_FLOOR, FP32_TOL
from torch_ref.vae import load_vae_torch, run_vae, run_vae_tiled, write_vae_folder
from weights.checkpoint import Checkpoint
from weights.configs.vae import get_vae_preset
from weights.vae_map import VAE


def make_video(cfg, *, frames: int = 5, height: int | None = None, width: int | None = None, batch: int = 1,
               seed: int = 0) -> np.ndarray:
    """A smooth random video in [-1, 1], channels-last; default size is 2x2 latents."""
    h = height or 2 * cfg.spatial_factor
    w = width or 2 * cfg.spatial_factor
    c = cfg.in_channels // (cfg.patch * cfg.patch)
    rng = np.random.default_rng(seed)
    return np.tanh(rng.standard_normal((batch, frames, h, w, c))).astype(np.float32)


def psnr(x: np.ndarray, ref: np.ndarray, peak_to_peak: float = RANGE_SIGNED) -> float:
    """PSNR in dB for videos in [-1, 1]; inf when identical (`parity.metrics.psnr` with data_range 2)."""
    return metrics.psnr(x, ref, data_range=peak_to_peak)


def _cache_taps(mine: list[list], theirs: list[list], side: str) -> tuple[dict, dict]:
    """One tensor per chunk: all conv caches flattened, each cut to the frames diffusers keeps.

    diffusers keeps 1 frame where we keep the zero frame plus that one, and a 'Rep' marker where we keep
    zeros; we compare the frames both hold.
    """
    a, b = {}, {}
    if len(mine) != len(theirs):
        raise ValueError(f"{side}: {len(mine)} chunks here, {len(theirs)} in diffusers")
    for k, (m, t) in enumerate(zip(mine, theirs)):
        if any(isinstance(c, np.ndarray) for c in t[len(m):]):
            raise ValueError(f"{side} chunk {k}: diffusers filled {len(t)} cache slots beyond our {len(m)}")
        xs, ys = [], []
        for i, (cm, ct) in enumerate(zip(m, t)):
            if not isinstance(ct, np.ndarray):
                continue
            n = ct.shape[1]
            cm = np.asarray(cm, np.float32)[:, -n:]
            if cm.shape != ct.shape:
                raise ValueError(f"{side} chunk {k} cache slot {i}: ours {cm.shape}, diffusers {ct.shape}")
            xs.append(cm.ravel())
            ys.append(ct.ravel())
        a[f"{side}.cache.{k}"], b[f"{side}.cache.{k}"] = np.concatenate(xs), np.concatenate(ys)
    return a, b


def layer_order(cfg, n_enc_chunks: int, n_dec_chunks: int, enc_blocks: int, dec_blocks: int) -> list[str]:
    names = ["encoder.conv_in"] + [f"encoder.down_blocks.{i}" for i in range(enc_blocks)]
    names += ["encoder.mid_block", "encoder.conv_out", "quant_conv"]
    names += [f"encoder.cache.{k}" for k in range(n_enc_chunks)] + ["encode.mean"]
    names += ["post_quant_conv", "decoder.conv_in", "decoder.mid_block"]
    names += [f"decoder.up_blocks.{i}" for i in range(dec_blocks)] + ["decoder.conv_out"]
    names += [f"decoder.cache.{k}" for k in range(n_dec_chunks)] + ["decode.video"]
    return names


def run_jax(folder, video: np.ndarray, dtype: str):
    """Our VAE: (mean, decoded, taps) as float32 numpy, decoding our own mean (the recording run; the
    production path, `WanVAE.stream`, is checked against diffusers in tests/test_vae_tiling.py)."""
    model = load_vae(folder, dtype=jnp.dtype(dtype))
    mean, et = model.encode(jnp.asarray(video), capture=True)
    dec, dt = model.decode(mean, capture=True)
    f32 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32))  # noqa: E731
    taps = {k: f32(v) for k, v in {**et, **dt}.items() if not k.endswith(".caches")}
    taps["encoder.caches"] = [[f32(c) for c in chunk] for chunk in et["encoder.caches"]]
    taps["decoder.caches"] = [[f32(c) for c in chunk] for chunk in dt["decoder.caches"]]
    return f32(mean), f32(dec), taps, len(model.encoder.down_blocks), len(model.decoder.up_blocks)


def run_torch(folder, video: np.ndarray, dtype: str):
    return run_vae(load_vae_torch(folder, getattr(torch, dtype)), video)


def _flatten(mean, dec, taps) -> dict[str, np.ndarray]:
    out = {k: v for k, v in taps.items() if not k.endswith(".caches")}
    out["encode.mean"], out["decode.video"] = mean, dec
    return out


def vae_parity(folder: str | Path, *, dtype: str = "float32", video: np.ndarray | None = None, **video_kwargs) -> Report:
    """Compare every captured VAE layer with diffusers' on the VAE folder `folder` (diffusers layout)."""
    cfg = Checkpoint(folder, VAE).config
    if video is None:
        video = make_video(cfg, **video_kwargs)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    mean, dec, taps, nenc, ndec = run_jax(folder, video, dtype)
    rmean, rdec, rtaps = run_torch(folder, video, "float32")
    ours, ref = _flatten(mean, dec, taps), _flatten(rmean, rdec, rtaps)
    for side in ("encoder", "decoder"):
        a, b = _cache_taps(taps[f"{side}.caches"], rtaps[f"{side}.caches"], side)
        ours.update(a)
        ref.update(b)
    order = layer_order(cfg, len(taps["encoder.caches"]), len(taps["decoder.caches"]), nenc, ndec)
    meta = {
        "model": "vae",
        "checkpoint": str(folder),
        "dtype": dtype,
        "video_shape": list(video.shape),
        "latent_shape": list(mean.shape),
        "decode_psnr_db": psnr(dec, rdec),
    }
    if dtype == "float32":
        return Report(compare_layers(ours, ref, FP32_TOL, order), meta | {"tolerance": f"rel_l2 <= {FP32_TOL}"})
    tmean, tdec, ttaps = run_torch(folder, video, "bfloat16")
    theirs = _flatten(tmean, tdec, ttaps)
    for side in ("encoder", "decoder"):
        _, b = _cache_taps(ttaps[f"{side}.caches"], ttaps[f"{side}.caches"], side)  # same slots as diffusers fp32
        theirs.update(b)
    layers = measured_bf16_layers(ours, ref, theirs, order, BF16_FACTOR, BF16_FLOOR)
    meta["tolerance"] = f"rel_l2 vs diffusers-fp32 <= {BF16_FACTOR} x diffusers-bf16's own error"
    meta["decode_psnr_db_torch_bf16"] = psnr(tdec, rdec)
    return Report(layers, meta)


def preset_parity(preset: str = "tiny-wan2.1", *, dtype: str = "float32", seed: int = 0, workdir: str | None = None,
                  **video_kwargs) -> Report:
    """Parity on a freshly written random-weight VAE folder of a `weights.configs.vae` preset."""
    cfg = get_vae_preset(preset)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = write_vae_folder(cfg, Path(tmp) / "vae", seed=seed)
        report = vae_parity(folder, dtype=dtype, seed=seed, **video_kwargs)
    report.meta["preset"] = preset
    return report


def tiled_parity(folder: str | Path, tiling, *, frames: int = 5, height: int, width: int, seed: int = 0,
                 conv=None, kinds: tuple[str, ...] = ("encode", "decode")) -> Report:
    """Spatially tiled encode and decode (fp32) against diffusers' `enable_tiling` path on the same weights.

    Rows (those of `kinds`): `tiled.encode.mean` (both encode `video` in tiles) and `tiled.decode.video`
    (both decode the same latents, diffusers' tiled mean, in tiles). `tiling` is a `jax_impl.vae_tiling.Tiling`,
    `conv` optional `jax_impl.vae.ConvSettings`. meta records the tile layout, so a test can check that the
    tiles overlap in both directions.
    """
    cfg = Checkpoint(folder, VAE).config
    video = make_video(cfg, frames=frames, height=height, width=width, seed=seed)
    torch_model = load_vae_torch(folder)
    rmean, _ = run_vae_tiled(torch_model, tiling, video=video)
    model = load_vae(folder, dtype=jnp.float32)
    if conv is not None:
        model.set_conv_settings(conv)
    ours, ref = {}, {}
    if "encode" in kinds:
        ours["tiled.encode.mean"] = np.asarray(vae_run.encode(model, video, tile="on", tiling=tiling), np.float32)
        ref["tiled.encode.mean"] = rmean
    if "decode" in kinds:
        ours["tiled.decode.video"] = np.asarray(vae_run.decode(model, rmean, tile="on", tiling=tiling), np.float32)
        ref["tiled.decode.video"] = run_vae_tiled(torch_model, tiling, latents=rmean)[1]
    layout = {}
    for kind, (h, w) in (("encode", (height, width)), ("decode", rmean.shape[2:4])):
        rows, cols = vae_tiling.plan(cfg, kind, h, w, tiling)
        layout[kind] = {"rows": len(rows.starts), "cols": len(cols.starts), "blend": [rows.blend, cols.blend]}
    meta = {"model": "vae", "checkpoint": str(folder), "dtype": "float32", "video_shape": list(video.shape),
            "tiling": dataclasses.asdict(tiling), "tiles": layout, "tolerance": f"rel_l2 <= {FP32_TOL}"}
    if "decode" in kinds:
        meta["decode_psnr_db"] = psnr(ours["tiled.decode.video"], ref["tiled.decode.video"])
    return Report(compare_layers(ours, ref, FP32_TOL, list(ours)), meta)
