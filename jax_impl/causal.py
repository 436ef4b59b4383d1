"""Block-causal (streaming) Wan DiT with a key/value cache, and the few-step block sampler, in Flax NNX.

The latent video is cut into blocks of `frames_per_block` latent frames. Self-attention of a block sees
the block itself and the blocks before it (optionally only a local window plus the first block, which
stays as an attention sink); cross-attention sees the text (and CLIP image) tokens as usual. Blocks are
generated one after the other, each denoised in a few steps, then run once more clean (t=0) so that
its keys/values enter the cache for the blocks that follow.

Two ways to run the same model, which must agree (tests/test_causal.py):
  * `causal_forward`: the whole sequence in one pass with the block-causal attention mask (reference);
  * `prepare_context` + `init_cache` + `block_step`/`commit_block`: one block at a time with the cache.

Design (cache layout, eviction, positions):
  * `KVCache` holds per layer `k`, `v` of shape [layers, batch, slots * block_tokens, heads, head_dim]:
    keys after q/k RMS-norm and RoPE, values as projected. Shapes are fixed at creation, so one
    compiled block step serves every block (no retrace); the block index is the traced counter
    `committed`, which also gives the RoPE frame offset and which slots are valid.
  * Slots hold whole blocks. Slot 0 is the first block (the attention sink); slots 1..slots-1 are a ring
    buffer for the most recent blocks: block n (n >= 1) goes to slot 1 + (n - 1) % (slots - 1), so
    the oldest recent block is overwritten (evicted) in place with `lax.dynamic_update_slice`, no
    shifting. Slot s is valid once s < committed. Attention order over keys does not matter (softmax
    is permutation invariant), so the ring order needs no un-rotation.
  * With `window` (latent frames, counting the current block) a block sees the sink block plus the
    last `window` frames: slots = window / frames_per_block, i.e. the cache holds sink + (window -
    frames_per_block) frames, the current block's keys are appended on the fly. Its size does not
    depend on the video length. Without a window, slots = number of blocks (the whole video).
  * RoPE frame positions keep counting: block n uses frames [n * fpb, (n + 1) * fpb) whatever was
    evicted, so a cached key keeps the position it was written with.
  * The current block's own keys are concatenated after the cache ([cache | current]) and a boolean
    mask [1, 1, block_tokens, keys] marks the invalid slots; the call is `kernels.attention(mask=...)`
    (xla or cudnn; with backend "auto" on TPU the masked self-attention falls back to xla). The price of
    static shapes: every block attends over the whole cache capacity, invalid slots masked, so
    without a window the first blocks cost as much as the last.
  * Without a window the cache is sized for `num_frames`; committing past that simply slides a window
    of `num_frames` frames (the ring wraps), it never writes out of bounds.
  * Frame positions must stay below rope_max_seq_len (checked by the sampler and `check_causal_inputs`;
    `block_step` itself cannot check the traced counter without a device sync).

Sampler: for each block, `timesteps` (default 1000, 750, 500, 250; optional shift warp) with
sigma = t / 1000: v = model(x_t, t); x0 = x_t - sigma * v; x_t' = (1 - sigma') x0 + sigma' * eps with
fresh noise eps; the last step's x0 is the block. Then the clean block is committed at t=0 (the last
block is not: nothing attends to it). The model call is the jitted `block_step` (compiled once per
shape, shared with the teacher-forced path); the update arithmetic is plain float32 jnp.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from weights.configs.causal import (
    CausalConfig, block_causal_mask, check_block_frames, check_causal_inputs, condition_channels,
)
from weights.configs.dit import check_context, check_latent_channels, check_patch_grid
from jax_impl.conditioning import ConcatCondition, Conditioning, FirstFrameCondition, NoCondition
from jax_impl.dit import CrossKV, MaskedAttention, token_grid
from jax_impl.frozen_jit import frozen_jit
from jax_impl.layers import F32
from jax_impl.noise import seeded_noise

# Number of times each jitted entry point was traced (compiled); tests check there is no retrace per block.
TRACE_COUNTS: collections.Counter = collections.Counter()


# ------------------------------------------------------------------------------------------------
# Cross-attention context (computed once) and the self-attention cache
# ------------------------------------------------------------------------------------------------
@frozen_jit
def _prepare_context(model, text, image):
    return model.cross_kv(text, image)


def prepare_context(model, text, image=None) -> CrossKV:
    """Embed text (and CLIP image tokens) and project them to every layer's cross-attention keys/values, once."""
    text = jnp.asarray(text)
    check_context(model.cfg, text.shape[0], text.shape, None if image is None else np.shape(image))
    return _prepare_context(model, text, None if image is None else jnp.asarray(image))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "committed"],
    meta_fields=["block_grid", "num_slots"],
)
@dataclasses.dataclass
class KVCache:
    """Fixed-size self-attention cache. k, v: [layers, B, num_slots * block_tokens, heads, head_dim].

    `committed` (int32 scalar on device) counts the blocks written so far, and is the index of the next
    block. Slot 0 = block 0 (sink); slots 1.. = ring buffer of the latest blocks (see module docstring).
    """

    k: jax.Array
    v: jax.Array
    committed: jax.Array
    block_grid: tuple[int, int, int]  # post-patch (frames, height, width) of one block
    num_slots: int

    @property
    def block_tokens(self) -> int:
        return math.prod(self.block_grid)

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)


