"""Nothing silently wrong (issue 15): each case that used to finish with exit 0 and a wrong result, or a
traceback, now gives a clear error before any work, or the right result. One test (or a few) per case;
case 1 (resume) is tests/test_resume.py, case 6 (images) tests/test_images.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wanport.cli import main

I2V = "tiny-wan2.1-i2v-14b"
A14B = "tiny-wan2.2-i2v-a14b"
TI2V = "tiny-wan2.2-ti2v-5b"
T2V = "tiny-wan2.1-t2v-1.3b"
SMALL = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--prompt", "a cat"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _error(capsys, after_work: bool = False) -> str:
    """The one error line. A run that failed after stages ran also printed progress bars before it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines and lines[-1].startswith("wanport "), err
    assert after_work or len(lines) == 1, lines
    return lines[-1]


def _refused(argv: list[str], capsys, out_root: Path, *needles: str) -> str:
    """The command exits 2 with one line naming every needle, and nothing appears under out_root."""
    before = _files(out_root) if out_root.exists() else []
    capsys.readouterr()
    assert main(argv) == 2
    line = _error(capsys)
    for n in needles:
        assert n in line, line
    assert (_files(out_root) if out_root.exists() else []) == before
    return line


# --- case 2: non-finite and out-of-range float options; non-finite latents --------------------------------
@pytest.mark.parametrize("option, value, needle", [
    ("--guidance", "inf", "--guidance must be a finite number"),
    ("--guidance", "nan", "--guidance must be a finite number"),
    ("--guidance", "-1", "--guidance must be a finite number >= 0"),
    ("--guidance-2", "nan", "--guidance-2 must be a finite number"),
    ("--shift", "0", "--shift must be a finite number > 0"),
    ("--shift", "inf", "--shift must be a finite number > 0"),
    ("--seed", "-1", "--seed must be in 0..4294967295"),
    ("--seed", str(2**32), "--seed must be in 0..4294967295"),
    ("--fps", "0", "--fps must be in 1..1000"),
    ("--steps", "0", "--steps must be >= 1"),
    ("--causal-shift", "nan", "--causal-shift"),
    ("--causal-steps", "1000,nan", "--causal-steps"),
])
def test_float_and_range_options_refused_before_anything(tiny_ckpt, image, tmp_path, capsys, option, value, needle):
    extra = ["--causal", "--frames-per-block", "1"] if option.startswith("--causal") else []
    argv = ["generate", "--checkpoint", str(tiny_ckpt(I2V)), "--image", str(image), *SMALL, *extra,
            option, value, "--out", str(tmp_path / "v.mp4")]
    _refused(argv, capsys, tmp_path, needle)


def test_non_finite_flag_names_the_first_bad_step():
    """The device-side carry keeps the first step whose latents were not finite, -1 while all were."""
    import jax.numpy as jnp

    from jax_impl.sampling import _first_non_finite

    bad = jnp.int32(-1)
    for i, x in enumerate([1.0, 2.0, np.nan, 3.0, np.inf]):
        bad = _first_non_finite(bad, jnp.full((2, 3), x, jnp.float32), i)
    assert int(bad) == 2
    assert int(_first_non_finite(jnp.int32(-1), jnp.ones(4), 7)) == -1


@pytest.mark.slow
def test_non_finite_latents_stop_with_step_and_expert_and_write_nothing(tiny_ckpt, image, tmp_path, capsys):
    """A NaN in the low-noise expert's weights: the run stops at the first low-noise step, names it and the
    expert, and writes no latents and no video (the encode stage, valid, stays for --resume)."""
    from weights.safetensors_io import load_tensors, save_tensors

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt(A14B), ckpt)
    path = ckpt / "transformer_2" / "diffusion_pytorch_model.safetensors"
    tensors, meta = load_tensors(path)
    tensors["proj_out.bias"] = np.full_like(tensors["proj_out.bias"], np.nan)
    save_tensors(path, tensors, meta)
    out = tmp_path / "out" / "v.mp4"
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(ckpt), "--image", str(image), *SMALL, "--steps", "4", "--out", str(out)]
    assert main(argv) == 2
    line = _error(capsys, after_work=True)
    # 4 UniPC steps with shift 5: t = 999, 937 (high-noise expert), 833, 625 (low-noise expert)
    want = r"non-finite latents .* at step 2 of 4 \(t=833\), expert 1 \(transformer_2/, low-noise\)"
    assert re.search(want, line), line
    assert not out.exists() and not (tmp_path / "out" / "v.stages" / "latents.safetensors").exists()


