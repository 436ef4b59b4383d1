"""`wanport generate` and `wanport demo`: mp4 output, stage files and resume, seeds, guidance options, bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wanport.cli import main
from jax_impl.media import read_mp4
from jax_impl.pipeline import JAX_ENCODERS, EncoderSet, GenerateSettings, Pipeline
from jax_impl.sampling import expert_for

ROOT = Path(__file__).resolve().parents[1]
PRESET = "tiny-wan2.1-i2v-14b"
SMALL = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "3", "--prompt", "a cat"]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "cat.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def pipe(tiny_ckpt) -> Pipeline:
    return Pipeline(tiny_ckpt(PRESET))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_generate_writes_mp4_with_requested_frames_and_resumes(tiny_ckpt, image_file, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    args = ["generate", "--checkpoint", str(tiny_ckpt(PRESET)), "--image", str(image_file), *SMALL, "--out", str(out)]
    assert main(args) == 0
    frames, fps = read_mp4(out)
    assert frames.shape == (5, 32, 32, 3) and fps == 16
    stages = tmp_path / "v.stages"
    assert sorted(p.name for p in stages.iterdir()) == ["encoded.safetensors", "latents.safetensors"]
    capsys.readouterr()

    assert main(args + ["--resume"]) == 0  # both stages reused, same video
    log = capsys.readouterr().out
    assert log.count("[resume] reusing") == 2
    np.testing.assert_array_equal(read_mp4(out)[0], frames)

    assert main(args[:-2] + ["--steps", "2", "--out", str(out), "--resume"]) == 0  # new steps: denoise re-runs
    log = capsys.readouterr().out
    assert "reusing" in log and "encoded.safetensors" in log and "recomputing" in log


def test_stage_files_carry_settings_and_refuse_wrong_stage(tiny_ckpt, image_file, tmp_path):
    from jax_impl.conditioning import ConcatCondition
    from jax_impl.stages import Encoded, load_stage
    from weights.safetensors_io import CheckpointError

    out = tmp_path / "v.mp4"
    assert main(["generate", "--checkpoint", str(tiny_ckpt(PRESET)), "--image", str(image_file), *SMALL,
                 "--out", str(out), "--seed", "7"]) == 0
    arrays, meta = load_stage(tmp_path / "v.stages" / "latents.safetensors", "latents")
    assert meta["settings"]["seed"] == 7 and meta["inputs"]["seed"] == 7 and meta["inputs"]["frames"] == 5
    assert len(meta["key"]) == 64 and meta["inputs"]["weights"]["transformer"]
    assert arrays["latents"].shape == (1, 2, 4, 4, 16) and arrays["latents"].dtype == np.float32
    arrays, meta = load_stage(tmp_path / "v.stages" / "encoded.safetensors", "encoded")
    assert set(arrays) == {"prompt_embeds", "negative_prompt_embeds", "image_embeds", "condition.mask_latent"}
    assert meta["conditioning"] == "concat"
    encoded = Encoded.from_stage(arrays, meta)  # read back into the typed condition
    assert isinstance(encoded.condition, ConcatCondition) and set(encoded) == set(arrays) - {"condition.mask_latent"}
    assert encoded.condition.mask_latent.shape == (1, 2, 4, 4, 20)  # 4 mask + 16 latent channels
    with pytest.raises(CheckpointError, match="holds stage 'latents'"):
        load_stage(tmp_path / "v.stages" / "latents.safetensors", "encoded")


@pytest.mark.parametrize(
    "change, message",
    [
        (["--frames", "6"], "not 4k\\+1"),
        (["--height", "40"], "multiple of 16"),
        (["--width", "8"], "multiple of 16"),
    ],
)
def test_bad_sizes_are_refused_before_anything_is_written(tiny_ckpt, image_file, tmp_path, capsys, change, message):
    out = tmp_path / "run" / "v.mp4"
    args = ["generate", "--checkpoint", str(tiny_ckpt(PRESET)), "--image", str(image_file), *SMALL, *change,
            "--out", str(out)]
    assert main(args) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists() or _files(tmp_path / "run") == []


def test_unreadable_image_is_a_clear_error(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    out = tmp_path / "v.mp4"
    assert main(["generate", "--checkpoint", str(tiny_ckpt(PRESET)), "--image", str(bad), *SMALL, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err
    assert _files(tmp_path) == ["broken.png"]


@pytest.mark.parametrize("component", ["vae", "scheduler", "text_encoder", "image_encoder", "transformer"])
def test_missing_component_is_named(tiny_ckpt, image_file, tmp_path, capsys, component):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt(PRESET), ckpt)
    shutil.rmtree(ckpt / component)
    out = tmp_path / "out" / "v.mp4"
    assert main(["generate", "--checkpoint", str(ckpt), "--image", str(image_file), *SMALL, "--out", str(out)]) == 2
    assert f"{component}/" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_i2v_without_image_and_not_a_pipeline_folder(tiny_ckpt, tmp_path, capsys):
    ckpt = tiny_ckpt(PRESET)
    assert main(["generate", "--checkpoint", str(ckpt), *SMALL, "--out", str(tmp_path / "v.mp4")]) == 2
    assert "give an image" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(ckpt / "transformer"), *SMALL, "--out", str(tmp_path / "v.mp4")]) == 2
    assert "not a pipeline folder" in capsys.readouterr().err


def test_seed_reproducible_and_cfg_batch_equals_two_calls(pipe, image_file):
    from jax_impl.media import load_image

    s = GenerateSettings(frames=5, height=32, width=32, steps=3, guidance=4.0, seed=5)
    enc = pipe.encode(s, prompt="a dog", image=load_image(image_file), negative_prompt="blurry")
    a = pipe.denoise(enc, s, progress=False)
    np.testing.assert_array_equal(a, pipe.denoise(enc, s, progress=False))
    assert not np.allclose(a, pipe.denoise(enc, GenerateSettings(**{**s.__dict__, "seed": 6}), progress=False))
    two_calls = pipe.denoise(enc, GenerateSettings(**{**s.__dict__, "cfg_batch": False}), progress=False)
    np.testing.assert_allclose(two_calls, a, rtol=1e-5, atol=1e-5)


def test_guidance_truncation_extremes(pipe, image_file):
    from jax_impl.media import load_image

    s = GenerateSettings(frames=5, height=32, width=32, steps=4, guidance=4.0, seed=1)
    enc = pipe.encode(s, prompt="a dog", image=load_image(image_file), negative_prompt="blurry")
    full = pipe.denoise(enc, s, progress=False)
    np.testing.assert_array_equal(pipe.denoise(enc, GenerateSettings(**{**s.__dict__, "guidance_steps": 4}),
                                               progress=False), full)
    none = pipe.denoise(enc, GenerateSettings(**{**s.__dict__, "guidance_steps": 0}), progress=False)
    unguided = pipe.denoise(enc, GenerateSettings(**{**s.__dict__, "guidance": 1.0}), progress=False)
    np.testing.assert_array_equal(none, unguided)
    assert not np.allclose(none, full)


def test_shift_from_settings_reaches_the_timesteps(pipe):
    from diffusers import UniPCMultistepScheduler

    default = pipe.schedule(GenerateSettings(steps=10))  # the checkpoint's shift: 3.0 for Wan2.1 I2V 480p
    shifted = pipe.schedule(GenerateSettings(steps=10, shift=5.0))
    ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    ref.set_timesteps(10)
    np.testing.assert_array_equal(shifted.timesteps, ref.timesteps.numpy().astype(np.float32))
    assert default.config.shift == 3.0 and not np.array_equal(default.timesteps, shifted.timesteps)


def test_expert_switch_boundary():
    assert expert_for(999.0, 0.9, 2) == 0
    assert expert_for(900.0, 0.9, 2) == 0  # t >= 900 stays on the high-noise expert
    assert expert_for(899.0, 0.9, 2) == 1
    assert expert_for(100.0, None, 1) == 0


@pytest.mark.slow
def test_demo_writes_video_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--frames", "9", "--size", "32", "--steps", "2"]) == 0
    frames, _ = read_mp4(out / "video.mp4")
    assert frames.shape == (9, 32, 32, 3)
    assert (out / "parity_transformer.json").is_file()
    log = capsys.readouterr().out
    assert "video.mp4" in log and "parity PASSED" in log


@pytest.mark.parametrize("layout", ["wan", "flax"])
def test_pipeline_folder_in_converted_layouts_gives_the_same_latents(tiny_ckpt, pipe, image_file, tmp_path, layout):
    """A pipeline folder whose transformers were converted to the original-Wan or Flax layout loads as is."""
    from jax_impl.media import load_image
    from weights.convert import convert
    from weights.dit_map import DIT
    from weights.safetensors_io import CheckpointReader

    converted = convert(tiny_ckpt(PRESET), tmp_path / layout, to=layout)
    assert DIT.detect_layout(CheckpointReader(converted / "transformer").keys()) == layout
    s = GenerateSettings(frames=5, height=32, width=32, steps=2, guidance=4.0)
    img = load_image(image_file)
    ours = Pipeline(converted)
    enc = ours.encode(s, prompt="a dog", image=img)
    np.testing.assert_array_equal(enc.condition.mask_latent, pipe.encode(s, prompt="a dog", image=img).condition.mask_latent)
    np.testing.assert_allclose(ours.denoise(enc, s, progress=False), pipe.denoise(enc, s, progress=False),
                               rtol=1e-6, atol=1e-6)


def test_offloaded_experts_give_the_same_latents(tiny_ckpt, image_file):
    """Experts kept in host memory (moved in at the switch) sample exactly as resident ones."""
    import jax

    from jax_impl.media import load_image
    from jax_impl.sampling import offload

    a14b = Pipeline(tiny_ckpt("tiny-wan2.2-i2v-a14b"))
    s = GenerateSettings(frames=5, height=32, width=32, steps=6, guidance=3.5, guidance_2=2.0)
    enc = a14b.encode(s, prompt="a dog", image=load_image(image_file))
    resident = a14b.denoise(enc, s, progress=False)
    for model in a14b.experts:
        offload(model)
    leaves = jax.tree.leaves(jax.tree.map(type, __import__("flax").nnx.state(a14b.experts[1])))
    assert all(t is np.ndarray for t in leaves), "offload must leave the parameters in host numpy arrays"
    np.testing.assert_array_equal(a14b.denoise(enc, s, progress=False), resident)


def test_causal_generate_writes_video_of_any_length(tiny_ckpt, image_file, tmp_path, capsys):
    """`--causal`: blocks of latent frames with a KV cache and a local window; I2V condition included."""
    ckpt = str(tiny_ckpt(PRESET))
    common = ["generate", "--checkpoint", ckpt, "--image", str(image_file), "--prompt", "a cat", "--height", "32",
              "--width", "32", "--causal"]
    out = tmp_path / "long.mp4"
    assert main(common + ["--frames", "25", "--frames-per-block", "1", "--window", "2", "--out", str(out)]) == 0
    assert read_mp4(out)[0].shape == (25, 32, 32, 3)
    capsys.readouterr()
    bad = tmp_path / "bad" / "v.mp4"
    assert main(common + ["--frames", "17", "--frames-per-block", "2", "--out", str(bad)]) == 2
    assert "does not divide the 5 latent frames" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["generate", "--checkpoint", ckpt, "--image", str(image_file), *SMALL, "--window", "2",
                 "--out", str(bad)]) == 2
    assert "only applies with --causal" in capsys.readouterr().err


def test_precomputed_embeddings_replace_the_encoders(tiny_ckpt, image_file, tmp_path):
    """--embeddings: a folder without text/image encoders generates from saved embeddings, same result."""
    from jax_impl.stages import load_stage
    from weights.safetensors_io import save_tensors

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt(PRESET), ckpt)
    ref = tmp_path / "ref.mp4"
    assert main(["generate", "--checkpoint", str(ckpt), "--image", str(image_file), *SMALL, "--out", str(ref)]) == 0
    encoded, _ = load_stage(tmp_path / "ref.stages" / "encoded.safetensors", "encoded")
    emb = tmp_path / "emb.safetensors"
    save_tensors(emb, {k: encoded[k] for k in ("prompt_embeds", "negative_prompt_embeds", "image_embeds")})
    for part in ("text_encoder", "tokenizer", "image_encoder", "image_processor"):
        shutil.rmtree(ckpt / part)
    out = tmp_path / "emb.mp4"
    assert main(["generate", "--checkpoint", str(ckpt), "--image", str(image_file), "--embeddings", str(emb),
                 *[a for a in SMALL if a not in ("--prompt", "a cat")], "--out", str(out)]) == 0
    np.testing.assert_array_equal(read_mp4(out)[0], read_mp4(ref)[0])


# --- the torch-free path: `wanport generate` with the default (JAX) encoders ----------------------------------
_NO_TORCH = """
import sys

