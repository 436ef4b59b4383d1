"""Latent normalisation, in one place: the DiT works on (z - mean) / std of the VAE's posterior mean.

mean and std are read from the VAE's `VaeConfig` (its vae/config.json), never hard-coded: Wan2.1 and
Wan2.2 VAEs have different statistics (16 vs 48 channels), and using the wrong or swapped ones
yields a black or washed-out video with no error. Works on numpy and jax arrays, channels-last.

`VaeOptions` is how the pipeline runs its VAE (dtype, spatial tiling); `VaeOptions.bind(vae)` gives the
VAE with those options applied to every `encode` / `decode`, for code that just calls `vae.encode(x)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jax_impl import vae_run
from jax_impl.vae_tiling import TILE_MODES
from weights.configs.vae import VaeConfig


def _stats(z: Any, cfg: VaeConfig):
    if z.shape[-1] != cfg.z_dim:
        raise ValueError(
            f"latents have {z.shape[-1]} channels (last axis), but this VAE's config has z_dim={cfg.z_dim}; "
            "channels-last [B, F, H, W, C] latents from the matching VAE are expected"
        )
    xp = np if isinstance(z, np.ndarray) else _jnp()
    mean = xp.asarray(np.asarray(cfg.latents_mean, np.float32))
    std = xp.asarray(np.asarray(cfg.latents_std, np.float32))
    return mean, std


def _jnp():
    import jax.numpy as jnp

    return jnp


def normalize(z: Any, cfg: VaeConfig) -> Any:
    """VAE latent -> DiT latent: (z - mean) / std per channel, computed in float32, returned in z's dtype."""
    mean, std = _stats(z, cfg)
    return ((z.astype(np.float32) - mean) / std).astype(z.dtype)


def denormalize(z: Any, cfg: VaeConfig) -> Any:
    """DiT latent -> VAE latent: z * std + mean, before decoding."""
    mean, std = _stats(z, cfg)
    return (z.astype(np.float32) * std + mean).astype(z.dtype)


VAE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class VaeOptions:
    """How the pipeline runs its VAE.

    dtype: float32 by default; bfloat16 is about 2x faster on a GPU, and bench/vae.py measures what it costs
    in decoded quality (PSNR of bf16 frames against fp32) so the default can follow the number.
    tile: "auto" (tiles when whole frames would not fit in free device memory; never on a CPU), "on", "off";
    tiling: tile sizes (a `jax_impl.vae_tiling.Tiling`; None: diffusers' 256-pixel tiles every 192).
    """

    dtype: str = "float32"
    tile: str = "auto"
    tiling: Any = None

    def __post_init__(self) -> None:
        if self.dtype not in VAE_DTYPES:
            raise ValueError(f"VAE dtype must be one of {VAE_DTYPES}, got {self.dtype!r}")
        if self.tile not in TILE_MODES:
            raise ValueError(f"VAE tile must be one of {TILE_MODES}, got {self.tile!r}")

    def bind(self, vae) -> "BoundVae":
        return BoundVae(vae, self)


class BoundVae:
    """A VAE whose `encode` / `decode` use fixed `VaeOptions` (tile mode and sizes); `cfg` as the VAE's."""

    def __init__(self, vae, options: VaeOptions):
        self.model, self.options, self.cfg = vae, options, vae.cfg

    def encode(self, video: Any) -> Any:
        return vae_run.encode(self.model, video, tile=self.options.tile, tiling=self.options.tiling)

    def decode(self, z: Any) -> Any:
        return vae_run.decode(self.model, z, tile=self.options.tile, tiling=self.options.tiling)


def encode_video(vae, video: Any) -> Any:
    """Pipeline helper: encode a video and normalise with the config of *that* VAE."""
    return normalize(vae.encode(video), vae.cfg)


def decode_latents(vae, latents: Any) -> Any:
    """Pipeline helper: denormalise with the VAE's own config, then decode to a [-1, 1] video."""
    return vae.decode(denormalize(latents, vae.cfg))
