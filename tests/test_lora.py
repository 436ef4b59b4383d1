"""LoRA reading, merging and layout conversion (`weights.lora`, `weights.lora_convert`).

The reference is diffusers itself: random LoRAs written by our writer in each layout are loaded with
`WanPipeline.load_lora_weights` (its PEFT path, its converter for `diffusion_model.` files and its
musubi/kohya converter), fused with `fuse_lora` and compared per tensor with our merge on the same base.
What diffusers cannot read (norm, modulation and positional-embedding deltas, which its converter drops)
is checked against the delta formula computed here from the raw file with safetensors' own reader.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from weights.configs.presets import get_preset
from weights.dit_map import dit_entries
from weights.lora import Lora, LoraError, Pair, Target, merge_lora, merged_tensor, parse_lora_arg
from weights.lora_read import read_lora
from weights.lora_convert import convert_lora, lora_tensors, write_lora
from weights.safetensors_io import SafetensorsFile
from tests.lora_helpers import fuse_in_diffusers, is_norm, kohya_keys, random_lora, role

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # fp32 rel L2 per tensor
T2V, I2V, A14B = "tiny-wan2.1-t2v-1.3b", "tiny-wan2.1-i2v-14b", "tiny-wan2.2-i2v-a14b"


def cfg_of(preset: str):
    return get_preset(preset).transformer


def rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


# --- diffusers as the reference --------------------------------------------------------------------
def diffusers_fused(preset: str, loads: list[tuple[Path, float, int]]) -> list[dict[str, np.ndarray]]:
    """Each expert's state dict after diffusers loads every (file, strength, expert) with
    `load_lora_weights`, fuses them at those strengths and unloads the adapters. Experts are seeded 0, 1."""
    from torch_ref.models import build_transformer

    cfg = cfg_of(preset)
    models = [build_transformer(cfg, seed=i) for i in range(get_preset(preset).num_experts)]
    fuse_in_diffusers(models, loads)
    return [{k: v.detach().numpy().copy() for k, v in m.state_dict().items()} for m in models]


def base_weights(preset: str, expert: int = 1) -> dict[str, np.ndarray]:
    from torch_ref.models import build_transformer

    return {k: v.detach().numpy().copy() for k, v in build_transformer(cfg_of(preset), seed=expert - 1).state_dict().items()}


def check_against(preset, ref: dict, base: dict, loras: list[tuple[Lora, float]]) -> None:
    """Our merge of `loras` onto `base` equals diffusers' fused `ref` for every tensor; the tensors the
    LoRAs target changed and every other tensor is untouched, in both."""
    touched = {e for lora, _ in loras for e in lora.targets}
    assert touched, "the LoRA targets nothing: the test would prove nothing"
    for e in dit_entries(cfg_of(preset)):
        ours = merged_tensor(e, base[e.diffusers], loras)
        assert ours.dtype == base[e.diffusers].dtype
        assert rel(ours, ref[e.diffusers]) <= TOL, (e.diffusers, rel(ours, ref[e.diffusers]))
        if e in touched:
            assert rel(ours, base[e.diffusers]) > 1e-3, f"{e.diffusers}: the LoRA did not change it"
        else:
            assert np.array_equal(ours, base[e.diffusers]) and np.array_equal(ref[e.diffusers], base[e.diffusers])


def diffusers_readable_wan_lora(cfg, seed: int) -> Lora:
    """A wan-layout LoRA within what diffusers' converter (`_convert_non_diffusers_wan_lora_to_diffusers`)
    reads: pairs on every linear layer but the head, alpha on block layers only (it ignores alphas
    elsewhere), a bias delta on every linear layer, and the head as a full delta plus bias (the LightX2V
    distill LoRAs' head)."""
    linear = {e.diffusers for e in dit_entries(cfg) if e.kind == "linear"}
    lora = random_lora(
        cfg, seed,
        pair=lambda e: e.kind == "linear" and e.diffusers != "proj_out.weight",
        bias=lambda e: "diff_b" if e.diffusers.replace(".bias", ".weight") in linear else None,
        full=lambda e: e.diffusers == "proj_out.weight",
    )
    for e, t in list(lora.targets.items()):
        if t.pair is not None and not e.diffusers.startswith("blocks."):
            lora.targets[e] = Target(e, pair=Pair(t.pair.up, t.pair.down, None))
    return lora


@pytest.mark.parametrize("preset", [I2V, T2V])
def test_peft_layout_equals_diffusers(tmp_path, preset):
    """diffusers layout: a pair on every linear layer and on the patch convolution, PEFT biases, alphas
    in the header metadata (common alpha plus alpha_pattern: 8, 3, absent = rank, 2 with rank 4)."""
    cfg = cfg_of(preset)
    lora = random_lora(cfg, 1, bias=lambda e: "peft" if len(e.diffusers) % 3 else None)
    path = write_lora(tmp_path / "d.safetensors", lora, "diffusers")
    meta = json.loads(SafetensorsFile(path).metadata["lora_adapter_metadata"])
    assert meta["transformer.alpha_pattern"] and meta["transformer.lora_bias"] is True
    ours = read_lora(path, cfg)
    assert set(ours.targets) == set(lora.targets)
    assert any(e.kind == "conv3d" for e in ours.targets)
    (ref,) = diffusers_fused(preset, [(path, 0.7, 1)])
    check_against(preset, ref, base_weights(preset), [(ours, 0.7)])


@pytest.mark.parametrize("preset", [I2V, T2V])
def test_wan_layout_equals_diffusers(tmp_path, preset):
    """original-Wan layout (`diffusion_model.` + lora_down/lora_up + .alpha, diff_b, head.head.diff) read
    by diffusers' own converter, which folds alpha into the matrices."""
    cfg = cfg_of(preset)
    lora = diffusers_readable_wan_lora(cfg, 2)
    path = write_lora(tmp_path / "w.safetensors", lora, "wan")
    keys = load_file(path).keys()
    assert "diffusion_model.blocks.0.self_attn.q.alpha" in keys and "diffusion_model.head.head.diff" in keys
    ours = read_lora(path, cfg)
    (ref,) = diffusers_fused(preset, [(path, 0.7, 1)])
    check_against(preset, ref, base_weights(preset), [(ours, 0.7)])


def test_kohya_layout_equals_diffusers(tmp_path):
    """musubi-tuner's `lora_unet_blocks_0_self_attn_q` keys (every attention and FFN layer, with alpha),
    read by diffusers' musubi converter."""
    cfg = cfg_of(I2V)
    lora = random_lora(cfg, 3, pair=lambda e: e.diffusers.startswith("blocks.") and e.kind == "linear", alphas=(8.0, 3.0, 2.0))
    tensors, _, _ = lora_tensors(lora, "wan")
    path = tmp_path / "k.safetensors"
    save_file(kohya_keys(tensors), str(path))
    ours = read_lora(path, cfg)
    assert ours.naming == "kohya" and set(ours.targets) == set(lora.targets)
    (ref,) = diffusers_fused(I2V, [(path, 1.3, 1)])
    check_against(I2V, ref, base_weights(I2V), [(ours, 1.3)])


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_two_loras_and_the_second_expert_equal_diffusers(tmp_path):
    """A14B: two LoRAs on the high-noise expert at strengths 0.8 and 0.5 (one per layout), a third on the
    low-noise expert at 0.6 (what `--lora a:0.8 --lora b:0.5 --lora-2 c:0.6` asks for)."""
    cfg = cfg_of(A14B)
    a = write_lora(tmp_path / "a.safetensors", random_lora(cfg, 4, bias=lambda e: "peft"), "diffusers")
    b = write_lora(tmp_path / "b.safetensors", diffusers_readable_wan_lora(cfg, 5), "wan")
    c = write_lora(tmp_path / "c.safetensors", random_lora(cfg, 6, pair=lambda e: "attn2" in e.diffusers), "diffusers")
    r1, r2 = diffusers_fused(A14B, [(a, 0.8, 1), (b, 0.5, 1), (c, 0.6, 2)])
    check_against(A14B, r1, base_weights(A14B, 1), [(read_lora(a, cfg), 0.8), (read_lora(b, cfg), 0.5)])
    check_against(A14B, r2, base_weights(A14B, 2), [(read_lora(c, cfg), 0.6)])


# --- what diffusers cannot read: checked through the converted file and against the formula -------------
def full_kind_lora(cfg, seed: int, dtype=np.float32) -> Lora:
    """Every key kind: pairs (linear and conv; alphas 8, 3, absent, 2), Wan bias deltas, full deltas on
    every norm, modulation table, positional embedding, and on the head weight (no pair there)."""
    lora = random_lora(
        cfg, seed,
        pair=lambda e: e.diffusers != "proj_out.weight",
        bias=lambda e: "diff_b",
        full=lambda e: is_norm(e) or role(e) == "param" or e.diffusers == "proj_out.weight",
    )
    cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    return Lora("random", "diffusers", {
        e: Target(e, pair=Pair(cast(t.pair.up), cast(t.pair.down), t.pair.alpha) if t.pair else None,
                  full=cast(t.full), full_scale=t.full_scale)
        for e, t in lora.targets.items()})


def expected_deltas(path: Path, cfg, scale: float) -> dict[str, np.ndarray]:
    """The update each tensor gets, computed in float64 from the raw file (safetensors' reader) with the
    published rules: scale * alpha / rank * up @ down (rank = rows of down, no alpha: 1), scale * diff."""
    raw = {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}
    names = {}
    for e in dit_entries(cfg):
        names[e.wan] = e.diffusers
    out: dict[str, np.ndarray] = {}

    def add(name, d):
        out[name] = out.get(name, 0) + d

    for k, v in raw.items():
        body = k.removeprefix("diffusion_model.")
        if body.endswith(".lora_up.weight"):
            m = body[: -len(".lora_up.weight")]
            down = raw[f"diffusion_model.{m}.lora_down.weight"]
            alpha = raw.get(f"diffusion_model.{m}.alpha")
            factor = 1.0 if alpha is None else float(alpha) / down.shape[0]
            tgt = names[m + ".weight"]
            shape = [e.shape for e in dit_entries(cfg) if e.diffusers == tgt][0]
            add(tgt, scale * factor * (v.reshape(v.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape))
        elif body.endswith(".diff_b"):
            add(names[body[: -len(".diff_b")] + ".bias"], scale * v)
        elif body.endswith(".diff_m"):
            add(names[body[: -len(".diff_m")] + ".modulation"], scale * v)
        elif body.endswith(".diff"):
            m = body[: -len(".diff")]
            add(names[m + ".weight"] if m + ".weight" in names else names[m], scale * v)
    return out


@pytest.mark.parametrize("layout", ["wan", "comfy"])
def test_full_deltas_follow_the_formula(tmp_path, layout):
    """Norms (diff, diff_b), modulation tables (LightX2V's diff_m; ComfyUI's modulation.diff), the image
    positional embedding, the patch convolution pair and the head: our merge equals the formula."""
    cfg = cfg_of(I2V).replace(pos_embed_seq_len=6)
    lora = full_kind_lora(cfg, 7)
    path = write_lora(tmp_path / "f.safetensors", lora, layout)
    keys = set(load_file(str(path)))
    mod = {"wan": "diffusion_model.blocks.1.diff_m", "comfy": "diffusion_model.blocks.1.modulation.diff"}[layout]
    assert mod in keys and "diffusion_model.img_emb.emb_pos.diff" in keys
    assert "diffusion_model.blocks.0.cross_attn.norm_k_img.diff" in keys and "diffusion_model.blocks.0.norm3.diff_b" in keys
    if layout == "comfy":  # ComfyUI spells it the same for every parameter; rename so the formula reads it
        renamed = {k.replace(".modulation.diff", ".diff_m"): v for k, v in load_file(str(path)).items()}
        save_file(renamed, str(tmp_path / "g.safetensors"))
        expected = expected_deltas(tmp_path / "g.safetensors", cfg, 0.9)
    else:
        expected = expected_deltas(path, cfg, 0.9)
    ours = read_lora(path, cfg)
    assert {e.diffusers for e in ours.targets} == set(expected)
    rng = np.random.default_rng(0)
    for e in dit_entries(cfg):
        base = rng.standard_normal(e.shape).astype(np.float32)
        got = merged_tensor(e, base, [(ours, 0.9)]).astype(np.float64) - base
        assert rel(got, expected.get(e.diffusers, np.zeros(e.shape))) <= 1e-6 if e.diffusers in expected else not got.any()


def test_comfy_layout_through_its_diffusers_conversion(tmp_path):
    """A ComfyUI-layout LoRA with every kind, converted to the diffusers layout: the part diffusers reads
    (pairs, biases) matches diffusers on the converted file, and the converted file merges exactly as
    the original (the `.diff` part diffusers refuses is covered by the formula test)."""
    cfg = cfg_of(I2V)
    src = write_lora(tmp_path / "c.safetensors", full_kind_lora(cfg, 8), "comfy")
    dst = convert_lora(src, tmp_path / "d.safetensors", "diffusers", cfg)
    a, b = read_lora(src, cfg), read_lora(dst, cfg)
    rng = np.random.default_rng(1)
    for e in dit_entries(cfg):
        base = rng.standard_normal(e.shape).astype(np.float32)
        assert np.array_equal(merged_tensor(e, base, [(a, 1.1)]), merged_tensor(e, base, [(b, 1.1)]))
    peft = {k: v for k, v in load_file(str(dst)).items() if ".lora_" in k}
    save_file(peft, str(tmp_path / "peft.safetensors"), metadata=dict(SafetensorsFile(dst).metadata))
    only = read_lora(tmp_path / "peft.safetensors", cfg)
    (ref,) = diffusers_fused(I2V, [(tmp_path / "peft.safetensors", 1.1, 1)])
    check_against(I2V, ref, base_weights(I2V), [(only, 1.1)])


# --- refusals ----------------------------------------------------------------------------------------
def test_unknown_modules_are_refused_with_the_list(tmp_path):
    """A LoRA for a deeper model (blocks 2..3 on a 2-layer model) is refused naming the first keys and
    the count; with ignore_missing the rest merges exactly as a LoRA without those keys."""
    small, deep = cfg_of(T2V), cfg_of(T2V).replace(num_layers=4)
    lora = random_lora(deep, 9, pair=lambda e: e.kind == "linear")
    path = write_lora(tmp_path / "deep.safetensors", lora, "wan")
    with pytest.raises(LoraError) as err:
        read_lora(path, small)
    msg = str(err.value)
    n_missing = sum(1 for k in load_file(str(path)) if ".blocks.2." in k or ".blocks.3." in k)
    assert f"{n_missing} LoRA tensor(s) name modules this model does not have" in msg
    assert "diffusion_model.blocks.2." in msg and f"and {n_missing - 8} more" in msg and "blocks up to 3" in msg
    assert "--lora-ignore-missing" in msg
    logs = []
    kept = read_lora(path, small, ignore_missing=True, log=logs.append)
    assert len(kept.ignored) == n_missing and any("skipping" in line for line in logs)
    shallow = Lora("x", "diffusers", {e: t for e, t in lora.targets.items() if not e.diffusers.startswith(("blocks.2", "blocks.3"))})
    ref = read_lora(write_lora(tmp_path / "shallow.safetensors", shallow, "wan"), small)
    assert set(kept.targets) == set(ref.targets)
    for e in kept.targets:
        base = np.ones(e.shape, np.float32)
        assert np.array_equal(merged_tensor(e, base, [(kept, 1.0)]), merged_tensor(e, base, [(ref, 1.0)]))


def test_image_branch_on_a_model_without_it_gets_a_hint(tmp_path):
    """A Wan2.1-I2V LoRA (k_img, v_img, img_emb) on Wan2.2 A14B: refused, saying why and that skipping is fine."""
    path = write_lora(tmp_path / "i2v.safetensors", random_lora(cfg_of(I2V), 10), "wan")
    with pytest.raises(LoraError, match=r"CLIP image branch .*LightX2V#1246"):
        read_lora(path, cfg_of(A14B))
    assert read_lora(path, cfg_of(A14B), ignore_missing=True).ignored


@pytest.mark.parametrize("case, match", [
    ({"diffusion_model.blocks.0.self_attn.q.dora_scale": (1, 32)}, "DoRA"),
    ({"diffusion_model.blocks.0.self_attn.q.weight": (32, 32)}, "not LoRA tensors"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": (32, 4)}, "no down matrix"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": (32, 4), "diffusion_model.blocks.0.self_attn.q.lora_down.weight": (4, 48)}, "another model size"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": (32, 4), "diffusion_model.blocks.0.self_attn.q.lora_down.weight": (4, 32),
      "diffusion_model.blocks.0.self_attn.q.diff": (32, 32)}, "both a low-rank pair and a full delta"),
    ({"diffusion_model.blocks.0.self_attn.norm_q.lora_up.weight": (32, 4), "diffusion_model.blocks.0.self_attn.norm_q.lora_down.weight": (4, 32)}, "not a linear"),
    ({"diffusion_model.blocks.0.self_attn.q.alpha": ()}, "alpha without"),
    ({"diffusion_model.blocks.0.modulation.diff": (1, 6, 32), "diffusion_model.blocks.0.diff_m": (1, 6, 32)}, "update the same tensor"),
    ({"text_encoders.layer.0.lora_up.weight": (32, 4), "text_encoders.layer.0.lora_down.weight": (4, 32)}, "names a Wan DiT module"),
])
def test_malformed_loras_are_refused_even_when_ignoring_missing(tmp_path, case, match):
    path = tmp_path / "bad.safetensors"
    save_file({k: np.ones(s, np.float32) for k, s in case.items()}, str(path))
    with pytest.raises(LoraError, match=match):
        read_lora(path, cfg_of(T2V), ignore_missing=True)