for name in ("torch", "torchvision", "torchaudio"):
    sys.modules[name] = None  # `import torch` raises ImportError and find_spec says absent: an install without it
from wanport.cli import main

rc = main(sys.argv[1:])
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] == "torch")
print("torch modules:", loaded)
sys.exit(rc or (3 if loaded else 0))
"""


@pytest.mark.slow
@pytest.mark.parametrize("encoders", ["jax", "torch"])
def test_generate_with_jax_encoders_needs_no_torch(tiny_ckpt, image_file, tmp_path, encoders):
    """The default `wanport generate` (JAX encoders) runs where torch cannot be imported (as if not installed);
    the same run with --encoders torch fails there, which shows the blocker bites."""
    out = tmp_path / "v.mp4"
    args = ["generate", "--checkpoint", str(tiny_ckpt(PRESET)), "--image", str(image_file), "--prompt", "a cat",
            "--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--out", str(out)]
    if encoders == "torch":
        args += ["--encoders", "torch"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=env)
    if encoders == "jax":
        assert p.returncode == 0, p.stderr[-3000:]
        assert "torch modules: []" in p.stdout and read_mp4(out)[0].shape[0] == 5
    else:
        assert p.returncode == 2 and "--encoders torch needs torch" in p.stderr, p.stderr[-3000:]
        assert not out.exists()


def test_pipeline_takes_any_encoder_set_builds_it_on_first_use_and_keys_the_stage_by_its_name(tiny_ckpt):
    """Encoders come in through the interface: a set whose factories record their calls is built only when a
    stage encodes, its arrays are what the pipeline embeds, and its name is part of the encode stage's key."""
    built = []

    def text(folder):
        built.append("text")
        return lambda prompts: np.full((len(prompts), 7, pipe.dit_config.text_dim), 0.5, np.float32)

    def image(folder):
        built.append("image")
        return lambda images: np.full((1, 3, pipe.dit_config.image_dim), 0.25, np.float32)

    pipe = Pipeline(tiny_ckpt(PRESET), encoders=EncoderSet("fake", text, image))
    assert built == []
    settings = GenerateSettings(frames=5, height=32, width=32, steps=1)
    from PIL import Image

    encoded = pipe.encode(settings, prompt="a cat", image=Image.new("RGB", (40, 48)))
    assert sorted(built) == ["image", "text"]
    assert (encoded["prompt_embeds"] == 0.5).all() and (encoded["image_embeds"] == 0.25).all()
    key = dict(prompt="a", negative_prompt="", files={"image": "x"})
    assert pipe.encode_inputs(settings, embedding_names=(), **key)["encoders"] == "fake"
    jax_pipe = Pipeline(tiny_ckpt(PRESET), load_encoders=False)
    assert jax_pipe.encoders is JAX_ENCODERS
    assert jax_pipe.encode_inputs(settings, embedding_names=(), **key)["encoders"] == "jax"
    every = ("prompt_embeds", "negative_prompt_embeds", "image_embeds")
    assert pipe.encode_inputs(settings, embedding_names=every, **key)["encoders"] is None  # no encoder runs
