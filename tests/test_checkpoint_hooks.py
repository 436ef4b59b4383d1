"""The checkpoint engine's hooks (`weights.checkpoint.Checkpoint`, `weights.entry.FileKeys`): a weight map's
`canonical_keys` turns a file's names into the map's, `file_config` gives a single file its config.

A toy map of two tensors shows the engine's side (every file key named once or set aside, the one log line, the
config of a file); the real maps' hooks (FantasyWorld's base components, CLIP's buffers, UMT5's tied embedding)
are checked on their key lists.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from weights.checkpoint import Checkpoint
from weights.clip_map import canonical_keys as clip_keys
from weights.entry import Entry, FileKeys, WeightMap
from weights.fantasyworld_map import BASE_COMPONENTS, fantasyworld_file_keys
from weights.safetensors_io import CheckpointError, save_tensors
from weights.umt5_map import EMBED, EMBED_ALIAS
from weights.umt5_map import canonical_keys as umt5_keys

ENTRIES = [Entry("a.weight", None, "a.kernel", (2, 3), "linear"), Entry("b", None, "b", (3,), "copy")]
TENSORS = {"net.a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "net.b": np.ones(3, np.float32),
           "extra.buffer": np.zeros(1, np.float32)}


def strip_net(keys: list[str]) -> FileKeys:
    """The toy hook: `net.` stripped, `extra.*` set aside."""
    return FileKeys({k[4:]: k for k in keys if k.startswith("net.")}, prefix="net.",
                    dropped=tuple(k for k in keys if k.startswith("extra.")), why="not weights of the toy")


def toy(hook=strip_net, file_config=lambda shapes, layout: {"width": shapes["b"][0]}) -> WeightMap:
    return WeightMap(what="toy", subfolder="toy", signatures={"diffusers": ()}, entries=lambda cfg: ENTRIES,
                     read_config=lambda raw, keys, source: raw, canonical_keys=hook, file_config=file_config,
                     file_hint="Compared with the toy's shapes.")


@pytest.fixture
def file(tmp_path):
    save_tensors(tmp_path / "toy.safetensors", TENSORS)
    return tmp_path / "toy.safetensors"


def test_hook_names_prefix_and_one_log_line(file, tmp_path):
    lines: list[str] = []
    ckpt = Checkpoint(file, toy(), log=lines.append)
    assert (ckpt.prefix, ckpt.dropped, ckpt.config, ckpt.single_file) == ("net.", ("extra.buffer",), {"width": 3}, True)
    assert lines == [f"{file}: set aside 1 tensor(s) (extra.buffer.* 1): not weights of the toy"]
    np.testing.assert_array_equal(ckpt.get(ENTRIES[0], "flax"), TENSORS["net.a.weight"].T)
    # a folder reads the same names through the same hook, its config from config.json
    folder = tmp_path / "folder"
    folder.mkdir()
    save_tensors(folder / "diffusion_pytorch_model.safetensors", TENSORS)
    (folder / "config.json").write_text(json.dumps({"width": 3}))
    same = Checkpoint(folder, toy(), log=lines.append)
    assert (same.names, same.config, same.single_file) == (ckpt.names, {"width": 3}, False)


@pytest.mark.parametrize("hook,match", [
    (lambda keys: FileKeys({k[4:]: k for k in keys if k.startswith("net.")}), r"lost \['extra\.buffer'\]"),
    (lambda keys: FileKeys({"a.weight": "net.a.weight", "b": "net.b", "c": "net.b"}, dropped=("extra.buffer",)),
     r"used \['net\.b'\] twice"),
])
def test_a_hook_that_loses_or_reuses_a_key_is_a_map_bug(file, hook, match):
    """Nothing in a file may vanish between the file and the key check: a hook that forgets a key (it would be
    neither loaded nor reported) or hands one file tensor out twice is refused, naming the keys."""
    with pytest.raises(CheckpointError, match=match + ".*a bug in the weight map"):
        Checkpoint(file, toy(hook))


def test_without_the_hook_the_prefix_shows_as_unexpected(file):
    with pytest.raises(CheckpointError, match=r"missing 2 tensor\(s\): a\.weight, b \| unexpected 3 tensor\(s\)"):
        Checkpoint(file, toy(hook=None), config={"width": 3})


def test_single_file_config(file):
    with pytest.raises(CheckpointError, match="a single toy file has no config.json: put it in a folder"):
        Checkpoint(file, toy(file_config=None))
    wider = dataclasses.replace(toy(), entries=lambda cfg: [ENTRIES[0], Entry("b", None, "b", (cfg["width"] + 1,), "copy")])
    with pytest.raises(CheckpointError, match=r"mis-shaped 1 tensor\(s\): b: checkpoint \[3\], config expects \[4\]\. "
                                              r"Names are shown without the file's prefix 'net\.'\. Compared with the toy's shapes"):
        Checkpoint(file, wider)
    ckpt = Checkpoint(file, toy(), config={"width": 7})  # given: used as is (the shapes still checked)
    assert ckpt.config == {"width": 7}


def test_single_file_identity_follows_the_file(file):
    first = Checkpoint(file, toy()).identity()
    assert first == Checkpoint(file, toy()).identity() and first.startswith("stat:")
    save_tensors(file, {**TENSORS, "net.b": np.zeros(3, np.float32)})
    os.utime(file, ns=(1, 1))
    assert Checkpoint(file, toy()).identity() != first


def test_fantasyworld_hook_sets_aside_the_base_components_only():
    keys = ["pipe.dit.patch_embedding.weight", "IRGBlock.0.x_agg.norm1.weight", "vggt.projection_head.weight",
            "pipe.text_encoder.blocks.0.attn.q.weight", "pipe.image_encoder.model.visual.proj", "pipe.vae.model.conv1.weight",
            "pipe.motion_controller.linear.weight", "pipe.text_encoder_extra.x"]
    view = fantasyworld_file_keys(keys)
    assert set(view.dropped) == {k for k in keys if k.startswith(BASE_COMPONENTS)} and len(view.dropped) == 3
    assert set(view.names) == set(keys) - set(view.dropped) and all(view.names[k] == k for k in view.names)
    assert "base checkpoint" in view.why and view.prefix == ""


def test_encoder_hooks_set_aside_buffers_and_tied_copies():
    clip = clip_keys(["vision_model.embeddings.position_ids", "vision_model.post_layernorm.weight"])
    assert clip.names == {"post_layernorm.weight": "vision_model.post_layernorm.weight"}
    assert clip.dropped == ("vision_model.embeddings.position_ids",)
    both = umt5_keys([EMBED, EMBED_ALIAS, "encoder.final_layer_norm.weight"])
    assert both.names == {EMBED: EMBED, "encoder.final_layer_norm.weight": "encoder.final_layer_norm.weight"}
    assert both.dropped == (EMBED_ALIAS,)
    alias_only = umt5_keys([EMBED_ALIAS])
    assert alias_only.names == {EMBED: EMBED_ALIAS} and not alias_only.dropped
