"""Parity of the block-causal DiT and block sampler: jax_impl.causal against torch_ref.causal.

Both run on the same weights (a checkpoint folder loaded by `parity.dit.load_models`) and inputs.
  * `causal_layer_parity`: teacher-forced generation, block by block through the caches: each block's
    given latents at its given timestep are run (with layer capture) and then committed. Every layer of
    every block is compared, named `block{b}.{layer}`, plus the text/image embeddings (computed once).
  * `causal_sampler_parity`: the few-step sampler on both sides with the same initial and step noise;
    one row per generated block (`block{b}.latents`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_impl import causal as jax_causal
from jax_impl.conditioning import i2v_condition
from parity.report import Report, compare_layers
from parity.tolerances import FP32_TOL, SAMPLER_TOL
from torch_ref import causal as torch_causal
from weights.configs.causal import condition_channels

LAYER_TOL = FP32_TOL  # one block-causal forward against the torch reference, per layer


@dataclasses.dataclass(frozen=True)
class CausalInputs:
    latents: np.ndarray  # [B, F, H, W, in_channels]: noisy latents (+ I2V condition) per block, channels-last
    timesteps: np.ndarray  # [B, num_blocks]
    text: np.ndarray  # [B, S, text_dim]
    image: np.ndarray | None  # [B, N, image_dim] or None
    noise: np.ndarray  # [B, F, H, W, out_channels]: the sampler's initial noise
    step_noise: np.ndarray  # [steps - 1, B, F, H, W, out_channels]
    condition: np.ndarray | None  # [B, F, H, W, in - out] or None


def make_causal_inputs(
    cfg, config, *, batch=1, frames=4, height=4, width=4, text_len=8, image_len=9, seed=0
) -> CausalInputs:
    """Deterministic random inputs for `cfg` (a DitConfig) and `config` (a CausalConfig)."""
    rng = np.random.default_rng(seed)
    blocks = config.num_blocks(frames)
    shape = (batch, frames, height, width)
    noise = rng.standard_normal((*shape, cfg.out_channels), dtype=np.float32)
    step_noise = rng.standard_normal((len(config.timesteps) - 1, *shape, cfg.out_channels), dtype=np.float32)
    condition = None
    if condition_channels(cfg):
        condition = i2v_condition(rng.standard_normal((*shape, condition_channels(cfg) - 4), dtype=np.float32))
    latents = rng.standard_normal((*shape, cfg.out_channels), dtype=np.float32)
    if condition is not None:
        latents = np.concatenate([latents, condition], axis=-1)
    timesteps = rng.uniform(0, 1000, size=(batch, blocks)).astype(np.float32)
    text = rng.standard_normal((batch, text_len, cfg.text_dim), dtype=np.float32)
    image = rng.standard_normal((batch, image_len, cfg.image_dim), dtype=np.float32) if cfg.has_image_tokens else None
    return CausalInputs(latents, timesteps, text, image, noise, step_noise, condition)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def jax_cached_blocks(model, inputs: CausalInputs, config, capture: bool = True):
    """Teacher-forced block-by-block run of our model; returns (per-block outputs, taps, final cache)."""
    b, f, h, w, _ = inputs.latents.shape
    cross = jax_causal.prepare_context(model, inputs.text, inputs.image)
    cache = jax_causal.init_cache(model, config, b, h, w, num_frames=f)
    fpb = config.frames_per_block
    taps = {"text_embedding": _np(cross.text)}
    if cross.image is not None:
        taps["image_embedding"] = _np(cross.image)
    outs = []
    for blk in range(config.num_blocks(f)):
        x = inputs.latents[:, blk * fpb : (blk + 1) * fpb]
        t = inputs.timesteps[:, blk]
        if capture:
            out, block_taps = jax_causal.block_step(model, cache, cross, x, t, capture=True)
            taps.update({f"block{blk}.{k}": _np(v) for k, v in block_taps.items()})
        else:
            out = jax_causal.block_step(model, cache, cross, x, t)
        outs.append(_np(out))
        cache = jax_causal.commit_block(model, cache, cross, x, t)
    return outs, taps, cache


def torch_cached_blocks(model, inputs: CausalInputs, config, capture: bool = True):
    """Same as `jax_cached_blocks` on the torch reference."""
    f = inputs.latents.shape[1]
    ctx = torch_causal.CrossContext(model, inputs.text, inputs.image)
    cache = torch_causal.BlockCache(config)
    fpb = config.frames_per_block
    taps = {"text_embedding": _np(ctx.text)}
    if ctx.image is not None:
        taps["image_embedding"] = _np(ctx.image)
    outs = []
    for blk in range(config.num_blocks(f)):
        x = inputs.latents[:, blk * fpb : (blk + 1) * fpb]
        out, block_taps = torch_causal.block_step(model, cache, ctx, x, inputs.timesteps[:, blk], commit=True,
                                                  capture=True)
        if capture:
            taps.update({f"block{blk}.{k}": _np(v) for k, v in block_taps.items()})
        outs.append(_np(out))
    return outs, taps, cache


def causal_layer_order(num_layers: int, num_blocks: int, has_image: bool) -> list[str]:
    names = ["text_embedding"] + (["image_embedding"] if has_image else [])
    for blk in range(num_blocks):
        names += [f"block{blk}.{n}" for n in ("patch_embedding", "time_embedding", "time_projection")]
        for i in range(num_layers):
            names += [f"block{blk}.blocks.{i}.{n}" for n in ("self_attn", "cross_attn", "ffn", "output")]
        names += [f"block{blk}.head", f"block{blk}.output"]
    return names


def causal_layer_parity(jax_model, torch_model, inputs: CausalInputs, config, tol: float = LAYER_TOL) -> Report:
    """Every layer of every block, cached teacher-forced run, JAX vs torch."""
    _, ours, _ = jax_cached_blocks(jax_model, inputs, config)
    _, ref, _ = torch_cached_blocks(torch_model, inputs, config)
    cfg = jax_model.cfg
    order = causal_layer_order(cfg.num_layers, config.num_blocks(inputs.latents.shape[1]), cfg.has_image_tokens)
    meta = {"model": "causal-dit", "frames_per_block": config.frames_per_block, "window": config.window}
    return Report(compare_layers(ours, ref, tol, order), meta | {"tolerance": f"rel_l2 <= {tol}"})


def causal_sampler_parity(jax_model, torch_model, inputs: CausalInputs, config, tol: float = SAMPLER_TOL) -> Report:
    """Latents of each generated block, JAX sampler vs torch sampler, same noise."""
    kw = dict(config=config, noise=inputs.noise, step_noise=inputs.step_noise)
    kw |= dict(image=inputs.image, condition=inputs.condition)
    ours = {f"block{i}.latents": _np(x) for i, x in enumerate(jax_causal.sample_blocks(jax_model, inputs.text, **kw))}
    ref = {f"block{i}.latents": _np(x)
           for i, x in enumerate(torch_causal.sample_blocks(torch_model, inputs.text, **kw))}
    meta = {"model": "causal-sampler", "frames_per_block": config.frames_per_block, "window": config.window,
            "timesteps": list(config.timesteps), "tolerance": f"rel_l2 <= {tol}"}
    return Report(compare_layers(ours, ref, tol), meta)
