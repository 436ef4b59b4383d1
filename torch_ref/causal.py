"""Block-causal Wan DiT with a key/value cache and the few-step block sampler, on diffusers' modules.

diffusers has no causal Wan, so the forward pass here is written out over the sub-modules of
`WanTransformer3DModel` (patch_embedding, condition_embedder, blocks[i].attn1/attn2/ffn/norms, proj_out)
with attention done by `torch.nn.functional.scaled_dot_product_attention` and a boolean mask or a cache.
It is the reference for `jax_impl.causal` and follows the same configuration and checks
(`weights.configs.causal`: `CausalConfig`, `check_causal_inputs`), but keeps its cache deliberately simple:
a dict of committed blocks' keys/values in temporal order, blocks falling out of the window deleted.
So the two sides share semantics, not data structures.

Tensors are channels-last like jax_impl ([B, F, H, W, C]); torch or numpy inputs are accepted.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from weights.configs.causal import CausalConfig, block_causal_mask, check_causal_inputs, condition_channels
from weights.configs.dit import DitConfig


def _t(x, like: torch.nn.Module | None = None, dtype=None) -> torch.Tensor:
    """numpy or torch -> torch on the model's device (and dtype if given)."""
    x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    dev = next(like.parameters()).device if like is not None else x.device
    return x.to(device=dev, dtype=dtype) if dtype is not None else x.to(dev)


def _cfg(model):
    return DitConfig.from_dict(dict(model.config))


def _dtype(model) -> torch.dtype:
    return model.patch_embedding.weight.dtype


# ------------------------------------------------------------------------------------------------
# Pieces of the forward pass
# ------------------------------------------------------------------------------------------------
def _embed_patches(model, latents: torch.Tensor) -> torch.Tensor:
    """[B, F, H, W, C] channels-last -> tokens [B, L, D] via the model's Conv3d."""
    x = latents.to(_dtype(model)).permute(0, 4, 1, 2, 3)
    return model.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()


def _time(model, t: torch.Tensor, dtype: torch.dtype):
    """t [B] or [B, L] -> temb [B, 1|L, D], modulation [B, 1|L, 6, D] and taps (temb/tproj as produced)."""
    ce = model.condition_embedder
    shape = t.shape
    freq = ce.timesteps_proj(t.flatten())
    te_dtype = next(iter(ce.time_embedder.parameters())).dtype
    temb = ce.time_embedder(freq.to(te_dtype)).to(dtype)
    tproj = ce.time_proj(ce.act_fn(temb))
    temb, tproj = temb.unflatten(0, shape), tproj.unflatten(0, shape)
    taps = {"time_embedding": temb, "time_projection": tproj}
    if temb.ndim == 2:
        temb, tproj = temb[:, None], tproj[:, None]
    return temb, tproj.unflatten(-1, (6, -1)), taps


def _head(model, x: torch.Tensor, temb: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    b, f, h, w = shape
    pt, ph, pw = model.config.patch_size
    shift, scale = (model.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)
    x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
    x = model.proj_out(x)
    out = x.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, -1)
    out = out.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, f, h, w, -1)
    return x, out


