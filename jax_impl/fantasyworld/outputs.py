"""What a FantasyWorld run writes besides the video: depth maps, a coloured point cloud and the predicted cameras.

Next to the mp4 `OUT.mp4` (`output_paths`):

- `OUT_depth.npy`, `OUT_depth_conf.npy`: float32 `[frames, H, W]`, the depth head's depth and confidence
  (confidence = 1 + exp(.) > 1) for every video frame;
- `OUT.ply`: binary little-endian PLY (`float x, y, z; uchar red, green, blue`), as the public code writes
  it: built from the **predicted depth and predicted cameras** (not the point-map head, not the input
  trajectory), every `stride`-th row and column of every frame (pixel indices, no half-pixel offset),
  points whose depth confidence is >= `min_confidence` and whose coordinates are finite, coloured by the
  decoded video frame at that pixel. The public defaults are stride 4 and threshold 1.0, which keeps every
  finite point (the confidence is always above 1); the header's comments record both values. One
  addition of ours: frames whose predicted field of view is not in (0, pi) (an infinite or negative focal
  length) contribute no points, where the public code would put them all on the optical axis;
- `OUT_cameras.json`: per frame the camera-to-world 4x4 (OpenCV axes: x right, y down, z forward), the
  intrinsics in pixels and the fields of view, decoded from the camera head's 9 values (translation,
  quaternion x y z w, fov_h, fov_w; that encoding gives world-to-camera [R | T]). As in the public code
  frame 0's camera is set to the identity.

Every file is written atomically (`weights.atomic`); `check_outputs` refuses unwritable paths before a run
starts. numpy only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from weights.atomic import atomic_write, check_output_path

PLY_STRIDE = 4  # the public code's defaults
PLY_MIN_CONFIDENCE = 1.0
_VERTEX = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    video: Path
    depth: Path
    depth_conf: Path
    points: Path
    cameras: Path

    def all(self) -> list[Path]:
        return [self.video, self.depth, self.depth_conf, self.points, self.cameras]


def output_paths(out: str | Path) -> OutputPaths:
    """The files of one run, named after the video `out` (OUT.mp4 -> OUT_depth.npy, OUT.ply, ...)."""
    out = Path(out)
    stem = out.with_suffix("")
    return OutputPaths(video=out, depth=Path(f"{stem}_depth.npy"), depth_conf=Path(f"{stem}_depth_conf.npy"),
                       points=Path(f"{stem}.ply"), cameras=Path(f"{stem}_cameras.json"))


def check_outputs(paths: OutputPaths) -> None:
    """Raise ValueError naming --out when any output file could not be written (before any work starts)."""
    check_output_path(paths.video, flag="--out", suffix=".mp4")
    for p in paths.all()[1:]:
        check_output_path(p, flag="--out (derived output)")


# --------------------------------------------------------------------------------------------- cameras
def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] from quaternions [..., 4] in (x, y, z, w) order; any nonzero norm."""
    q = np.asarray(q, np.float64)
    x, y, z, w = np.moveaxis(q, -1, 0)
    s = 2.0 / np.sum(q * q, axis=-1)
    rows = [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
            s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
            s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)]
    return np.stack(rows, axis=-1).reshape(*q.shape[:-1], 3, 3)


@dataclasses.dataclass(frozen=True)
class Cameras:
    """Decoded camera-head output for `frames` video frames of `height` x `width` pixels (float64)."""

    w2c: np.ndarray  # [F, 4, 4] world-to-camera
    intrinsics: np.ndarray  # [F, 3, 3] pixels, principal point at (W/2, H/2)
    fov: np.ndarray  # [F, 2] (fov_h, fov_w) radians
    pose_enc: np.ndarray  # [F, 9] as predicted
    height: int
    width: int

    @property
    def c2w(self) -> np.ndarray:
        return np.linalg.inv(self.w2c)

    @property
    def valid(self) -> np.ndarray:
        """[F] bool: both fields of view lie in (0, pi), so the focal lengths are finite and positive (the
        head's ReLU can give 0, an infinite focal length that would put every point on the optical axis)."""
        return np.all((self.fov > 0) & (self.fov < np.pi), axis=-1)


