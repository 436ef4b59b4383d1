"""FantasyWorld's PyTorch reference: end to end on the tiny config, its Wan half against diffusers' own
block, the behaviours docs/fantasyworld.md calls easy to get wrong, and the released-layout checkpoints."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from torch_ref.fantasyworld.camera import AdaptedCrossAttention, plucker_rays
from torch_ref.fantasyworld.checkpoint import (
    BASE_COMPONENT_SHAPES, PICKLE, SAFETENSORS, build_model, load_fantasyworld, read_released, torch_state,
    write_tiny_fantasyworld,
)
from torch_ref.fantasyworld.heads import CameraHead, ResidualConvUnit, TemporalUpsampler
from torch_ref.fantasyworld.model import wan_attention_half, wan_ffn_half
from weights.configs.fantasyworld import FantasyWorldConfig
from weights.fantasyworld_map import BASE_COMPONENTS, fantasyworld_entries
from weights.safetensors_io import CheckpointError

DOC = Path(__file__).resolve().parents[1] / "docs" / "fantasyworld.md"


def tiny_inputs(cfg: FantasyWorldConfig, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    f = (cfg.frames - 1) // 4 + 1
    return dict(
        latents=torch.randn(1, 36, f, cfg.height // 8, cfg.width // 8, generator=g),
        timestep=torch.tensor([700.0]),
        text=torch.randn(1, 512, cfg.wan.text_dim, generator=g),
        image=torch.randn(1, 257, cfg.wan.image_dim, generator=g),
        rays=torch.randn(1, cfg.frames, cfg.height, cfg.width, 6, generator=g),
    )


@pytest.fixture(scope="module")
def cfg() -> FantasyWorldConfig:
    return FantasyWorldConfig.tiny()


@pytest.fixture(scope="module")
def model(cfg):
    return build_model(cfg, seed=0)


@pytest.fixture(scope="module")
def run(model, cfg):
    inp = tiny_inputs(cfg)
    with torch.no_grad():
        return inp, model(**inp, heads=True, capture=True)


def test_end_to_end_shapes_and_ranges(run, cfg):
    inp, (velocity, pred, taps) = run
    t, h, w = cfg.frames, cfg.height, cfg.width
    assert velocity.shape == (1, 16) + inp["latents"].shape[2:]
    expected = {"pose_enc": (1, t, 9), "depth": (1, t, h, w, 1), "depth_conf": (1, t, h, w),
                "world_points": (1, t, h, w, 3), "world_points_conf": (1, t, h, w)}
    assert {k: tuple(v.shape) for k, v in pred.items()} == expected
    assert all(torch.isfinite(v).all() for v in pred.values()) and torch.isfinite(velocity).all()
    assert (pred["depth"] > 0).all() and (pred["depth_conf"] > 1).all() and (pred["world_points_conf"] > 1).all()
    assert (pred["pose_enc"][..., 7:] >= 0).all()
    assert taps["camera_features"].shape == (1, 36, cfg.camera_context_dim)
    assert taps["layers.1.geo"].shape == (1, 3 * 17, cfg.geo_dim)


def test_camera_and_geometry_change_the_video(model, cfg, run):
    """The adapter (rays) and the bidirectional attention (gates) both reach the velocity."""
    inp, (velocity, _, _) = run
    with torch.no_grad():
        no_camera = model(**{**inp, "rays": None})[0]
        saved = [b.gate_video.clone() for b in model.bicross]
        for b in model.bicross:
            b.gate_video.zero_()
        no_bicross = model(**inp)[0]
        for b, g in zip(model.bicross, saved):
            b.gate_video.copy_(g)
    assert (velocity - no_camera).abs().max() > 1e-3
    assert (velocity - no_bicross).abs().max() > 1e-3


def test_wan_halves_equal_diffusers_block(model, cfg):
    """Attention half + feed-forward half == diffusers' WanTransformerBlock.forward (a block without the
    adapter, and an adapted block given no camera)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 36, cfg.wan_dim, generator=g)
    ctx = torch.randn(1, 257 + 512, cfg.wan_dim, generator=g)
    temb6 = torch.randn(1, 6, cfg.wan_dim, generator=g)
    rotary = model.wan.rope(torch.zeros(1, 36, 3, 6, 8))
    with torch.no_grad():
        for i in (3, 0):
            block = model.wan.blocks[i]
            ours = wan_ffn_half(block, *wan_attention_half(block, x, ctx, temb6, rotary))
            theirs = block(x, ctx, temb6, rotary)
            assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), i


