"""`wanport generate --resume` (issue 15, case 1): a stage file is reused exactly when every input that
determines it is unchanged, and a resumed run equals a fresh one byte for byte.

The matrix changes one input of one stage at a time from a base run, resumes from the base run's stage
files, runs the same command fresh, and compares the mp4 and the stage files, and which stages the log
says were reused (and which inputs it names as changed).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from wanport.cli import main
from weights.configs.presets import get_preset
from jax_impl.stages import load_stage

PRESET = "tiny-wan2.2-i2v-a14b"  # image concat conditioning, two experts, takes a last image


@pytest.fixture(scope="module")
def env(tiny_ckpt, tmp_path_factory):
    from PIL import Image

    from weights.safetensors_io import save_tensors

    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "last"):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(root / f"{name}.png")
    (root / "copy").mkdir()
    shutil.copy(root / "a.png", root / "copy" / "a.png")  # same bytes, another path
    ckpt = tiny_ckpt(PRESET)
    text_dim = get_preset(PRESET).transformer.text_dim
    e1 = {k: rng.standard_normal((1, 8, text_dim)).astype(np.float32)
          for k in ("prompt_embeds", "negative_prompt_embeds")}
    save_tensors(root / "e1.safetensors", e1)
    save_tensors(root / "e2.safetensors", {k: v + 0.5 for k, v in e1.items()})
    from tests.lora_helpers import random_lora
    from weights.lora_convert import write_lora

    cfg = get_preset(PRESET).transformer
    for k, name in enumerate(("l1", "l2")):
        write_lora(root / f"{name}.safetensors", random_lora(cfg, 20 + k), "wan")
    return {"root": root, "ckpt": ckpt, "bases": {}}


BASE = {"--image": "a.png", "--prompt": "a cat", "--frames": "5", "--height": "32", "--width": "32", "--steps": "2",
        "--guidance": "4", "--guidance-2": "3", "--seed": "0"}


def _args(env, opts: dict, ckpt: Path) -> list[str]:
    args = ["generate", "--checkpoint", str(ckpt)]
    for k, v in opts.items():
        if v is None:
            continue
        if k in ("--image", "--last-image", "--embeddings", "--lora", "--lora-2"):
            v = str(env["root"] / v)
        args += [k] if v is True else [k, v]
    return args


def _run(args: list[str], out: Path, work: Path, capsys, resume: bool) -> str:
    capsys.readouterr()
    rc = main(args + ["--out", str(out), "--work-dir", str(work)] + (["--resume"] if resume else []))
    log = capsys.readouterr()
    assert rc == 0, log.err
    return log.out


@dataclasses.dataclass
class Case:
    name: str
    change: dict  # options changed from the base (None removes one)
    reused: tuple[bool, bool]  # (encoded, latents) expected reused
    field: str | None = None  # the input the log must name as changed
    base: dict | None = None  # a different base, when the input is absent from BASE
    mutate: str | None = None  # a component whose weights (or "lora": the --lora file) are rewritten in place


CASES = [
    Case("image", {"--image": "b.png"}, (False, False), "image"),
    Case("image-same-bytes", {"--image": "copy/a.png"}, (True, True)),
    Case("last-image", {"--last-image": "last.png"}, (False, False), "last_image"),
    Case("prompt", {"--prompt": "a dog"}, (False, False), "prompt"),
    Case("negative-prompt", {"--negative-prompt": "blurry"}, (False, False), "negative_prompt"),
    Case("embeddings", {"--embeddings": "e2.safetensors"}, (False, False), "embeddings",
         base={**BASE, "--prompt": None, "--embeddings": "e1.safetensors"}),
    Case("seed", {"--seed": "1"}, (True, False), "seed"),
    Case("steps", {"--steps": "3"}, (True, False), "steps"),
    Case("guidance", {"--guidance": "5"}, (True, False), "guidance"),
    Case("guidance-2", {"--guidance-2": "2"}, (True, False), "guidance_2"),
    Case("shift", {"--shift": "2"}, (True, False), "scheduler.shift"),
    Case("scheduler", {"--scheduler": "euler"}, (True, False), "scheduler.kind"),
    Case("dtype", {"--dtype": "bfloat16"}, (True, False), "dtype"),  # encoders and VAE run in float32 anyway
    Case("attention-same", {"--backend": "xla"}, (True, True)),  # auto is xla on CPU: the same computation
    Case("attention", {"--backend": "splash"}, (True, False), "attention"),
    Case("encoders", {"--encoders": "torch"}, (False, False), "encoders"),  # JAX (default) -> torch encoders
    Case("frames", {"--frames": "9"}, (False, False), "frames"),
    Case("size", {"--height": "48"}, (False, False), "height"),
    Case("fps", {"--fps": "8"}, (True, True)),  # decode only: never cached
    Case("weights-transformer", {}, (True, False), "weights.transformer", mutate="transformer"),
    Case("weights-vae", {}, (False, False), "weights.vae", mutate="vae"),
    Case("weights-text-encoder", {}, (False, False), "weights.text_encoder", mutate="text_encoder"),
    Case("lora-added", {"--lora": "l1.safetensors"}, (True, False), "loras"),
    Case("lora-scale", {"--lora": "l1.safetensors:0.5"}, (True, False), "loras.transformer",
         base={**BASE, "--lora": "l1.safetensors"}),
    Case("lora-2-scale", {"--lora-2": "l2.safetensors:0.5"}, (True, False), "loras.transformer_2",
         base={**BASE, "--lora-2": "l2.safetensors"}),
    Case("lora-other-file", {"--lora": "l2.safetensors"}, (True, False), "loras.transformer",
         base={**BASE, "--lora": "l1.safetensors"}),
    Case("lora-file-rewritten", {}, (True, False), "loras.transformer", base={**BASE, "--lora": "l1.safetensors"},
         mutate="lora"),
    Case("timesteps", {"--timesteps": "1000,600"}, (True, False), "timesteps",
         base={**BASE, "--steps": None, "--timesteps": "1000,500"}),
]


def _rewrite_weights(folder: Path) -> None:
    """Replace a component's weights in place (same names, shapes and file size, other values)."""
    for path in sorted(folder.glob("*.safetensors")):
        _rewrite_file(path)


