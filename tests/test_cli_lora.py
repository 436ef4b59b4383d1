"""The command line of LoRAs, FP8 and few-step sampling: `wanport generate --lora/--lora-2/--timesteps/--precision`,
`wanport convert --lora/--dtype float8_e4m3fn` and `wanport convert-lora`.

Issue 22's "must show" is `test_generate_cli_lora_timesteps_equals_diffusers`: the command, run on the tiny
two-expert (Wan2.2 A14B style) checkpoint, ends at diffusers' latents with the same LoRAs fused and the same
levels. The fast tests check each piece of the wiring: the options reach `Pipeline` unchanged, each LoRA
lands on its expert at its strength, bad combinations exit 2 with nothing written, FP8 runs end to end.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jax_impl.loading import load_dit
from jax_impl.pipeline import GenerateSettings, Pipeline
from jax_impl.schedulers import schedule_from_timesteps
from jax_impl.stages import load_stage
from wanport.cli import build_parser, main
from wanport.args import model_options
from weights.configs.presets import get_preset
from weights.lora_apply import apply_loras
from weights.lora_convert import write_lora
from weights.safetensors_io import load_tensors
from weights.single_file import open_dit
from tests.lora_helpers import random_lora
from tests.test_distill_generate import A14B, TIMESTEPS, diffusers_distilled_steps, write_distill_loras

SINGLE = "tiny-wan2.1-i2v-14b"  # the demo's tiny default: one expert, image-to-video
SMALL = ["--frames", "5", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    high, low = write_distill_loras(A14B, root)
    write_lora(root / "i2v.safetensors", random_lora(get_preset(SINGLE).transformer, 5), "wan")  # image-branch keys
    img = root / "img.png"
    Image.fromarray((np.random.default_rng(1).random((40, 48, 3)) * 255).astype(np.uint8)).save(img)
    return {"high": high, "low": low, "image": img, "root": root}


def _leaves(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _same_model(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


# --- the options reach the pipeline --------------------------------------------------------------------


def test_model_options_from_the_command_line():
    args = build_parser().parse_args(["generate", "--checkpoint", "c", "--out", "o.mp4", "--lora", "a.safetensors:0.8",
                                      "--lora", "c.safetensors", "--lora-2", "b.safetensors", "--lora-ignore-missing",
                                      "--timesteps", "1000, 750,500,250", "--dtype", "float32"])
    opts = model_options(args)
    assert opts == {"dtype": "float32", "precision": None, "loras": ["a.safetensors:0.8", "c.safetensors"],
                    "loras_2": ["b.safetensors"], "lora_ignore_missing": True, "timesteps": (1000, 750, 500, 250)}
    assert args.steps == 4  # --steps follows --timesteps
    fp8 = build_parser().parse_args(["generate", "--checkpoint", "c", "--out", "o.mp4", "--precision", "fp8"])
    assert model_options(fp8)["dtype"] == "bfloat16"  # implied


def test_each_lora_goes_to_its_expert_at_its_strength_and_the_timesteps_to_the_schedule(tiny_ckpt, loras):
    folder = tiny_ckpt(A14B)
    high, low = loras["high"], loras["low"]
    ts = (1000.0, 750.0, 500.0, 250.0)
    pipe = Pipeline(folder, loras=[f"{high}:0.8"], loras_2=[str(low)], timesteps=ts, load_encoders=False)
    want_high = load_dit(apply_loras(open_dit(folder / "transformer"), [(str(high), 0.8)]))
    want_low = load_dit(apply_loras(open_dit(folder / "transformer_2"), [(str(low), 1.0)]))
    assert _same_model(pipe.experts[0], want_high)
    assert _same_model(pipe.experts[1], want_low)
    assert not _same_model(pipe.experts[0], load_dit(folder / "transformer"))  # the LoRA changed something
    settings = GenerateSettings(frames=5, height=32, width=32, steps=4, guidance=1.0, shift=5.0)
    want = schedule_from_timesteps(pipe.scheduler_for(settings), ts)
    got = pipe.schedule(settings)
    np.testing.assert_array_equal(got.timesteps, want.timesteps)
    np.testing.assert_array_equal(got.sigmas, want.sigmas)
    key = pipe.denoise_inputs(settings, "k")
    assert key["timesteps"] == list(ts)
    assert [x["scale"] for x in key["loras"]["transformer"]] == [0.8]
    assert [x["scale"] for x in key["loras"]["transformer_2"]] == [1.0]
    assert key["loras"]["transformer"][0]["sha256"] != key["loras"]["transformer_2"][0]["sha256"]
    plain = Pipeline(folder, load_encoders=False).denoise_inputs(GenerateSettings(steps=4), "k")
    assert "loras" not in plain and "timesteps" not in plain  # old stage files of plain runs stay valid


# --- issue 22's must show -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_generate_cli_lora_timesteps_equals_diffusers(tiny_ckpt, loras, tmp_path, capsys):
    """`wanport generate --lora high:0.8 --lora-2 low --steps 4 --guidance 1 --timesteps 1000,750,500,250
    --shift 5` = diffusers' pipeline with the same LoRAs fused and the same levels, at every latent."""
    from jax_impl.media import load_image
    from jax_impl.noise import initial_noise
    from jax_impl.schedulers import parse_timesteps
    from parity.pipeline import STEP_TOL

    folder = tiny_ckpt(A14B)
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--checkpoint", str(folder), "--image", str(loras["image"]), "--prompt", "a cat", *SMALL,
               "--lora", f"{loras['high']}:0.8", "--lora-2", str(loras["low"]), "--steps", "4", "--guidance", "1",
               "--timesteps", TIMESTEPS, "--shift", "5", "--seed", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.stat().st_size > 0
    ours = load_stage(tmp_path / "v.stages" / "latents.safetensors", "latents")[0]["latents"]
    ts = parse_timesteps(TIMESTEPS)
    settings = GenerateSettings(frames=5, height=32, width=32, steps=4, guidance=1.0, seed=4, shift=5.0)
    noise = initial_noise(4, ours.shape)
    ref, ref_t = diffusers_distilled_steps(folder, [(loras["high"], 0.8)], [(loras["low"], 1.0)],
                                           load_image(loras["image"]), "a cat", settings, ts, noise)
    np.testing.assert_allclose(ref_t, [1000, 937.5, 2500 / 3, 625], rtol=1e-6)
    err = np.linalg.norm(ours - ref[-1]) / np.linalg.norm(ref[-1])
    assert err < STEP_TOL, f"final latents: rel L2 {err:.2e}"


