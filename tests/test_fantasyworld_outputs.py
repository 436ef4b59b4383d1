"""FantasyWorld's output files (`jax_impl.fantasyworld.outputs`) on synthetic predictions: the cameras decoded
from the 9-value pose encoding, the point cloud checked by projecting it back through those cameras, the PLY
read by a parser of our own, the confidence and field-of-view filters, the cameras JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jax_impl.fantasyworld.outputs import (cameras_json, decode_cameras, frame_ranges, output_paths, ply_bytes,
                                           point_cloud, quaternion_to_matrix, write_geometry)

F, H, W = 3, 12, 20


def read_ply(data: bytes) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(xyz [N, 3] float32, rgb [N, 3] uint8, comments) of a binary little-endian x y z red green blue PLY; the body
    must hold exactly the vertex count the header states."""
    marker = b"end_header\n"
    end = data.index(marker) + len(marker)
    lines = data[:end].decode("ascii").splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"] and lines[-1] == "end_header"
    counts = [int(line.split()[2]) for line in lines if line.startswith("element vertex ")]
    props = [tuple(line.split()[1:]) for line in lines if line.startswith("property ")]
    assert len(counts) == 1 and props == [("float", "x"), ("float", "y"), ("float", "z"), ("uchar", "red"),
                                          ("uchar", "green"), ("uchar", "blue")]
    record = np.dtype([("xyz", "<f4", 3), ("rgb", "u1", 3)])
    body = data[end:]
    assert len(body) == counts[0] * record.itemsize, f"body of {len(body)} bytes for {counts[0]} vertices"
    v = np.frombuffer(body, record)
    return v["xyz"], v["rgb"], [line[len("comment "):] for line in lines if line.startswith("comment ")]


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def matrix_to_xyzw(r: np.ndarray) -> np.ndarray:
    """A quaternion (x, y, z, w) of rotation r (w > 0 branch; fine for rotations well away from 180 degrees)."""
    w = np.sqrt(1 + np.trace(r)) / 2
    return np.array([(r[2, 1] - r[1, 2]) / (4 * w), (r[0, 2] - r[2, 0]) / (4 * w), (r[1, 0] - r[0, 1]) / (4 * w), w])


def synthetic(rng, fov_w=(1.0, 0.9, 1.1)) -> dict[str, np.ndarray]:
    """Predictions with known cameras: random rotations (quaternions scaled off unit norm), translations, fovs."""
    pose = np.zeros((F, 9))
    for f in range(F):
        pose[f, 3:7] = matrix_to_xyzw(random_rotation(rng)) * (0.5 + f)  # any nonzero norm: the same rotation
        pose[f, :3] = rng.standard_normal(3)
    pose[:, 7], pose[:, 8] = 0.8, fov_w
    return {"pose_enc": pose.astype(np.float32), "depth": rng.uniform(0.5, 3.0, (F, H, W, 1)).astype(np.float32),
            "depth_conf": (1 + rng.exponential(1.0, (F, H, W))).astype(np.float32)}


def test_quaternion_matches_rodrigues():
    axis, angle = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5]), 0.7
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    want = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    q = np.append(axis * np.sin(angle / 2), np.cos(angle / 2))
    np.testing.assert_allclose(quaternion_to_matrix(3.0 * q), want, atol=1e-12)