def test_non_finite_causal_block_is_named(tiny_ckpt, tmp_path, capsys):
    from weights.configs.presets import get_preset
    from weights.safetensors_io import save_tensors

    emb = tmp_path / "huge.safetensors"  # finite, but overflows inside the model
    save_tensors(emb, {"prompt_embeds": np.full((1, 4, get_preset(T2V).transformer.text_dim), 3e38, np.float32)})
    out = tmp_path / "out" / "v.mp4"
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tiny_ckpt(T2V)), "--embeddings", str(emb), "--frames", "9",
                 "--height", "32", "--width", "32", "--causal", "--frames-per-block", "1", "--out", str(out)]) == 2
    assert "non-finite latents (NaN or inf) in block 0 of 3" in _error(capsys, after_work=True)
    assert not out.exists() and not (tmp_path / "out" / "v.stages" / "latents.safetensors").exists()


# --- case 3: damaged pipeline parts are refused by convert and generate ------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


@pytest.mark.parametrize("part, damage", [
    ("vae/diffusion_pytorch_model.safetensors", _truncate),
    ("text_encoder/model.safetensors", _truncate),
    ("image_encoder/model.safetensors", _truncate),
    ("model_index.json", lambda p: p.write_text('{"_class_name": "WanImageToVideoPipeline",')),
    ("tokenizer/tokenizer.json", lambda p: p.write_text(p.read_text()[:-50])),
])
def test_convert_refuses_damaged_components_before_writing(tiny_ckpt, tmp_path, capsys, part, damage):
    from wanport.cli import main as convert_main

    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt(I2V), src)
    damage(src / part)
    capsys.readouterr()
    assert convert_main(["convert", str(src), str(tmp_path / "dst"), "--to", "flax", "--no-progress"]) == 2
    line = _error(capsys)
    assert str(src / part) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no temp folder, no lock


@pytest.mark.parametrize("part", ["text_encoder/model.safetensors", "image_encoder/model.safetensors"])
def test_generate_on_truncated_encoder_is_a_clear_error(tiny_ckpt, image, tmp_path, capsys, part):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt(I2V), ckpt)
    _truncate(ckpt / part)
    argv = ["generate", "--checkpoint", str(ckpt), "--image", str(image), *SMALL,
            "--out", str(tmp_path / "o" / "v.mp4")]
    _refused(argv, capsys, tmp_path / "o", str(ckpt / part), "truncated")


