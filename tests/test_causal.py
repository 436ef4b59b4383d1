"""Block-causal Wan DiT with KV cache and the few-step block sampler: equivalence, parity, failure modes.

Tiny I2V model (CLIP image tokens, 36 input channels) in float32. Shapes are kept to a few so that the
jitted block step compiles a handful of times for the whole file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jax_impl import causal as C
from weights.configs.presets import get_preset
from jax_impl.rope import rope_tables
from parity.causal import (
    LAYER_TOL,
    SAMPLER_TOL,
    causal_layer_parity,
    causal_sampler_parity,
    jax_cached_blocks,
    make_causal_inputs,
    torch_cached_blocks,
)
from parity.dit import load_models
from parity.metrics import rel_l2
from parity.tolerances import FP32_TOL
from torch_ref import causal as T

EQ_TOL = FP32_TOL  # cached against uncached, one side against itself
PRESET = "tiny-wan2.1-i2v-14b"
WIN = C.CausalConfig(frames_per_block=1, window=2)  # sink + one earlier block + the current one
FULL2 = C.CausalConfig(frames_per_block=2)  # two-frame blocks, no window


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny eager torch ops: OpenMP threads only add contention (8 s vs 0.1 s for a sampler run on 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    return load_models(tiny_ckpt(PRESET) / "transformer", "float32")


def _inputs(models, config, **kw):
    return make_causal_inputs(models["jax"].cfg, config, **kw)


def _sample_kw(inp, config, **over):
    kw = dict(config=config, noise=inp.noise, step_noise=inp.step_noise, image=inp.image, condition=inp.condition)
    return kw | over


# ------------------------------------------------------------------------------------------------
# Validation: clear errors before anything runs
# ------------------------------------------------------------------------------------------------
def test_block_size_must_divide_frames(models):
    with pytest.raises(ValueError, match=r"frames_per_block=3 does not divide the 8 latent frames.*\[1, 2, 4, 8\]"):
        C.CausalConfig(frames_per_block=3).num_blocks(8)
    inp = _inputs(models, FULL2, frames=4)
    bad = C.CausalConfig(frames_per_block=3)
    for sample, model in ((C.sample_blocks, models["jax"]), (T.sample_blocks, models["torch_fp32"])):
        with pytest.raises(ValueError, match="does not divide the 4 latent frames"):
            sample(model, inp.text, **_sample_kw(inp, bad))
    with pytest.raises(ValueError, match="does not divide"):
        C.causal_forward(models["jax"], inp.latents, 500.0, inp.text, inp.image, config=bad)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(frames_per_block=2, window=3), r"multiple of frames_per_block=2.*--window 4"),
        (dict(frames_per_block=2, window=1), r"at least 2.*--window 2"),
        (dict(frames_per_block=0), "positive integer"),
        (dict(frames_per_block=1, window=2.0), "integer number of latent frames"),
        (dict(frames_per_block=1, timesteps=(500, 750)), "strictly decreasing"),
        (dict(frames_per_block=1, timesteps=(1200, 500)), r"\(0, 1000\]"),
        (dict(frames_per_block=1, timesteps=()), "at least one"),
        (dict(frames_per_block=1, shift=0.0), "shift"),
    ],
)
def test_config_errors_name_the_fix(kw, msg):
    with pytest.raises(ValueError, match=msg):
        C.CausalConfig(**kw)


def test_input_errors_name_the_fix():
    cfg = get_preset(PRESET).transformer
    t2v = get_preset("tiny-wan2.1-t2v-1.3b").transformer
    ok = dict(latent_shape=(2, 4, 4, 4), text_shape=(2, 8, cfg.text_dim), image_shape=(2, 9, cfg.image_dim),
              condition_shape=(2, 4, 4, 4, 20))
    assert C.check_causal_inputs(cfg, WIN, **ok) == 4
    cases = [
        (dict(condition_shape=(2, 3, 4, 4, 20)), "condition has 3 latent frames, the video has 4"),
        (dict(condition_shape=(1, 4, 4, 4, 20)), "condition has batch 1, the latents have batch 2"),
        (dict(condition_shape=(2, 4, 4, 4, 16)), r"\[batch, frames, height, width, 20\]"),
        (dict(condition_shape=None), "pass `condition`"),
        (dict(text_shape=(1, 8, cfg.text_dim)), "text embeddings have batch 1"),
        (dict(image_shape=(3, 9, cfg.image_dim)), "image tokens have batch 3"),
        (dict(image_shape=None), "pass `image`"),
        (dict(latent_shape=(2, 4, 5, 4)), "height=5 is not divisible"),
        (dict(latent_shape=(2, 2048, 4, 4), condition_shape=(2, 2048, 4, 4, 20)), "rope_max_seq_len"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            C.check_causal_inputs(cfg, WIN, **(ok | change))
    t2v_ok = dict(latent_shape=(1, 4, 4, 4), text_shape=(1, 8, t2v.text_dim))
    with pytest.raises(ValueError, match="drop `condition`"):
        C.check_causal_inputs(t2v, WIN, **t2v_ok, condition_shape=(1, 4, 4, 4, 20))
    with pytest.raises(ValueError, match="no image cross-attention"):
        C.check_causal_inputs(t2v, WIN, **t2v_ok, image_shape=(1, 9, 24))


def test_sampler_rejects_mismatched_noise(models):
    inp = _inputs(models, WIN, frames=4)
    with pytest.raises(ValueError, match="step_noise must be"):
        C.sample_blocks(models["jax"], inp.text, **_sample_kw(inp, WIN, step_noise=inp.step_noise[:2]))
    with pytest.raises(ValueError, match="condition has 2 latent frames, the video has 4"):
        C.sample_blocks(models["jax"], inp.text, **_sample_kw(inp, WIN, condition=inp.condition[:, :2]))


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
def test_block_causal_mask():
    m = C.block_causal_mask(4, 1)
    np.testing.assert_array_equal(m, np.tril(np.ones((4, 4), bool)))
    w = C.block_causal_mask(5, 2, window_blocks=2)[::2, ::2]  # one row/column per block
    expect = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(w, expect)


def test_rope_offsets_match_static_tables(models):
    """rope_tables with a traced frame offset (the cache's block counter) == static tables == torch's."""
    cfg = models["jax"].cfg
    traced = jax.jit(lambda off: rope_tables((2, 2, 3), cfg.rope_split, cfg.rope_max_seq_len, frame_offset=off))
    for offset in (0, 3, 7):
        cos, sin = traced(jnp.int32(offset))
        ref = rope_tables((2, 2, 3), cfg.rope_split, cfg.rope_max_seq_len, frame_offset=offset)
        np.testing.assert_array_equal(np.asarray(cos), np.asarray(ref[0]))
        np.testing.assert_array_equal(np.asarray(sin), np.asarray(ref[1]))
        tcos, tsin = T.rope_tables(models["torch_fp32"], (2, 2, 3), offset)
        np.testing.assert_array_equal(tcos.numpy(), np.asarray(ref[0]))
        np.testing.assert_array_equal(tsin.numpy(), np.asarray(ref[1]))


def test_one_block_is_the_plain_dit(models):
    """With a single block the causal forward is diffusers' WanTransformer3DModel forward."""
    from torch_ref.capture import run_dit

    config = C.CausalConfig(frames_per_block=2)
    inp = _inputs(models, config, frames=2, text_len=512)  # diffusers' I2V splits image from 512 text tokens
    want, _ = run_dit(models["torch_fp32"], inp.latents, inp.timesteps[:, 0], inp.text, inp.image)
    got = T.causal_forward(models["torch_fp32"], inp.latents, inp.timesteps, inp.text, inp.image, config=config)
    assert rel_l2(got.numpy(), want) < EQ_TOL


# ------------------------------------------------------------------------------------------------
# Equivalence: cached block-by-block == one pass with the block-causal mask
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, frames", [(FULL2, 4), (WIN, 6)], ids=["fpb2", "fpb1-window2"])
def test_cached_equals_masked_full(models, config, frames):
    inp = _inputs(models, config, batch=2, frames=frames)
    args = (inp.latents, inp.timesteps, inp.text, inp.image)
    full_j = np.asarray(C.causal_forward(models["jax"], *args, config=config))
    full_t = T.causal_forward(models["torch_fp32"], *args, config=config).numpy()
    blocks_j, _, _ = jax_cached_blocks(models["jax"], inp, config, capture=False)
    blocks_t, _, _ = torch_cached_blocks(models["torch_fp32"], inp, config, capture=False)
    fpb = config.frames_per_block
    for b, (bj, bt) in enumerate(zip(blocks_j, blocks_t)):
        sl = slice(b * fpb, (b + 1) * fpb)
        assert rel_l2(bj, full_j[:, sl]) <= EQ_TOL, f"jax block {b}"
        assert rel_l2(bt, full_t[:, sl]) <= EQ_TOL, f"torch block {b}"
    assert rel_l2(full_j, full_t) <= LAYER_TOL
    if config.window is not None:  # the window matters: without it the late blocks differ
        unwindowed = T.causal_forward(models["torch_fp32"], *args, config=C.CausalConfig(frames_per_block=fpb)).numpy()
        assert rel_l2(unwindowed[:, : config.window + 1], full_t[:, : config.window + 1]) < EQ_TOL
        assert rel_l2(unwindowed[:, -1], full_t[:, -1]) > 1e-3


# ------------------------------------------------------------------------------------------------
# Parity JAX vs torch
# ------------------------------------------------------------------------------------------------
def test_layer_parity_every_block(models):
    inp = _inputs(models, WIN, batch=2, frames=6)
    report = causal_layer_parity(models["jax"], models["torch_fp32"], inp, WIN)
    assert report.passed, report.table()
    names = [layer.name for layer in report.layers]
    assert "image_embedding" in names and "block3.blocks.1.self_attn" in names and names[-1] == "block5.output"


@pytest.mark.parametrize("config, frames", [(WIN, 6), (FULL2, 4)], ids=["fpb1-window2", "fpb2"])
def test_sampler_parity_and_uncached_reference(models, config, frames):
    inp = _inputs(models, config, batch=2, frames=frames, seed=1)
    report = causal_sampler_parity(models["jax"], models["torch_fp32"], inp, config)
    assert report.passed, report.table()
    assert len(report.layers) == frames // config.frames_per_block and report.worst_rel_l2 <= SAMPLER_TOL
    # The cache changes nothing: re-running the masked full forward on the growing prefix gives the same video.
    cached = T.sample_causal(models["torch_fp32"], inp.text, **_sample_kw(inp, config)).numpy()
    uncached = T.sample_causal_uncached(models["torch_fp32"], inp.text, **_sample_kw(inp, config)).numpy()
    assert rel_l2(cached, uncached) <= EQ_TOL
    assert np.isfinite(cached).all() and np.abs(cached).max() > 0.1


# ------------------------------------------------------------------------------------------------
# Failure modes
# ------------------------------------------------------------------------------------------------
def _blocks(models, inp, config, **over):
    return [np.asarray(x) for x in C.sample_blocks(models["jax"], inp.text, **_sample_kw(inp, config, **over))]


def test_image_condition_reaches_every_block(models):
    inp = _inputs(models, WIN, batch=2, frames=6, seed=1)
    base = _blocks(models, inp, WIN)
    rng = np.random.default_rng(0)
    # CLIP image tokens go to every block's cross-attention (a random change: LayerNorm ignores a constant shift).
    other_image = _blocks(models, inp, WIN, image=rng.standard_normal(inp.image.shape).astype(np.float32))
    assert all(rel_l2(o, b) > 1e-2 for o, b in zip(other_image, base))
    # The first-frame latent reaches the last block through the sink block in the cache (window = 2).
    cond = inp.condition.copy()
    cond[:, 0, ..., 4:] = rng.standard_normal(cond[:, 0, ..., 4:].shape)
    other_first = _blocks(models, inp, WIN, condition=cond)
    assert all(rel_l2(o, b) > 1e-3 for o, b in zip(other_first, base))
    # The condition is sliced per block: frame 3's condition changes blocks 3.. only.
    cond = inp.condition.copy()
    cond[:, 3, ..., 4:] = rng.standard_normal(cond[:, 3, ..., 4:].shape)
    other_mid = _blocks(models, inp, WIN, condition=cond)
    for b in range(3):
        np.testing.assert_array_equal(other_mid[b], base[b])
    assert rel_l2(other_mid[3], base[3]) > 1e-3 and rel_l2(other_mid[4], base[4]) > 1e-3


def test_batch_two_equals_batch_one(models):
    inp = _inputs(models, WIN, batch=2, frames=6, seed=1)
    both = np.asarray(C.sample_causal(models["jax"], inp.text, **_sample_kw(inp, WIN)))
    both_t = T.sample_causal(models["torch_fp32"], inp.text, **_sample_kw(inp, WIN)).numpy()
    assert both.shape == (2, 6, 4, 4, 16)
    for i in range(2):
        one = lambda a: None if a is None else a[i : i + 1]  # noqa: E731
        kw = _sample_kw(inp, WIN, noise=one(inp.noise), step_noise=inp.step_noise[:, i : i + 1],
                        image=one(inp.image), condition=one(inp.condition))
        single = np.asarray(C.sample_causal(models["jax"], one(inp.text), **kw))
        assert rel_l2(single, both[i : i + 1]) <= 1e-6
        single_t = T.sample_causal(models["torch_fp32"], one(inp.text), **kw).numpy()
        assert rel_l2(single_t, both_t[i : i + 1]) <= 1e-6
    # Seeded noise is drawn per sample: sample 0 of a batch of 2 is the batch-of-1 video.
    kw = dict(config=WIN, shape=(6, 4, 4), image=inp.image, condition=inp.condition, seed=7)
    seeded2 = np.asarray(C.sample_causal(models["jax"], inp.text, **kw))
    kw1 = kw | dict(image=inp.image[:1], condition=inp.condition[:1])
    seeded1 = np.asarray(C.sample_causal(models["jax"], inp.text[:1], **kw1))
    assert rel_l2(seeded1, seeded2[:1]) <= 1e-6 and rel_l2(seeded2[:1], seeded2[1:]) > 1e-2


def test_window_cache_is_bounded_and_matches_windowed_mask(models):
    """2x and 4x the frames: same cache arrays, no recompile, result = full mask restricted to sink + window."""
    shapes, nbytes, torch_bytes = set(), set(), set()
    for frames in (6, 12, 24):
        inp = _inputs(models, WIN, batch=2, frames=frames, seed=frames)
        before = C.TRACE_COUNTS.copy()
        got, _, cache = jax_cached_blocks(models["jax"], inp, WIN, capture=False)
        if frames > 6:
            assert C.TRACE_COUNTS == before, "block step recompiled for a longer video"
        shapes.add(cache.k.shape)
        nbytes.add(cache.nbytes)
        _, _, tcache = torch_cached_blocks(models["torch_fp32"], inp, WIN, capture=False)
        torch_bytes.add(tcache.nbytes)
        assert sorted(tcache.blocks) == [0, frames - 1]  # sink + the newest block; the rest evicted
        want = T.causal_forward(
            models["torch_fp32"], inp.latents, inp.timesteps, inp.text, inp.image, config=WIN
        ).numpy()
        assert rel_l2(np.concatenate(got, axis=1), want) <= LAYER_TOL
    assert len(shapes) == 1 and len(nbytes) == 1 and len(torch_bytes) == 1
    (shape,) = shapes
    assert shape[2] == 2 * 4  # (sink + window - current block) = 2 blocks of 2x2 tokens
    # Without a window the cache grows with the video.
    full = {C.init_cache(models["jax"], C.CausalConfig(1), 2, 4, 4, num_frames=f).nbytes for f in (6, 12, 24)}
    assert len(full) == 3


def test_sampler_compiles_once_for_all_blocks(models):
    inp = _inputs(models, WIN, batch=2, frames=6, seed=3)
    list(C.sample_blocks(models["jax"], inp.text, **_sample_kw(inp, WIN)))  # warm (maybe compiled by earlier tests)
    before = C.TRACE_COUNTS.copy()
    for frames in (6, 12, 24):  # 6, 12 and 24 blocks of 4 steps: one compiled step and one compiled commit
        inp = _inputs(models, WIN, batch=2, frames=frames, seed=3)
        out = C.sample_causal(models["jax"], inp.text, **_sample_kw(inp, WIN))
        assert out.shape[1] == frames
    assert C.TRACE_COUNTS == before
    assert before["block_step"] >= 1 and before["commit_block"] >= 1


def test_fresh_shape_traces_step_and_commit_once(models):
    config = C.CausalConfig(frames_per_block=1, window=3, timesteps=(1000.0, 500.0))
    inp = make_causal_inputs(models["jax"].cfg, config, batch=1, frames=5, height=2, width=6, seed=4)
    before = C.TRACE_COUNTS.copy()
    list(C.sample_blocks(models["jax"], inp.text, **_sample_kw(inp, config)))
    delta = C.TRACE_COUNTS - before
    assert delta == {"block_step": 1, "commit_block": 1}, delta


def test_calls_leave_the_weights_in_place(models):
    """Every jitted entry point reads the weights without copying them (jax_impl/frozen_jit.py): `nnx.jit` would
    return the module's state from the compiled program and give every parameter a fresh buffer per call, twice
    the weights at the call's peak (bench/NOTES.md)."""
    model = models["jax"]

    def pointers():
        return {path: var.get_value().unsafe_buffer_pointer() for path, var in nnx.to_flat_state(nnx.state(model))}

    before = pointers()
    inp = _inputs(models, WIN, batch=2, frames=6, seed=6)  # the shapes of the tests above: compiled already
    C.sample_causal(model, inp.text, **_sample_kw(inp, WIN)).block_until_ready()  # context, block step, commit
    C.causal_forward(model, inp.latents, inp.timesteps, inp.text, inp.image, config=WIN).block_until_ready()
    assert pointers() == before, "a call replaced the model's weights by copies"


def test_t2v_sampler_parity(tiny_ckpt):
    """Text-to-video (no condition channels, no image tokens): the same sampler, both sides agree."""
    t2v = load_models(tiny_ckpt("tiny-wan2.1-t2v-1.3b") / "transformer", "float32")
    config = C.CausalConfig(frames_per_block=1, timesteps=(1000.0, 500.0))
    inp = make_causal_inputs(t2v["jax"].cfg, config, batch=1, frames=3, seed=5)
    assert inp.condition is None and inp.image is None
    report = causal_sampler_parity(t2v["jax"], t2v["torch_fp32"], inp, config)
    assert report.passed, report.table()
    uncached = T.sample_causal_uncached(t2v["torch_fp32"], inp.text, **_sample_kw(inp, config)).numpy()
    ours = np.asarray(C.sample_causal(t2v["jax"], inp.text, **_sample_kw(inp, config)))
    assert rel_l2(ours, uncached) <= SAMPLER_TOL


def test_block_step_rejects_mismatched_cache(models):
    inp = _inputs(models, WIN, batch=2, frames=6)
    cross = C.prepare_context(models["jax"], inp.text, inp.image)
    cache = C.init_cache(models["jax"], WIN, 1, 4, 4)
    with pytest.raises(ValueError, match="batch 2 differs from the cache's 1"):
        C.block_step(models["jax"], cache, cross, inp.latents[:, :1], inp.timesteps[:, 0])
    with pytest.raises(ValueError, match="block token grid"):
        C.commit_block(models["jax"], cache, cross, inp.latents[:1, :2], 0.0)
    with pytest.raises(ValueError, match="noisy latents"):
        C.block_step(models["jax"], cache, cross, inp.noise[:1, :1], 500.0)
