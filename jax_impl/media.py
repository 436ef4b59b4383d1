"""Images in, videos out: loading and resizing the conditioning image, writing and reading mp4 files.

Pixels follow the pipelines' convention: float32 in [-1, 1], channels-last. The resize is PIL's Lanczos
to exactly (width, height), as the diffusers Wan pipelines do it, so both sides see the same pixels.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_FPS = 16


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB (see `to_rgb`), with an error that names the file when it cannot be read.

    The EXIF orientation is applied (a phone photo stored sideways comes out upright); of an animated
    image the first frame is used.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img), source=str(path))
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}. Give a PNG, JPEG or WebP file.") from None


BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WHITE_LEVEL = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_rgb(img: Image.Image, source: str = "image") -> Image.Image:
    """Any PIL image as 8-bit RGB, with its real range and transparency taken into account.

    16-bit grayscale (I;16*) is scaled by 65535; 32-bit integer images (mode I, which is how PIL holds
    16-bit data) must lie in 0..65535 and are scaled the same way; float images (F) must lie in [0, 1];
    PIL's own conversion would clip all of these at 255 (a white image). Transparency (alpha, a palette or
    tRNS transparent colour) is composited on `BACKGROUND` (white). Bilevel, palette, CMYK, YCbCr, LAB and
    HSV images are converted by PIL. Raises ValueError for values outside the range, or a mode PIL cannot
    convert.
    """
    mode = img.mode
    if mode in _WHITE_LEVEL:
        a = np.asarray(img).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        white = _WHITE_LEVEL[mode]
        if not (np.isfinite(a).all() and lo >= 0 and hi <= white):
            raise ValueError(
                f"{source}: {mode} image values span [{lo:g}, {hi:g}]; expected 0..{white:g} "
                f"({'float images hold 0..1' if mode == 'F' else '16-bit data'}). Save it as an 8- or 16-bit PNG."
            )
        gray = np.round(a * (255.0 / white)).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")
    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    try:
        if not has_alpha:
            return img.convert("RGB")
        rgba = np.asarray(img.convert("RGBA") if mode != "La" else img.convert("LA").convert("RGBA"), np.float64)
    except (ValueError, OSError) as e:
        raise ValueError(f"{source}: cannot convert a {mode} image to RGB ({e}); save it as an 8-bit RGB PNG") from None
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + np.asarray(BACKGROUND, np.float64) * (1.0 - alpha)
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


def image_to_array(image: Image.Image, height: int, width: int) -> np.ndarray:
    """[height, width, 3] float32 in [-1, 1]: Lanczos-resized to exactly (width, height), then 2x - 1."""
    if image.size != (width, height):
        image = image.convert("RGB").resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255], rounding as the pipelines' postprocessing does."""
    return np.round((np.clip(np.asarray(video, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = DEFAULT_FPS) -> Path:
    """Write uint8 frames [F, H, W, 3] as H.264 mp4; the file appears complete or not at all."""
    import warnings

    import imageio.v2 as imageio

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 wants uint8 frames [frames, height, width, 3], got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".mp4", dir=path.parent)
    os.close(fd)
    try:
        # macro_block_size=1: tiny test videos (32 px) are written as they are, not resized to 16-multiples.
        with warnings.catch_warnings():  # ffmpeg is a child process; JAX's fork warning does not apply to it
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
            writer = imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                        ffmpeg_log_level="error",
                                        pixelformat="yuv420p" if _even(frames) else "yuv444p")
            with writer:
                for frame in frames:
                    writer.append_data(frame)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the video normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _even(frames: np.ndarray) -> bool:
    return frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """(uint8 frames [F, H, W, 3], fps) of a video file."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(os.fspath(path))
    try:
        fps = float(reader.get_meta_data().get("fps", 0.0))
        frames = np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()
    return frames, fps