# --- case 4: concurrent converts to one DST ----------------------------------------------------------------
def _convert_proc(src: Path, dst: Path, delay: str = "0.05", *extra: str) -> subprocess.Popen:
    env = {**os.environ, "WANPORT_CONVERT_TENSOR_DELAY": delay, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "wanport.cli", "convert", str(src), str(dst), "--to", "flax",
                             "--no-progress", *extra], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """In the child: SIGINT back to its default, so Python turns it into KeyboardInterrupt. A child inherits an
    ignored SIGINT from its parent, and in the full suite something leaves the test process's ignored (the
    Ctrl-C tests then saw convert finish with exit 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(pred, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not pred():
        assert time.time() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_concurrent_converts_to_one_destination(tiny_ckpt, tmp_path):
    """The second conversion to a DST being written is refused (lock); the first one's output is intact."""
    from weights.atomic import lock_path
    from weights.convert import verify

    src, dst = tiny_ckpt(T2V), tmp_path / "dst"
    first = _convert_proc(src, dst)
    _wait_for(lambda: lock_path(dst).exists() or first.poll() is not None)
    second = _convert_proc(src, dst, "0")
    out2, err2 = second.communicate(timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2, (out2, err2)
    assert "is being written by another wanport convert" in err2 and str(lock_path(dst)) in err2
    assert verify(dst) == [] and not lock_path(dst).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_final_rename_never_replaces_a_destination_that_appeared(tmp_path):
    """Without force, a DST that appears while the output is being written is kept, the new output dropped."""
    from weights.atomic import atomic_folder, lock_path

    dst = tmp_path / "dst"
    with pytest.raises(FileExistsError, match="appeared while this conversion ran"):
        with atomic_folder(dst) as tmp:
            (tmp / "new.txt").write_text("new")
            dst.mkdir()
            (dst / "theirs.txt").write_text("theirs")
    assert _files(dst) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"] and not lock_path(dst).exists()


def test_lock_of_a_dead_process_is_taken_over_a_live_one_refused(tmp_path):
    import socket

    from weights.atomic import atomic_folder, lock_path

    dst = tmp_path / "dst"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(dst).write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    with atomic_folder(dst) as tmp:
        (tmp / "a").write_text("a")
    assert _files(dst) == ["a"] and not lock_path(dst).exists()
    lock_path(tmp_path / "other").write_text(f"{os.getppid()} {socket.gethostname()}\n")
    with pytest.raises(FileExistsError, match="delete the lock file if no conversion is running"):
        with atomic_folder(tmp_path / "other"):
            pass
    assert lock_path(tmp_path / "other").exists()  # someone else's lock is left alone


# --- case 5: output paths checked before the first stage -------------------------------------------------
@pytest.mark.parametrize("how, needle", [
    ("dir", "is a folder; give a file path inside it"),
    ("below-file", "is a file, so no folder can be made below it"),
    ("suffix", "must end in .mp4"),
    ("work-dir-file", "--work-dir"),
])
def test_bad_output_paths_are_refused_before_any_stage(tiny_ckpt, image, tmp_path, capsys, how, needle):
    root = tmp_path / "root"
    root.mkdir()
    (root / "file.txt").write_text("x")
    (root / "folder").mkdir()
    extra: list[str] = []
    out = {"dir": root / "folder", "below-file": root / "file.txt" / "sub" / "v.mp4", "suffix": root / "v.png",
           "work-dir-file": root / "v.mp4"}[how]
    if how == "work-dir-file":
        extra = ["--work-dir", str(root / "file.txt")]
    argv = ["generate", "--checkpoint", str(tiny_ckpt(I2V)), "--image", str(image), *SMALL, *extra, "--out", str(out)]
    _refused(argv, capsys, root, needle)


# --- case 7: parity options and checkpoint layouts -------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--text-len", "0"], "--text-len must be >= 1, got 0"),
    (["--frames", "0"], "--frames must be >= 1, got 0"),
    (["--frames", "-2"], "--frames must be >= 1, got -2"),
    (["--model", "vae", "--frames", "0"], "--frames must be >= 1, got 0"),
    (["--height", "0"], "--height must be >= 1"),
])
def test_parity_size_options_are_named(tmp_path, capsys, args, needle):
    _refused(["parity", "--preset", T2V, *args], capsys, tmp_path, needle)


def test_parity_checkpoint_accepts_every_converter_layout(tiny_ckpt, tmp_path, capsys):
    from weights.convert import convert

    for layout in ("flax", "wan"):
        folder = convert(tiny_ckpt(T2V) / "transformer", tmp_path / layout, to=layout)
        capsys.readouterr()
        assert main(["parity", "--checkpoint", str(folder), "--json", str(tmp_path / f"{layout}.json")]) == 0
        report = json.loads((tmp_path / f"{layout}.json").read_text())
        assert report["passed"] and report["meta"]["layout"] == layout
    capsys.readouterr()
    _refused(["parity", "--checkpoint", str(tiny_ckpt(T2V))], capsys, tmp_path, "is a pipeline folder",
             str(tiny_ckpt(T2V) / "transformer"))