def _rewrite_file(path: Path) -> None:
    """Replace a safetensors file's floats in place (same names, shapes and file size, other values)."""
    from weights.safetensors_io import load_tensors, save_tensors

    tensors, meta = load_tensors(path)
    save_tensors(path, {k: (v * 1.1 if v.dtype.kind == "f" else v) for k, v in tensors.items()}, meta)


def _stale_fields(log: str, stage: str) -> list[str]:
    m = re.search(rf"\[resume\] {stage} stage is stale: (.*) changed; recomputing", log)
    return m.group(1).split(", ") if m else []


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_resume_matrix(env, case, tmp_path, capsys):
    root, base = env["root"], case.base or BASE
    ckpt = env["ckpt"]
    if case.mutate == "lora":  # a private copy of the LoRA file, rewritten after the base run
        shutil.copy(root / base["--lora"], tmp_path / "lora.safetensors")
        base = {**base, "--lora": str(tmp_path / "lora.safetensors")}
    elif case.mutate:  # a private checkpoint copy whose weights are rewritten after the base run
        ckpt = tmp_path / "ckpt"
        shutil.copytree(env["ckpt"], ckpt)
    key = (str(ckpt), tuple(sorted((k, str(v)) for k, v in base.items())))
    if key not in env["bases"]:
        work = tmp_path / "base.stages"
        _run(_args(env, base, ckpt), tmp_path / "base.mp4", work, capsys, resume=False)
        env["bases"][key] = work
    if case.mutate == "lora":
        _rewrite_file(tmp_path / "lora.safetensors")
    elif case.mutate:
        _rewrite_weights(ckpt / case.mutate)
    changed = _args(env, {**base, **case.change}, ckpt)

    resumed_work = tmp_path / "resumed.stages"
    shutil.copytree(env["bases"][key], resumed_work)
    log = _run(changed, tmp_path / "resumed.mp4", resumed_work, capsys, resume=True)
    _run(changed, tmp_path / "fresh.mp4", tmp_path / "fresh.stages", capsys, resume=False)

    assert (tmp_path / "resumed.mp4").read_bytes() == (tmp_path / "fresh.mp4").read_bytes()
    for stage, name in (("encoded", "encoded.safetensors"), ("latents", "latents.safetensors")):
        a, meta_a = load_stage(resumed_work / name, stage)
        b, meta_b = load_stage(tmp_path / "fresh.stages" / name, stage)
        assert meta_a["key"] == meta_b["key"]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    reused_encoded, reused_latents = case.reused
    assert ("[resume] reusing encoded stage" in log) == reused_encoded, log
    assert ("[resume] reusing latents stage" in log) == reused_latents, log
    if case.field is not None:
        stage = "latents" if reused_encoded else "encoded"
        assert case.field in _stale_fields(log, stage), log
    if not reused_encoded:  # a new encode stage makes the denoise stage stale through its key
        assert "encoded_stage" in _stale_fields(log, "latents"), log


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_stage_file_is_recomputed_not_fatal(tiny_ckpt, tmp_path, capsys, damage):
    """A truncated or bit-flipped encoded stage is recomputed with a one-line note; the latents stay valid
    (the encode key is unchanged) and are reused; the video equals the first run's."""
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "img.png")
    args = ["generate", "--checkpoint", str(tiny_ckpt("tiny-wan2.1-i2v-14b")), "--image", str(tmp_path / "img.png"),
            "--prompt", "a cat", "--frames", "5", "--height", "32", "--width", "32", "--steps", "2",
            "--out", str(tmp_path / "v.mp4")]
    assert main(args) == 0
    first = (tmp_path / "v.mp4").read_bytes()
    stage = tmp_path / "v.stages" / "encoded.safetensors"
    data = bytearray(stage.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-10] ^= 0xFF  # inside the last tensor's data: the header still parses
    stage.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    log = capsys.readouterr().out
    assert re.search(r"\[resume\] encoded stage .*encoded\.safetensors unreadable \(.+\); recomputing", log), log
    assert "[resume] reusing latents stage" in log
    assert (tmp_path / "v.mp4").read_bytes() == first
    load_stage(stage, "encoded")  # rewritten intact


