"""Config of the Wan causal 3D VAE, read from and written to diffusers' `vae/config.json` (AutoencoderKLWan).

The latent normalisation statistics live here, with the weights' config, because using the wrong ones
(another VAE's, or swapped) silently produces a black or washed-out video; see `jax_impl.latents`.
Imports neither torch nor jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from weights.configs.base import ConfigError, JsonConfig

WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclasses.dataclass(frozen=True)
class VaeConfig(JsonConfig):
    """Hyper-parameters of AutoencoderKLWan; field names are diffusers' (typos such as `temperal_` included)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_MEAN
    latents_std: tuple[float, ...] = WAN21_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    DIFFUSERS_CLASS = "AutoencoderKLWan"

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(v) for v in self.latents_std))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError(
                f"temperal_downsample has {len(self.temperal_downsample)} entries; dim_mult {list(self.dim_mult)} needs "
                f"{len(self.dim_mult) - 1} (one per downsampling stage)"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ConfigError(
                f"latents_mean ({len(self.latents_mean)}) and latents_std ({len(self.latents_std)}) must have z_dim="
                f"{self.z_dim} entries; the statistics belong to another VAE"
            )
        if any(s <= 0 for s in self.latents_std):
            raise ConfigError("latents_std must be positive")
        if self.attn_scales:
            raise ConfigError("attn_scales other than [] are not supported (no Wan VAE uses them)")
        if self.dropout != 0.0:
            raise ConfigError("dropout must be 0.0: this is an inference implementation")
        if self.patch_size not in (None, 1, 2):
            raise ConfigError(f"patch_size must be None, 1 or 2, got {self.patch_size}")
        if self.spatial_factor != self.scale_factor_spatial and self.scale_factor_spatial is not None:
            raise ConfigError(
                f"scale_factor_spatial={self.scale_factor_spatial} but the architecture downsamples by {self.spatial_factor}"
            )
        if self.temporal_factor != self.scale_factor_temporal and self.scale_factor_temporal is not None:
            raise ConfigError(
                f"scale_factor_temporal={self.scale_factor_temporal} but the architecture downsamples time by {self.temporal_factor}"
            )

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def patch(self) -> int:
        return self.patch_size or 1

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height/width: 2 per downsampling stage, times the patchify step."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return self.temperal_downsample[::-1]

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(frames, height, width, channels) of the latent of a video of this size (channels-last)."""
        s = self.spatial_factor
        return 1 + (frames - 1) // self.temporal_factor, height // s, width // s, self.z_dim

    # --- diffusers config.json -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            d[k] = list(d[k])
        return {"_class_name": self.DIFFUSERS_CLASS, **d}



WAN21_VAE = VaeConfig()
WAN22_VAE = VaeConfig(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_temporal=4,
    scale_factor_spatial=16,
    latents_mean=WAN22_MEAN,
    latents_std=WAN22_STD,
)
# Tiny variants for tests: same topology and latent statistics, a few channels wide.
TINY_WAN21_VAE = WAN21_VAE.replace(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
TINY_WAN22_VAE = WAN22_VAE.replace(base_dim=8, decoder_base_dim=12, dim_mult=(1, 2, 2, 2), num_res_blocks=1)

VAE_PRESETS: dict[str, VaeConfig] = {
    "wan2.1": WAN21_VAE,
    "wan2.2": WAN22_VAE,
    "tiny-wan2.1": TINY_WAN21_VAE,
    "tiny-wan2.2": TINY_WAN22_VAE,
}


def get_vae_preset(name: str) -> VaeConfig:
    try:
        return VAE_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown VAE preset {name!r}; choose one of {sorted(VAE_PRESETS)}") from None