# --- case 8: config fields type-checked, file and field named ---------------------------------------------
@pytest.mark.parametrize("part, field, value, expected", [
    ("transformer/config.json", "num_layers", "two", "expected int"),
    ("transformer/config.json", "patch_size", [1, 2], "expected list of 3 int"),
    ("transformer/config.json", "eps", None, "expected number"),
    ("transformer/config.json", "cross_attn_norm", 1, "expected true/false"),
    ("vae/config.json", "z_dim", 16.5, "expected int"),
    ("vae/config.json", "dim_mult", [1, "2", 2, 2], "expected list of int"),
    ("scheduler/scheduler_config.json", "flow_shift", "3", "expected number"),
    ("model_index.json", "boundary_ratio", "0.9", "expected number or null"),
])
def test_config_field_types_are_checked_with_file_and_field(tiny_ckpt, image, tmp_path, capsys, part, field, value,
                                                             expected):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt(I2V), ckpt)
    raw = json.loads((ckpt / part).read_text())
    raw[field] = value
    (ckpt / part).write_text(json.dumps(raw))
    argv = ["generate", "--checkpoint", str(ckpt), "--image", str(image), *SMALL,
            "--out", str(tmp_path / "o" / "v.mp4")]
    _refused(argv, capsys, tmp_path / "o", str(ckpt / part), repr(field), expected)


def test_original_wan_config_types_are_checked(tiny_ckpt, tmp_path):
    from weights.configs.base import ConfigError
    from weights.configs.dit import DitConfig

    with pytest.raises(ConfigError, match=r"cfg\.json: field 'num_layers' is \"two\" \(str\); expected int"):
        DitConfig.from_wan_dict({"dim": 32, "num_heads": 2, "in_dim": 16, "out_dim": 16, "ffn_dim": 64,
                                 "num_layers": "two"}, False, source="cfg.json")


# --- case 9: --last-image only where the checkpoint can take it ------------------------------------------
@pytest.mark.parametrize("preset, needle", [
    (I2V, "Wan2.1 image-to-video checkpoints cannot take a last frame"),
    (TI2V, "TI2V checkpoints condition on the first frame only"),
    (T2V, "this is a text-to-video checkpoint: its DiT takes no image"),
])
def test_last_image_refused_where_it_cannot_be_used(tiny_ckpt, image, tmp_path, capsys, preset, needle):
    size = ["--height", "32", "--width", "32"]
    argv = ["generate", "--checkpoint", str(tiny_ckpt(preset)), "--image", str(image), "--last-image", str(image),
            *SMALL, *size, "--out", str(tmp_path / "o" / "v.mp4")]
    _refused(argv, capsys, tmp_path / "o", needle)


def test_last_image_changes_the_a14b_condition(tiny_ckpt, image, tmp_path):
    """Where diffusers takes a last frame (Wan2.2 I2V-A14B), it is used: the mask marks the last frame."""
    from jax_impl.media import load_image
    from jax_impl.pipeline import GenerateSettings, Pipeline

    pipe = Pipeline(tiny_ckpt(A14B))
    s = GenerateSettings(frames=5, height=32, width=32, steps=2)
    img = load_image(image)
    with_last = pipe.encode(s, prompt="a cat", image=img, last_image=img).condition.mask_latent
    without = pipe.encode(s, prompt="a cat", image=img).condition.mask_latent
    assert with_last[0, -1, 0, 0, 3] == 1.0 and without[0, -1, 0, 0, 3] == 0.0  # mask of the last pixel frame


