"""FantasyWorld's trajectory files, the released ray convention, and the config's JSON and checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from weights.configs.base import ConfigError
from torch_ref.fantasyworld.camera import plucker_rays
from weights.configs.fantasyworld import FantasyWorldConfig
from weights.trajectory import TrajectoryError, ray_cameras, read_trajectory, released_ray_intrinsics


def forward_walk(frames: int, step: float = 0.1) -> np.ndarray:
    """A camera walking along its own optical axis, starting rotated and away from the world origin."""
    a = 0.3
    start = np.eye(4)
    start[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    start[:3, 3] = [2.0, -1.0, 5.0]
    out = []
    for i in range(frames):
        local = np.eye(4)
        local[2, 3] = step * i
        out.append(start @ local)
    return np.stack(out)


def test_relative_poses_scale_and_released_intrinsics(tmp_path):
    path = tmp_path / "walk.json"
    path.write_text(json.dumps({"focal_length": 500, "scale": 1, "cameras": [], "cameras_interp": forward_walk(9).tolist()}))
    traj = read_trajectory(path, frames=9)
    c2w, k = ray_cameras(traj, 336, 592, scale=2.0)
    assert np.allclose(c2w[0], np.eye(4))
    assert np.allclose(c2w[:, :3, :3], np.eye(3), atol=1e-6)
    assert np.allclose(c2w[:, :3, 3], [[0, 0, 0.05 * i] for i in range(9)], atol=1e-6)  # 0.1 per frame / scale 2
    assert np.allclose(k, [296000, 168000, 175232, 56448])
    pixel = ray_cameras(traj, 336, 592, released=False)[1]
    assert np.allclose(pixel[0], [500, 500, 296, 168])


def test_released_rays_are_nearly_parallel():
    """The convention the docs describe: at 336x592, f=500, every ray of a frame points about (-0.592, -0.336, 1)."""
    k = torch.from_numpy(released_ray_intrinsics(500.0, 336, 592)[None].astype(np.float32))
    d = plucker_rays(torch.eye(4)[None], k, 336, 592)[0, ..., 3:]
    want = torch.tensor([-0.592, -0.336, 1.0])
    assert torch.allclose(d, want / want.norm(), atol=3e-3)
    assert float(d[..., 0].max() - d[..., 0].min()) < 3e-3


@pytest.mark.parametrize("doc,frames,match", [
    ({"focal_length": 500}, None, "cameras_interp"),
    ({"cameras_interp": forward_walk(3).tolist()}, 4, "has 3 cameras, the video has 4"),
    ({"focal_length": -1, "cameras_interp": forward_walk(2).tolist()}, None, "focal_length"),
    ({"cameras_interp": [[[1, 0, 0], [0, 1, 0], [0, 0, 1]]]}, None, "4x4"),
    ({"cameras_interp": (forward_walk(2) * [[2], [1], [1], [1]]).tolist()}, None, r"camera\(s\) \[0, 1\] are not rigid"),
])
def test_bad_trajectories_are_named(doc, frames, match):
    with pytest.raises(TrajectoryError, match=match):
        read_trajectory(doc, frames=frames)


def test_default_focal_is_the_public_default():
    assert read_trajectory({"cameras_interp": forward_walk(1).tolist()}).focal_length == 500.0


def test_config_json_round_trip_and_checks(tmp_path):
    tiny = FantasyWorldConfig.tiny()
    tiny.to_json(tmp_path / "config.json")
    assert FantasyWorldConfig.from_json(tmp_path / "config.json") == tiny
    full = FantasyWorldConfig.full()
    assert (full.joint_layers, full.adapter_hidden, full.adapter_shift_hidden, full.bicross_rope_split()) == (24, 1024, 409, (32, 32, 32))
    with pytest.raises(ConfigError, match="branch_start=4"):
        tiny.replace(branch_start=4)
    with pytest.raises(ConfigError, match="dpt_layers"):
        tiny.replace(dpt_layers=(2, 1, 0, 0))
    raw = tiny.to_dict() | {"bogus": 1}
    with pytest.raises(ConfigError, match="bogus"):
        FantasyWorldConfig.from_dict(raw)