def init_cache(
    model, ccfg: CausalConfig, batch: int, height: int, width: int, num_frames: int | None = None
) -> KVCache:
    """An empty cache for latents of `height` x `width`. Without a window, `num_frames` sizes it."""
    cfg = model.cfg
    check_block_frames(cfg, ccfg)
    check_patch_grid(cfg, height=height, width=width)
    if ccfg.window_blocks is not None:
        slots = ccfg.window_blocks
    elif num_frames is None:
        raise ValueError("without a window the cache covers the whole video: pass num_frames (or set a window)")
    else:
        slots = ccfg.num_blocks(num_frames)
    grid = token_grid(cfg, ccfg.frames_per_block, height, width)
    shape = (cfg.num_layers, batch, slots * math.prod(grid), cfg.num_attention_heads, cfg.attention_head_dim)
    zeros = jnp.zeros(shape, model.dtype)
    return KVCache(zeros, jnp.zeros(shape, model.dtype), jnp.zeros((), jnp.int32), grid, slots)


def _block_impl(model, cache: KVCache, cross: CrossKV, latents, timestep, *, write: bool, capture: bool):
    """One block through the model with the cache; returns (prediction, new k/v per layer or None, taps)."""
    b = latents.shape[0]
    grid = token_grid(model.cfg, *latents.shape[1:4])
    if grid != cache.block_grid:
        raise ValueError(f"block token grid {grid} does not match the cache's {cache.block_grid}")
    n_tok = cache.block_tokens
    valid = (jnp.arange(cache.num_slots * n_tok) // n_tok) < cache.committed  # [cache | own block]
    mask = jnp.concatenate([valid, jnp.ones((n_tok,), bool)])[None, None, None, :]
    t = jnp.broadcast_to(jnp.asarray(timestep, F32).reshape(-1), (b,))
    return model.forward(latents, t, cross=cross, self_attention=MaskedAttention(mask), past=(cache.k, cache.v),
                         frame_offset=cache.committed * grid[0], keep_kv=write, capture=capture)


def _write(cache: KVCache, kv) -> KVCache:
    """Put the block's k/v into its slot (sink or ring) and advance the counter."""
    n = cache.committed
    ring = cache.num_slots - 1
    slot = jnp.where(n == 0, 0, 1 + (n - 1) % max(ring, 1))
    start = slot * cache.block_tokens
    k = jax.lax.dynamic_update_slice_in_dim(cache.k, kv[0].astype(cache.k.dtype), start, axis=2)
    v = jax.lax.dynamic_update_slice_in_dim(cache.v, kv[1].astype(cache.v.dtype), start, axis=2)
    if ring == 0:  # window of one block: only the sink is ever stored
        k, v = jnp.where(n == 0, k, cache.k), jnp.where(n == 0, v, cache.v)
    return dataclasses.replace(cache, k=k, v=v, committed=n + 1)


@frozen_jit(static_argnames=("capture",))
def _jit_step(model, cache, cross, latents, timestep, capture=False):
    TRACE_COUNTS["block_step"] += 1
    out, _, taps = _block_impl(model, cache, cross, latents, timestep, write=False, capture=capture)
    return (out, taps) if capture else out


@frozen_jit
def _jit_commit(model, cache, cross, latents, timestep):
    TRACE_COUNTS["commit_block"] += 1
    _, kv, _ = _block_impl(model, cache, cross, latents, timestep, write=True, capture=False)
    return _write(cache, kv)


def block_step(model, cache: KVCache, cross: CrossKV, latents, timestep, *, capture: bool = False):
    """Predict the flow for the next block (index `cache.committed`) at `timestep` ([B] or scalar).

    latents [B, frames_per_block, H, W, in_channels] (I2V: noisy latents and the block's condition
    concatenated). Does not change the cache. Returns [B, fpb, H, W, out_channels] (and taps).
    """
    latents = jnp.asarray(latents)
    _check_step(model, cache, cross, latents)
    return _jit_step(model, cache, cross, latents, jnp.asarray(timestep, F32), capture=capture)


def commit_block(model, cache: KVCache, cross: CrossKV, latents, timestep=0.0) -> KVCache:
    """Run the (clean) block once and write its self-attention keys/values into the cache."""
    latents = jnp.asarray(latents)
    _check_step(model, cache, cross, latents)
    return _jit_commit(model, cache, cross, latents, jnp.asarray(timestep, F32))


def _check_step(model, cache: KVCache, cross: CrossKV, latents) -> None:
    cfg = model.cfg
    if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
        hint = " (noisy latents + the block's condition)" if condition_channels(cfg) else ""
        raise ValueError(f"block latents must be [B, fpb, H, W, {cfg.in_channels}]{hint}, got {latents.shape}")
    if token_grid(cfg, *latents.shape[1:4]) != cache.block_grid:
        raise ValueError(f"block latents {latents.shape} do not match the cache's block token grid {cache.block_grid}")
    if latents.shape[0] != cache.k.shape[1] or latents.shape[0] != cross.k.shape[1]:
        raise ValueError(
            f"batch {latents.shape[0]} differs from the cache's {cache.k.shape[1]} or the context's {cross.k.shape[1]}"
        )


# ------------------------------------------------------------------------------------------------
# Full-sequence forward with the block-causal mask (the reference for the cached path)
# ------------------------------------------------------------------------------------------------
@frozen_jit(static_argnames=("frames_per_block", "window_blocks", "capture"))
def _jit_full(model, latents, timesteps, cross, frames_per_block, window_blocks, capture):
    grid = token_grid(model.cfg, *latents.shape[1:4])
    num_blocks = latents.shape[1] // frames_per_block
    n_tok = math.prod(grid) // num_blocks
    t = jnp.repeat(timesteps.astype(F32), n_tok, axis=1)  # per block -> per token
    mask = block_causal_mask(num_blocks, n_tok, window_blocks, xp=jnp)[None, None]  # in-graph, no constant
    out, _, taps = model.forward(latents, t, cross=cross, self_attention=MaskedAttention(mask), capture=capture)
    return out, taps


def causal_forward(
    model,
    latents,
    timesteps,
    text,
    image=None,
    *,
    config: CausalConfig,
    capture: bool = False,
):
    """Whole video in one pass with the block-causal (optionally windowed) attention mask.

    latents [B, F, H, W, in_channels]; timesteps scalar, [B] or per block [B, num_blocks];
    text [B, S, text_dim]; image [B, N, image_dim] (Wan2.1 I2V). Returns [B, F, H, W, out] (and taps).
    """
    latents, text = jnp.asarray(latents), jnp.asarray(text)
    cfg = model.cfg
    b, f, h, w, c = latents.shape
    check_latent_channels(cfg, c)
    cc = condition_channels(cfg)  # I2V: the condition is already concatenated to the latents
    blocks = check_causal_inputs(
        cfg, config, (b, f, h, w), text.shape,
        None if image is None else np.shape(image), (b, f, h, w, cc) if cc else None,
    )
    ts = jnp.asarray(timesteps, F32)
    if ts.ndim == 0 or (ts.ndim == 1 and ts.shape[0] in (1, b)):
        ts = jnp.broadcast_to(ts.reshape(-1, 1), (b, blocks))
    if ts.shape != (b, blocks):
        raise ValueError(f"timesteps must be a scalar, [batch] or [batch, num_blocks={blocks}], got {ts.shape}")
    cross = prepare_context(model, text, image)
    out, taps = _jit_full(model, latents, ts, cross, config.frames_per_block, config.window_blocks, capture)
    if capture:
        taps["text_embedding"] = cross.text
        if cross.image is not None:
            taps["image_embedding"] = cross.image
        return out, taps
    return out


# ------------------------------------------------------------------------------------------------
# Few-step block sampler
# ------------------------------------------------------------------------------------------------
def block_noise(seed: int, batch: int, block: int, step: int, shape: Sequence[int]) -> jax.Array:
    """Seeded standard normal noise [batch, *shape] for (block, step): `seeded_noise` with the block and the step
    as streams, so sample i does not depend on batch size."""
    return seeded_noise(seed, batch, shape, block, step)


def sample_blocks(
    model,
    text,
    *,
    config: CausalConfig,
    noise=None,
    shape: tuple[int, int, int] | None = None,
    image=None,
    condition=None,
    step_noise=None,
    seed: int = 0,
    cross: CrossKV | None = None,
) -> Iterator[jax.Array]:
    """Generate the video block by block; yields each finished block's clean latents [B, fpb, H, W, C].

    noise: initial noise [B, F, H, W, out_channels], or None with `shape` = (frames, height, width)
    to draw it from `seed`. step_noise: the fresh noise of steps 1.. of the schedule, [steps - 1, B, F,
    H, W, C], or None to draw it from `seed`. image: CLIP tokens (Wan2.1 I2V), given to every block.
    condition: the typed condition (`jax_impl.conditioning`: NoCondition or ConcatCondition, sliced per block
    with `frames`), or an I2V condition array [B, F, H, W, in - out channels] (see `i2v_condition`).
    """
    cfg = model.cfg
    text = jnp.asarray(text)
    b = text.shape[0]
    if noise is not None:
        noise = jnp.asarray(noise, F32)
        if noise.ndim != 5:
            raise ValueError(f"noise must be [batch, frames, height, width, channels], got {noise.shape}")
        latent_shape = noise.shape
    elif shape is not None:
        latent_shape = (b, *shape, cfg.out_channels)
    else:
        raise ValueError("pass `noise` [B, F, H, W, C] or `shape` = (frames, height, width) with a seed")
    _, f, h, w, c = latent_shape
    condition = _typed(condition)
    blocks = check_causal_inputs(
        cfg, config, latent_shape, text.shape, None if image is None else np.shape(image),
        np.shape(condition.mask_latent) if isinstance(condition, ConcatCondition) else None,
    )
    ts, sig = config.schedule()
    if step_noise is not None:
        step_noise = jnp.asarray(step_noise, F32)
        want = (len(ts) - 1, *latent_shape)
        if step_noise.shape != want:
            raise ValueError(f"step_noise must be [steps - 1, B, F, H, W, C] = {want}, got {step_noise.shape}")
    if cross is None:
        cross = prepare_context(model, text, image)
    return _generate(model, cross, config, (b, f, h, w, c), blocks, noise, step_noise, condition, seed)


def _typed(condition) -> Conditioning:
    """The sampler's condition as a typed value: an I2V condition array [B, F, H, W, in - out] is a ConcatCondition."""
    if condition is None:
        return NoCondition()
    if isinstance(condition, FirstFrameCondition):
        raise ValueError("block-causal generation does not support TI2V's first-frame conditioning")
    if isinstance(condition, (NoCondition, ConcatCondition)):
        return jax.tree.map(lambda a: jnp.asarray(a, F32), condition)
    return ConcatCondition(jnp.asarray(condition, F32))


def _generate(model, cross, config, latent_shape, blocks, noise, step_noise, cond_all: Conditioning,
              seed) -> Iterator[jax.Array]:
    b, f, h, w, c = latent_shape
    ts, sig = config.schedule()
    fpb = config.frames_per_block
    cache = init_cache(model, config, b, h, w, num_frames=f)
    for blk in range(blocks):
        sl = slice(blk * fpb, (blk + 1) * fpb)
        x = noise[:, sl] if noise is not None else block_noise(seed, b, blk, 0, (fpb, h, w, c))
        cond = cond_all.frames(sl)
        for s in range(len(ts)):
            v = block_step(model, cache, cross, *cond.model_input(x, ts[s]))
            x0 = x - jnp.float32(sig[s]) * v.astype(F32)
            if s + 1 < len(ts):  # re-noise to the next level with fresh noise
                if step_noise is not None:
                    eps = step_noise[s, :, sl]
                else:
                    eps = block_noise(seed, b, blk, s + 1, (fpb, h, w, c))
                x = (1.0 - jnp.float32(sig[s + 1])) * x0 + jnp.float32(sig[s + 1]) * eps
        yield cond.finalize(x0)
        if blk + 1 < blocks:  # the last block is never attended to: skip its cache write
            cache = commit_block(model, cache, cross, *cond.model_input(x0, 0.0))


def sample_causal(model, text, *, config: CausalConfig, **kwargs) -> jax.Array:
    """All blocks of `sample_blocks` concatenated: clean latents [B, F, H, W, out_channels] (float32)."""
    return jnp.concatenate(list(sample_blocks(model, text, config=config, **kwargs)), axis=1)


__all__ = [
    "CrossKV",
    "KVCache",
    "block_noise",
    "block_step",
    "causal_forward",
    "commit_block",
    "init_cache",
    "prepare_context",
    "sample_blocks",
    "sample_causal",
]