def test_peft_config_rank_must_match_the_weights(tmp_path):
    cfg = cfg_of(T2V)
    path = write_lora(tmp_path / "d.safetensors", random_lora(cfg, 11, pair=lambda e: "attn1.to_q" in e.diffusers), "diffusers")
    tensors = load_file(str(path))
    meta = dict(SafetensorsFile(path).metadata)
    conf = json.loads(meta["lora_adapter_metadata"])
    conf["transformer.r"], conf["transformer.rank_pattern"] = 16, {}
    meta["lora_adapter_metadata"] = json.dumps(conf)
    save_file(tensors, str(tmp_path / "e.safetensors"), metadata=meta)
    with pytest.raises(LoraError, match="rank 16, its matrices have rank 4"):
        read_lora(tmp_path / "e.safetensors", cfg)


# --- scales, alpha, rank ---------------------------------------------------------------------------------
def test_scale_alpha_and_rank(tmp_path):
    """delta = scale * alpha / rank * up @ down, rank = rows of down (4 here, the input width is 32), no
    alpha: factor 1; rsLoRA (PEFT config use_rslora): alpha / sqrt(rank); diffs scale linearly, no alpha."""
    cfg = cfg_of(T2V)
    q = next(e for e in dit_entries(cfg) if e.diffusers == "blocks.0.attn1.to_q.weight")
    qb = next(e for e in dit_entries(cfg) if e.diffusers == "blocks.0.attn1.to_q.bias")
    rng = np.random.default_rng(12)
    up, down = rng.standard_normal((32, 4)).astype(np.float32), rng.standard_normal((4, 32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    prod = up.astype(np.float64) @ down.astype(np.float64)
    base = rng.standard_normal(q.shape).astype(np.float32)
    for alpha, factor in ((None, 1.0), (8.0, 2.0), (3.0, 0.75)):
        lora = Lora("x", "diffusers", {q: Target(q, pair=Pair(up, down, alpha)), qb: Target(qb, full=bias)})
        got = read_lora(write_lora(tmp_path / f"a{alpha}.safetensors", lora, "wan", force=True), cfg)
        for scale in (0.0, 0.5, 1.0, 2.5):
            merged = merged_tensor(q, base, [(got, scale)])
            assert rel(merged - base.astype(np.float64), scale * factor * prod) <= 1e-6 if scale else np.array_equal(merged, base)
            assert np.allclose(merged_tensor(qb, np.zeros(32, np.float32), [(got, scale)]), scale * bias, rtol=1e-6)
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": down, "transformer.blocks.0.attn1.to_q.lora_B.weight": up},
              str(tmp_path / "rs.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 6, "transformer.use_rslora": True})})
    rs = read_lora(tmp_path / "rs.safetensors", cfg)
    assert rel(merged_tensor(q, base, [(rs, 1.0)]) - base.astype(np.float64), 6 / math.sqrt(4) * prod) <= 1e-6


def test_merge_into_flax_layout_and_bfloat16():
    """The merge works in the base's layout (Flax kernels are transposed) and dtype (bf16 in, bf16 out)."""
    import ml_dtypes

    cfg = cfg_of(I2V)
    lora = full_kind_lora(cfg, 13)
    rng = np.random.default_rng(2)
    for e in lora.targets:
        base = rng.standard_normal(e.shape).astype(np.float32)
        torch_side = merged_tensor(e, base, [(lora, 0.6)])
        flax = merged_tensor(e, e.to_flax(base), [(lora, 0.6)], layout="flax")
        assert np.array_equal(flax, e.to_flax(torch_side))
        b16 = merged_tensor(e, base.astype(ml_dtypes.bfloat16), [(lora, 0.6)])
        assert b16.dtype == ml_dtypes.bfloat16
        exact = base.astype(ml_dtypes.bfloat16).astype(np.float32) + lora.targets[e].delta(0.6)
        assert np.array_equal(b16, exact.astype(ml_dtypes.bfloat16))
        assert np.array_equal(merged_tensor(e, base.astype(ml_dtypes.bfloat16), [(lora, 0.6)], dtype=np.float32), exact)
    merged = dict(merge_lora(lambda e: np.zeros(e.shape, np.float32), lora, 0.6))
    assert set(merged) == set(lora.targets)


# --- layout conversion: bit-exact round trips ------------------------------------------------------------
def tensors_and_alphas(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}, json.loads(f.metadata.get("lora_adapter_metadata", "{}"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trips_are_bit_exact(tmp_path, dtype):
    """diffusers -> wan -> comfy -> diffusers and wan -> diffusers -> wan give back every tensor bit for
    bit (pairs, PEFT biases, diff, diff_b, diff_m, norms, parameters), with the same alphas."""
    import ml_dtypes

    cfg = cfg_of(I2V).replace(pos_embed_seq_len=6)
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    lora = full_kind_lora(cfg, 14, dt)  # biases of modules with alpha = rank become PEFT lora_B.bias
    d0 = write_lora(tmp_path / "d0.safetensors", lora, "diffusers")
    w1 = convert_lora(d0, tmp_path / "w1.safetensors", "wan")
    c2 = convert_lora(w1, tmp_path / "c2.safetensors", "comfy")
    d3 = convert_lora(c2, tmp_path / "d3.safetensors", "diffusers")
    w4 = convert_lora(d3, tmp_path / "w4.safetensors", "wan")
    (t0, m0), (t3, m3) = tensors_and_alphas(d0), tensors_and_alphas(d3)
    assert t0.keys() == t3.keys() and any(k.endswith(".lora_B.bias") for k in t0) and any(k.endswith(".diff") for k in t0)
    for k in t0:
        assert t0[k].dtype == t3[k].dtype == dt and t0[k].tobytes() == t3[k].tobytes(), k
    assert m0 == m3
    (t1, _), (t4, _) = tensors_and_alphas(w1), tensors_and_alphas(w4)
    assert t1.keys() == t4.keys() and any(k.endswith(".diff_m") for k in t1)
    for k in t1:
        assert t1[k].tobytes() == t4[k].tobytes(), k
    # and all five files merge identically
    loras = [read_lora(p, cfg) for p in (d0, w1, c2, d3, w4)]
    for e in lora.targets:
        base = np.ones(e.shape, np.float32)
        outs = [merged_tensor(e, base, [(x, 0.8)]) for x in loras]
        assert all(np.array_equal(outs[0], o) for o in outs[1:]), e.diffusers


def test_peft_bias_with_alpha_not_rank_is_rescaled_with_a_warning(tmp_path):
    """PEFT scales lora_B.bias by alpha / rank; Wan's diff_b is unscaled, so that one case rounds, and says so."""
    cfg = cfg_of(T2V)
    lora = random_lora(cfg, 15, pair=lambda e: e.diffusers == "blocks.0.attn1.to_q.weight", bias=lambda e: "peft", alphas=(3.0,))
    d = write_lora(tmp_path / "d.safetensors", lora, "diffusers")
    logs = []
    w = convert_lora(d, tmp_path / "w.safetensors", "wan", log=logs.append)
    assert any("rescaled, so not bit-exact" in line for line in logs)
    a, b = read_lora(d, cfg), read_lora(w, cfg)
    for e in a.targets:
        assert rel(a.targets[e].delta(), b.targets[e].delta()) <= 1e-7


def test_layout_is_detected_and_logged(tmp_path):
    cfg = cfg_of(I2V)
    lora = full_kind_lora(cfg, 16)
    seen = {}
    for to in ("diffusers", "wan", "comfy"):
        logs = []
        read_lora(write_lora(tmp_path / f"{to}.safetensors", lora, to), cfg, log=logs.append)
        seen[to] = logs[-1]
    assert "diffusers names; prefix 'transformer.'; lora_A/lora_B" in seen["diffusers"]
    assert "wan names; prefix 'diffusion_model.'; lora_down/lora_up" in seen["wan"] and "LightX2V-style" in seen["wan"]
    assert "diff_m" not in seen["comfy"] and "alpha .alpha keys" in seen["comfy"]
    k = random_lora(cfg, 17, pair=lambda e: e.diffusers.startswith("blocks.1.attn1"))
    save_file(kohya_keys(lora_tensors(k, "wan")[0]), str(tmp_path / "k.safetensors"))
    logs = []
    read_lora(tmp_path / "k.safetensors", cfg, log=logs.append)
    assert "kohya names; prefix 'lora_unet_'" in logs[-1]


def test_convert_lora_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path):
    cfg = cfg_of(T2V)
    src = write_lora(tmp_path / "a.safetensors", random_lora(cfg, 18), "wan")
    dst = convert_lora(src, tmp_path / "b.safetensors", "diffusers")
    with pytest.raises(FileExistsError, match="--force"):
        convert_lora(src, dst, "diffusers")
    convert_lora(src, dst, "comfy", force=True)
    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": np.ones((32, 4), np.float32)}, str(bad))
    with pytest.raises(LoraError):
        convert_lora(bad, tmp_path / "out.safetensors", "diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "bad.safetensors"]
    with pytest.raises(ValueError, match="diffusers, wan, comfy"):
        convert_lora(src, tmp_path / "c.safetensors", "kohya")


def test_a_lora_read_on_names_only_converts_but_does_not_merge(tmp_path):
    """Without the model's config nothing checks shapes, so merging such a LoRA is refused."""
    cfg = cfg_of(T2V)
    lora = read_lora(write_lora(tmp_path / "a.safetensors", random_lora(cfg, 19), "wan"))
    assert not lora.checked and lora.targets
    e = next(iter(lora.targets))
    with pytest.raises(LoraError, match="names only"):
        merged_tensor(e, np.zeros(e.shape, np.float32), [(lora, 1.0)])


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert parse_lora_arg("dir/a.safetensors") == ("dir/a.safetensors", 1.0)
    assert parse_lora_arg("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)


def test_lora_modules_import_neither_jax_nor_torch():
    code = ("import sys, weights.lora, weights.lora_read, weights.lora_convert, weights.lora_names; "
            "bad = {'jax', 'torch', 'flax'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
