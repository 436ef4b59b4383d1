"""Camera trajectories in the public FantasyWorld JSON format, and the cameras its rays are built from.

The file is `{"focal_length": f, "cameras_interp": [[4x4 camera-to-world], ...]}` (OpenCV axes: x right,
y down, z forward; one matrix per video frame; other keys such as "cameras" and "scale" are ignored,
as the public code does). The released model was conditioned on Plucker rays of the poses relative to
the first camera, translations divided by a scene scale, and intrinsics that the public code multiplies
by the image size (docs/fantasyworld.md section 6); `ray_cameras` reproduces that, or gives plain pixel
intrinsics with `released=False`. Framework-neutral: numpy only.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

DEFAULT_FOCAL = 500.0  # the public code's default when the file has no focal_length


class TrajectoryError(ValueError):
    """A trajectory file this model cannot use; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Trajectory:
    focal_length: float  # pixels of the generated video
    c2w: np.ndarray  # [frames, 4, 4] camera-to-world, float64

    @property
    def frames(self) -> int:
        return self.c2w.shape[0]


def read_trajectory(src: str | os.PathLike | dict, frames: int | None = None) -> Trajectory:
    """Parse and check a trajectory (a path or the loaded JSON object); `frames` demands that many poses."""
    name = "trajectory"
    if not isinstance(src, dict):
        name = str(src)
        try:
            with open(src, encoding="utf-8") as f:
                src = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise TrajectoryError(f"{name}: cannot read a JSON trajectory ({e})") from None
    if not isinstance(src, dict) or "cameras_interp" not in src:
        raise TrajectoryError(f"{name}: expected an object with 'cameras_interp' (one 4x4 camera-to-world matrix per frame)")
    focal = src.get("focal_length", DEFAULT_FOCAL)
    if isinstance(focal, bool) or not isinstance(focal, (int, float)) or not np.isfinite(focal) or focal <= 0:
        raise TrajectoryError(f"{name}: focal_length must be a positive number of pixels, got {focal!r}")
    try:
        c2w = np.asarray(src["cameras_interp"], dtype=np.float64)
    except (TypeError, ValueError):
        raise TrajectoryError(f"{name}: cameras_interp must be a list of 4x4 number matrices") from None
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or len(c2w) == 0:
        raise TrajectoryError(f"{name}: cameras_interp must be a non-empty list of 4x4 matrices, got shape {list(c2w.shape)}")
    if frames is not None and len(c2w) != frames:
        raise TrajectoryError(f"{name}: has {len(c2w)} cameras, the video has {frames} frames; give one camera per frame")
    if not np.all(np.isfinite(c2w)):
        raise TrajectoryError(f"{name}: cameras_interp holds NaN or infinite values")
    rot = c2w[:, :3, :3]
    bad_rot = np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2)) > 1e-3
    bad_row = np.abs(c2w[:, 3] - [0, 0, 0, 1]).max(axis=1) > 1e-6
    bad = np.flatnonzero(bad_rot | bad_row | (np.linalg.det(rot) < 0))
    if bad.size:
        raise TrajectoryError(f"{name}: camera(s) {bad[:8].tolist()} are not rigid camera-to-world matrices "
                              "(rotation must be orthonormal with det +1, last row 0 0 0 1)")
    return Trajectory(float(focal), c2w)


def relative_c2w(c2w: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Poses relative to the first camera (frame 0 becomes the identity), translations divided by `scale`
    (the public code's MoGe-2 scene scale; 1 leaves them as given)."""
    if not scale > 0:
        raise TrajectoryError(f"scene scale must be positive, got {scale}")
    rel = np.linalg.inv(c2w[0])[None] @ c2w
    rel[:, :3, 3] /= scale
    rel[0] = np.eye(4)
    return rel


def released_ray_intrinsics(focal: float, height: int, width: int) -> np.ndarray:
    """(fx, fy, cx, cy) the released model's rays were made with: the pixel intrinsics (f, f, W/2, H/2)
    multiplied by (W, H, W, H), as if they were normalised (so the rays of a frame are nearly parallel)."""
    return np.array([focal * width, focal * height, width / 2 * width, height / 2 * height], dtype=np.float64)


def ray_cameras(traj: Trajectory, height: int, width: int, *, scale: float = 1.0, released: bool = True):
    """(c2w [F, 4, 4], intrinsics [F, 4]) float32 for `plucker_rays`: relative poses and the released
    intrinsics convention (or plain pixel intrinsics with `released=False`)."""
    k = (released_ray_intrinsics(traj.focal_length, height, width) if released
         else np.array([traj.focal_length, traj.focal_length, width / 2, height / 2]))
    rel = relative_c2w(traj.c2w, scale)
    return rel.astype(np.float32), np.broadcast_to(k, (traj.frames, 4)).astype(np.float32)