# --- refused up front -----------------------------------------------------------------------------------


def _refusals(loras):
    high = str(loras["high"])
    return [
        (SINGLE, ["--lora-2", high], "--lora-2 goes to the low-noise expert"),
        (SINGLE, ["--precision", "fp8", "--dtype", "float32"], "drop --dtype float32"),
        (SINGLE, ["--precision", "fp8", "--backend", "cudnn_fp8"], "cudnn_fp8 needs an NVIDIA Hopper GPU"),
        (A14B, ["--precision", "fp8", "--lora", high], "fp8 with LoRAs is not supported"),
        (A14B, ["--timesteps", "1000,500", "--steps", "3"], "--steps 3 does not match the 2 --timesteps"),
        (A14B, ["--timesteps", "500,1000"], "strictly decreasing"),
        (A14B, ["--timesteps", "1000,500", "--scheduler", "unipc"], "flow-Euler"),
        (A14B, ["--lora", str(loras["root"] / "missing.safetensors")], "--lora: LoRA file .* does not exist"),
        (A14B, ["--lora", str(loras["root"] / "i2v.safetensors")], "--lora-ignore-missing"),  # Wan2.1 I2V LoRA
    ]


@pytest.mark.parametrize("k", range(9))
def test_bad_combinations_exit_2_before_any_work(tiny_ckpt, loras, tmp_path, capsys, k):
    preset, extra, message = _refusals(loras)[k]
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--checkpoint", str(tiny_ckpt(preset)), "--image", str(loras["image"]), "--prompt", "a cat",
               *SMALL, *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []  # no stage folder, no video


# --- FP8 from the command line --------------------------------------------------------------------------


