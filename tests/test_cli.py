import json
import subprocess

import pytest
import sys

from wanport.cli import main
from weights.configs.presets import PRESETS


def test_presets_one_per_line(capsys):
    assert main(["presets"]) == 0
    assert capsys.readouterr().out.split() == list(PRESETS)


def test_help_lists_subcommands_and_examples():
    out = subprocess.run([sys.executable, "-m", "wanport.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("presets", "make-tiny", "parity", "examples:"):
        assert word in out


HEAVY = ("jax", "flax", "torch", "diffusers", "transformers")


def test_help_imports_no_jax_or_torch():
    """`wanport --help` answers without starting jax or torch: the parser imports every command module, and
    each imports them inside its `run` only."""
    code = (
        "import sys\n"
        "from wanport.cli import build_parser\n"
        "build_parser().format_help()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("flags, message", [
    (["truncation", "--cut", "0,x"], "--cut must be comma-separated integers"),
    (["truncation", "--cut", "0,,4"], "--cut must be comma-separated integers"),
    (["truncation", "--frames-list", ""], "--frames-list is empty"),
    (["truncation", "--frames-list", "9,6"], "every count must be 4k+1"),
    (["truncation", "--timesteps", "1000,750,500,250", "--cut", "0,8"], "every cut must be in 0..4"),
    (["fast-modes", "--thresholds", "0.1,-1"], "--thresholds: every value must be a finite number > 0"),
    (["fast-modes", "--skip-steps", "a"], "--skip-steps must be comma-separated integers"),
    (["fast-modes", "--timesteps", "1000,750,500,250", "--cut", "4"], "every cut must be in 1..3"),
])
def test_analyze_refuses_bad_lists_before_starting_jax_or_torch(tmp_path, flags, message):
    """A wrong list option is answered at once (exit 2, the problem named), before jax and torch load; the step
    count the cuts are checked against follows --timesteps when it is given."""
    code = (
        "import sys\n"
        "from wanport.cli import main\n"
        f"rc = main(['analyze', {flags[0]!r}, '--out', {str(tmp_path / 'o')!r}, *{flags[1:]!r}])\n"
        f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "2 []", p.stdout + p.stderr
    assert message in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()


def test_make_tiny_then_parity_json(tmp_path, capsys):
    assert main(["make-tiny", "--preset", "tiny-wan2.1-t2v-1.3b", "--out", str(tmp_path / "ck"), "--shard-size", "30KB"]) == 0
    assert (tmp_path / "ck" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    rc = main(["parity", "--model", "dit", "--checkpoint", str(tmp_path / "ck" / "transformer"), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is True and report["worst_rel_l2"] < 1e-5 and report["first_failure"] is None
    assert {"name", "max_abs", "rel_l2", "cosine"} <= set(report["layers"][0])
    assert "parity PASSED" in capsys.readouterr().out


def test_parity_exits_nonzero_when_parity_fails(tmp_path, monkeypatch):
    import parity.dit as pd

    monkeypatch.setattr(pd, "FP32_TOL", 1e-12)  # no real implementation is that close: must report failure
    rc = main(["parity", "--preset", "tiny-wan2.1-t2v-1.3b", "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert rc == 1 and report["passed"] is False and report["first_failure"] == "patch_embedding"


def test_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    assert main(["parity", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["parity", "--checkpoint", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    assert main(["make-tiny", "--preset", "tiny-wan2.1-t2v-1.3b", "--out", str(tmp_path / "x")]) == 2
    assert "--force" in capsys.readouterr().err


def test_parity_vae_subcommand(tmp_path, capsys):
    rc = main(["parity", "--model", "vae", "--preset", "tiny-wan2.1", "--frames", "5", "--json", str(tmp_path / "v.json")])
    report = json.loads((tmp_path / "v.json").read_text())
    assert rc == 0 and report["passed"] and report["meta"]["model"] == "vae"
    assert report["meta"]["decode_psnr_db"] >= 60
    assert main(["parity", "--model", "vae", "--preset", "tiny-wan2.1", "--frames", "6"]) == 2
    assert "not 4k+1" in capsys.readouterr().err
