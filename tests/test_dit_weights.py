"""The DiT weight map: loading tensor by tensor, Flax checkpoint round trip, key checks."""

import hashlib
import json

import numpy as np
import pytest

from jax_impl.loading import load_dit, save_dit
from weights.checkpoint import Checkpoint
from weights.dit_map import DIT, dit_entries
from weights.safetensors_io import CheckpointError, CheckpointReader, load_tensors, save_tensors


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


@pytest.mark.parametrize("preset", ["tiny-wan2.1-i2v-14b", "tiny-wan2.2-ti2v-5b"])
def test_flax_checkpoint_round_trip_is_bit_exact(tiny_ckpt, tmp_path, preset):
    src = tiny_ckpt(preset) / "transformer"
    model = load_dit(src)
    save_dit(model, tmp_path / "flax")
    flax = CheckpointReader(tmp_path / "flax")
    torch_side = CheckpointReader(src)
    entries = dit_entries(model.cfg)
    assert sorted(flax.keys()) == sorted(e.flax for e in entries)
    for e in entries:
        back = e.from_flax(flax.get(e.flax))
        assert _digest(back) == _digest(torch_side.get(e.diffusers)), e.diffusers
    # and loading the Flax checkpoint gives the same model, saved again identically
    again = load_dit(tmp_path / "flax")
    save_dit(again, tmp_path / "flax2")
    a, b = load_tensors(tmp_path / "flax" / "flax_model.safetensors")[0], load_tensors(tmp_path / "flax2" / "flax_model.safetensors")[0]
    assert {k: _digest(v) for k, v in a.items()} == {k: _digest(v) for k, v in b.items()}


def test_sharded_checkpoint_loads_identically(tiny_ckpt):
    whole = load_dit(tiny_ckpt("tiny-wan2.1-t2v-1.3b") / "transformer")
    sharded_dir = tiny_ckpt("tiny-wan2.1-t2v-1.3b", max_shard_size="20KB") / "transformer"
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1
    assert (sharded_dir / "diffusion_pytorch_model.safetensors.index.json").is_file()
    sharded = load_dit(sharded_dir)
    np.testing.assert_array_equal(np.asarray(whole.blocks.ffn.fc1.kernel.value), np.asarray(sharded.blocks.ffn.fc1.kernel.value))


def test_bf16_load_keeps_float32_islands(tiny_ckpt):
    import jax.numpy as jnp

    m = load_dit(tiny_ckpt("tiny-wan2.1-t2v-1.3b") / "transformer", dtype=jnp.bfloat16)
    assert m.blocks.self_attn.q.kernel.value.dtype == jnp.bfloat16
    assert m.blocks.modulation.value.dtype == jnp.float32
    assert m.time_embed.fc1.kernel.value.dtype == jnp.float32


def _rewrite(src, dst, edit):
    """Copy a single-file checkpoint folder with its tensors edited by `edit(dict)`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors, meta = load_tensors(src / "diffusion_pytorch_model.safetensors")
    edit(tensors)
    save_tensors(dst / "diffusion_pytorch_model.safetensors", tensors, meta)
    return dst


def test_missing_unexpected_misshaped_keys_are_named(tiny_ckpt, tmp_path):
    src = tiny_ckpt("tiny-wan2.1-t2v-1.3b") / "transformer"
    missing = _rewrite(src, tmp_path / "missing", lambda t: t.pop("blocks.1.ffn.net.2.bias"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): blocks.1.ffn.net.2.bias"):
        Checkpoint(missing, DIT)
    extra = _rewrite(src, tmp_path / "extra", lambda t: t.update({"blocks.9.attn1.to_q.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): blocks.9.attn1.to_q.weight"):
        Checkpoint(extra, DIT)
    bad = _rewrite(src, tmp_path / "bad", lambda t: t.update({"proj_out.weight": np.zeros((64, 30), np.float32)}))
    with pytest.raises(CheckpointError, match=r"proj_out.weight: checkpoint \[64, 30\], config expects \[64, 32\]"):
        Checkpoint(bad, DIT)


def test_config_that_does_not_match_weights(tiny_ckpt, tmp_path):
    src = tiny_ckpt("tiny-wan2.1-t2v-1.3b") / "transformer"
    dst = _rewrite(src, tmp_path / "deeper", lambda t: None)
    cfg = json.loads((dst / "config.json").read_text()) | {"num_layers": 3}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing 27 tensor.*blocks.2.*config.json belongs to these weights"):
        Checkpoint(dst, DIT)


def test_pipeline_folder_hint(tiny_ckpt):
    with pytest.raises(CheckpointError, match="did you mean .*transformer"):
        Checkpoint(tiny_ckpt("tiny-wan2.1-t2v-1.3b"), DIT)


def test_tiny_checkpoint_is_deterministic_and_refuses_overwrite(tmp_path):
    from torch_ref.checkpoints import write_tiny_checkpoint

    a = write_tiny_checkpoint("tiny-wan2.1-t2v-1.3b", tmp_path / "a", seed=3)
    b = write_tiny_checkpoint("tiny-wan2.1-t2v-1.3b", tmp_path / "b", seed=3)
    c = write_tiny_checkpoint("tiny-wan2.1-t2v-1.3b", tmp_path / "c", seed=4)
    ra, rb, rc = (CheckpointReader(p / "transformer") for p in (a, b, c))
    assert all(np.array_equal(ra.get(k), rb.get(k)) for k in ra.keys())
    assert not np.array_equal(ra.get("proj_out.weight"), rc.get("proj_out.weight"))
    index = json.loads((a / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    with pytest.raises(FileExistsError, match="--force"):
        write_tiny_checkpoint("tiny-wan2.1-t2v-1.3b", a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