def test_weights_identity_manifest_and_stat(tiny_ckpt, tmp_path):
    """A converted folder is identified by its manifest (the same after a copy that keeps mtimes); a file
    rewritten in place, or an unconverted folder touched, changes the identity."""
    import os

    from weights.convert import convert
    from weights.checkpoint import folder_identity

    conv = convert(tiny_ckpt("tiny-wan2.1-t2v-1.3b"), tmp_path / "flax", to="flax")
    ident = folder_identity(conv / "transformer")
    assert ident.startswith("manifest:")
    copy = tmp_path / "copy"
    shutil.copytree(conv, copy)  # copy2 keeps mtimes
    assert folder_identity(copy / "transformer") == ident
    assert folder_identity(copy / "vae") == folder_identity(conv / "vae") != ident
    weights = copy / "transformer" / "flax_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, rewritten after the manifest: no longer vouched for
    assert folder_identity(copy / "transformer").startswith("stat:")
    plain = tiny_ckpt("tiny-wan2.1-t2v-1.3b") / "vae"
    before = folder_identity(plain)
    assert before.startswith("stat:") and folder_identity(plain) == before
    shutil.copytree(plain, tmp_path / "vae2")
    f = tmp_path / "vae2" / "config.json"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))
    assert folder_identity(tmp_path / "vae2") != folder_identity(plain)
