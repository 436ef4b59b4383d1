"""Images in, videos out: loading and resizing the conditioning image, writing and reading mp4 files.

Pixels follow the pipelines' convention: float32 in [-1, 1], channels-last. The resize is PIL's Lanczos
to exactly (width, height), as the diffusers Wan pipelines do it, so both sides see the same pixels.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_FPS = 16


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, with an error that names the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}. Give a PNG, JPEG or WebP file.") from None


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