def test_flf2v_checkpoint_refused_when_opened(tiny_ckpt, image, tmp_path, capsys):
    """First-last-frame transformers (CLIP tokens of two images with a position embedding) are named as
    not supported yet, before any stage, instead of crashing inside the DiT."""
    from weights.safetensors_io import load_tensors, save_tensors

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt(I2V), ckpt)
    cfg_path = ckpt / "transformer" / "config.json"
    _set(cfg_path, pos_embed_seq_len=10)
    path = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors, meta = load_tensors(path)
    image_dim = json.loads(cfg_path.read_text())["image_dim"]
    tensors["condition_embedder.image_embedder.pos_embed"] = np.zeros((1, 10, image_dim), np.float32)
    save_tensors(path, tensors, meta)
    argv = ["generate", "--checkpoint", str(ckpt), "--image", str(image), "--last-image", str(image), *SMALL,
            "--out", str(tmp_path / "o" / "v.mp4")]
    _refused(argv, capsys, tmp_path / "o", "FLF2V checkpoints are not supported yet")


# --- case 10: components that do not fit each other -------------------------------------------------------
def _swap(tiny_ckpt, tmp_path, preset: str, part: str, donor: str) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt(preset), ckpt)
    shutil.rmtree(ckpt / part)
    shutil.copytree(tiny_ckpt(donor) / part, ckpt / part)
    return ckpt


def _set(path: Path, **fields) -> None:
    raw = json.loads(path.read_text())
    raw.update(fields)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("change, needle", [
    ("vae-z48", "in_channels=36 does not fit vae/ (z_dim=48)"),
    ("text-width", "text_encoder/config.json: d_model=48 does not fit the transformer's text_dim=32"),
    ("image-width", "image_encoder/config.json: hidden_size=16 does not fit the transformer's image_dim=24"),
    ("expand", "expand_timesteps (TI2V first-frame conditioning) is set"),
])
def test_components_that_do_not_fit_are_named_when_opened(tiny_ckpt, image, tmp_path, capsys, change, needle):
    if change == "vae-z48":
        ckpt = _swap(tiny_ckpt, tmp_path, I2V, "vae", TI2V)
    else:
        ckpt = tmp_path / "ckpt"
        shutil.copytree(tiny_ckpt(I2V), ckpt)
        if change == "text-width":
            _set(ckpt / "text_encoder" / "config.json", d_model=48)
        elif change == "image-width":
            _set(ckpt / "image_encoder" / "config.json", hidden_size=16)
        else:
            _set(ckpt / "model_index.json", expand_timesteps=True)
    argv = ["generate", "--checkpoint", str(ckpt), "--image", str(image), *SMALL,
            "--out", str(tmp_path / "o" / "v.mp4")]
    _refused(argv, capsys, tmp_path / "o", needle)


def test_experts_that_differ_are_named(tiny_ckpt, tmp_path):
    from jax_impl.pipeline import Pipeline, PipelineError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt(A14B), ckpt)
    shutil.rmtree(ckpt / "transformer_2")
    shutil.copytree(tiny_ckpt(I2V) / "transformer", ckpt / "transformer_2")  # image tokens: another config
    with pytest.raises(PipelineError, match=r"transformer_2/ does not fit transformer/.*image_dim None vs 24"):
        Pipeline(ckpt)


# --- case 11: Ctrl-C -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_during_convert_cleans_up_and_exits_130(tiny_ckpt, tmp_path):
    from weights.atomic import lock_path

    dst = tmp_path / "dst"
    proc = _convert_proc(tiny_ckpt(T2V), dst, "0.2")
    _wait_for(lambda: any(p.name.startswith(".dst.wanport-tmp-") and any(p.iterdir()) for p in tmp_path.iterdir())
              or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "wanport convert: interrupted" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [] and not lock_path(dst).exists()


@pytest.mark.slow
def test_ctrl_c_during_generate_exits_130_without_temp_files(tiny_ckpt, image, tmp_path):
    out = tmp_path / "o" / "v.mp4"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "wanport.cli", "generate", "--checkpoint", str(tiny_ckpt(I2V)),
                             "--image", str(image), *SMALL, "--steps", "200", "--out", str(out)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    line = proc.stdout.readline()  # "[1/3] encoded: ..." once the encode stage is written
    assert line.startswith("[1/3]"), (line, proc.communicate())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "wanport generate: interrupted" and "Traceback" not in err
    assert _files(tmp_path / "o") == ["v.stages", "v.stages/encoded.safetensors"]  # no temp file, no video
