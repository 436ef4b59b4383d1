"""`wanport convert`: exact round trips in every direction, sharding, pipelines, safety, the manifest."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from weights.configs.presets import PRESETS
from wanport.cli import main as cli_main
from wanport.commands.convert import add_parser
from weights.convert import DELAY_ENV, convert, is_dit_folder, parse_size, plan_shards
from weights.checkpoint import Checkpoint
from weights.dit_map import DIT, LAYOUTS
from weights.manifest import MANIFEST_NAME, read_manifest, verify
from weights.safetensors_io import CheckpointError, CheckpointReader, TensorSpec, load_tensors, save_tensors

ROOT = Path(__file__).resolve().parents[1]
TINY = sorted(n for n in PRESETS if n.startswith("tiny-"))
PAIRS = list(itertools.permutations(LAYOUTS, 2))


def tensor_hashes(folder: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{tensor: (dtype, shape, sha256 of stored bytes)} over every DiT folder below `folder` (the converted part;
    other pipeline components are copied, which test_pipeline_other_files_copied_unchanged checks)."""
    out = {}
    for cfg in sorted(folder.rglob("config.json")):
        if not is_dit_folder(cfg.parent):
            continue
        r = CheckpointReader(cfg.parent)
        rel = cfg.parent.relative_to(folder).as_posix()
        for k in r.keys():
            x = r.get(k, copy=False)
            out[f"{rel}:{k}"] = (str(x.dtype), x.shape, hashlib.sha256(x.reshape(-1).view(np.uint8)).hexdigest())
    return out


