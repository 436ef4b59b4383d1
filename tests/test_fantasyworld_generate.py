"""`wanport generate --fantasyworld` end to end on the tiny FantasyWorld checkpoint, its refusals, and the sampling
step (guidance, heads on the conditional pass of the last step) against direct model calls.

The end-to-end run (slow: it compiles the joint model with its heads) writes the mp4, the depth maps, the point
cloud and the cameras; the point cloud is checked against a count and coordinates recomputed here from the
saved depth, confidence and cameras, and parsed by the test's own PLY reader."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_impl.media import read_mp4
from tests.test_fantasyworld_outputs import read_ply
from torch_ref.fantasyworld.checkpoint import write_tiny_fantasyworld_pipeline
from wanport.cli import main
from wanport.commands.demo import DEMO_IMAGE, DEMO_TRAJECTORY
from weights.configs.fantasyworld import FantasyWorldConfig

CFG = FantasyWorldConfig.tiny()  # 9 frames of 48x64
STEPS = 2


@pytest.fixture(scope="module")
def fw_ckpt(tmp_path_factory) -> Path:
    return write_tiny_fantasyworld_pipeline(tmp_path_factory.mktemp("fw") / "ckpt", seed=0)


def fw_args(ckpt: Path, out: Path, *extra: str, camera: Path | None = DEMO_TRAJECTORY) -> list[str]:
    args = ["generate", "--fantasyworld", "--checkpoint", str(ckpt), "--image", str(DEMO_IMAGE), "--prompt", "a room",
            "--steps", str(STEPS), "--out", str(out)]
    return args + (["--camera", str(camera)] if camera is not None else []) + list(extra)


def trajectory(tmp_path: Path, frames: int) -> Path:
    path = tmp_path / f"traj{frames}.json"
    cams = np.tile(np.eye(4), (frames, 1, 1))
    cams[:, 2, 3] = np.linspace(0, 1, frames)
    path.write_text(json.dumps({"focal_length": 300, "cameras_interp": cams.tolist()}))
    return path


# ------------------------------------------------------------------------------------------------ refusals
def refused(capsys, args: list[str], match: str, out_dir: Path) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not [p for p in out_dir.iterdir() if p.is_file() and p.suffix in (".mp4", ".npy", ".ply", ".json")
                and "traj" not in p.name], "nothing may be written"


def test_camera_without_fantasyworld_and_fantasyworld_without_camera(fw_ckpt, tmp_path, capsys):
    plain = ["generate", "--checkpoint", str(fw_ckpt), "--image", str(DEMO_IMAGE), "--prompt", "x",
             "--out", str(tmp_path / "v.mp4")]
    refused(capsys, plain + ["--camera", str(DEMO_TRAJECTORY)], "--camera only applies with --fantasyworld", tmp_path)
    refused(capsys, plain + ["--point-stride", "2"], "--point-stride only applies with --fantasyworld", tmp_path)
    refused(capsys, fw_args(fw_ckpt, tmp_path / "v.mp4", camera=None), "--fantasyworld needs --camera", tmp_path)


def test_frames_must_match_the_trajectory(fw_ckpt, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    refused(capsys, fw_args(fw_ckpt, out, "--frames", "5"), "trajectory has 9 cameras, the video has 5 frames", tmp_path)
    refused(capsys, fw_args(fw_ckpt, out, camera=trajectory(tmp_path, 8)), "8 cameras, one per video frame", tmp_path)


def test_not_a_fantasyworld_checkpoint(tiny_ckpt, tmp_path, capsys):
    plain = tiny_ckpt("tiny-wan2.1-i2v-14b")
    refused(capsys, fw_args(plain, tmp_path / "v.mp4"), "not a FantasyWorld checkpoint (it is a plain Wan pipeline",
            tmp_path)


@pytest.mark.parametrize("extra,match", [
    (["--resume"], "--resume does not go with --fantasyworld"),
    (["--batch", "2"], "one video per run"),
    (["--scheduler", "unipc"], "drop --scheduler unipc"),
    (["--camera-scale", "0"], "--camera-scale must be a positive number"),
    (["--point-stride", "0"], "--point-stride must be an integer >= 1"),
    (["--frames-per-block", "3"], "--frames-per-block only applies with --causal"),
    (["--guidance-steps", "2", "--cfg-reuse"], "--cfg-reuse does not go with --fantasyworld"),
    (["--skip-steps", "1"], "--skip-steps does not go with --fantasyworld"),
])
def test_options_fantasyworld_does_not_take(fw_ckpt, tmp_path, capsys, extra, match):
    refused(capsys, fw_args(fw_ckpt, tmp_path / "v.mp4", *extra), match, tmp_path)


def test_output_paths_are_checked_before_work(fw_ckpt, tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file")
    refused(capsys, fw_args(fw_ckpt, tmp_path / "v.avi"), "must end in .mp4", tmp_path)
    refused(capsys, fw_args(fw_ckpt, tmp_path / "blocker" / "v.mp4"), "is a file, so no folder", tmp_path)
    (tmp_path / "v_depth.npy").mkdir()  # a derived output that cannot be written as a file
    refused(capsys, fw_args(fw_ckpt, tmp_path / "v.mp4"), "v_depth.npy is a folder", tmp_path)


def test_make_tiny_and_demo_refusals(tmp_path, capsys):
    assert main(["make-tiny", "--fantasyworld", "--preset", "tiny-wan2.1-i2v-14b", "--out", str(tmp_path / "a")]) == 2
    assert "drop --preset" in capsys.readouterr().err
    assert main(["make-tiny", "--out", str(tmp_path / "b")]) == 2
    assert "give --preset" in capsys.readouterr().err
    assert main(["demo", "--fantasyworld", "--frames", "17", "--out", str(tmp_path / "c")]) == 2
    assert "--frames does not go with --fantasyworld" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def run(fw_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("fw_run") / "scene.mp4"
    assert main(fw_args(fw_ckpt, out)) == 0
    return out


@pytest.mark.slow
def test_end_to_end_writes_all_four_outputs(run):
    folder = run.parent
    assert sorted(p.name for p in folder.iterdir()) == ["scene.mp4", "scene.ply", "scene_cameras.json",
                                                        "scene_depth.npy", "scene_depth_conf.npy"]
    frames, fps = read_mp4(run)
    assert frames.shape == (CFG.frames, CFG.height, CFG.width, 3) and fps == 16
    depth, conf = np.load(folder / "scene_depth.npy"), np.load(folder / "scene_depth_conf.npy")
    assert depth.shape == conf.shape == (CFG.frames, CFG.height, CFG.width)
    assert depth.dtype == conf.dtype == np.float32 and (depth > 0).all() and (conf > 1).all()
    cams = json.loads((folder / "scene_cameras.json").read_text())
    assert (cams["width"], cams["height"], len(cams["frames"])) == (CFG.width, CFG.height, CFG.frames)
    assert all(np.shape(c["c2w"]) == (4, 4) and c["frame"] == i for i, c in enumerate(cams["frames"]))
    assert np.allclose(cams["frames"][0]["c2w"], np.eye(4))


@pytest.mark.slow
def test_point_cloud_is_the_saved_depth_through_the_saved_cameras(run):
    """Count and coordinates recomputed here from the saved files: every 4th row and column (the default stride)
    of each frame with a valid camera, depth confidence >= 1.0 (the default), unprojected with the JSON's
    intrinsics and camera-to-world matrices."""
    folder = run.parent
    depth, conf = np.load(folder / "scene_depth.npy"), np.load(folder / "scene_depth_conf.npy")
    cams = json.loads((folder / "scene_cameras.json").read_text())["frames"]
    xyz, rgb, comments = read_ply((folder / "scene.ply").read_bytes())
    assert np.isfinite(xyz).all() and "stride 4" in comments
    want = []
    for f, cam in enumerate(cams):
        if not cam["valid"]:
            continue
        v, u = np.meshgrid(np.arange(0, CFG.height, 4), np.arange(0, CFG.width, 4), indexing="ij")
        d = depth[f, ::4, ::4]
        p = np.stack([(u - cam["cx"]) * d / cam["fx"], (v - cam["cy"]) * d / cam["fy"], d], axis=-1)
        c2w = np.asarray(cam["c2w"])
        want.append((p @ c2w[:3, :3].T + c2w[:3, 3])[conf[f, ::4, ::4] >= 1.0])
    want = np.concatenate(want)
    assert 0 < len(xyz) == len(want)
    np.testing.assert_allclose(xyz, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_confidence_threshold_filters_the_saved_predictions(run, tmp_path):
    """The run's own predictions written again with the median confidence as threshold: about half the points go."""
    from jax_impl.fantasyworld.outputs import output_paths, write_geometry

    folder = run.parent
    depth, conf = np.load(folder / "scene_depth.npy"), np.load(folder / "scene_depth_conf.npy")
    cams = json.loads((folder / "scene_cameras.json").read_text())["frames"]
    pred = {"depth": depth[..., None], "depth_conf": conf, "pose_enc": np.array([c["pose_enc"] for c in cams])}
    thr = float(np.median(conf[:, ::4, ::4]))
    frames = read_mp4(run)[0]
    write_geometry(output_paths(tmp_path / "again.mp4"), frames, pred, min_confidence=thr)
    xyz, _, _ = read_ply((tmp_path / "again.ply").read_bytes())
    valid = np.array([c["valid"] for c in cams])
    want = int(((conf[:, ::4, ::4] >= thr) & valid[:, None, None]).sum())
    assert 0 < len(xyz) == want < int(valid.sum()) * 12 * 16


