"""LoRAs merged at load (`weights.lora_apply.apply_loras` + `load_dit`): the model's forward against diffusers
with the same LoRAs loaded by `load_lora_weights` and fused, per expert for Wan2.2 A14B (`--lora` on the
high-noise `transformer`, `--lora-2` on the low-noise `transformer_2`), and from a single-file bf16 base.
"""

from __future__ import annotations

import numpy as np
import pytest

from weights.configs.presets import get_preset
from jax_impl.loading import load_dit
from weights.single_file import open_dit
from weights.lora import LoraError
from weights.lora_apply import apply_loras
from weights.lora_convert import write_lora
from tests.lora_helpers import fuse_in_diffusers, random_lora
from tests.test_lora import diffusers_readable_wan_lora

A14B, T2V = "tiny-wan2.2-i2v-a14b", "tiny-wan2.1-t2v-1.3b"


def forward_report(ours, ref, seed: int = 0):
    from parity.dit import compare_dit, make_inputs

    inputs = make_inputs(ours.cfg, frames=2, height=4, width=6, seed=seed)
    return compare_dit({"jax": ours, "torch_fp32": ref}, inputs, "float32"), inputs


def output(model, inputs) -> np.ndarray:
    from parity.dit import jax_forward

    out, _ = jax_forward(model, inputs)
    return np.asarray(out, np.float64)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_a14b_lora_and_lora2_forward_equals_diffusers(tiny_ckpt, tmp_path):
    """`--lora a:0.8 --lora b:0.5 --lora-2 c:0.6` on the tiny A14B: each expert's forward with the merged
    LoRAs equals diffusers' fused experts, and differs clearly from the base expert."""
    from torch_ref.models import load_transformer

    root = tiny_ckpt(A14B)
    cfg = get_preset(A14B).transformer
    a = write_lora(tmp_path / "a.safetensors", random_lora(cfg, 4, bias=lambda e: "peft"), "diffusers")
    b = write_lora(tmp_path / "b.safetensors", diffusers_readable_wan_lora(cfg, 5), "wan")
    c = write_lora(tmp_path / "c.safetensors", random_lora(cfg, 6, pair=lambda e: "attn2" in e.diffusers), "diffusers")
    ours = [
        load_dit(apply_loras(open_dit(root / "transformer"), [(a, 0.8), f"{b}:0.5"])),
        load_dit(apply_loras(root / "transformer_2", [(c, 0.6)])),
    ]
    refs = [load_transformer(root / d) for d in ("transformer", "transformer_2")]
    fuse_in_diffusers(refs, [(a, 0.8, 1), (b, 0.5, 1), (c, 0.6, 2)])
    for expert, (model, ref) in enumerate(zip(ours, refs), start=1):
        report, inputs = forward_report(model, ref, seed=expert)
        assert report.passed and report.worst_rel_l2 < 1e-5, report.table()
        base = output(load_dit(root / ("transformer" if expert == 1 else "transformer_2")), inputs)
        merged = output(model, inputs)
        assert np.linalg.norm(merged - base) / np.linalg.norm(base) > 1e-2, f"expert {expert}: LoRA had no effect"


def test_single_file_bf16_base_with_lora_equals_diffusers(tmp_path):
    """A ComfyUI-style bf16 single file plus a LightX2V-style LoRA: merged in float32 (the bf16 base is
    not rounded again), equal to diffusers fusing the same LoRA into the same rounded base in float32."""
    from tests.test_single_file import base_state, diffusers_on, rounded, write_single_file

    cfg = get_preset(T2V).transformer
    state = base_state(cfg, seed=3)
    path = write_single_file(tmp_path / "m.safetensors", cfg, state, prefix="model.diffusion_model.", dtype="bf16")
    lora = write_lora(tmp_path / "l.safetensors", diffusers_readable_wan_lora(cfg, 7), "wan")
    ckpt = apply_loras(open_dit(path, num_heads=cfg.num_attention_heads), [(lora, 1.0)])
    some = next(iter(ckpt.touched))
    assert ckpt.get(some, "flax").dtype == np.float32 and ckpt.base.dtype(some).name == "bfloat16"
    ours = load_dit(ckpt)
    ref = diffusers_on(cfg, rounded(state, "bf16"))
    fuse_in_diffusers([ref], [(lora, 1.0, 1)])
    report, _ = forward_report(ours, ref)
    assert report.passed and report.worst_rel_l2 < 1e-5, report.table()


def test_apply_loras_refuses_before_reading(tiny_ckpt, tmp_path):
    """A LoRA for another model (Wan2.1 I2V image branch on T2V) is refused at apply time, naming keys."""
    i2v = get_preset("tiny-wan2.1-i2v-14b").transformer
    path = write_lora(tmp_path / "i2v.safetensors", random_lora(i2v, 1, pair=lambda e: "add_k_proj" in e.diffusers), "wan")
    base = tiny_ckpt(T2V) / "transformer"
    with pytest.raises(LoraError, match=r"name modules this model does not have: .*k_img.*--lora-ignore-missing"):
        apply_loras(base, [path])
    with pytest.raises(LoraError, match="finite"):
        apply_loras(base, [(path, float("nan"))])
    skipped = apply_loras(base, [path], ignore_missing=True)
    assert not skipped.touched and skipped.loras[0][0].ignored


def test_merge_into_built_model_equals_merge_at_load(tiny_ckpt, tmp_path):
    """`apply_loras_to_model` on a loaded model gives bit for bit the parameters of loading with the LoRA
    merged (whose forward equals diffusers, above): stacked block slices, embeddings, patch conv, head."""
    from jax_impl.loading import flax_tensors
    from jax_impl.lora import apply_loras_to_model
    from tests.test_lora import full_kind_lora

    root = tiny_ckpt("tiny-wan2.1-i2v-14b") / "transformer"
    cfg = get_preset("tiny-wan2.1-i2v-14b").transformer
    path = write_lora(tmp_path / "f.safetensors", full_kind_lora(cfg, 8), "wan")
    base = load_dit(root)
    before = {k: f() for k, f in flax_tensors(base)[1].items()}
    merged = apply_loras_to_model(base, [f"{path}:0.7"])
    at_load = {k: f() for k, f in flax_tensors(load_dit(apply_loras(root, [(path, 0.7)])))[1].items()}
    after = {k: f() for k, f in flax_tensors(merged)[1].items()}
    changed = [k for k in after if not np.array_equal(after[k], before[k])]
    assert len(changed) > 0.9 * len(after)  # the full-kind LoRA touches nearly every tensor
    for k in after:
        np.testing.assert_array_equal(after[k], at_load[k], err_msg=k)
