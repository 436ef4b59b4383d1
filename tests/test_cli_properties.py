"""Property tests over the `wanport generate` and `wanport convert` option spaces (issue 15).

Whatever options are drawn, the command ends in one of two ways: exit 0 with a valid output (an mp4 with
the requested frames and size; a converted folder that verifies against its manifest and opens), or exit 2
with a one-line message and nothing new on disk. Never a traceback, never a half-written output.

Each option is drawn from a pool of valid and a pool of invalid values, so most examples are invalid and
fail fast; full runs are capped, because each costs a second or more.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from wanport.cli import main

MAX_FULL_RUNS = {"generate": 6, "convert": 15}  # a tiny generate run takes a second or more, a convert 0.1 s


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _pick(data, valid: list, invalid: list, p_invalid: float, label: str):
    """A value from `invalid` with probability about `p_invalid` (drawn through hypothesis), else from `valid`."""
    bad = invalid and data.draw(st.integers(0, 99), label=f"{label}?") < p_invalid * 100
    return data.draw(st.sampled_from(invalid if bad else valid), label=label), bool(bad)


def _check_outcome(rc: int, err: str, command: str, before: list[str], root: Path) -> None:
    event(f"exit {rc}" + (": " + re.sub(r"/\S+", "PATH", err.split("error: ")[-1])[:60] if rc else ""))
    if rc == 0:
        return
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}: {err}"
    assert len(lines) == 1 and lines[0].startswith(f"wanport {command}: error: "), err
    assert _listing(root) == before, "an error left files behind"


@pytest.fixture(scope="module")
def gen_env(tiny_ckpt, tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("gen-props")
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(root / "img.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return {"root": root, "ckpts": {"i2v": tiny_ckpt("tiny-wan2.1-i2v-14b"), "t2v": tiny_ckpt("tiny-wan2.1-t2v-1.3b")},
            "full_runs": 0, "n": 0}


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_generate_options_end_in_a_video_or_a_one_line_error(gen_env, capsys, data):
    root = gen_env["root"]
    gen_env["n"] += 1
    ex = root / f"ex{gen_env['n']}"
    ex.mkdir()
    (ex / "file.txt").write_text("x")
    (ex / "folder").mkdir()
    picks = {}
    picks["ckpt"] = _pick(data, ["i2v"], ["t2v"], 0.2, "checkpoint")
    picks["image"] = _pick(data, ["img.png"], [None, "broken.png", "missing.png"], 0.15, "image")
    picks["last_image"] = _pick(data, [None], ["img.png"], 0.05, "last-image")
    picks["prompt"] = _pick(data, ["a cat", "ünïcode 猫 &amp; <b>"], [None], 0.1, "prompt")
    picks["frames"] = _pick(data, ["5", "1"], ["0", "-3", "6"], 0.1, "frames")
    picks["height"] = _pick(data, ["32"], ["0", "40", "-32"], 0.1, "height")
    picks["width"] = _pick(data, ["32"], ["8", "33"], 0.1, "width")
    picks["steps"] = _pick(data, ["1", "2"], ["0", "-1", "1001"], 0.1, "steps")
    picks["guidance"] = _pick(data, ["0", "1", "4.5"], ["nan", "inf", "-inf", "-1"], 0.15, "guidance")
    picks["guidance_2"] = _pick(data, [None], ["2", "nan"], 0.05, "guidance-2")
    picks["shift"] = _pick(data, [None, "3", "0.5"], ["0", "-1", "nan", "inf"], 0.1, "shift")
    picks["scheduler"] = _pick(data, [None, "unipc", "euler"], [], 0.0, "scheduler")
    picks["seed"] = _pick(data, ["0", "12345"], ["-1", str(2**32)], 0.1, "seed")
    picks["fps"] = _pick(data, ["16", "1"], ["0", "1001"], 0.05, "fps")
    picks["batch"] = _pick(data, ["1"], ["0", "-2"], 0.05, "batch")
    picks["dtype"] = _pick(data, [None, "float32"], [], 0.0, "dtype")
    picks["out"] = _pick(data, ["out/v.mp4", "v.mp4"], ["folder", "file.txt/v.mp4", "v.png"], 0.1, "out")
    picks["causal"] = _pick(data, [None], ["1", "2", "0"], 0.05, "causal")
    if not any(bad for _, bad in picks.values()) and gen_env["full_runs"] >= MAX_FULL_RUNS["generate"]:
        picks["frames"] = (data.draw(st.sampled_from(["0", "6"]), label="capped frames"), True)
    value = {k: v for k, (v, _) in picks.items()}
    argv = ["generate", "--checkpoint", str(gen_env["ckpts"][value["ckpt"]])]
    for key in ("image", "last_image"):
        if value[key] is not None:
            argv += [f"--{key.replace('_', '-')}", str(root / value[key])]
    for key in ("prompt", "frames", "height", "width", "steps", "guidance", "guidance_2", "shift", "scheduler",
                "seed", "fps", "batch", "dtype"):
        if value[key] is not None:  # --flag=value: argparse takes "-inf" after a bare flag for another option
            argv += [f"--{key.replace('_', '-')}={value[key]}"]
    if value["causal"] is not None:
        argv += ["--causal", "--frames-per-block", value["causal"]]
    argv += ["--out", str(ex / value["out"])]

    before = _listing(ex)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    _check_outcome(rc, err, "generate", before, ex)
    if rc == 0:
        from jax_impl.media import read_mp4

        gen_env["full_runs"] += 1
        frames, fps = read_mp4(ex / value["out"])
        assert frames.shape == (int(value["frames"]), int(value["height"]), int(value["width"]), 3)
        assert fps == float(value["fps"])
    shutil.rmtree(ex)


@pytest.fixture(scope="module")
def conv_env(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("conv-props")
    src = tiny_ckpt("tiny-wan2.1-t2v-1.3b")
    damaged = root / "damaged"
    shutil.copytree(src, damaged)
    vae = damaged / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-64])
    return {"root": root, "srcs": {"pipeline": src, "model": src / "transformer", "damaged": damaged,
                                   "missing": root / "missing", "file": src / "model_index.json"},
            "full_runs": 0, "n": 0}


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_convert_options_end_in_a_verified_folder_or_a_one_line_error(conv_env, capsys, data):
    from weights.convert import verify
    from weights.checkpoint import Checkpoint
    from weights.dit_map import DIT

    conv_env["n"] += 1
    ex = conv_env["root"] / f"ex{conv_env['n']}"
    ex.mkdir()
    (ex / "file.txt").write_text("x")
    (ex / "existing").mkdir()
    (ex / "existing" / "keep.txt").write_text("keep")
    src, src_bad = _pick(data, ["pipeline", "model"], ["damaged", "missing", "file"], 0.15, "src")
    dst, dst_bad = _pick(data, ["dst", "existing"], ["file.txt/dst", "src-inside"], 0.1, "dst")
    to, _ = _pick(data, ["flax", "diffusers", "wan"], [], 0.0, "to")
    dtype, _ = _pick(data, [None, "float32", "bfloat16"], [], 0.0, "dtype")
    shard, shard_bad = _pick(data, [None, "20KB"], ["0", "-5", "abc", "1XB"], 0.1, "shard-size")
    force = data.draw(st.booleans(), label="force")
    exists_without_force = dst == "existing" and not force
    valid = not (src_bad or dst_bad or shard_bad or exists_without_force)
    if valid and conv_env["full_runs"] >= MAX_FULL_RUNS["convert"]:
        shard = "0"
    src_path = conv_env["srcs"][src]
    dst_path = src_path / "inside" if dst == "src-inside" else ex / dst
    argv = ["convert", str(src_path), str(dst_path), "--to", to, "--no-progress"]
    argv += ["--dtype", dtype] if dtype else []
    argv += ["--shard-size", shard] if shard else []
    argv += ["--force"] if force else []

    before = _listing(ex)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    _check_outcome(rc, err, "convert", before, ex)
    if rc == 0:
        conv_env["full_runs"] += 1
        assert verify(dst_path) == []
        model = dst_path / "transformer" if src == "pipeline" else dst_path
        assert Checkpoint(model, DIT).layout == to
        assert not (dst_path / "keep.txt").exists()  # a forced replacement leaves nothing of the old folder
    assert not (src_path / "inside").exists()
    shutil.rmtree(ex)