def test_adapted_processor_is_diffusers_without_camera(model, cfg):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(1, 36, cfg.wan_dim, generator=g)
    ctx = torch.randn(1, 257 + 512, cfg.wan_dim, generator=g)
    attn = model.wan.blocks[0].attn2
    assert isinstance(attn.processor, AdaptedCrossAttention)
    with torch.no_grad():
        ours = attn.processor(attn, h, ctx)
        theirs = WanAttnProcessor()(attn, h, ctx)
        shifted = attn.processor(attn, h, ctx, camera=torch.randn(1, 36, cfg.camera_context_dim, generator=g))
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
    assert (shifted - theirs).abs().max() > 1e-3


def _chunked_upsample(up: TemporalUpsampler, z: torch.Tensor) -> torch.Tensor:
    """The public code's way: one latent frame at a time, every causal conv keeping the last two frames it
    saw as history (zeros before the first); a doubling conv lets frame 0 through and starts after it."""
    x = up.conv_in(z)
    cache: dict[str, object] = {}
    frames = []
    for i in range(x.shape[2]):
        h = x[:, :, i:i + 1]
        for name, conv, gamma in (("t1", up.time_conv1, None), ("r1", up.res1_conv, up.res1_gamma),
                                  ("t2", up.time_conv2, None), ("r2", up.res2_conv, up.res2_gamma)):
            if gamma is None:
                if name not in cache:
                    cache[name] = None  # frame 0 passes through
                    continue
                hist = cache[name] if cache[name] is not None else torch.zeros_like(h[:, :, :1]).repeat(1, 1, 2, 1, 1)
                seq = torch.cat([hist, h], dim=2)
                cache[name] = seq[:, :, -2:]
                y = conv(seq)
                c = h.shape[1]
                h = torch.stack([y[:, :c], y[:, c:]], dim=3).flatten(2, 3)
            else:
                a = F.silu(F.normalize(h, dim=1) * h.shape[1] ** 0.5 * gamma)
                hist = cache.get(name, torch.zeros_like(a[:, :, :1]).repeat(1, 1, 2, 1, 1))
                seq = torch.cat([hist, a], dim=2)
                cache[name] = seq[:, :, -2:]
                h = h + conv(F.pad(seq, (1, 1, 1, 1)))
        frames.append(h)
    return torch.cat(frames, dim=2)


def test_temporal_upsampler_equals_frame_by_frame_decoding():
    torch.manual_seed(0)
    up = TemporalUpsampler(6).eval()
    with torch.no_grad():
        for p in up.parameters():
            p.add_(0.2 * torch.randn_like(p))
        z = torch.randn(2, 6, 4, 3, 5)
        whole, chunked = up(z), _chunked_upsample(up, z)
    assert whole.shape == (2, 6, 13, 3, 5)
    assert torch.allclose(whole, chunked, rtol=0, atol=1e-5)


