"""bench/dit.py keeps working on CPU (the GPU numbers in the README come from the same script)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flop_count_matches_hand_count():
    sys.path.insert(0, str(ROOT / "bench"))
    from dit import dit_flops, latent_grid

    from weights.configs.presets import get_preset

    assert latent_grid("wan2.1-t2v-1.3b", 480, 832, 81) == (21, 60, 104)
    assert latent_grid("wan2.2-ti2v-5b", 704, 1280, 121) == (31, 44, 80)  # its VAE compresses 16x
    cfg = get_preset("wan2.1-t2v-1.3b").transformer
    L, D, F, S = 21 * 30 * 52, 1536, 8960, 512
    per_block = 8 * L * D * D + 4 * L * L * D + 4 * L * D * D + 4 * S * D * D + 4 * L * S * D + 4 * L * D * F
    assert abs(dit_flops(cfg, (21, 60, 104), 512) - 30 * per_block) / (30 * per_block) < 1e-3


def test_tiny_run_writes_json(tmp_path):
    out = tmp_path / "dit.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dit.py"), "--tiny", "--impls", "jax,torch-eager", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert {r["impl"] for r in data["results"]} == {"jax", "torch-eager"}
    assert all(r["median_s"] > 0 for r in data["results"])


def test_denoise_bench_tiny_runs_both_experts(tmp_path):
    """bench/denoise.py on CPU: guided step both ways, a whole A14B run using both experts, VAE decode."""
    out = tmp_path / "denoise.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "denoise.py"), "--tiny", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())["results"]["jax"]
    assert set(res["step"]) == {"batch2", "two_calls"} and res["experts_used"] == [0, 1]
    assert res["latents_finite"] and res["decode_s"] > 0


def test_flop_split_gives_attention_its_share():
    """The kernel profile's per-kind TFLOP/s rest on this split: attention = scores + weighted sums only."""
    sys.path.insert(0, str(ROOT / "bench"))
    from dit import dit_flops, dit_flops_split

    from weights.configs.presets import get_preset

    cfg = get_preset("wan2.2-i2v-a14b").transformer
    split = dit_flops_split(cfg, (21, 60, 104), 512)
    L, D = 21 * 30 * 52, cfg.inner_dim
    assert split["attention"] == cfg.num_layers * (4 * L * L * D + 4 * L * 512 * D)
    assert split["attention"] + split["linear"] == dit_flops(cfg, (21, 60, 104), 512)


def test_kernel_classes():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_profile import dit_kernel_class

    assert dit_kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert dit_kernel_class("nvjet_sm90_tst_256x152_64x4_1x2_h_bz_coopA_bias_NNT") == "matmul"
    assert dit_kernel_class("input_concatenate_fusion_11") == "other"


def test_place_experts_follows_the_mode_and_records_the_step_memory():
    """bench.common.place_experts: "yes" moves the idle expert to host memory, "auto" on a CPU (no pool limit)
    keeps both; either way XLA's memory analysis of the guided step is recorded."""
    import jax
    import numpy as np
    from flax import nnx

    from bench.common import place_experts, random_dit
    from jax_impl import schedulers
    from jax_impl.noise import initial_noise
    from jax_impl.sampling import DenoiseInputs
    from weights.configs.presets import get_preset
    from weights.configs.scheduler import SchedulerConfig

    cfg = get_preset("tiny-wan2.1-t2v-1.3b").transformer
    rng = np.random.default_rng(0)
    inputs = DenoiseInputs(text=rng.standard_normal((1, 8, cfg.text_dim), np.float32),
                           negative_text=rng.standard_normal((1, 8, cfg.text_dim), np.float32))
    noise = initial_noise(0, (1, 2, 4, 4, cfg.out_channels))
    sched = schedulers.make_schedule(SchedulerConfig(kind="unipc", shift=5.0), 3)
    for mode, host in (("auto", False), ("yes", True)):
        experts = [random_dit(cfg, dtype="float32", seed=s) for s in range(2)]
        rec = place_experts(experts, mode, sched, noise, inputs, 4.0)
        assert rec["offloaded"] is host and rec["step_memory"]["temp"] >= 0
        leaves = [jax.tree.leaves(nnx.state(m)) for m in experts]
        assert all(isinstance(x, jax.Array) for x in leaves[0])
        assert all(isinstance(x, np.ndarray) for x in leaves[1]) is host
