"""`wanport convert` of a FantasyWorld checkpoint as released: `model.pth` (a pickle, read weights-only with
--allow-pickle) whose state dict also holds the pipeline's base components (`pipe.text_encoder.*`,
`pipe.image_encoder.*`, `pipe.vae.*`), which the map's hook sets aside with one log line.

The source is the tiny released-layout writer's (`torch_ref.fantasyworld.checkpoint`); every converted tensor
is compared with the writer's own tensors re-laid by the map, and the round trip back to the released layout
is bit-exact.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from torch_ref.fantasyworld.checkpoint import (
    BASE_COMPONENT_SHAPES, CONFIG, PICKLE, SAFETENSORS, load_fantasyworld, read_released, torch_state,
    write_tiny_fantasyworld,
)
from wanport.cli import main
from weights.checkpoint import Checkpoint
from weights.configs.fantasyworld import FantasyWorldConfig
from weights.convert import convert
from weights.fantasyworld_map import FANTASYWORLD, FLAX, RELEASED, TORCH, fantasyworld_entries, relayout
from weights.safetensors_io import CheckpointError, CheckpointReader

CFG = FantasyWorldConfig.tiny()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_tiny_fantasyworld(tmp_path_factory.mktemp("fw") / "tiny", CFG, seed=2)


@pytest.fixture
def released(written, tmp_path):
    """A folder as a user has it after download: config.json and the pickled model.pth only."""
    src = tmp_path / "released"
    src.mkdir()
    for name in (CONFIG, PICKLE):
        shutil.copy(written / name, src / name)
    return src


def _convert(src, dst, to, capsys, *extra) -> None:
    rc = main(["convert", str(src), str(dst), "--to", to, "--allow-pickle", "--no-progress", *extra])
    assert rc == 0, capsys.readouterr().err


def test_released_pth_converts_to_every_layout_and_back_bit_exact(written, released, tmp_path, capsys, caplog):
    model = read_released(written / SAFETENSORS)  # the writer's tensors, base components set aside
    entries = fantasyworld_entries(CFG)
    caplog.set_level(logging.INFO, logger="wanport.checkpoint")
    for to in (FLAX, TORCH):
        _convert(released, tmp_path / to, to, capsys)
        keys = CheckpointReader(tmp_path / to).keys()
        assert not any(k.startswith("pipe.") and not k.startswith("pipe.dit.") for k in keys)
        ckpt = Checkpoint(tmp_path / to, FANTASYWORLD)
        assert (ckpt.layout, ckpt.config) == (to, CFG) and (tmp_path / to / "model.safetensors").is_file()
        want = relayout(model, entries, RELEASED, to)
        for e in ckpt.entries:
            np.testing.assert_array_equal(ckpt.get(e, to), want[e.name(to)], err_msg=e.name(to))
    # the one log line per read of model.pth: what was set aside, from which components, and why
    lines = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert len(lines) == 2, lines
    n = len(BASE_COMPONENT_SHAPES)
    assert f"set aside {n} tensor(s) (pipe.text_encoder.* 3, pipe.image_encoder.* 2, pipe.vae.* 2)" in lines[0]
    assert "wanport takes them from the base checkpoint" in lines[0]
    # back to the released names from the Flax folder: the released tensors exactly, without the base components
    _convert(tmp_path / FLAX, tmp_path / "back", RELEASED, capsys)
    back = read_released(tmp_path / "back" / "model.safetensors")
    assert back.keys() == model.keys()
    assert all(back[k].dtype == model[k].dtype and np.array_equal(back[k], model[k]) for k in model)
    assert main(["convert", "--verify", str(tmp_path / "back")]) == 0
    # the torch reference loads the torch-layout folder to the model the writer built
    ref = torch_state(load_fantasyworld(written))
    got = torch_state(load_fantasyworld(tmp_path / TORCH))
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)


def test_pickle_refused_without_allow_pickle(released, tmp_path, capsys):
    rc = main(["convert", str(released), str(tmp_path / "out"), "--to", "flax", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--allow-pickle" in err and not (tmp_path / "out").exists()


def test_bare_model_pth_is_checked_against_the_released_config(written, tmp_path, capsys, monkeypatch):
    """The released model.pth alone (no config.json): its config is the released model's. A file of another size is
    refused with the tensors that differ and the fix; with the released config (here patched to the tiny one) the
    file converts on its own."""
    pth = tmp_path / "model.pth"
    shutil.copy(written / PICKLE, pth)
    rc = main(["convert", str(pth), str(tmp_path / "out"), "--to", "flax", "--allow-pickle", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "out").exists()
    assert "mis-shaped" in err and "FantasyWorldConfig.full()" in err and "folder with its config.json" in err
    monkeypatch.setattr(FantasyWorldConfig, "full", classmethod(lambda cls: CFG))
    _convert(pth, tmp_path / "out", FLAX, capsys)
    assert Checkpoint(tmp_path / "out", FANTASYWORLD).config == CFG


def test_unknown_pipeline_component_is_named(written, tmp_path, capsys):
    """Only the base components are set aside: any other `pipe.*` module is reported as unexpected, by name."""
    src = tmp_path / "odd"
    src.mkdir()
    shutil.copy(written / CONFIG, src / CONFIG)
    state = torch.load(written / PICKLE, weights_only=True)
    state["pipe.motion_controller.linear.weight"] = torch.zeros(2, 2)
    torch.save(state, src / PICKLE)
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): pipe\.motion_controller\.linear\.weight"):
        convert(src, tmp_path / "out", "flax", allow_pickle=True)
    assert not (tmp_path / "out").exists()


def test_dit_only_options_refused(released, tmp_path):
    with pytest.raises(ValueError, match="FantasyWorld model; --lora and --dtype float8_e4m3fn are for Wan DiT"):
        convert(released, tmp_path / "out", "flax", allow_pickle=True, dtype="float8_e4m3fn")
    assert not (tmp_path / "out").exists()