def decode_cameras(pose_enc: np.ndarray, height: int, width: int, *, identity_first: bool = True) -> Cameras:
    """pose_enc [F, 9] (translation, quaternion xyzw, fov_h, fov_w) -> world-to-camera [R | T] and pixel
    intrinsics fx = (W/2) / tan(fov_w/2), fy = (H/2) / tan(fov_h/2). `identity_first`: frame 0's camera is
    the identity, as the public code sets it before building the point cloud."""
    p = np.asarray(pose_enc, np.float64)
    if p.ndim != 2 or p.shape[1] != 9:
        raise ValueError(f"pose_enc must be [frames, 9], got {list(p.shape)}")
    if not np.isfinite(p).all():
        raise ValueError("the camera head predicted non-finite poses (NaN or inf); check the weights")
    w2c = np.tile(np.eye(4), (len(p), 1, 1))
    w2c[:, :3, :3] = quaternion_to_matrix(p[:, 3:7])
    w2c[:, :3, 3] = p[:, :3]
    if identity_first:
        w2c[0] = np.eye(4)
    fov_h, fov_w = p[:, 7], p[:, 8]
    k = np.zeros((len(p), 3, 3))
    with np.errstate(divide="ignore"):
        k[:, 0, 0] = (width / 2) / np.tan(fov_w / 2)
        k[:, 1, 1] = (height / 2) / np.tan(fov_h / 2)
    k[:, 0, 2], k[:, 1, 2], k[:, 2, 2] = width / 2, height / 2, 1.0
    return Cameras(w2c, k, np.stack([fov_h, fov_w], axis=-1), p, height, width)


def depth_to_world(depth: np.ndarray, cams: Cameras, stride: int = 1) -> np.ndarray:
    """World points [F, ceil(H/stride), ceil(W/stride), 3] (float64) of depth maps [F, H, W] at every
    `stride`-th pixel: pixel (u, v) (integer indices) at depth d is ((u - cx) d / fx, (v - cy) d / fy, d) in the
    camera, taken to the world by the inverse of [R | T]."""
    f, h, w = depth.shape
    v, u = np.meshgrid(np.arange(0, h, stride, dtype=np.float64), np.arange(0, w, stride, dtype=np.float64),
                       indexing="ij")
    k = cams.intrinsics[:, None, None]
    d = np.asarray(depth, np.float64)[:, ::stride, ::stride]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        cam = np.stack([(u - k[..., 0, 2]) * d / k[..., 0, 0], (v - k[..., 1, 2]) * d / k[..., 1, 1], d], axis=-1)
        c2w = cams.c2w
        return np.einsum("fij,fhwj->fhwi", c2w[:, :3, :3], cam) + c2w[:, None, None, :3, 3]


def point_cloud(depth: np.ndarray, confidence: np.ndarray, cams: Cameras, colors: np.ndarray, *,
                stride: int = PLY_STRIDE, min_confidence: float = PLY_MIN_CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """(xyz [N, 3] float32, rgb [N, 3] uint8): every `stride`-th row/column of every frame with a valid camera
    (`Cameras.valid`) whose depth confidence is >= `min_confidence` and whose world point is finite
    (frame-major, then row, column)."""
    if depth.shape != confidence.shape or colors.shape != (*depth.shape, 3):
        raise ValueError(f"depth {depth.shape}, confidence {confidence.shape} and colours {colors.shape} must "
                         "cover the same frames [F, H, W] (colours [F, H, W, 3])")
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"point stride must be an integer >= 1, got {stride!r}")
    with np.errstate(over="ignore", invalid="ignore"):
        pts = depth_to_world(depth, cams, stride).astype(np.float32)  # finite as written: checked in float32
    keep = (confidence[:, ::stride, ::stride] >= min_confidence) & np.isfinite(pts).all(axis=-1)
    keep &= cams.valid[:, None, None]
    return pts[keep], np.asarray(colors, np.uint8)[:, ::stride, ::stride][keep]


