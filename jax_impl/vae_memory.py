"""Peak device memory of a VAE encode or decode, estimated before it runs, and the `tile="auto"` decision.

The estimate compiles the chunk steps the run will use (`vae.StepTable`: the run reuses them, so
nothing is compiled twice) and reads XLA's memory analysis of each: the arguments besides the weights
(the chunk and the conv caches), the outputs and the temporaries, minus what donation aliases. To the
largest step it adds what lives across steps: the result buffer and, when tiled, the rows of tiles that
are kept for blending. The weights are not counted: they are on the device already (`bytes_in_use`).

`tile="auto"` tiles when the whole-frame estimate exceeds AUTO_FRACTION of the free device memory
(`bytes_limit - bytes_in_use` of the device's allocator). A CPU reports no limit, so auto means off there.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np
from flax import nnx

from jax_impl.vae import StepTable, chunk_bounds, step_table
from jax_impl.vae_tiling import Tiling, applies, plan, tile_shape

AUTO_FRACTION = 0.9  # headroom for allocator fragmentation and whatever else runs beside the VAE
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes beyond the weights: `peak_bytes` = `step_bytes` + `result_bytes` + `tile_bytes`."""

    peak_bytes: int
    step_bytes: int  # the largest chunk step: chunk, caches, temporaries, outputs, less donated aliases
    result_bytes: int  # the output buffer (and the posterior-mean copy when encoding)
    tile_bytes: int  # tiled: the previous and current row of blended tiles plus one blend copy; else 0
    tiled: bool
    steps: int  # how many distinct compiled steps were analysed

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        kind = "tiled" if self.tiled else "whole frames"
        return (f"{self.peak_bytes / GIB:.2f} GiB ({kind}: step {self.step_bytes / GIB:.2f}, result "
                f"{self.result_bytes / GIB:.2f}, tiles {self.tile_bytes / GIB:.2f})")


def _nbytes(aval) -> int:
    return int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def estimate(model, kind: str, shape: tuple[int, ...], *, dtype=None, tile: bool = False,
             tiling: Tiling | None = None, compile_step=None) -> MemoryEstimate | None:
    """Estimated peak device memory of `model.encode`/`decode` (`kind`) of an input of `shape` and `dtype`
    (default: the model's), whole frames or tiled; None where XLA gives no memory analysis.

    Compiles the steps the run needs (cached, shared with the run): on a GPU that is the compile time of
    the first call, paid earlier. `compile_step(table, state, x, caches) -> compiled` compiles elsewhere
    instead (another device, e.g. a TPU topology; `model` may then be abstract, from nnx.eval_shape).
    """
    graphdef, state = nnx.split(model)
    weights = sum(_nbytes(leaf) for leaf in jax.tree.leaves(state))
    dtype = jax.dtypes.canonicalize_dtype(dtype or model.dtype)
    tiling = tiling or Tiling()
    tiled = tile and applies(model.cfg, kind, shape, tiling)
    raw = tiled and kind == "decode"
    frames = shape[1]
    out_frames = model.out_frames(kind, frames)
    step_max, n_steps = 0, 0
    steps = step_table(graphdef, kind, raw, masked=tiled)
    shp = tile_shape(model.cfg, kind, shape, tiling) if tiled else tuple(shape)  # every tile is padded to it
    caches = None
    for a, b in chunk_bounds(kind, frames)[:2]:  # the first chunk and the steady-state chunk
        x = jax.ShapeDtypeStruct((shp[0], b - a, *shp[2:]), dtype)
        compiled = (compile_step or StepTable.get)(steps, state, x, caches)
        ma = compiled.memory_analysis()
        if ma is None:
            return None
        step = (ma.argument_size_in_bytes - weights + ma.output_size_in_bytes + ma.temp_size_in_bytes
                - ma.alias_size_in_bytes)
        step_max, n_steps = max(step_max, int(step)), n_steps + 1
        y, caches = compiled.out_info
        px_out = _nbytes(y) // (y.shape[1] * y.shape[2] * y.shape[3]) * out_frames  # per output pixel
        scale = y.shape[2] / shp[2]  # output pixels per input pixel along an axis
    # the result buffer holds every output frame once; encode then slices the mean out of the moments
    b, _, h, w = shape[:4]
    cfg, itemsize = model.cfg, np.dtype(model.dtype).itemsize
    if not tiled:
        result = px_out * int(h * scale) * int(w * scale)
    elif kind == "encode":
        result = b * out_frames * (h // cfg.spatial_factor) * (w // cfg.spatial_factor) * 2 * cfg.z_dim * itemsize
    else:
        s = cfg.spatial_factor
        result = b * out_frames * h * s * w * s * cfg.out_channels // cfg.patch**2 * itemsize
    if kind == "encode":
        result = result * 3 // 2
    tiles = 0
    if tiled:
        rows, cols = plan(model.cfg, kind, shape[2], shape[3], tiling)
        row = max(sum(px_out * int(th * scale) * int(tw * scale) for tw in cols.sizes(shape[3]))
                  for th in rows.sizes(shape[2]))
        tiles = 2 * row + px_out * int(shp[2] * scale) * int(shp[3] * scale)  # + one padded tile before its crop
    return MemoryEstimate(int(step_max + result + tiles), int(step_max), int(result), int(tiles), bool(tiled),
                          n_steps)


def free_bytes(device=None) -> int | None:
    """bytes_limit - bytes_in_use of the device's allocator, or None where the platform reports neither."""
    try:
        stats = (device or jax.devices()[0]).memory_stats()
    except Exception:  # noqa: BLE001 - a platform without memory stats
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def needs_tiles(model, kind: str, x, tiling: Tiling, free: int | None = None) -> bool:
    """`tile="auto"`: whether the whole-frame estimate exceeds AUTO_FRACTION of the free device memory."""
    free = free_bytes() if free is None else free
    if free is None:
        return False
    whole = estimate(model, kind, x.shape, dtype=x.dtype)
    if whole is None or whole.peak_bytes <= AUTO_FRACTION * free:
        return False
    tiled = estimate(model, kind, x.shape, dtype=x.dtype, tile=True, tiling=tiling)
    if tiled is not None and tiled.peak_bytes > AUTO_FRACTION * free:
        warnings.warn(f"VAE {kind} of {tuple(x.shape)}: even tiled it needs about {tiled} but {free / GIB:.2f} GiB "
                      "are free; try smaller tiles (Tiling) or a bfloat16 VAE", stacklevel=3)
    return True