def test_generate_precision_fp8_writes_an_mp4(tiny_ckpt, loras, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--checkpoint", str(tiny_ckpt(SINGLE)), "--image", str(loras["image"]), "--prompt", "a cat",
               "--frames", "1", "--height", "16", "--width", "16", "--steps", "1", "--precision", "fp8", "--dtype",
               "bfloat16", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.read_bytes()[4:8] == b"ftyp"
    key = load_stage(tmp_path / "v.stages" / "latents.safetensors", "latents")[1]["inputs"]
    assert key["precision"] == "fp8" and key["dtype"] == "bfloat16"


# --- convert --lora, --dtype float8_e4m3fn; convert-lora --------------------------------------------------


def test_convert_lora_writes_the_merged_checkpoint(tiny_ckpt, loras, tmp_path, capsys):
    src = tiny_ckpt(A14B)
    dst = tmp_path / "merged"
    rc = main(["convert", str(src), str(dst), "--to", "wan", "--lora", f"{loras['high']}:0.8",
               "--lora-2", str(loras["low"]), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    for part, spec in (("transformer", (str(loras["high"]), 0.8)), ("transformer_2", (str(loras["low"]), 1.0))):
        want = apply_loras(open_dit(src / part), [spec], dtype=None)
        got = open_dit(dst / part)
        assert got.layout == "wan"
        for e in want.entries:
            np.testing.assert_array_equal(got.get(e, "wan"), want.get(e, "wan"), err_msg=f"{part} {e.wan}")
        assert any(not np.array_equal(want.get(e, "wan"), want.base.get(e, "wan")) for e in want.entries)
    assert main(["convert", str(src / "transformer"), str(tmp_path / "x"), "--to", "wan",
                 "--lora-2", str(loras["low"])]) == 2
    assert "use --lora" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_convert_dtype_float8_from_the_command_line(tiny_ckpt, tmp_path, capsys):
    import ml_dtypes

    dst = tmp_path / "fp8"
    assert main(["convert", str(tiny_ckpt(SINGLE) / "transformer"), str(dst), "--to", "diffusers",
                 "--dtype", "float8_e4m3fn", "--no-progress"]) == 0, capsys.readouterr().err
    tensors = {}
    for f in dst.glob("*.safetensors"):
        tensors.update(load_tensors(f)[0])
    assert tensors["blocks.0.attn1.to_q.weight"].dtype == ml_dtypes.float8_e4m3fn


@pytest.mark.parametrize("to", ["diffusers", "comfy"])
def test_convert_lora_command_keeps_every_merged_tensor(tmp_path, capsys, to):
    cfg = get_preset(A14B).transformer
    src = write_lora(tmp_path / "src.safetensors", random_lora(cfg, 3, bias=lambda e: "diff_b"), "wan")
    dst = tmp_path / "dst.safetensors"
    assert main(["convert-lora", str(src), str(dst), "--to", to]) == 0, capsys.readouterr().err
    assert to in capsys.readouterr().out
    base = _tiny_base(tmp_path)
    a, b = apply_loras(base, [str(src)]), apply_loras(base, [str(dst)])
    assert a.touched == b.touched and a.touched
    for e in a.touched:
        np.testing.assert_array_equal(a.get(e, "flax"), b.get(e, "flax"))
    assert main(["convert-lora", str(src), str(dst), "--to", to]) == 2  # DST exists, no --force
    assert "--force" in capsys.readouterr().err


def _tiny_base(tmp_path):
    from torch_ref.checkpoints import write_tiny_checkpoint

    folder = tmp_path / "ckpt"
    if not folder.exists():
        write_tiny_checkpoint(A14B, folder)
    return open_dit(folder / "transformer")


@pytest.mark.parametrize("shards", [1, 2])
def test_convert_a_single_file_with_a_lora_into_a_model_folder(tmp_path, capsys, shards):
    """A ComfyUI-style single file (prefixed original-Wan names, bf16; or shards + index json) -> a diffusers model
    folder whose config is the one read off the shapes and whose tensors are the base's with the LoRA merged."""
    from tests.test_single_file import base_state, write_single_file

    cfg = get_preset("tiny-hd128-wan2.1-i2v-14b").transformer  # head width 128: the head count is read off the width
    src = write_single_file(tmp_path / "model.safetensors", cfg, base_state(cfg), prefix="model.diffusion_model.",
                            dtype="bf16", shards=shards)
    lora = write_lora(tmp_path / "l.safetensors", random_lora(cfg, 7), "wan")
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst), "--to", "diffusers", "--lora", f"{lora}:0.5", "--no-progress"]) == 0, \
        capsys.readouterr().err
    got, want = open_dit(dst), apply_loras(open_dit(src), [(str(lora), 0.5)], dtype=None)
    assert got.config == cfg and (dst / "config.json").is_file()
    for e in want.entries:
        np.testing.assert_array_equal(got.get(e, "diffusers"), want.get(e, "diffusers"), err_msg=e.diffusers)


def test_analyze_shares_the_options_and_their_checks(tmp_path, capsys):
    """`wanport analyze` takes the same model options (wanport/args.py) and refuses the same way, before work."""
    out = tmp_path / "report"
    assert main(["analyze", "cfg", "--timesteps", "1000,500", "--steps", "3", "--out", str(out)]) == 2
    assert "--steps 3 does not match the 2 --timesteps" in capsys.readouterr().err
    assert main(["analyze", "cfg", "--precision", "fp8", "--dtype", "float32", "--out", str(out)]) == 2
    assert "drop --dtype float32" in capsys.readouterr().err
    assert not out.exists()
