"""Wan2.1 I2V's image encoder in JAX: CLIP preprocessing (PIL + numpy) and the Flax CLIP vision tower, no torch.

`JaxImageEncoder(folder)(images)` returns what `torch_ref.encoders.ImageEncoder` returns: float32
[1, tokens * len(images), hidden], the penultimate hidden state of each image (257 x 1280 for ViT-H/14).

`preprocess` is CLIPImageProcessor's PIL path written out (transformers 4's processor, and transformers 5's
`CLIPImageProcessorPil`): convert to RGB (transparency composited on white), resize the shortest edge with the
configured PIL filter (bicubic), center crop (zero padding where the image is smaller), rescale in float64,
normalise in float32. Owning it pins the numbers: transformers 5 with torchvision installed resizes with
torch's bicubic instead (antialiased differently), whose pixels differ from PIL's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from jax_impl.frozen_jit import frozen_jit
from jax_impl.loading import load_clip_vision
from weights.configs.encoders import ClipProcessorConfig
from weights.safetensors_io import CheckpointError


def _to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _resize_hw(height: int, width: int, cfg: ClipProcessorConfig) -> tuple[int, int]:
    if cfg.resize_hw is not None:
        return cfg.resize_hw
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(cfg.shortest_edge * long / short)
    return (new_long, cfg.shortest_edge) if width <= height else (cfg.shortest_edge, new_long)


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """[H, W, C] -> [ch, cw, C]; an image smaller than the crop is zero-padded around its centre first."""
    h, w = x.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return x[top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    pt, pl = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas = np.zeros((nh, nw, x.shape[2]), x.dtype)
    canvas[pt : pt + h, pl : pl + w] = x
    top, left = top + pt, left + pl
    return canvas[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def preprocess(images: list[Image.Image], cfg: ClipProcessorConfig) -> np.ndarray:
    """PIL images -> float32 pixels [N, H, W, 3], channels-last, as CLIPImageProcessor computes them."""
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"images must be PIL images, got {type(image).__name__}")
        image = _to_rgb(image) if cfg.do_convert_rgb else image
        if cfg.do_resize:
            h, w = _resize_hw(image.height, image.width, cfg)
            image = image.resize((w, h), resample=Image.Resampling(cfg.resample))
        x = np.asarray(image)
        if x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"image has shape {x.shape} after preprocessing; CLIP takes 3 channels (set do_convert_rgb)")
        if cfg.do_center_crop:
            x = _center_crop(x, *cfg.crop_hw)
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32) if cfg.do_rescale else x.astype(np.float32)
        if cfg.do_normalize:
            x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
        out.append(x)
    return np.stack(out)


@frozen_jit
def _penultimate(model, pixels: jax.Array) -> jax.Array:
    return model.penultimate(pixels).astype(jnp.float32)


class JaxImageEncoder:
    """CLIP preprocessing + Flax vision tower (`image_processor/`, `image_encoder/`): penultimate-layer tokens."""

    def __init__(self, folder: str | os.PathLike, dtype=jnp.float32, *, attention_backend: str = "auto"):
        folder = Path(folder)
        cfg_path = folder / "image_processor" / "preprocessor_config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{folder}: no image_processor/preprocessor_config.json; Wan2.1 I2V folders have one")
        self.processor = ClipProcessorConfig.from_json(cfg_path)
        self.model = load_clip_vision(folder / "image_encoder", dtype=jnp.dtype(dtype), attention_backend=attention_backend)
        size = self.model.cfg.image_size
        if self.processor.do_center_crop and tuple(self.processor.crop_hw) != (size, size):
            raise CheckpointError(
                f"{folder}: the image processor crops to {self.processor.crop_hw}, the CLIP model takes {size}x{size}"
            )

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """[1, tokens * len(images), hidden] float32 (257 x 1280 per image for ViT-H/14 at 224 px)."""
        pixels = preprocess(images, self.processor)
        hidden = np.asarray(_penultimate(self.model, jnp.asarray(pixels)))
        return hidden.reshape(1, -1, hidden.shape[-1])


__all__ = ["JaxImageEncoder", "preprocess"]
