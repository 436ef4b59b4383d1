"""Spatial tiling of the VAE against diffusers' tiled path (fp32, CPU), the whole-frame production path,
the memory estimate and tile="auto".

Tile sizes are small enough that non-square frames split into several overlapping tiles in both
directions, with edge tiles of other sizes. Wan2.1 runs 5 frames (two time chunks per tile); Wan2.2 one
frame (its own parts are patchify and the tile units; the time chunking is the same code). Every distinct
tile shape is a compiled chunk step (a few seconds each on a CPU), hence the small counts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import vae, vae_memory, vae_run, vae_tiling
from jax_impl.vae import Cursor, VaeInputError
from weights.configs.vae import TINY_WAN21_VAE, TINY_WAN22_VAE
from jax_impl.vae_tiling import Tiling
from parity.tolerances import FP32_TOL
from parity.vae import tiled_parity
from torch_ref.vae import write_vae_folder
from jax_impl.loading import load_vae

# (config, tiling, frame height, frame width): Wan2.1 64x96 -> encode 3x4 tiles, decode 3x4; Wan2.2 (patch 2,
# tile sizes in patchified pixels when encoding, as diffusers counts them) 96x128 -> encode 2x2, decode 3x4.
# Every edge tile is smaller than the others (padded and masked inside the network) and wider than the blend,
# so it shows in the result: an edge tile no wider than the blend gets weight 0 and would hide a masking bug.
CASES = {
    "tiny-wan2.1": (TINY_WAN21_VAE, Tiling(32, 32, 24, 24), 64, 96, 5),
    "tiny-wan2.2": (TINY_WAN22_VAE, Tiling(48, 48, 32, 32), 96, 128, 1),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_tiles")
    return {name: write_vae_folder(cfg, root / name, seed=4) for name, (cfg, *_) in CASES.items()}


def _parity(folders, variant, kinds=("encode", "decode")):
    _, tiling, h, w, frames = CASES[variant]
    return tiled_parity(folders[variant], tiling, frames=frames, height=h, width=w, seed=2, kinds=kinds)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(CASES))
def test_tiled_encode_decode_match_diffusers(folders, variant):
    report = _parity(folders, variant)
    assert report.passed, report.table()
    assert [l.name for l in report.layers] == ["tiled.encode.mean", "tiled.decode.video"]
    assert all(l.rel_l2 <= FP32_TOL for l in report.layers)
    for kind, t in report.meta["tiles"].items():  # several overlapping tiles in both directions
        assert t["rows"] >= 2 and t["cols"] >= 2 and min(t["blend"]) > 0, (kind, t)
    assert report.meta["video_shape"][2] != report.meta["video_shape"][3]


def _wrong_direction(prev, cur, extent, axis, prev_len, cur_len):
    """Fades the wrong way: the new tile's first row comes from itself, the last from the old tile."""
    m = min(prev.shape[axis], cur.shape[axis], extent)
    e = jnp.minimum(jnp.minimum(prev_len, cur_len), extent)
    shape = [m if a == axis else 1 for a in range(cur.ndim)]
    y = jnp.arange(m)
    w = (y / e).reshape(shape)
    tail = jnp.take(prev, jnp.clip(prev_len - e + y, 0, prev.shape[axis] - 1), axis=axis)
    head = jnp.take(cur, y, axis=axis)
    mixed = jnp.where((y < e).reshape(shape), tail * w + head * (1 - w), head)
    return jnp.concatenate([mixed, jnp.take(cur, jnp.arange(m, cur.shape[axis]), axis=axis)], axis=axis)


def _off_by_one(real):
    def plan(*args):
        return tuple(dataclasses.replace(ax, blend=ax.blend + 1) for ax in real(*args))
    return plan


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["blend direction", "overlap off by one", "no padding mask"])
def test_planted_tiling_bugs_fail(folders, monkeypatch, request, bug):
    """The parity test must catch a wrong blend direction, an overlap one row too wide, and padded edge tiles
    whose padding the convs see (no mask), in encode and decode."""
    kinds = ("decode",)
    if bug == "blend direction":
        monkeypatch.setattr(vae_tiling, "blend", _wrong_direction)
        jax.clear_caches()  # the blending program compiled by earlier tests holds the real blend
        request.addfinalizer(jax.clear_caches)  # and later tests must not run the planted one
    elif bug == "overlap off by one":
        monkeypatch.setattr(vae_tiling, "plan", _off_by_one(vae_tiling.plan))
    else:
        monkeypatch.setattr(Cursor, "mask", lambda self, x: x)
        monkeypatch.setattr(vae, "_TABLES", {})  # else the steps compiled (with the mask) by earlier tests run
        kinds = ("encode", "decode")
    report = _parity(folders, "tiny-wan2.1", kinds=kinds)
    assert not report.passed
    assert all(l.rel_l2 > 1e-3 for l in report.layers), report.table()


def test_tiling_validation():
    with pytest.raises(ValueError, match="0 < stride <= tile"):
        Tiling(32, 32, 40, 24)
    with pytest.raises(VaeInputError, match="multiples of 16 pixels.*stride_width=24"):
        Tiling(32, 32, 16, 24).check(TINY_WAN22_VAE)
    Tiling(32, 32, 16, 24).check(TINY_WAN21_VAE)  # 8-pixel latents: fine


@pytest.fixture(scope="module")
def model21(folders):
    return load_vae(folders["tiny-wan2.1"])