@pytest.mark.slow
def test_step_is_guided_euler_with_heads_on_the_conditional_pass(fw_ckpt):
    """One `fantasyworld_step` (CFG batched, heads on) against direct model calls: the latents move by
    (sigma_1 - sigma_0) (v_neg + g (v_pos - v_neg)), and the predictions are the conditional pass's heads."""
    from jax_impl import schedulers
    from jax_impl.conditioning import ConcatCondition
    from jax_impl.fantasyworld.pipeline import FantasyWorldPipeline, camera_rays, default_settings, fantasyworld_step
    from jax_impl.media import load_image
    from jax_impl.settings import GenerateSettings
    from jax_impl.sampling import DenoiseInputs
    from weights.trajectory import read_trajectory

    pipe = FantasyWorldPipeline(fw_ckpt)  # as the run above, same shapes: its compiled step is reused
    model = pipe.model
    settings = GenerateSettings(**default_settings(CFG))
    enc = pipe.encode(settings, prompt="a room", image=load_image(DEMO_IMAGE), negative_prompt="blurry")
    noise = jnp.asarray(np.random.default_rng(0).standard_normal(pipe.base.latent_shape(settings)), jnp.float32)
    mask = jnp.asarray(enc.condition.mask_latent)
    inputs = DenoiseInputs(*(jnp.asarray(enc[k]) for k in ("prompt_embeds", "negative_prompt_embeds", "image_embeds")),
                           condition=ConcatCondition(mask))
    rays = camera_rays(read_trajectory(DEMO_TRAJECTORY), CFG.height, CFG.width)
    sched = schedulers.diffsynth_schedule(5.0, STEPS)
    t, scale = jnp.float32(sched.timesteps[0]), 5.0
    graphdef, params = nnx.split(model)
    state, pred, bad = fantasyworld_step(graphdef, params, schedulers.init_state(sched, noise), jnp.int32(0), t, inputs,
                                         rays, jnp.float32(scale), jnp.bool_(True), jnp.int32(-1), guided=True,
                                         cfg_batch=True)
    x = jnp.concatenate([noise, mask], axis=-1)
    call = nnx.jit(lambda m, text: m(x, t[None], text, inputs.image, rays, heads=True)[:2])  # one compile for both
    v_pos, want = call(model, inputs.text)
    v_neg, _ = call(model, inputs.negative_text)
    expect = noise + (sched.sigmas[1] - sched.sigmas[0]) * (v_neg + scale * (v_pos - v_neg))
    np.testing.assert_allclose(np.asarray(state.sample), np.asarray(expect), rtol=1e-4, atol=1e-5)
    for k in want:
        np.testing.assert_allclose(np.asarray(pred[k]), np.asarray(want[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    assert int(bad) == -1
    other, _, _ = fantasyworld_step(graphdef, params, schedulers.init_state(sched, noise), jnp.int32(0), t, inputs,
                                    camera_rays(read_trajectory(DEMO_TRAJECTORY), CFG.height, CFG.width, scale=0.1),
                                    jnp.float32(scale), jnp.bool_(True), jnp.int32(-1), guided=True, cfg_batch=True)
    assert not np.allclose(np.asarray(other.sample), np.asarray(state.sample), atol=1e-4), "the camera must matter"


@pytest.mark.slow
def test_demo_runs_fantasyworld_end_to_end(run, tmp_path, capsys):
    """`wanport demo --fantasyworld`: the tiny checkpoint and the bundled 9-frame run (after `run`, whose compiled
    functions it reuses: the same tiny model and shapes)."""
    out = tmp_path / "demo"
    assert main(["demo", "--fantasyworld", "--out", str(out), "--steps", str(STEPS)]) == 0
    assert (out / "checkpoint" / "fantasyworld" / "config.json").is_file()
    names = {"video.mp4", "video_depth.npy", "video_depth_conf.npy", "video.ply", "video_cameras.json"}
    assert names <= {p.name for p in out.iterdir()}
    xyz, _, _ = read_ply((out / "video.ply").read_bytes())
    assert f"({len(xyz)} points)" in capsys.readouterr().out
