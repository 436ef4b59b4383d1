"""Error and quality metrics, computed in float64 on the host. The one implementation the repo uses.

Tensor errors (any shape): `max_abs`, `rel_l2`, `cosine`, `mse`, `compare`.
Image/video quality: `psnr`, `ssim` (one frame), `video_psnr`, `video_ssim`, `temporal_continuity`,
`compare_videos` (a JSON-ready summary for reports).

Inputs may be numpy or jax arrays (anything `np.asarray` takes, integer dtypes included); everything is
converted to float64 first, so uint8 video never wraps around.

Layouts. Frames are channels-last `[H, W, C]`; videos are `[F, H, W, C]` or a batch `[B, F, H, W, C]`.
Latents are videos too (C = 16 or 48). Nothing is transposed or guessed: a wrong rank is an error.

Data range. PSNR and SSIM take `data_range`, the width of the value range, always given explicitly:
`RANGE_SIGNED` (2.0) for [-1, 1], `RANGE_UNIT` (1.0) for [0, 1], `RANGE_UINT8` (255.0) for uint8.
Values are not checked against it (a decoder may overshoot [-1, 1] slightly).

SSIM follows Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5 (truncated at 3.5 sigma),
K1 = 0.01, K2 = 0.03, population (not sample) covariance, averaged over the frame minus a 5-pixel border
and then over channels. This is exactly `skimage.metrics.structural_similarity(a, b, data_range=R,
channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` on float64 (or integer)
inputs; scikit-image computes float32 inputs in float32, we always use float64.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

RANGE_SIGNED = 2.0  # videos in [-1, 1] (what the Wan VAE encodes and decodes)
RANGE_UNIT = 1.0  # videos in [0, 1]
RANGE_UINT8 = 255.0  # uint8 videos

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5, as scipy.ndimage computes it
SSIM_WIN = 2 * SSIM_RADIUS + 1  # 11
SSIM_K1, SSIM_K2 = 0.01, 0.03

VIDEO_LAYOUT = "a video [F, H, W, C] or a batch of videos [B, F, H, W, C] (channels-last)"
FRAME_LAYOUT = "a frame [H, W, C] (channels-last; use C=1 for grayscale)"


class PerFrame(NamedTuple):
    """Per-frame (or per adjacent-frame-pair) values and their mean.

    `values` has shape [F] for a video, [B, F] for a batch ([F-1] / [B, F-1] for frame pairs).
    """

    values: np.ndarray
    mean: float


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------
# Tensor errors


def max_abs(x, ref) -> float:
    x, ref = _f64(x), _f64(ref)
    return float(np.max(np.abs(x - ref))) if x.size else 0.0


def rel_l2(x, ref) -> float:
    """||x - ref|| / ||ref||; inf if ref is zero and x is not, 0 if both are zero. NaN anywhere gives NaN."""
    x, ref = _f64(x), _f64(ref)
    num, den = np.linalg.norm((x - ref).ravel()), np.linalg.norm(ref.ravel())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(num / den)


def cosine(x, ref) -> float:
    x, ref = _f64(x).ravel(), _f64(ref).ravel()
    nx, nr = np.linalg.norm(x), np.linalg.norm(ref)
    if nx == 0.0 or nr == 0.0:
        return 1.0 if nx == nr else 0.0
    return float(np.dot(x, ref) / (nx * nr))


def mse(a, b) -> float:
    """Mean squared difference over all elements; shapes must match exactly (no broadcasting)."""
    a, b = _same_shape(a, b)
    return float(np.mean((a - b) ** 2)) if a.size else 0.0


def compare(x, ref) -> dict[str, float]:
    x, ref = np.asarray(x), np.asarray(ref)
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: candidate {x.shape} vs reference {ref.shape}")
    return {"max_abs": max_abs(x, ref), "rel_l2": rel_l2(x, ref), "cosine": cosine(x, ref)}


# ---------------------------------------------------------------------------------------------------------
# Checks


def _same_shape(a, b, what: str = "inputs") -> tuple[np.ndarray, np.ndarray]:
    a, b = _f64(a), _f64(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch between {what}: {a.shape} vs {b.shape}")
    return a, b


def _check_range(data_range) -> float:
    if isinstance(data_range, (bool, np.bool_)) or not isinstance(data_range, (int, float, np.number)):
        raise TypeError(
            f"data_range must be a number (RANGE_SIGNED=2.0 for [-1, 1], RANGE_UNIT=1.0 for [0, 1], "
            f"RANGE_UINT8=255.0 for uint8), got {data_range!r}"
        )
    r = float(data_range)
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"data_range must be positive and finite, got {data_range!r}")
    return r


def _check_frame(x: np.ndarray, name: str) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name}: expected {FRAME_LAYOUT}, got shape {x.shape} (rank {x.ndim})")


def _check_video(x: np.ndarray, name: str, min_frames: int = 1) -> None:
    if x.ndim not in (4, 5):
        raise ValueError(f"{name}: expected {VIDEO_LAYOUT}, got shape {x.shape} (rank {x.ndim})")
    if x.shape[-4] < min_frames:
        raise ValueError(f"{name}: needs at least {min_frames} frame(s) on axis F of {VIDEO_LAYOUT}, "
                         f"got shape {x.shape}")


def _video_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    _check_video(a, "first video")
    _check_video(b, "second video")
    if a.shape != b.shape:
        raise ValueError(f"video shape mismatch: {a.shape} vs {b.shape} (both must be {VIDEO_LAYOUT})")
    return a, b


def _frames(x: np.ndarray) -> np.ndarray:
    """[F, H, W, C] or [B, F, H, W, C] -> [N, H, W, C] (a view, not a copy)."""
    return x.reshape((-1,) + x.shape[-3:])


def _per_frame(values: list[float], lead: tuple[int, ...]) -> PerFrame:
    v = np.asarray(values, dtype=np.float64).reshape(lead)
    return PerFrame(v, float(np.mean(v)) if v.size else float("nan"))


# ---------------------------------------------------------------------------------------------------------
# PSNR / SSIM


def _psnr_from_mse(m: float, r: float) -> float:
    if m == 0.0:
        return math.inf
    return 10.0 * math.log10(r * r / m)  # NaN mse gives NaN


def psnr(a, b, data_range) -> float:
    """10 log10(data_range^2 / mse) in dB over all elements; inf for identical inputs; shapes must match."""
    r = _check_range(data_range)
    return _psnr_from_mse(mse(a, b), r)


def _gaussian_taps() -> np.ndarray:
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * x * x / (SSIM_SIGMA * SSIM_SIGMA))
    return w / w.sum()


_TAPS = _gaussian_taps()


def _filter_valid(x: np.ndarray, axis: int) -> np.ndarray:
    """Gaussian-weighted sum along `axis`, only where the whole window fits (output shrinks by 2 * radius).

    SSIM discards a border of `radius` pixels, so the border mode of a full-size filter never matters and
    this is exactly the kept part of it.
    """
    n = x.shape[axis] - 2 * SSIM_RADIUS
    out = _TAPS[SSIM_RADIUS] * _slice(x, axis, SSIM_RADIUS, SSIM_RADIUS + n)
    for k in range(SSIM_RADIUS):  # symmetric taps: add the mirrored pair first, one multiply per pair
        pair = _slice(x, axis, k, k + n) + _slice(x, axis, 2 * SSIM_RADIUS - k, 2 * SSIM_RADIUS - k + n)
        pair *= _TAPS[k]
        out += pair
    return out


def _slice(x: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(start, stop)
    return x[tuple(idx)]


def _ssim_frame(x: np.ndarray, y: np.ndarray, r: float) -> float:
    """SSIM of two float64 [H, W, C] frames, already checked."""
    x, y = np.moveaxis(x, -1, 0), np.moveaxis(y, -1, 0)
    stack = np.stack([x, y, x * x, y * y, x * y])  # [5, C, H, W]: W contiguous, faster to filter
    mx, my, mxx, myy, mxy = _filter_valid(_filter_valid(stack, 2), 3)
    vx, vy, vxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (SSIM_K1 * r) ** 2, (SSIM_K2 * r) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(np.mean(s.reshape(s.shape[0], -1).mean(axis=1)))  # per channel, then over channels


def _check_ssim_size(shape: tuple[int, ...], name: str) -> None:
    h, w = shape[-3], shape[-2]
    if h < SSIM_WIN or w < SSIM_WIN:
        raise ValueError(
            f"{name}: SSIM needs frames of at least {SSIM_WIN}x{SSIM_WIN} (Gaussian window, sigma {SSIM_SIGMA}), "
            f"got H={h}, W={w} in shape {shape} (channels-last)"
        )


def ssim(a, b, data_range) -> float:
    """Mean SSIM of two frames [H, W, C] (Gaussian window 11x11, sigma 1.5; see the module doc); 1 if equal."""
    r = _check_range(data_range)
    a, b = _f64(a), _f64(b)
    _check_frame(a, "first frame")
    _check_frame(b, "second frame")
    if a.shape != b.shape:
        raise ValueError(f"frame shape mismatch: {a.shape} vs {b.shape} (both must be {FRAME_LAYOUT})")
    _check_ssim_size(a.shape, "ssim")
    return _ssim_frame(a, b, r)


def video_psnr(a, b, data_range) -> PerFrame:
    """PSNR of each frame (over H, W, C) and the mean of those values (inf if any frame is identical)."""
    r = _check_range(data_range)
    a, b = _video_pair(a, b)
    fa, fb = _frames(a), _frames(b)
    vals = [_psnr_from_mse(float(np.mean((_f64(x) - _f64(y)) ** 2)), r) for x, y in zip(fa, fb)]
    return _per_frame(vals, a.shape[:-3])


def video_ssim(a, b, data_range) -> PerFrame:
    """SSIM of each frame (as `ssim`) and the mean of those values."""
    r = _check_range(data_range)
    a, b = _video_pair(a, b)
    _check_ssim_size(a.shape, "video_ssim")
    vals = [_ssim_frame(_f64(x), _f64(y), r) for x, y in zip(_frames(a), _frames(b))]
    return _per_frame(vals, a.shape[:-3])


def temporal_continuity(video) -> PerFrame:
    """Mean squared difference between adjacent frames, per pair ([F-1] or [B, F-1]) and the mean.

    In the video's own units (squared): compare videos on the same scale, or divide by data_range**2.
    Lower is smoother; a static video gives 0.
    """
    v = np.asarray(video)
    _check_video(v, "temporal_continuity", min_frames=2)
    v = _f64(v)
    d = np.diff(v, axis=-4)
    per_pair = np.mean(d * d, axis=(-3, -2, -1))
    return PerFrame(per_pair, float(np.mean(per_pair)))


# ---------------------------------------------------------------------------------------------------------
# Report summary


def compare_videos(a, b, data_range) -> dict[str, Any]:
    """Quality summary of candidate `a` against reference `b` (same shape, `VIDEO_LAYOUT`), ready for JSON.

    Keys: shape, data_range, psnr_mean, psnr_min, psnr_per_frame, ssim_mean, ssim_min, ssim_per_frame,
    mse, max_abs, rel_l2 (of a against b), temporal_mse_a, temporal_mse_b (mean adjacent-frame MSE,
    None for single-frame videos), notes. PSNR of identical frames is inf (json writes `Infinity`);
    SSIM fields are None, with a note, when frames are smaller than the 11x11 SSIM window.
    """
    r = _check_range(data_range)
    a, b = _video_pair(a, b)
    p = video_psnr(a, b, r)
    notes: list[str] = []
    try:
        s: PerFrame | None = video_ssim(a, b, r)
    except ValueError as e:
        if "SSIM needs frames" not in str(e):
            raise
        s, notes = None, [str(e)]
    multi = a.shape[-4] >= 2
    return {
        "shape": list(a.shape),
        "data_range": r,
        "psnr_mean": p.mean,
        "psnr_min": float(np.min(p.values)),
        "psnr_per_frame": p.values.tolist(),
        "ssim_mean": s.mean if s else None,
        "ssim_min": float(np.min(s.values)) if s else None,
        "ssim_per_frame": s.values.tolist() if s else None,
        "mse": mse(a, b),
        "max_abs": max_abs(a, b),
        "rel_l2": rel_l2(a, b),
        "temporal_mse_a": temporal_continuity(a).mean if multi else None,
        "temporal_mse_b": temporal_continuity(b).mean if multi else None,
        "notes": notes,
    }