def test_tile_argument_checked(model21):
    z = jnp.zeros((1, 2, 7, 10, 16))
    with pytest.raises(ValueError, match="tile must be one of"):
        vae_run.decode(model21, z, tile="yes")
    with pytest.raises(VaeInputError, match="multiples of 8"):
        vae_run.decode(model21, z, tile="on", tiling=Tiling(36, 32, 24, 24))


def test_small_frames_are_not_tiled(model21):
    """diffusers' condition: frames no larger than one tile run whole, whatever `tile` says."""
    t = CASES["tiny-wan2.1"][1]
    assert not vae_tiling.applies(TINY_WAN21_VAE, "decode", (1, 2, 4, 4, 16), t)
    assert vae_tiling.applies(TINY_WAN21_VAE, "decode", (1, 2, 4, 5, 16), t)
    assert not vae_tiling.applies(TINY_WAN21_VAE, "encode", (1, 5, 32, 32, 3), t)
    assert not vae_run.use_tiles(model21, "decode", np.zeros((1, 2, 4, 4, 16)), "on", t)


@pytest.mark.slow
def test_memory_estimate_and_auto(model21, monkeypatch):
    """The estimate counts the real result buffer, tiling lowers the per-step memory, and tile="auto" tiles
    exactly when the whole-frame estimate exceeds the free memory (none reported on a CPU: auto = off)."""
    _, tiling, h, w, _ = CASES["tiny-wan2.1"]
    z = np.asarray(np.random.default_rng(0).standard_normal((1, 2, h // 8, w // 8, 16)), np.float32)
    whole = vae_memory.estimate(model21, "decode", z.shape, dtype=z.dtype)
    tiled = vae_memory.estimate(model21, "decode", z.shape, dtype=z.dtype, tile=True, tiling=tiling)
    assert whole is not None and tiled is not None and not whole.tiled and tiled.tiled
    assert whole.result_bytes == vae_run.decode(model21, z, tile="off").nbytes
    assert tiled.result_bytes == whole.result_bytes and tiled.tile_bytes > 0 and whole.tile_bytes == 0
    assert tiled.step_bytes < whole.step_bytes
    assert whole.peak_bytes == whole.step_bytes + whole.result_bytes
    assert tiled.steps == 2 and whole.steps == 2  # one (padded) tile shape x (first chunk, steady chunk)

    assert vae_memory.free_bytes() is None  # CPU
    assert not vae_run.use_tiles(model21, "decode", z, "auto", tiling)
    assert not vae_memory.needs_tiles(model21, "decode", z, tiling, free=int(whole.peak_bytes / 0.8))
    with pytest.warns(UserWarning, match="even tiled"):
        assert vae_memory.needs_tiles(model21, "decode", z, tiling, free=1)
    assert vae_memory.needs_tiles(model21, "decode", z, tiling, free=int(whole.peak_bytes * 1.0))

    monkeypatch.setattr(vae_memory, "free_bytes", lambda device=None: int(whole.peak_bytes * 1.0))
    auto = np.asarray(vae_run.decode(model21, z, tiling=tiling))
    np.testing.assert_array_equal(auto, np.asarray(vae_run.decode(model21, z, tile="on", tiling=tiling)))
    assert np.abs(auto - np.asarray(vae_run.decode(model21, z, tile="off"))).max() > 1e-3  # tiles did change it


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(CASES))
def test_whole_frame_fast_path_matches_diffusers(folders, variant):
    """`stream` (compiled steps, donated caches, one output buffer) is what users run without tiles; the layer
    parity tests record taps through a separate jit, so check this path end to end as well (5 frames)."""
    from parity.metrics import rel_l2
    from parity.vae import make_video
    from torch_ref.vae import load_vae_torch, run_vae

    cfg, _, h, w, _ = CASES[variant]
    s = cfg.spatial_factor
    model = load_vae(folders[variant])
    video = make_video(cfg, frames=5, height=h, width=w, seed=5)
    z = np.asarray(np.random.default_rng(1).standard_normal((1, 2, h // s, w // s, cfg.z_dim)), np.float32)
    rmean, rdec, _ = run_vae(load_vae_torch(folders[variant]), video, latents=z)
    mean = vae_run.encode(model, video, tile="off")
    assert mean.shape == rmean.shape and rel_l2(np.asarray(mean), rmean) <= FP32_TOL
    dec = vae_run.decode(model, z, tile="off")
    assert dec.shape == rdec.shape == (1, 5, h, w, 3) and rel_l2(np.asarray(dec), rdec) <= FP32_TOL
    assert vae_run.encode(model, video, tile="off", return_moments=True).shape[-1] == 2 * cfg.z_dim


def test_tiles_at_a_new_size_compile_only_the_video_sized_programs(model21):
    """Cutting, blending and writing tiles take offsets and valid sizes as traced numbers: a decode at a new
    size whose tiles have the same padded shape compiles only what depends on the video's shape (the tile
    taker, the output buffer and the writer), not a slice, crop and blend per tile position as eager ops did
    (26 compilations for this 2x3 grid; each costs a fraction of a second on a GPU)."""
    from jax import monitoring

    tiling = Tiling(32, 32, 24, 24)
    count = {"n": 0}

    def listen(event, duration, **kw):
        count["n"] += event == "/jax/core/compile/backend_compile_duration"

    monitoring.register_event_duration_secs_listener(listen)
    try:
        for h, w in ((8, 12), (10, 14)):
            z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, h, w, 16)), jnp.float32)
            count["n"] = 0
            jax.block_until_ready(vae_tiling.tiled_decode(model21, z, tiling))
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert count["n"] <= 3, f"{count['n']} compilations for a decode at a new size"
