"""FP8 (e4m3) weights on disk, framework-neutral: quantise for the converter, find and pair FP8 tensors on load.

Arithmetic. A weight w is stored as q = e4m3(clip(w / s, -448, 448)) with a float32 scale s, and read back as
q * s. s = amax / 448 (amax * float32(1/448)) per output channel (the largest |w| of the channel lands on 448, e4m3's largest finite
value) or per tensor. An all-zero channel gets s = 1. e4m3 rounds to nearest-even with 3 mantissa bits, so a
value in the normal range (|w / s| >= 2^-6) comes back within a relative 2^-4; smaller ones are subnormal
(steps of 2^-9 s). Casting without the clip turns anything past 448 into NaN, which is why it is there.
jax_impl/fp8.py computes the same arithmetic on the device, bit for bit (tests/test_fp8.py checks it), so a
model quantised after loading equals one converted offline.

Which layers. `is_fp8_linear` picks the linear weights of each block's self- and cross-attention (q, k, v, o
and the I2V image k/v) and feed-forward; patch, time, text and image embeddings, the time projection and the
head stay in bf16. This is LightX2V's choice (ModelTC/LightX2V tools/convert/converter.py: for `wan_dit` it
quantises 2D tensors whose third name part is `self_attn`, `cross_attn` or `ffn`, per output row, and casts
the rest to a non-linear dtype). Kijai's ComfyUI-WanVideoWrapper (nodes.py, 2025-03) keeps names containing
norm, head, bias, time_, img_emb, patch_embedding, modulation in the base dtype but casts the text embedding
too; Comfy-Org's repackaged `*_fp8_scaled` Wan files quantise every 2D weight, head and time projection
included. The blocks hold more than 99.9% of the linear FLOPs (the others run on one timestep vector, 512
text tokens, or write 64 channels per token), and the embeddings and the head set every block's modulation
or write the prediction directly, so rounding them buys no time and costs accuracy.

File conventions (what `find_fp8_pairs` reads, and what `quantize_for_file` writes):
- `NAME.weight` stored as F8_E4M3 (or F8_E5M2) with a float32 `NAME.scale_weight`: ComfyUI's "scaled fp8"
  files (comfy/ops.py `scaled_fp8_ops`, 2024-2025: a scalar Parameter defaulting to ones, dequantised as
  `weight * scale_weight`; optional scalar `NAME.scale_input`, a static activation scale). These files also
  carry an empty `scaled_fp8` marker tensor whose dtype names the format (comfy/model_detection.py). Kijai's
  and Comfy-Org's Wan `*_fp8_scaled.safetensors` use this layout with scalar scales (the key list of
  Comfy-Org's wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors shows `blocks.0.self_attn.q.scale_weight` [] F32
  next to an F8_E4M3 [5120, 5120] weight).
- The same with `NAME.weight_scale` / `NAME.input_scale`: newer ComfyUI (comfy/ops.py `mixed_precision_ops`
  reads `weight_scale`, plus a per-layer `comfy_quant` JSON tensor), diffusers/ModelOpt-style files and
  LightX2V (`weight_scale` of shape [out, 1], per output channel). Readers that know one spelling only load
  the other off by the scale factor without an error (stable-diffusion.cpp PR #1898 found white images;
  InvokeAI PR #9478 reads both), so both are read here.
- Plain `*_fp8_e4m3fn.safetensors` files (Kijai's WanVideo_comfy, Comfy-Org's `fp8_e4m3fn` repacks): FP8
  weights and no scale tensor at all, meaning scale 1.
- Our own files: the torch layouts (diffusers, original Wan) write `NAME.weight` F8_E4M3 [out, in] and
  `NAME.scale_weight` float32 of shape [out, 1] (per channel) or [] (per tensor); the Flax layout writes
  `NAME.kernel` [in, out] and `NAME.kernel_scale` [out] or [] (the parameter names of jax_impl.fp8.Fp8Dense).
  In both, the scale broadcasts against the weight as stored, so `weight * scale` is right in any reader;
  a per-channel [out] vector next to a square [out, in] weight would broadcast along the input axis instead,
  silently (most of Wan's linears are 5120 x 5120).
`scale_input` / `input_scale` tensors are recognised and not used: activations are scaled per token (or per
tensor) on the fly from their own maximum.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from weights.safetensors_io import CheckpointError

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E5M2 = np.dtype(ml_dtypes.float8_e5m2)
FP8_DTYPES = (E4M3, E5M2)
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
# scale = amax * float32(1/448): a multiply by one constant rounds the same in numpy and XLA (XLA rewrites a
# division by a constant into this multiply on some back-ends, which made the two differ by an ulp).
INV_E4M3_MAX = np.float32(1.0 / E4M3_MAX)
SCALINGS = ("channel", "tensor")

WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI legacy; newer ComfyUI / diffusers / LightX2V
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
FLAX_SCALE_SUFFIX = ".kernel_scale"
MARKERS = ("scaled_fp8",)  # ComfyUI: an empty tensor whose dtype names the fp8 format

# Linear layers of the DiT blocks in every layout we read: Flax / original Wan (`self_attn.q`, `ffn.0`, `ffn.fc1`)
# and diffusers (`attn1.to_q`, `ffn.net.0.proj`); the layer index is absent in the stacked model's own paths.
_BLOCK_LINEAR = re.compile(
    r"(?:^|\.)blocks\.(?:\d+\.)?(?:"
    r"(?:self_attn|cross_attn)\.(?:q|k|v|o|k_img|v_img)"
    r"|attn[12]\.(?:to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)"
    r"|ffn\.(?:0|2|fc1|fc2|net\.0\.proj|net\.2)"
    r")(?:\.(?:weight|kernel))?$"
)


def is_fp8_linear(name: str) -> bool:
    """True for the DiT linear layers stored and run in FP8 (see the module docstring for the choice).

    `name` is a weight key in any layout (`blocks.3.attn1.to_q.weight`, `blocks.3.self_attn.q.kernel`, with or
    without a `model.diffusion_model.` prefix) or a module path of the stacked model (`blocks.self_attn.q`)."""
    return _BLOCK_LINEAR.search(name) is not None


# ------------------------------------------------------------------------------------------------------------
# quantise / dequantise
def quantize(w: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """e4m3(clip(w / scale, -448, 448)), computed in float32; `scale` broadcasts against `w`."""
    h = np.asarray(w, dtype=np.float32) / np.asarray(scale, dtype=np.float32)
    return np.clip(h, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def dequantize(q: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """q * scale in float32 (`scale` broadcasts against `q`: use `normalize_scale` for a file's scale)."""
    return np.asarray(q).astype(np.float32) * np.asarray(scale, dtype=np.float32)


def amax_scale(amax: np.ndarray) -> np.ndarray:
    """amax / 448 (as amax * float32(1/448)), or 1 where amax is 0 (an all-zero channel quantises to zeros)."""
    amax = np.asarray(amax, dtype=np.float32)
    return np.where(amax > 0, amax * INV_E4M3_MAX, np.float32(1.0)).astype(np.float32)


def quantize_linear(w: np.ndarray, *, scaling: str = "channel", in_axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """A linear weight -> (e4m3 weight, float32 scale) with `q * scale ~ w`.

    `in_axis` is the input (reduced) axis: 1 for torch's [out, in], 0 (or -2) for Flax's [in, out]. The scale
    keeps `w`'s rank with `in_axis` of size 1 ("channel": one scale per output channel) or is a scalar
    ("tensor"), so it broadcasts against `w` as it is."""
    if scaling not in SCALINGS:
        raise ValueError(f"weight scaling must be one of {SCALINGS}, got {scaling!r}")
    h = np.asarray(w, dtype=np.float32)
    if h.ndim < 2:
        raise ValueError(f"a linear weight has 2 or more axes, got shape {h.shape}")
    if scaling == "channel":
        scale = amax_scale(np.max(np.abs(h), axis=in_axis, keepdims=True))
    else:
        scale = amax_scale(np.max(np.abs(h)))
    return quantize(h, scale), scale


def scale_key(weight_key: str) -> str:
    """The key our files store a weight's scale under: `X.weight` -> `X.scale_weight`, `X.kernel` -> `X.kernel_scale`."""
    if weight_key.endswith(".weight"):
        return weight_key[: -len(".weight")] + ".scale_weight"
    if weight_key.endswith(".kernel"):
        return weight_key[: -len(".kernel")] + FLAX_SCALE_SUFFIX
    raise ValueError(f"{weight_key!r} is not a linear weight key (expected a name ending in .weight or .kernel)")


def quantize_for_file(weight_key: str, w: np.ndarray, *, scaling: str = "channel") -> dict[str, np.ndarray]:
    """What the converter writes for one FP8 linear: {weight_key: e4m3 weight, scale key: float32 scale}.

    Torch layouts (`.weight`, [out, in]) get a [out, 1] or [] scale, the Flax layout (`.kernel`, [in, out]) a
    [out] or [] scale: in both the scale broadcasts against the stored weight."""
    if weight_key.endswith(".kernel"):
        q, scale = quantize_linear(w, scaling=scaling, in_axis=-2)
        scale = scale.reshape(scale.shape[:-2] + scale.shape[-1:]) if scale.ndim else scale
    else:
        q, scale = quantize_linear(w, scaling=scaling, in_axis=-1)
    return {weight_key: q, scale_key(weight_key): scale}


# ------------------------------------------------------------------------------------------------------------
# reading: which tensors are FP8, and their scales
@dataclass(frozen=True)
class Fp8Pair:
    """An FP8 weight of a checkpoint and the tensors that go with it."""

    weight: str
    scale: str | None  # None: the file has no scale for it, the scale is 1
    input_scale: str | None = None  # a static activation scale in the file; recorded, not used


def _out_axis(weight_key: str) -> int:
    return -1 if weight_key.endswith(".kernel") else 0


def normalize_scale(scale: np.ndarray, weight_shape: tuple[int, ...], weight_key: str) -> np.ndarray:
    """A file's scale for `weight_key` as float32 [] (per tensor) or [out] (per output channel).

    Accepts a scalar, [1], [out], [out, 1] (torch layouts) or [1, out] (Flax); anything else is an error
    naming the tensor, never a broadcast along the wrong axis."""
    s = np.asarray(scale, dtype=np.float32)
    if s.size == 1:
        return s.reshape(())
    if len(weight_shape) != 2:
        raise CheckpointError(f"{weight_key}: a per-channel scale needs a 2D weight, the weight has shape {list(weight_shape)}")
    out = weight_shape[_out_axis(weight_key)]
    flax = weight_key.endswith(".kernel")
    allowed = [(out,), (1, out)] if flax else [(out,), (out, 1)]
    if s.shape not in allowed:
        raise CheckpointError(
            f"{weight_key}: scale of shape {list(s.shape)} does not fit a weight of shape {list(weight_shape)}; "
            f"expected a scalar or one of {[list(a) for a in allowed]} (one scale per output channel)"
        )
    return s.reshape(out)


def dequantize_weight(q: np.ndarray, scale: np.ndarray | None, weight_key: str) -> np.ndarray:
    """A file's FP8 weight as float32, with its scale (None: 1) applied along the output channels."""
    if scale is None:
        return np.asarray(q).astype(np.float32)
    s = normalize_scale(scale, tuple(np.shape(q)), weight_key)
    if s.ndim and _out_axis(weight_key) == 0:
        s = s[:, None]
    return dequantize(q, s)


def find_fp8_pairs(infos: Mapping[str, Any]) -> tuple[dict[str, Fp8Pair], set[str]]:
    """Pair every FP8 tensor of a checkpoint with its scale; list the keys that are not model tensors.

    `infos` maps tensor names to anything with `.dtype` and `.shape` (safetensors `TensorInfo`, numpy arrays).
    Returns ({fp8 weight key: Fp8Pair}, companion keys: scales, input scales and format markers, which a loader
    drops before matching names against the model). Raises CheckpointError on a scale without its weight, a
    scale on a weight that is not FP8, two spellings of one scale, or a scale whose shape fits neither per
    tensor nor per output channel."""
    dtypes = {k: np.dtype(v.dtype) for k, v in infos.items()}
    companions: set[str] = {k for k in infos if k.rsplit(".", 1)[-1] in MARKERS}
    weight_scales: dict[str, list[str]] = {}
    input_scales: dict[str, str] = {}
    for k in infos:
        for suffix in WEIGHT_SCALE_SUFFIXES:
            if k.endswith(suffix):
                weight_scales.setdefault(k[: -len(suffix)] + ".weight", []).append(k)
        if k.endswith(FLAX_SCALE_SUFFIX):
            weight_scales.setdefault(k[: -len(FLAX_SCALE_SUFFIX)] + ".kernel", []).append(k)
        for suffix in INPUT_SCALE_SUFFIXES:
            if k.endswith(suffix):
                input_scales[k[: -len(suffix)] + ".weight"] = k
    for weight, scales in weight_scales.items():
        companions.update(scales)
        if len(scales) > 1:
            raise CheckpointError(f"{weight} has two scale tensors ({', '.join(scales)}); the file is ambiguous")
        if weight not in infos:
            raise CheckpointError(f"scale tensor {scales[0]} has no weight {weight} in the checkpoint")
        if dtypes[weight] not in FP8_DTYPES:
            raise CheckpointError(
                f"scale tensor {scales[0]} belongs to {weight}, which is {dtypes[weight]}, not FP8: "
                "applying it would rescale a full-precision weight"
            )
    companions.update(input_scales.values())
    pairs: dict[str, Fp8Pair] = {}
    for k, dt in dtypes.items():
        if dt not in FP8_DTYPES or k in companions:
            continue
        scale = weight_scales.get(k, [None])[0]
        if scale is not None:
            normalize_scale(np.zeros(infos[scale].shape, np.float32), tuple(infos[k].shape), k)  # shape check only
        pairs[k] = Fp8Pair(weight=k, scale=scale, input_scale=input_scales.get(k))
    return pairs, companions


__all__ = [
    "E4M3",
    "E4M3_MAX",
    "Fp8Pair",
    "amax_scale",
    "dequantize",
    "dequantize_weight",
    "find_fp8_pairs",
    "is_fp8_linear",
    "normalize_scale",
    "quantize",
    "quantize_for_file",
    "quantize_linear",
    "scale_key",
]