def test_points_project_back_to_their_pixels_and_depths():
    """Every point, taken back into its frame's camera ([R | T], then the intrinsics), lands on the pixel it came
    from at the predicted depth: the unprojection, the pose decoding and the stride agree with each other."""
    rng = np.random.default_rng(0)
    pred = synthetic(rng)
    cams = decode_cameras(pred["pose_enc"], H, W)
    assert np.allclose(cams.w2c[0], np.eye(4)), "frame 0's camera is the identity, whatever was predicted"
    assert np.allclose(cams.c2w @ cams.w2c, np.eye(4))
    np.testing.assert_allclose(cams.intrinsics[1, 0, 0], (W / 2) / np.tan(0.45))  # fx from fov_w
    np.testing.assert_allclose(cams.intrinsics[1, 1, 1], (H / 2) / np.tan(0.4))  # fy from fov_h
    colors = rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8)
    for stride in (1, 3):
        xyz, rgb = point_cloud(pred["depth"][..., 0], pred["depth_conf"], cams, colors, stride=stride, min_confidence=0)
        rows, cols = np.arange(0, H, stride), np.arange(0, W, stride)
        assert len(xyz) == F * len(rows) * len(cols)
        per_frame = np.split(xyz.astype(np.float64), F)
        for f in range(F):
            cam = per_frame[f] @ cams.w2c[f, :3, :3].T + cams.w2c[f, :3, 3]
            k = cams.intrinsics[f]
            u, v = k[0, 0] * cam[:, 0] / cam[:, 2] + k[0, 2], k[1, 1] * cam[:, 1] / cam[:, 2] + k[1, 2]
            vv, uu = np.meshgrid(rows, cols, indexing="ij")
            np.testing.assert_allclose(u, uu.ravel(), atol=1e-3)
            np.testing.assert_allclose(v, vv.ravel(), atol=1e-3)
            np.testing.assert_allclose(cam[:, 2], pred["depth"][f, ::stride, ::stride, 0].ravel(), rtol=1e-5)
        np.testing.assert_array_equal(rgb, colors[:, ::stride, ::stride].reshape(-1, 3))


def test_confidence_and_field_of_view_filters():
    rng = np.random.default_rng(1)
    pred = synthetic(rng, fov_w=(1.0, 0.0, 1.1))  # frame 1: ReLU-ed to 0, an infinite focal length
    cams = decode_cameras(pred["pose_enc"], H, W)
    assert cams.valid.tolist() == [True, False, True]
    conf = pred["depth_conf"]
    thr = float(np.median(conf))
    xyz, _ = point_cloud(pred["depth"][..., 0], conf, cams, np.zeros((F, H, W, 3), np.uint8), stride=2,
                         min_confidence=thr)
    want = sum(int((conf[f, ::2, ::2] >= thr).sum()) for f in (0, 2))
    assert 0 < len(xyz) == want < F * (H // 2) * (W // 2)
    data = json.loads(json.dumps(cameras_json(cams), allow_nan=False))
    assert data["frames"][1]["fx"] is None and data["frames"][1]["valid"] is False


def test_write_geometry_writes_four_files_the_ply_parses(tmp_path):
    rng = np.random.default_rng(2)
    pred = synthetic(rng)
    frames = rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8)
    paths = output_paths(tmp_path / "scene.mp4")
    assert [p.name for p in paths.all()] == ["scene.mp4", "scene_depth.npy", "scene_depth_conf.npy", "scene.ply",
                                             "scene_cameras.json"]
    counts = write_geometry(paths, frames, pred, stride=4, min_confidence=1.5)
    depth, conf = np.load(paths.depth), np.load(paths.depth_conf)
    assert depth.shape == conf.shape == (F, H, W) and depth.dtype == np.float32
    np.testing.assert_array_equal(depth, pred["depth"][..., 0])
    xyz, rgb, comments = read_ply(paths.points.read_bytes())
    assert len(xyz) == counts["points"] == int((conf[:, ::4, ::4] >= 1.5).sum()) and np.isfinite(xyz).all()
    assert "stride 4" in comments and "min_depth_confidence 1.5" in comments
    cams = json.loads(paths.cameras.read_text())
    assert len(cams["frames"]) == F and all(np.shape(c["c2w"]) == (4, 4) for c in cams["frames"])
    assert not list(Path(tmp_path).glob(".*tmp*")), "temporary files left behind"


def test_ply_header_states_the_vertex_count():
    xyz = np.arange(12, dtype=np.float32).reshape(4, 3)
    data = ply_bytes(xyz, np.full((4, 3), 7, np.uint8), ["hello"])
    got, rgb, comments = read_ply(data)
    np.testing.assert_array_equal(got, xyz)
    assert comments == ["hello"] and (rgb == 7).all()
    with pytest.raises(AssertionError, match="body of"):
        read_ply(data.replace(b"element vertex 4", b"element vertex 5"))


def test_non_finite_predictions_are_refused(tmp_path):
    pred = synthetic(np.random.default_rng(3))
    pred["pose_enc"][2, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite poses"):
        write_geometry(output_paths(tmp_path / "x.mp4"), np.zeros((F, H, W, 3), np.uint8), pred)
    assert not any(tmp_path.iterdir())


def test_frame_ranges():
    assert frame_ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10" and frame_ranges([]) == ""