def leftovers(dst: Path) -> list[str]:
    return [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.fixture(scope="module")
def layouts(tiny_ckpt, tmp_path_factory):
    """layouts(preset) -> {layout: pipeline folder in that layout}, converted once from diffusers' own output."""
    root = tmp_path_factory.mktemp("layouts")
    cache: dict[str, dict[str, Path]] = {}

    def get(preset: str) -> dict[str, Path]:
        if preset not in cache:
            src = tiny_ckpt(preset)
            cache[preset] = {"diffusers": src}
            for to in ("flax", "wan"):
                cache[preset][to] = convert(src, root / f"{preset}-{to}", to)
        return cache[preset]

    return get


# --- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", TINY)
def test_every_direction_round_trips_bit_exact(layouts, tmp_path, preset):
    ckpts = layouts(preset)
    ref = {lay: tensor_hashes(p) for lay, p in ckpts.items()}
    n_models = PRESETS[preset].num_experts
    assert len({k.split(":")[0] for k in ref["flax"]}) == n_models  # both experts of A14B converted
    for a, b in PAIRS:
        there = convert(ckpts[a], tmp_path / f"{a}-{b}", b)
        back = convert(there, tmp_path / f"{a}-{b}-{a}", a)
        assert tensor_hashes(there) == ref[b], f"{a} -> {b} differs from the reference {b} conversion"
        assert tensor_hashes(back) == ref[a], f"{a} -> {b} -> {a} is not bit-exact"
        assert verify(back) == []


def test_layouts_differ_and_keep_their_config_format(layouts):
    ckpts = layouts("tiny-wan2.1-i2v-14b")
    wan_cfg = json.loads((ckpts["wan"] / "transformer" / "config.json").read_text())
    assert wan_cfg["_class_name"] == "WanModel" and "dim" in wan_cfg
    flax_cfg = json.loads((ckpts["flax"] / "transformer" / "config.json").read_text())
    assert flax_cfg["_class_name"] == "WanTransformer3DModel"
    wan_keys = set(CheckpointReader(ckpts["wan"] / "transformer").keys())
    assert any(k.startswith("img_emb.") for k in wan_keys) and "head.head.weight" in wan_keys
    for lay in LAYOUTS:  # the image branch is detected back from the img_emb keys
        assert Checkpoint(ckpts[lay] / "transformer", DIT).config.has_image_tokens


def test_pipeline_other_files_copied_unchanged(tiny_ckpt, tmp_path):
    src = tmp_path / "pipe"
    shutil.copytree(tiny_ckpt("tiny-wan2.2-i2v-a14b"), src)
    shutil.rmtree(src / "vae")  # replaced by an odd component: non-safetensors files are copied too
    (src / "vae").mkdir()
    (src / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKLWan"}')
    (src / "vae" / "weights.bin").write_bytes(os.urandom(1000))
    (src / "README.md").write_text("hello")
    out = convert(src, tmp_path / "out", "flax")
    for rel in ("model_index.json", "vae/config.json", "vae/weights.bin", "README.md"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert (out / "transformer_2" / "flax_model.safetensors").is_file()
    m = read_manifest(out)
    assert "vae/weights.bin" in m["files"] and "transformer_2/flax_model.safetensors" in m["tensors"]


@pytest.mark.parametrize("to", LAYOUTS)
def test_sharded_output_and_input(tiny_ckpt, tmp_path, to):
    src = tiny_ckpt("tiny-wan2.1-i2v-14b")
    out = convert(src, tmp_path / "sharded", to, shard_size="40KB")
    folder = out / "transformer"
    stem = "flax_model" if to == "flax" else "diffusion_pytorch_model"
    shards = sorted(folder.glob(f"{stem}-*-of-*.safetensors"))
    assert len(shards) > 2
    assert shards[0].name == f"{stem}-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / f"{stem}.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(CheckpointReader(folder).info(k).nbytes for k in index["weight_map"])
    for p in shards[:-1]:  # no shard over the limit unless one tensor alone exceeds it
        r = CheckpointReader(folder)
        sizes = [r.info(k).nbytes for k, f in index["weight_map"].items() if f == p.name]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    back = convert(out, tmp_path / "back", "diffusers")  # sharded input
    assert tensor_hashes(back) == tensor_hashes(convert(src, tmp_path / "ref", "diffusers"))
    assert verify(out) == []


def test_dtype_cast_only_on_request(tiny_ckpt, tmp_path):
    src = tiny_ckpt("tiny-wan2.1-t2v-1.3b")
    kept = convert(src, tmp_path / "kept", "flax")
    assert {v[0] for v in tensor_hashes(kept).values()} == {"float32"}
    bf = convert(src, tmp_path / "bf", "flax", dtype="bfloat16")
    assert {v[0] for v in tensor_hashes(bf).values()} == {"bfloat16"}
    r, s = CheckpointReader(bf / "transformer"), CheckpointReader(kept / "transformer")
    np.testing.assert_array_equal(r.get("head.kernel").astype(np.float32), s.get("head.kernel").astype("bfloat16").astype(np.float32))


def test_parse_size_and_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500") == 500
    with pytest.raises(ValueError):
        parse_size("five")
    specs = [TensorSpec(str(i), np.float32, (n,)) for i, n in enumerate([10, 10, 100, 5])]
    assert [[s.name for s in sh] for sh in plan_shards(specs, 80)] == [["0", "1"], ["2"], ["3"]]


# --- loading converted folders ----------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-wan2.1-t2v-1.3b", "tiny-wan2.1-i2v-14b"])
def test_load_dit_identical_across_layouts(layouts, preset):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.loading import load_dit

    ckpts = layouts(preset)
    models = {lay: load_dit(p / "transformer") for lay, p in ckpts.items()}
    ref = jax.tree_util.tree_leaves(nnx.state(models["diffusers"]))
    for lay in ("flax", "wan"):
        leaves = jax.tree_util.tree_leaves(nnx.state(models[lay]))
        assert len(leaves) == len(ref)
        for a, b in zip(leaves, ref):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    cfg = models["diffusers"].cfg
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 1, 4, 4, cfg.in_channels)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((1, 3, cfg.text_dim)), jnp.float32)
    img = jnp.asarray(rng.standard_normal((1, 2, cfg.image_dim)), jnp.float32) if cfg.has_image_tokens else None
    outs = {lay: np.asarray(m(x, jnp.float32(500.0), text, img)) for lay, m in models.items()}
    assert np.array_equal(outs["flax"], outs["diffusers"]) and np.array_equal(outs["wan"], outs["diffusers"])


# --- key errors -----------------------------------------------------------------------------------
def _edited(tiny_ckpt, tmp_path, edit) -> Path:
    src = tiny_ckpt("tiny-wan2.1-t2v-1.3b") / "transformer"
    folder = tmp_path / "edited"
    folder.mkdir()
    shutil.copy(src / "config.json", folder)
    tensors, meta = load_tensors(next(src.glob("*.safetensors")))
    edit(tensors)
    save_tensors(folder / "diffusion_pytorch_model.safetensors", tensors, meta)
    return folder


def test_missing_unexpected_misshaped_keys(tiny_ckpt, tmp_path):
    def edit(t):
        del t["blocks.1.ffn.net.2.bias"]
        t["blocks.0.extra.weight"] = np.zeros(3, np.float32)
        t["proj_out.weight"] = np.zeros((7, 32), np.float32)

    folder = _edited(tiny_ckpt, tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        convert(folder, tmp_path / "out", "flax")
    msg = str(e.value)
    assert "blocks.1.ffn.net.2.bias" in msg and "blocks.0.extra.weight" in msg
    assert "proj_out.weight: checkpoint [7, 32], config expects [64, 32]" in msg
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


# --- safety ---------------------------------------------------------------------------------------
def test_existing_destination_kept_unless_force(tiny_ckpt, tmp_path):
    src = tiny_ckpt("tiny-wan2.1-t2v-1.3b")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        convert(src, dst, "flax")
    assert (dst / "precious.txt").read_text() == "keep"
    convert(src, dst, "flax", force=True)
    assert not (dst / "precious.txt").exists() and verify(dst) == []
    assert leftovers(dst) == []
    with pytest.raises(ValueError, match="overlaps"):
        convert(src, src / "inside", "flax")


def test_pickle_refused_unless_allowed(tiny_ckpt, tmp_path):
    import torch

    src = tiny_ckpt("tiny-wan2.1-t2v-1.3b") / "transformer"
    folder = tmp_path / "pkl"
    folder.mkdir()
    shutil.copy(src / "config.json", folder)
    sd = {k: torch.from_numpy(v) for k, v in load_tensors(next(src.glob("*.safetensors")))[0].items()}
    torch.save({k: v.to(torch.bfloat16) if "ffn" in k else v for k, v in sd.items()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow-pickle"):
        convert(folder, tmp_path / "a", "flax")
    assert not (tmp_path / "a").exists()
    out = convert(folder, tmp_path / "b", "diffusers", allow_pickle=True)
    r = CheckpointReader(out)
    assert r.info("blocks.0.ffn.net.0.proj.weight").dtype.name == "bfloat16"
    np.testing.assert_array_equal(r.get("proj_out.weight"), sd["proj_out.weight"].numpy())

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil"
    bad.mkdir()
    shutil.copy(src / "config.json", bad)
    torch.save({"x": Evil()}, bad / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        convert(bad, tmp_path / "c", "flax", allow_pickle=True)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def fuzz_source(tiny_ckpt, tmp_path_factory):
    """A sharded single-model folder with its manifest: the original that corruptions start from."""
    root = tmp_path_factory.mktemp("fuzz")
    return convert(tiny_ckpt("tiny-wan2.1-t2v-1.3b") / "transformer", root / "orig", "diffusers", shard_size="60KB")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_corrupted_source(fuzz_source, data):
    """Any corruption ends in a CheckpointError with no output, or (data-only damage) a successful
    conversion whose source then fails --verify against the original manifest."""
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        src = work / "src"
        shutil.copytree(fuzz_source, src)
        files = sorted(p for p in src.iterdir() if p.name != MANIFEST_NAME)
        target = data.draw(st.sampled_from(files))
        raw = bytearray(target.read_bytes())
        kind = data.draw(st.sampled_from(["flip", "flip", "truncate", "length", "json", "dtype", "offsets"]))
        if kind == "flip":
            for _ in range(data.draw(st.integers(1, 3))):
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        elif kind == "length" and target.suffix == ".safetensors":
            raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
        elif kind in ("dtype", "offsets") and target.suffix == ".safetensors":
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8 : 8 + n])
            name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
            if kind == "dtype":
                header[name]["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "I64", "X9", 3, None]))
            else:
                a, b = header[name]["data_offsets"]
                header[name]["data_offsets"] = [a + data.draw(st.integers(-9, 9)), b + data.draw(st.integers(-9, 9))]
            blob = json.dumps(header).encode()
            raw = bytearray(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
        else:  # "json" (or a header edit drawn for a json file): break the text
            cut = data.draw(st.integers(0, max(0, len(raw) - 2)))
            raw = raw[:cut] + b"\x00{]" + raw[cut + 1 :]
        if bytes(raw) == target.read_bytes():
            return
        target.write_bytes(bytes(raw))
        dst = work / "out" / "dst"
        try:
            convert(src, dst, data.draw(st.sampled_from(["flax", "wan"])))
        except CheckpointError as e:
            event(f"{kind}: refused")
            assert str(src) in str(e)
            assert not dst.exists()
            assert not (work / "out").exists() or leftovers(dst) == []
        else:
            event(f"{kind}: converted, caught by verify")
            problems = verify(src)
            assert problems and any(target.name in p for p in problems)
    finally:
        shutil.rmtree(work)


def test_verify_names_file_and_tensor(tiny_ckpt, tmp_path):
    out = convert(tiny_ckpt("tiny-wan2.1-t2v-1.3b"), tmp_path / "out", "flax")
    assert verify(out) == []
    f = out / "transformer" / "flax_model.safetensors"
    r = CheckpointReader(f.parent)
    info = r.info("head.kernel")
    data_start = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    raw = bytearray(f.read_bytes())
    raw[data_start + info.begin + 3] ^= 0x40
    f.write_bytes(bytes(raw))
    problems = verify(out)
    assert any("flax_model.safetensors: sha256" in p for p in problems)
    assert any("'head.kernel' data differs" in p for p in problems)
    assert cli_main(["convert", "--verify", str(out)]) == 1
    (out / "transformer" / "config.json").unlink()
    assert any("config.json: missing" in p for p in verify(out))


def _run_cli(args, env=None, **kw):
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "wanport.cli", "convert", *args], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _kill_mid_conversion(src: Path, dst: Path, extra=()) -> None:
    proc = _run_cli([str(src), str(dst), "--to", "flax", "--no-progress", *extra], env={DELAY_ENV: "0.05"})
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:  # wait until a weights file is half written
            partial = [p for t in dst.parent.glob(f".{dst.name}.wanport-tmp-*") for p in t.rglob(".*.safetensors.tmp-*")]
            if partial and partial[0].stat().st_size > 0:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        else:
            pytest.fail("conversion never started writing")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_killed_conversion_leaves_no_destination(tiny_ckpt, tmp_path):
    src = tiny_ckpt("tiny-wan2.2-i2v-a14b")
    before = tensor_hashes(src)
    dst = tmp_path / "dst"
    _kill_mid_conversion(src, dst)
    assert not dst.exists()
    assert tensor_hashes(src) == before
    # the next run removes the dead process' temp folder and completes
    convert(src, dst, "flax")
    assert verify(dst) == [] and leftovers(dst) == []


def test_killed_forced_conversion_keeps_old_destination(tiny_ckpt, tmp_path):
    src = tiny_ckpt("tiny-wan2.1-t2v-1.3b")
    dst = convert(src, tmp_path / "dst", "wan")
    before = tensor_hashes(dst)
    _kill_mid_conversion(src, dst, ["--force"])
    assert verify(dst) == [] and tensor_hashes(dst) == before


# --- command line ---------------------------------------------------------------------------------
def test_cli_convert_and_verify(tiny_ckpt, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="wanport")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", str(tiny_ckpt("tiny-wan2.2-ti2v-5b")), str(tmp_path / "o"), "--to", "wan", "--shard-size", "30KB", "--no-progress"])
    assert args.func(args) == 0
    assert len(list((tmp_path / "o" / "transformer").glob("*-of-*.safetensors"))) > 1
    assert cli_main(["convert", "--verify", str(tmp_path / "o")]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli_main(["convert", str(tiny_ckpt("tiny-wan2.2-ti2v-5b")), str(tmp_path / "o"), "--to", "wan"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "nothing"), str(tmp_path / "p"), "--to", "flax"]) == 2
    assert cli_main(["convert", str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit):
        cli_main(["convert", "--help"])
    assert "--verify" in capsys.readouterr().out


def test_convert_dit_keeps_its_signature(tiny_ckpt, tmp_path):
    seen = []
    out = convert(tiny_ckpt("tiny-wan2.1-t2v-1.3b") / "transformer", tmp_path / "o", "flax", progress=lambda n, b: seen.append(n))
    assert (out / "flax_model.safetensors").is_file() and "patch_kernel" in seen


def test_bench_tiny_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "convert.py"), "--tiny", "--verify", "--json", str(tmp_path / "b.json"), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["verify_ok"] and res["convert_seconds"] > 0 and res["peak_rss_bytes"] > 0
    assert "peak RSS" in out.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]  # the checkpoints were deleted
