"""FantasyWorld's added modules: Flax against our PyTorch reference, module by module, fp32, rel L2 <= 1e-5.

Both sides get the same perturbed weights through the one weight map (`weights.fantasyworld_map`): the
torch modules are taken from a whole tiny reference model, the Flax module is filled from its torch
state dict re-laid by the map's entries for that module's prefix.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jax_impl.fantasyworld import bicross as jbi
from jax_impl.fantasyworld import camera as jcam
from jax_impl.fantasyworld import geometry as jgeo
from jax_impl.fantasyworld import heads as jheads
from jax_impl.loading import build_loaded, load_params
from parity.metrics import rel_l2
from torch_ref.fantasyworld import bicross as tbi
from torch_ref.fantasyworld import geometry as tgeo
from torch_ref.fantasyworld.camera import plucker_rays
from torch_ref.fantasyworld.checkpoint import build_model
from parity.tolerances import FP32_TOL
from weights.configs.fantasyworld import FantasyWorldConfig
from weights.entry import Entry
from weights.fantasyworld_map import FLAX, TORCH, fantasyworld_entries, relayout
from weights.safetensors_io import CheckpointError

TOL = FP32_TOL
CFG = FantasyWorldConfig.tiny()
F_, H_, W_ = 3, 3, 4  # tiny token grid: latent frames, rows, columns
P_ = CFG.patch_start + H_ * W_


@pytest.fixture(scope="module")
def ref():
    return build_model(CFG, seed=0)


def flax_weights(model: torch.nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """The map's entries under `prefix`, prefix stripped, applied to the torch model's tensors."""
    cut = len(prefix) + 1
    entries = [Entry(e.diffusers[cut:], e.wan, e.flax[cut:], e.shape, e.kind)
               for e in fantasyworld_entries(CFG) if e.diffusers.startswith(prefix + ".")]
    state = {k[cut:]: v.detach().numpy() for k, v in model.state_dict().items() if k.startswith(prefix + ".")}
    return relayout(state, entries, TORCH, FLAX, prefix)


def filled(make, model: torch.nn.Module, prefix: str) -> nnx.Module:
    """The Flax module `make()` holding the torch module's weights (built abstractly, then filled)."""
    return build_loaded(make, flax_weights(model, prefix), prefix)


def jrun(fn, module, *args):
    """fn(module, *args) under nnx.jit: eager op-by-op dispatch is ~10x slower on a CPU."""
    return nnx.jit(fn)(module, *args)


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(ours, theirs, what: str) -> None:
    err = rel_l2(np.asarray(ours), theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs)
    assert err <= TOL, f"{what}: rel L2 {err:.2e} > {TOL}"


def test_rope_tables_match():
    pos = tgeo.frame_positions(H_, W_, CFG.patch_start)
    assert np.array_equal(pos.numpy(), jgeo.frame_positions(H_, W_, CFG.patch_start))
    for t, j in zip(tgeo.rope2d_tables(pos, 16, 100.0), jgeo.rope2d_tables(pos.numpy(), 16, 100.0)):
        close(j, t, "2D rope")
    split = CFG.bicross_rope_split()
    for special in (0, CFG.patch_start):
        tc, ts = tbi.rope3d_tables((F_, H_, W_), split, special)
        jc, js = jbi.rope3d_tables((F_, H_, W_), split, special)
        close(jc[:, 0::2], tc, "3D rope cos")  # Wan layout repeats each pair's angle
        close(js[:, 1::2], ts, "3D rope sin")
    assert np.all(np.asarray(jc).reshape(F_, P_, -1)[:, :CFG.patch_start] == 1.0)