def test_camera_head_expands_tokens_block_major(cfg):
    """Expanded token m of frames 1.. comes from Conv1d channel 4c + m // n of source frame m % n."""
    head = CameraHead(cfg).eval()
    d, n = cfg.head_dim_in, 3
    with torch.no_grad():
        head.time_upsample.bias.zero_()
        head.time_upsample.weight.zero_()
        for c in range(d):
            for s in range(4):
                head.time_upsample.weight[4 * c + s, c, 0] = s + 1.0  # copy s of channel c: source x (s+1)
        tap = torch.randn(1, n + 1, 5, d)
        tokens = head.camera_tokens(tap)
    src = tap[:, 1:, 0]
    for m in range(4 * n):
        assert torch.allclose(tokens[:, 1 + m], src[:, m % n] * (m // n + 1))


def test_residual_conv_unit_skip_carries_relu():
    rcu = ResidualConvUnit(3)
    with torch.no_grad():
        rcu.conv2.weight.zero_()
        rcu.conv2.bias.zero_()
        x = torch.randn(1, 3, 4, 4)
        assert torch.equal(rcu(x), F.relu(x))


def test_plucker_rays_geometry():
    g = torch.Generator().manual_seed(5)
    c2w = torch.eye(4).repeat(2, 1, 1)
    c2w[1, :3, 3] = torch.tensor([1.0, -2.0, 0.5])
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    c2w[1, :3, :3] = q * torch.sign(torch.det(q))
    k = torch.tensor([[10.0, 10.0, 3.5, 2.5]]).repeat(2, 1)
    rays = plucker_rays(c2w, k, 6, 8)
    moment, d = rays[..., :3], rays[..., 3:]
    assert rays.shape == (2, 6, 8, 6)
    assert torch.allclose(d.norm(dim=-1), torch.ones(2, 6, 8), atol=1e-6)
    assert torch.allclose((moment * d).sum(-1), torch.zeros(2, 6, 8), atol=1e-5)
    assert torch.allclose(moment[0], torch.zeros(6, 8, 3))  # camera at the origin
    # the pixel whose centre is the principal point looks straight down the optical axis
    assert torch.allclose(d[0, 2, 3], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(d[0, 2, 4], torch.tensor([0.1, 0.0, 1.0]) / torch.tensor([0.1, 0.0, 1.0]).norm())
    assert torch.allclose(d[1], torch.einsum("hwc,rc->hwr", d[0], c2w[1, :3, :3]), atol=1e-6)


# ------------------------------------------------------------------------------------------ the doc's key list
def doc_key_patterns() -> list[tuple[str, tuple[int, ...]]]:
    appendix = DOC.read_text(encoding="utf-8").split("## Appendix", 1)[1]
    rows = re.findall(r"^\| `([^`]+)` \| `\[([0-9, ]*)\]` \|$", appendix, flags=re.M)
    return [(p, tuple(int(v) for v in s.split(",") if v.strip())) for p, s in rows]


def expand(patterns, cfg: FantasyWorldConfig) -> dict[str, tuple[int, ...]]:
    symbols = {
        "b": range(cfg.branch_start), "j": range(cfg.joint_layers),
        "a": range(max(0, min(cfg.adapter_blocks, cfg.wan.num_layers) - cfg.branch_start)),
        "n": range(cfg.head_trunk_depth), "r": range(1, 4), "head": ("depth_head", "point_head"),
    }
    out = {}
    for pattern, shape in patterns:
        names = re.findall(r"\{(\w+)\}", pattern)
        for values in itertools.product(*(symbols[n] for n in names)):
            out[pattern.format(**dict(zip(names, values)))] = shape
    return out


def test_doc_lists_every_14b_key_with_its_shape():
    patterns = doc_key_patterns()
    assert len(patterns) > 300
    full = FantasyWorldConfig.full()
    assert expand(patterns, full) == {e.wan: e.shape for e in fantasyworld_entries(full)}


@pytest.fixture(scope="module")
def written(tmp_path_factory, cfg):
    return write_tiny_fantasyworld(tmp_path_factory.mktemp("fw") / "tiny", cfg, seed=0)


def test_written_checkpoint_keys_are_the_doc_patterns(written, cfg):
    """The files hold the doc's keys plus, as the public model's state dict does, base-component tensors under
    each of `pipe.text_encoder.`, `pipe.image_encoder.`, `pipe.vae.`, which reading sets aside."""
    keys = set(expand(doc_key_patterns(), cfg))
    assert {k.startswith(BASE_COMPONENTS) for k in BASE_COMPONENT_SHAPES} == {True}
    assert {p for p in BASE_COMPONENTS if any(k.startswith(p) for k in BASE_COMPONENT_SHAPES)} == set(BASE_COMPONENTS)
    assert set(read_released(written / SAFETENSORS)) == keys
    assert set(read_released(written / PICKLE, allow_pickle=True)) == keys
    assert set(torch.load(written / PICKLE, weights_only=True)) == keys | set(BASE_COMPONENT_SHAPES)


def test_every_written_parameter_is_perturbed(written):
    tensors = read_released(written / SAFETENSORS)
    for name, x in tensors.items():
        assert x.size < 2 or np.std(x) > 1e-3, f"{name} is constant"
        assert not np.allclose(x, 0.0) and not np.allclose(x, 1.0), f"{name} left at its init"


def test_loader_round_trip(written, model, cfg):
    inp = tiny_inputs(cfg, seed=1)
    ref = torch_state(model)
    with torch.no_grad():
        expected = model(**inp)[0]
    for allow_pickle, remove in ((False, None), (True, SAFETENSORS)):
        folder = written
        if remove:
            folder = written.parent / "pickle-only"
            folder.mkdir(exist_ok=True)
            for f in written.iterdir():
                if f.name != remove:
                    (folder / f.name).write_bytes(f.read_bytes())
        loaded = load_fantasyworld(folder, allow_pickle=allow_pickle)
        state = torch_state(loaded)
        assert state.keys() == ref.keys() and all(np.array_equal(state[k], ref[k]) for k in ref)
        with torch.no_grad():
            assert torch.equal(loaded(**inp)[0], expected)
    with pytest.raises(CheckpointError, match="pickle"):
        load_fantasyworld(written.parent / "pickle-only")


def test_loader_names_missing_and_misshaped_tensors(written, tmp_path, cfg):
    import shutil

    from weights.safetensors_io import save_tensors

    tensors = read_released(written / SAFETENSORS)
    del tensors["vggt.camera_head.token_norm.weight"]
    tensors["IRGBlock.0.bicross_attention.gamma_m1"] = np.zeros(3, np.float32)
    bad = tmp_path / "bad"
    shutil.copytree(written, bad)
    (bad / PICKLE).unlink()
    save_tensors(bad / SAFETENSORS, tensors)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): vggt\.camera_head\.token_norm\.weight.*mis-shaped 1 tensor\(s\): IRGBlock\.0"):
        load_fantasyworld(bad)
