"""How one VAE encode or decode runs: whole frames (`WanVAE.stream`) or overlapping spatial tiles
(`vae_tiling`), with `tile="auto"` deciding from the memory estimate (`vae_memory`).

The decision sits above the three modules it uses, so that none of them imports another in a circle
(`WanVAE` knows nothing of tiling; tiling and the memory estimate build on `WanVAE`).
"""

from __future__ import annotations

from typing import Any

from jax_impl import vae_tiling
from jax_impl.vae_memory import needs_tiles
from jax_impl.vae_tiling import TILE_MODES, Tiling, applies


def use_tiles(model, kind: str, x, tile: str, tiling: Tiling | None) -> bool:
    """Resolve `tile` ("auto" / "on" / "off") for one encode or decode of `x` (an array: shape and dtype)."""
    if tile not in TILE_MODES:
        raise ValueError(f"tile must be one of {TILE_MODES}, got {tile!r}")
    if tile == "off":
        return False
    tiling = tiling or Tiling()
    tiling.check(model.cfg)
    if not applies(model.cfg, kind, x.shape, tiling):
        return False
    if tile == "on":
        return True
    return needs_tiles(model, kind, x, tiling)


def encode(model, video: Any, *, tile: str = "auto", tiling: Tiling | None = None, return_moments: bool = False):
    """Posterior mean (or the moments) of `video`, as `WanVAE.encode`, in tiles when `tile` says so.

    `tile`: "off" encodes whole frames; "on" encodes overlapping spatial tiles blended as diffusers'
    `enable_tiling` does (`tiling`: default diffusers' sizes) when the frames are larger than one tile;
    "auto" (default) tiles when the estimated peak device memory of whole frames exceeds the free device
    memory (never on a CPU, which reports no limit)."""
    model.check_video(video)
    if use_tiles(model, "encode", video, tile, tiling):
        out = vae_tiling.tiled_encode(model, video, tiling)
    else:
        out = model.stream("encode", video)
    return out if return_moments else out[..., :model.cfg.z_dim]


def decode(model, z: Any, *, tile: str = "auto", tiling: Tiling | None = None):
    """Video in [-1, 1] from latents, as `WanVAE.decode`, in tiles when `tile` says so (tiles counted in
    latents of the same pixel sizes, as diffusers does)."""
    model.check_latents(z)
    if use_tiles(model, "decode", z, tile, tiling):
        return vae_tiling.tiled_decode(model, z, tiling)
    return model.stream("decode", z)


__all__ = ["decode", "encode", "use_tiles"]