@pytest.mark.parametrize("kind", ["frame", "global", "trunk"])
def test_geometry_block(ref, kind):
    if kind == "trunk":
        tblock, prefix, qk, d, heads = ref.camera_head.trunk[1], "camera_head.trunk.1", False, CFG.head_dim_in, CFG.head_heads
        x, rope, e0 = randn(1, 9, d), None, None
    else:
        tblock = (ref.frame_blocks if kind == "frame" else ref.global_blocks)[1]
        prefix, qk, d, heads = f"{kind}_blocks.1", True, CFG.geo_dim, CFG.geo_heads
        rows, n = (F_, P_) if kind == "frame" else (1, F_ * P_)
        pos = tgeo.frame_positions(H_, W_, CFG.patch_start)
        rope = tuple(t.repeat(n // P_, 1) for t in tgeo.rope2d_tables(pos, d // heads, CFG.geo_rope_base))
        x, e0 = randn(rows, n, d), randn(rows, 6, d, seed=1)
    jblock = filled(lambda: jgeo.GeometryBlock(d, heads, 4, qk, attention_backend="xla", rngs=nnx.Rngs(0)), ref, prefix)
    jrope = None if rope is None else tuple(jnp.asarray(t.numpy()) for t in rope)
    with torch.no_grad():
        want = tblock(x, rope, e0)
        mod = tblock.mod(e0) if e0 is not None else None
        half = tblock.attention_half(x, rope, mod)
    jx, je0 = jnp.asarray(x.numpy()), None if e0 is None else jnp.asarray(e0.numpy())
    got_half = jrun(lambda m, x, r, e: m.attention_half(x, r, None if e is None else m.mod(e)), jblock, jx, jrope, je0)
    close(got_half, half, f"{kind} attention half")
    close(jrun(lambda m, x, r, e: m(x, r, e), jblock, jx, jrope, je0), want, f"{kind} block")


def test_geometry_embed(ref):
    jemb = filled(lambda: jgeo.GeometryEmbed(CFG, rngs=nnx.Rngs(0)), ref, "geometry")
    x, t = randn(1, F_ * H_ * W_, CFG.wan_dim), torch.tensor([731.0])
    with torch.no_grad():
        tokens, e0 = ref.geometry(x, (F_, H_, W_)), ref.geometry.time(t)
    close(jrun(lambda m, x: m(x, (F_, H_, W_)), jemb, jnp.asarray(x.numpy())), tokens, "geometry tokens")
    close(jrun(lambda m, t: m.time(t), jemb, jnp.asarray(t.numpy())), e0, "geometry time modulation")


def test_bicross_attention(ref):
    jb = filled(lambda: jbi.BiCrossAttention(CFG.wan_dim, CFG.geo_dim, CFG.bicross_dim, CFG.bicross_heads,
                                     attention_backend="xla", rngs=nnx.Rngs(0)), ref, "bicross.0")
    split = CFG.bicross_rope_split()
    video, geo = randn(1, F_ * H_ * W_, CFG.wan_dim), randn(1, F_ * P_, CFG.geo_dim, seed=1)
    with torch.no_grad():
        tv, tg = ref.bicross[0](video, geo, tbi.rope3d_tables((F_, H_, W_), split), tbi.rope3d_tables((F_, H_, W_), split, CFG.patch_start))
    jv, jg = jrun(lambda m, *a: m(*a), jb, jnp.asarray(video.numpy()), jnp.asarray(geo.numpy()),
                  jbi.rope3d_tables((F_, H_, W_), split), jbi.rope3d_tables((F_, H_, W_), split, CFG.patch_start))
    close(jv, tv, "bicross video")
    close(jg, tg, "bicross geometry")


def test_camera_pose_encoder(ref):
    jenc = filled(lambda: jcam.CameraPoseEncoder(CFG, rngs=nnx.Rngs(0)), ref, "pose_encoder")
    rays = randn(1, CFG.frames, CFG.height, CFG.width, 6)
    with torch.no_grad():
        want = ref.pose_encoder(rays)
    assert want.shape == (1, F_ * H_ * W_, CFG.camera_context_dim)
    close(jrun(lambda m, r: m(r), jenc, jnp.asarray(rays.numpy())), want, "camera features")


def test_camera_adapter(ref):
    jad = filled(lambda: jcam.CameraAdapter(CFG, rngs=nnx.Rngs(0)), ref, "adapters.2")
    a, cam = randn(1, 36, CFG.wan_dim), randn(1, 36, CFG.camera_context_dim, seed=1)
    with torch.no_grad():
        want = ref.adapters[2](a, cam)
    close(jad(jnp.asarray(a.numpy()), jnp.asarray(cam.numpy())), want, "adapter")
    assert np.array_equal(np.asarray(jad(jnp.asarray(a.numpy()), jnp.zeros((1, 36, CFG.camera_context_dim)))), a.numpy())


def test_plucker_rays():
    g = torch.Generator().manual_seed(2)
    c2w = torch.eye(4).repeat(3, 1, 1)
    c2w[:, :3, 3] = torch.randn(3, 3, generator=g)
    q, _ = torch.linalg.qr(torch.randn(3, 3, 3, generator=g))
    c2w[:, :3, :3] = q
    k = torch.tensor([[30.0, 28.0, 31.5, 23.0]]).repeat(3, 1)
    close(jcam.plucker_rays(jnp.asarray(c2w.numpy()), jnp.asarray(k.numpy()), 48, 64), plucker_rays(c2w, k, 48, 64), "rays")


def test_camera_head(ref):
    jhead = filled(lambda: jheads.CameraHead(CFG, attention_backend="xla", rngs=nnx.Rngs(0)), ref, "camera_head")
    tap = randn(1, F_, P_, CFG.head_dim_in)
    with torch.no_grad():
        want = ref.camera_head(tap)
    got = jrun(lambda m, t: m(t), jhead, jnp.asarray(tap.numpy()))
    assert len(got) == CFG.head_iterations and got[-1].shape == (1, CFG.frames, 9)
    for i, (j, t) in enumerate(zip(got, want)):
        close(j, t, f"camera pose pass {i}")


def test_temporal_upsampler(ref):
    tup = ref.depth_head.upsamplers[2]
    c = CFG.dpt_channels[2]
    jup = filled(lambda: jheads.TemporalUpsampler(c, rngs=nnx.Rngs(0)), ref, "depth_head.upsamplers.2")
    z = randn(1, c, F_, H_, W_)
    with torch.no_grad():
        want = tup(z)
    got = jrun(lambda m, z: m(z), jup, jnp.asarray(z.permute(0, 2, 3, 4, 1).numpy()))
    assert got.shape == (1, CFG.frames, H_, W_, c)
    close(jnp.transpose(got, (0, 4, 1, 2, 3)), want, "temporal upsampler")


@pytest.mark.slow
@pytest.mark.parametrize("name,out_dim,act", [("depth_head", 2, "exp"), ("point_head", 4, "inv_log")])
def test_dpt_head(ref, name, out_dim, act):
    jhead = filled(lambda: jheads.DPTHead(CFG, out_dim, act, rngs=nnx.Rngs(0)), ref, name)
    taps = [randn(1, F_, P_, CFG.head_dim_in, seed=s) for s in range(CFG.joint_layers)]
    with torch.no_grad():
        values, conf = getattr(ref, name)(taps, (H_, W_))
        levels = [getattr(ref, name).level(k, taps[i], (H_, W_)) for k, i in enumerate(CFG.dpt_layers)]
    jt = [jnp.asarray(t.numpy()) for t in taps]
    got_levels, (jv, jc) = jrun(lambda m, t: ([m.level(k, t[i], (H_, W_)) for k, i in enumerate(CFG.dpt_layers)],
                                              m(t, (H_, W_), frames_per_chunk=5)), jhead, jt)
    for k, lvl in enumerate(got_levels):
        close(jnp.transpose(lvl.reshape(-1, *lvl.shape[2:]), (0, 3, 1, 2)), levels[k], f"{name} level {k}")
    assert jv.shape == (1, CFG.frames, CFG.height, CFG.width, out_dim - 1)
    close(jv, values, f"{name} values")
    close(jc, conf, f"{name} confidence")


def test_loader_rejects_wrong_weights(ref):
    weights = flax_weights(ref, "adapters.0")
    weights.pop("shift_up.kernel")
    weights["shift_up.bias"] = np.zeros(7, np.float32)
    with pytest.raises(CheckpointError, match=r"missing 1: shift_up\.kernel.*mis-shaped 1: shift_up\.bias"):
        load_params(nnx.eval_shape(lambda: jcam.CameraAdapter(CFG, rngs=nnx.Rngs(0))), weights)