# --------------------------------------------------------------------------------------------- writers
def ply_bytes(xyz: np.ndarray, rgb: np.ndarray, comments: list[str] = ()) -> bytes:
    """A binary little-endian PLY of coloured points (`float x, y, z; uchar red, green, blue`)."""
    if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != xyz.shape:
        raise ValueError(f"points must be [N, 3] with colours [N, 3], got {xyz.shape} and {rgb.shape}")
    v = np.empty(len(xyz), _VERTEX)
    for i, name in enumerate("xyz"):
        v[name] = xyz[:, i]
    for i, name in enumerate(("red", "green", "blue")):
        v[name] = rgb[:, i]
    header = ["ply", "format binary_little_endian 1.0", *(f"comment {c}" for c in comments),
              f"element vertex {len(v)}", "property float x", "property float y", "property float z",
              "property uchar red", "property uchar green", "property uchar blue", "end_header"]
    return ("\n".join(header) + "\n").encode("ascii") + v.tobytes()


def cameras_json(cams: Cameras) -> dict[str, Any]:
    """The cameras as JSON data: convention, size, and per frame c2w 4x4, intrinsics, fovs, raw pose_enc."""
    c2w, k = cams.c2w, cams.intrinsics

    def num(x: float) -> float | None:  # JSON has no inf/NaN (a zero field of view gives an infinite focal)
        return float(x) if np.isfinite(x) else None

    frames = [{"frame": i, "c2w": [[num(x) for x in row] for row in c2w[i]],
               "fx": num(k[i, 0, 0]), "fy": num(k[i, 1, 1]), "cx": float(k[i, 0, 2]), "cy": float(k[i, 1, 2]),
               "fov_h": float(cams.fov[i, 0]), "fov_w": float(cams.fov[i, 1]), "valid": bool(cams.valid[i]),
               "pose_enc": [float(x) for x in cams.pose_enc[i]]} for i in range(len(c2w))]
    return {"convention": "camera-to-world 4x4, OpenCV axes (x right, y down, z forward); intrinsics in pixels; "
                          "frame 0 set to the identity; predicted by the FantasyWorld camera head",
            "width": cams.width, "height": cams.height, "frames": frames}


def frame_ranges(frames: list[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> "1-3, 7, 9-10"."""
    parts: list[str] = []
    for f in sorted(frames):
        if parts and f == last + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{f}"
        else:
            parts.append(str(f))
        last = f
    return ", ".join(parts)


def write_npy(path: Path, a: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, a, allow_pickle=False)


def write_geometry(paths: OutputPaths, frames: np.ndarray, predictions: dict[str, np.ndarray], *,
                   stride: int = PLY_STRIDE, min_confidence: float = PLY_MIN_CONFIDENCE) -> dict[str, Any]:
    """Write depth, depth confidence, point cloud and cameras of one video (uint8 `frames` [F, H, W, 3];
    `predictions` of batch row 0: depth [F, H, W, 1], depth_conf [F, H, W], pose_enc [F, 9]).
    Everything is computed before the first file is written. Returns counts for the log."""
    depth = np.asarray(predictions["depth"], np.float32)[..., 0]
    conf = np.asarray(predictions["depth_conf"], np.float32)
    f, h, w = depth.shape
    if frames.shape != (f, h, w, 3):
        raise ValueError(f"the video is {list(frames.shape)}, the depth head predicted {f} frames of {h}x{w}")
    if not (np.isfinite(depth).all() and np.isfinite(conf).all()):
        raise ValueError("the depth head predicted non-finite depth or confidence (NaN or inf); check the weights")
    cams = decode_cameras(predictions["pose_enc"], h, w)
    xyz, rgb = point_cloud(depth, conf, cams, frames, stride=stride, min_confidence=min_confidence)
    skipped = np.flatnonzero(~cams.valid).tolist()
    ply = ply_bytes(xyz, rgb, [f"FantasyWorld point cloud: predicted depth + predicted cameras, {f} frames {h}x{w}",
                               f"stride {stride}", f"min_depth_confidence {min_confidence:g}",
                               f"frames_without_valid_camera {frame_ranges(skipped) or 'none'}"])
    cam_text = json.dumps(cameras_json(cams), indent=1, allow_nan=False) + "\n"
    write_npy(paths.depth, depth)
    write_npy(paths.depth_conf, conf)
    with atomic_write(paths.points) as fh:
        fh.write(ply)
    with atomic_write(paths.cameras, "w", encoding="utf-8") as fh:
        fh.write(cam_text)
    candidates = f * len(range(0, h, stride)) * len(range(0, w, stride))
    return {"points": len(xyz), "candidates": candidates, "frames": f, "skipped_frames": skipped}