def rope_tables(model, grid: tuple[int, int, int], frame_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [f*h*w, head_dim] from the model's own rotary buffers, frames starting at `frame_offset`."""
    f, h, w = grid
    rope = model.rope
    if frame_offset + f > rope.max_seq_len:
        raise ValueError(f"frames {frame_offset}..{frame_offset + f} exceed rope_max_seq_len={rope.max_seq_len}")
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        tf, th, tw = table.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
        parts = [
            tf[frame_offset : frame_offset + f].view(f, 1, 1, -1).expand(f, h, w, -1),
            th[:h].view(1, h, 1, -1).expand(f, h, w, -1),
            tw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ]
        out.append(torch.cat(parts, dim=-1).reshape(f * h * w, -1))
    return out[0], out[1]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (even, odd) channel pairs of x [B, L, heads, head_dim]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


def _sdpa(q, k, v, mask=None) -> torch.Tensor:
    """[B, L, heads, d] attention -> [B, L, heads * d]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2).type_as(q)


def _self_attention(attn, h, rope, mask=None, past=None):
    """attn1 with [past | own] keys; returns (output, own k, own v) (k after norm and RoPE)."""
    q = attn.norm_q(attn.to_q(h)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(h)).unflatten(2, (attn.heads, -1))
    v = attn.to_v(h).unflatten(2, (attn.heads, -1))
    q, k = _rotate(q, *rope), _rotate(k, *rope)
    keys, vals = k, v
    if past is not None:
        keys, vals = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
    return attn.to_out[0](_sdpa(q, keys, vals, mask)), k, v


def _cross_attention(attn, h, ctx) -> torch.Tensor:
    """attn2 on precomputed text (and image) keys/values ctx = (k, v, k_img, v_img)."""
    q = attn.norm_q(attn.to_q(h)).unflatten(2, (attn.heads, -1))
    out = _sdpa(q, ctx[0], ctx[1])
    if ctx[2] is not None:
        out = out + _sdpa(q, ctx[2], ctx[3])
    return attn.to_out[0](out)


def _block(blk, x, tproj, self_attn, ctx):
    """diffusers' WanTransformerBlock arithmetic with a pluggable self-attention."""
    shift, scale, gate, c_shift, c_scale, c_gate = (blk.scale_shift_table.unsqueeze(0) + tproj.float()).unbind(2)
    h = (blk.norm1(x.float()) * (1 + scale) + shift).type_as(x)
    sa, k, v = self_attn(blk.attn1, h)
    x = (x.float() + sa * gate).type_as(x)
    h = blk.norm2(x.float()).type_as(x)
    ca = _cross_attention(blk.attn2, h, ctx)
    x = x + ca
    h = (blk.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
    ff = blk.ffn(h)
    x = (x.float() + ff.float() * c_gate).type_as(x)
    return x, (k, v), {"self_attn": sa, "cross_attn": ca, "ffn": ff, "output": x}


# ------------------------------------------------------------------------------------------------
# Context and cache
# ------------------------------------------------------------------------------------------------
class CrossContext:
    """Text (and image) embeddings and every layer's cross-attention keys/values, computed once."""

    @torch.no_grad()
    def __init__(self, model, text, image=None):
        dt = _dtype(model)
        ce = model.condition_embedder
        self.text = ce.text_embedder(_t(text, model, dt))
        self.image = ce.image_embedder(_t(image, model, dt)) if image is not None else None
        self.layers = []
        for blk in model.blocks:
            a = blk.attn2
            k = a.norm_k(a.to_k(self.text)).unflatten(2, (a.heads, -1))
            v = a.to_v(self.text).unflatten(2, (a.heads, -1))
            ki = vi = None
            if self.image is not None:
                ki = a.norm_added_k(a.add_k_proj(self.image)).unflatten(2, (a.heads, -1))
                vi = a.add_v_proj(self.image).unflatten(2, (a.heads, -1))
            self.layers.append((k, v, ki, vi))


class BlockCache:
    """Committed blocks' self-attention keys/values, {block index: per layer (k, v) [B, T, heads, d]}.

    Keeps the first block (sink) and the blocks still inside the window of any later block; older ones
    are deleted at commit time, so memory is bounded by (1 + window_blocks) blocks.
    """

    def __init__(self, config: CausalConfig):
        self.window_blocks = config.window_blocks
        self.blocks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.committed = 0

    def visible(self) -> list[int]:
        """Blocks the next block (index `committed`) attends to, oldest first."""
        n, wb = self.committed, self.window_blocks
        return [j for j in sorted(self.blocks) if wb is None or j == 0 or j > n - wb]

    def past(self, layer: int):
        ids = self.visible()
        if not ids:
            return None
        return (
            torch.cat([self.blocks[j][layer][0] for j in ids], dim=1),
            torch.cat([self.blocks[j][layer][1] for j in ids], dim=1),
        )

    def add(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.blocks[self.committed] = kv
        self.committed += 1
        if self.window_blocks is not None:  # evict blocks no later block can see
            for j in [j for j in self.blocks if 0 < j <= self.committed - self.window_blocks]:
                del self.blocks[j]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.blocks.values() for pair in kv for t in pair)


# ------------------------------------------------------------------------------------------------
# Block step (cached) and the full masked forward
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def block_step(model, cache: BlockCache, ctx: CrossContext, latents, timestep, *, commit=False, capture=False):
    """Run block `cache.committed` ([B, fpb, H, W, in_channels]) at `timestep` against the cache.

    With commit=True its keys/values are added to the cache afterwards. Returns the flow prediction
    [B, fpb, H, W, out] channels-last (and taps with capture=True).
    """
    dt = _dtype(model)
    latents = _t(latents, model, dt)
    b, f, h, w, _ = latents.shape
    pt, ph, pw = model.config.patch_size
    grid = (f // pt, h // ph, w // pw)
    x = _embed_patches(model, latents)
    taps = {"patch_embedding": x}
    t = _t(torch.as_tensor(timestep, dtype=torch.float32).reshape(-1), model).expand(b)
    temb, tproj, ttaps = _time(model, t, dt)
    taps.update(ttaps)
    rope = rope_tables(model, grid, cache.committed * grid[0])
    new_kv = []
    for i, blk in enumerate(model.blocks):
        past = cache.past(i)
        x, kv, btaps = _block(blk, x, tproj, lambda a, hh: _self_attention(a, hh, rope, None, past), ctx.layers[i])
        new_kv.append(kv)
        taps.update({f"blocks.{i}.{k}": v for k, v in btaps.items()})
    head, out = _head(model, x, temb, (b, f, h, w))
    taps["head"], taps["output"] = head, out
    if commit:
        cache.add(new_kv)
    return (out, taps) if capture else out


@torch.no_grad()
def causal_forward(model, latents, timesteps, text, image=None, *, config: CausalConfig, capture=False):
    """The whole video in one pass with the block-causal (windowed) mask; timesteps scalar, [B] or [B, blocks]."""
    dt = _dtype(model)
    latents = _t(latents, model, dt)
    b, f, h, w, c = latents.shape
    cfg_in = model.config.in_channels
    if c != cfg_in:
        raise ValueError(f"latents have {c} channels, this model takes {cfg_in}")
    cfg = _cfg(model)
    cc = condition_channels(cfg)
    image_shape = None if image is None else tuple(image.shape)
    cond_shape = (b, f, h, w, cc) if cc else None  # I2V: the condition is already in the latents
    blocks = check_causal_inputs(cfg, config, (b, f, h, w), tuple(text.shape), image_shape, cond_shape)
    ts = _t(torch.as_tensor(np.asarray(timesteps, np.float32)), model)
    if ts.ndim == 0 or (ts.ndim == 1 and ts.shape[0] in (1, b)):
        ts = ts.reshape(-1, 1).expand(b, blocks)
    if tuple(ts.shape) != (b, blocks):
        raise ValueError(f"timesteps must be a scalar, [batch] or [batch, num_blocks={blocks}], got {tuple(ts.shape)}")
    ctx = CrossContext(model, text, image)
    pt, ph, pw = model.config.patch_size
    grid = (f // pt, h // ph, w // pw)
    n_tok = math.prod(grid) // blocks
    x = _embed_patches(model, latents)
    taps = {"patch_embedding": x, "text_embedding": ctx.text}
    if ctx.image is not None:
        taps["image_embedding"] = ctx.image
    temb, tproj, ttaps = _time(model, ts.repeat_interleave(n_tok, dim=1).contiguous(), dt)
    taps.update(ttaps)
    rope = rope_tables(model, grid)
    mask = _t(torch.from_numpy(block_causal_mask(blocks, n_tok, config.window_blocks)), model)
    for i, blk in enumerate(model.blocks):
        x, _, btaps = _block(blk, x, tproj, lambda a, hh: _self_attention(a, hh, rope, mask), ctx.layers[i])
        taps.update({f"blocks.{i}.{k}": v for k, v in btaps.items()})
    head, out = _head(model, x, temb, (b, f, h, w))
    taps["head"], taps["output"] = head, out
    return (out, taps) if capture else out


# ------------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------------
def sample_blocks(
    model, text, *, config: CausalConfig, noise, step_noise=None, image=None, condition=None, generator=None
) -> Iterator[torch.Tensor]:
    """Few-step block sampler (same recipe as jax_impl.causal.sample_blocks); yields clean blocks [B, fpb, H, W, C].

    noise [B, F, H, W, C]; step_noise [steps - 1, B, F, H, W, C] or None to draw from `generator`.
    """
    cfg = _cfg(model)
    noise = _t(noise, model, torch.float32)
    b, f, h, w, c = noise.shape
    blocks = check_causal_inputs(
        cfg, config, tuple(noise.shape), tuple(text.shape),
        None if image is None else tuple(image.shape), None if condition is None else tuple(condition.shape),
    )
    ts, sig = config.schedule()
    if step_noise is not None:
        step_noise = _t(step_noise, model, torch.float32)
        if tuple(step_noise.shape) != (len(ts) - 1, *noise.shape):
            raise ValueError(f"step_noise must be [steps - 1, B, F, H, W, C], got {tuple(step_noise.shape)}")
    cond_all = None if condition is None else _t(condition, model, torch.float32)
    ctx = CrossContext(model, text, image)
    return _generate(model, ctx, config, blocks, noise, step_noise, cond_all, generator)


@torch.no_grad()
def _generate(model, ctx, config, blocks, noise, step_noise, cond_all, generator) -> Iterator[torch.Tensor]:
    b = noise.shape[0]
    ts, sig = config.schedule()
    fpb = config.frames_per_block
    cache = BlockCache(config)
    for blk in range(blocks):
        sl = slice(blk * fpb, (blk + 1) * fpb)
        x = noise[:, sl]
        cond = None if cond_all is None else cond_all[:, sl]
        for s in range(len(ts)):
            inp = x if cond is None else torch.cat([x, cond], dim=-1)
            v = block_step(model, cache, ctx, inp, torch.full((b,), ts[s])).float()
            x0 = x - sig[s] * v
            if s + 1 < len(ts):
                if step_noise is not None:
                    eps = step_noise[s, :, sl]
                else:
                    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
                x = (1.0 - sig[s + 1]) * x0 + sig[s + 1] * eps
        yield x0
        if blk + 1 < blocks:
            clean = x0 if cond is None else torch.cat([x0, cond], dim=-1)
            block_step(model, cache, ctx, clean, torch.zeros(b), commit=True)


def sample_causal(model, text, *, config: CausalConfig, **kwargs) -> torch.Tensor:
    """All blocks of `sample_blocks` concatenated along frames: [B, F, H, W, C] float32."""
    return torch.cat(list(sample_blocks(model, text, config=config, **kwargs)), dim=1)


@torch.no_grad()
def sample_causal_uncached(model, text, *, config: CausalConfig, noise, step_noise, image=None, condition=None):
    """The sampler without any cache: every step re-runs `causal_forward` on [clean blocks so far | current
    block] with timesteps [0, ..., 0, t]. Quadratic cost; the reference that the cached samplers must match."""
    noise = _t(noise, model, torch.float32)
    step_noise = _t(step_noise, model, torch.float32)
    cond_all = None if condition is None else _t(condition, model, torch.float32)
    b, f = noise.shape[:2]
    ts, sig = config.schedule()
    fpb = config.frames_per_block
    done: list[torch.Tensor] = []  # model inputs of the finished blocks (clean latents + condition)
    for blk in range(config.num_blocks(f)):
        sl = slice(blk * fpb, (blk + 1) * fpb)
        x = noise[:, sl]
        cond = None if cond_all is None else cond_all[:, sl]
        for s in range(len(ts)):
            inp = x if cond is None else torch.cat([x, cond], dim=-1)
            tsteps = torch.tensor([0.0] * blk + [ts[s]]).expand(b, -1)
            v = causal_forward(model, torch.cat(done + [inp], dim=1), tsteps, text, image, config=config)
            x0 = x - sig[s] * v[:, -fpb:].float()
            if s + 1 < len(ts):
                x = (1.0 - sig[s + 1]) * x0 + sig[s + 1] * step_noise[s, :, sl]
        done.append(x0 if cond is None else torch.cat([x0, cond], dim=-1))
    return torch.cat([d[..., : noise.shape[-1]] for d in done], dim=1)


__all__ = [
    "BlockCache",
    "CrossContext",
    "block_step",
    "causal_forward",
    "rope_tables",
    "sample_blocks",
    "sample_causal",
    "sample_causal_uncached",
]
