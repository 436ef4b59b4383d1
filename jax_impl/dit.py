"""The Wan diffusion transformer (Wan2.1 T2V/I2V, Wan2.2 A14B experts, TI2V-5B) in Flax NNX.

Layout is channels-last throughout `jax_impl`: latents are `[batch, frames, height, width, channels]`.
The blocks are stored stacked (one leading layer axis per parameter) and run under `jax.lax.scan`, so
compile time does not grow with depth. Numerics follow the PyTorch reference: norms, modulation and
the time embedder run in float32, everything else in the model dtype.

Calling the model with `capture=True` also returns a dict of intermediate activations ("taps") named
as in the parity report: patch_embedding, time_embedding, time_projection, text_embedding,
image_embedding, blocks.{i}.{self_attn,cross_attn,ffn,output}, head, output.

There is one forward (`WanTransformer.forward`: embed -> rotary tables -> scan the blocks -> head); the
self-attention is its variable part, a policy: `full_attention` (plain Wan), `MaskedAttention` over the
whole sequence (block-causal) or against a key/value cache (`jax_impl.causal`'s streaming block step).
Models built around Wan's blocks (FantasyWorld) use the hooks: `Block.attention_half` / `Block.ffn_half`,
`Attention.cross_attend` (cross-attention before its output projection) and `scan_blocks(..., layers=)` /
`block_stack(layers)` for a sub-range of the stacked blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from kernels.backends import resolve_backend
from kernels.context_parallel import SequenceSplit, pad_axis
from weights.configs.dit import DitConfig, check_dit_inputs
from jax_impl.fp8 import fused_dense  # plain Dense layers fused as before; FP8 (Fp8Dense) ones fused in FP8
from jax_impl.layers import F32, Dense, LayerNorm, RMSNorm, gelu_exact, gelu_tanh, layer_norm
from jax_impl.rope import apply_rope, rope_tables

if not getattr(kernels, "WANPORT_KERNELS", False):  # a namesake package shadows ours
    raise ImportError(
        f"`import kernels` found {getattr(kernels, '__file__', kernels)!r}, which is not wanport's attention "
        "package (Hugging Face's `kernels` distribution uses the same name). Uninstall it or use a separate venv."
    )

Taps = dict[str, jax.Array]


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [..., dim] in float32, cosines first (Wan's flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=F32) / half)
    angles = t.astype(F32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    return jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, dim % 2)])


class Mlp(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act, *, param_dtype, rngs: nnx.Rngs):
        self.fc1 = Dense(d_in, d_hidden, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Dense(d_hidden, d_out, param_dtype=param_dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class ImageEmbedding(nnx.Module):
    """Projects CLIP image tokens (Wan2.1 I2V) to the model width: LN -> MLP(GELU) -> LN."""

    def __init__(self, cfg: DitConfig, *, param_dtype, rngs: nnx.Rngs):
        d_img, d = cfg.image_dim, cfg.inner_dim
        self.norm1 = LayerNorm(d_img, eps=1e-5, affine=True)
        self.mlp = Mlp(d_img, d_img, d, gelu_exact, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=1e-5, affine=True)
        self.pos_embed = (
            nnx.Param(jnp.zeros((1, cfg.pos_embed_seq_len, d_img), param_dtype)) if cfg.pos_embed_seq_len else None
        )

    def __call__(self, img: jax.Array) -> jax.Array:
        if self.pos_embed is not None:  # first/last-frame models: two images' tokens side by side
            b, n, c = img.shape
            img = img.reshape(-1, 2 * n, c) + self.pos_embed.value
        return self.norm2(self.mlp(self.norm1(img)))


def cross_backend(backend: str) -> str:
    """The cross-attention's back-end: the model's, except that cuDNN FP8 stays on self-attention. Measured on an
    H100 (bench/results/fp8_2026-11-25b): FP8 made the 32760 x 32760 self-attention 1.38x faster but the
    32760 x 512 cross-attention 0.79x (its per-tensor quantisation passes cost more than the short kernel saves)."""
    return "cudnn" if backend == "cudnn_fp8" else backend


class Attention(nnx.Module):
    """Multi-head attention with RMS-normalised q/k over all heads; optional separate image k/v."""

    def __init__(self, cfg: DitConfig, *, image_kv: bool, param_dtype, attention_backend: str, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.heads = cfg.num_attention_heads
        self.backend = attention_backend
        self.q = Dense(d, d, param_dtype=param_dtype, rngs=rngs)
        self.k = Dense(d, d, param_dtype=param_dtype, rngs=rngs)
        self.v = Dense(d, d, param_dtype=param_dtype, rngs=rngs)
        self.o = Dense(d, d, param_dtype=param_dtype, rngs=rngs)
        self.norm_q = RMSNorm(d, eps=cfg.eps, param_dtype=param_dtype)
        self.norm_k = RMSNorm(d, eps=cfg.eps, param_dtype=param_dtype)
        if image_kv:
            self.k_img = Dense(cfg.added_kv_proj_dim, d, param_dtype=param_dtype, rngs=rngs)
            self.v_img = Dense(cfg.added_kv_proj_dim, d, param_dtype=param_dtype, rngs=rngs)
            self.norm_k_img = RMSNorm(d, eps=cfg.eps, param_dtype=param_dtype)
        else:
            self.k_img = self.v_img = self.norm_k_img = None

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, -1)

    def output(self, out: jax.Array) -> jax.Array:
        """Attention output [..., heads, head_dim] -> the output projection [..., dim]."""
        return self.o(out.reshape(*out.shape[:-2], -1))

    def qkv(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None):
        """Self-attention q, k, v [B, L, heads, head_dim] of `x`: one matmul, q/k RMS-norm, then RoPE."""
        q, k, v = fused_dense(x, [self.q, self.k, self.v])
        q, k, v = self._heads(self.norm_q(q)), self._heads(self.norm_k(k)), self._heads(v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def context_kv(self, context: jax.Array, context_img: jax.Array | None = None):
        """Cross-attention (k, v, k_img, v_img) of the text (and image) tokens, heads split; the image pair is
        None without image tokens. Depends on the context only, so it can be computed once (jax_impl.causal)."""
        k, v = fused_dense(context, [self.k, self.v])
        k, v = self._heads(self.norm_k(k)), self._heads(v)
        if self.k_img is None or context_img is None:
            return k, v, None, None
        return k, v, self._heads(self.norm_k_img(self.k_img(context_img))), self._heads(self.v_img(context_img))

    def cross_attend(self, x: jax.Array, kv: tuple, split: SequenceSplit | None = None) -> jax.Array:
        """Cross-attention of `x` on `context_kv` keys/values before the output projection: text attention plus
        image attention, [B, L, heads, head_dim] (FantasyWorld's camera adapter works on this)."""
        k, v, k_img, v_img = kv
        q = self._heads(self.norm_q(self.q(x)))
        backend = cross_backend(self.backend)
        out = kernels.attention(q, k, v, backend=backend, sequence_split=split)
        if k_img is not None:
            out = out + kernels.attention(q, k_img, v_img, backend=backend, sequence_split=split)
        return out

    def cross(self, x: jax.Array, kv: tuple, split: SequenceSplit | None = None) -> jax.Array:
        """Cross-attention of `x` on `context_kv` keys/values."""
        return self.output(self.cross_attend(x, kv, split))

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        context_img: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
        split: SequenceSplit | None = None,
    ) -> jax.Array:
        """Self-attention (`rope` applies) without `context`, cross-attention on `context` (and `context_img`)."""
        if context is not None:
            return self.cross(x, self.context_kv(context, context_img), split)
        q, k, v = self.qkv(x, rope)
        return self.output(kernels.attention(q, k, v, backend=self.backend, sequence_split=split))


# Self-attention policies: the one part of the forward that differs between plain Wan and the block-causal
# (streaming) model. `policy(attn, h, rope, past, split) -> (output [B, L, D], own (k, v) or None)`.
SelfAttention = Callable[..., tuple[jax.Array, "tuple[jax.Array, jax.Array] | None"]]


def full_attention(attn: "Attention", h, rope, past, split):
    """Plain Wan: every token attends to every token (context parallel with `split`)."""
    return attn(h, rope=rope, split=split), None


MASK_BACKENDS = ("xla", "cudnn")


def mask_backend(backend: str, dtype) -> str:
    """A back-end that applies masks: the configured one if it can, else xla (auto on TPU picks splash)."""
    name = resolve_backend(backend, dtype)
    if name in MASK_BACKENDS:
        return name
    if backend == "auto":
        return "xla"
    return name  # explicitly chosen: let kernels.attention raise its own clear error


def set_attention_backend(model: nnx.Module, backend: str) -> int:
    """Switch every attention of `model` to `kernels` back-end `backend` (e.g. "cudnn_fp8" after a bf16 reference
    run of the same weights); returns how many were switched. The next jitted call compiles for the new one."""
    n = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Attention):
            node.backend = backend
            n += 1
    return n


@dataclasses.dataclass(frozen=True)
class MaskedAttention:
    """Self-attention over [past keys | own keys] under a boolean `mask` [1, 1, 1 or T, S] (True = attend):
    the block-causal mask over the whole sequence (no past), or one block against its key/value cache
    (`past` = this layer's cached (k, v)). Also returns the block's own (k, v), which the cache stores."""

    mask: jax.Array

    def __call__(self, attn: "Attention", h, rope, past, split):
        q, k, v = attn.qkv(h, rope)
        keys, vals = k, v
        if past is not None:
            keys = jnp.concatenate([past[0], k], axis=1)
            vals = jnp.concatenate([past[1], v], axis=1)
        mask = jnp.broadcast_to(self.mask, (1, 1, q.shape[1], keys.shape[1]))  # cuDNN wants the full [T, S] extent
        out = kernels.attention(q, keys, vals, backend=mask_backend(attn.backend, q.dtype), mask=mask)
        return attn.output(out), (k, v)


class Block(nnx.Module):
    """Self-attention, cross-attention and feed-forward, modulated by six per-block vectors.

    The two halves are public so that other modules can run between them (FantasyWorld's joint layers):
    `__call__` is `ffn_half(*attention_half(...))`.
    """

    def __init__(self, cfg: DitConfig, *, param_dtype, attention_backend: str, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.eps = cfg.eps
        kw = dict(param_dtype=param_dtype, attention_backend=attention_backend, rngs=rngs)
        self.self_attn = Attention(cfg, image_kv=False, **kw)
        self.cross_attn = Attention(cfg, image_kv=cfg.has_image_tokens, **kw)
        self.norm_cross = LayerNorm(d, eps=cfg.eps, affine=True) if cfg.cross_attn_norm else None
        self.ffn = Mlp(d, cfg.ffn_dim, d, gelu_tanh, param_dtype=param_dtype, rngs=rngs)
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 6, d), F32) / d**0.5)

    def attention_half(
        self,
        x,
        context,
        context_img,
        mod,
        rope,
        splits=(None, None),
        *,
        self_attention: Callable[[Attention, jax.Array], jax.Array] | None = None,
        cross_attention: Callable[[Attention, jax.Array], jax.Array] | None = None,
        taps: Taps | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
        """Self- and cross-attention residual updates; returns (x, ffn_mod = (shift, scale, gate) float32).

        x [B, L, D]; mod: [B, 1 or L, 6, D] float32 time projection (the block's table is added in float32).
        `self_attention(attn, h)` and `cross_attention(attn, h)` replace the default
        `attn(h, rope=rope, split=splits[0])` and `attn(h, context, context_img, split=splits[1])`.
        `taps`, if given, receives "self_attn" and "cross_attn".
        """
        if self_attention is None:
            self_attention = lambda attn, h: attn(h, rope=rope, split=splits[0])  # noqa: E731
        if cross_attention is None:
            cross_attention = lambda attn, h: attn(h, context, context_img, split=splits[1])  # noqa: E731
        m = self.modulation.value[None] + mod
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (m[:, :, i] for i in range(6))

        h = (layer_norm(x, self.eps) * (1 + scale_sa) + shift_sa).astype(x.dtype)
        sa = self_attention(self.self_attn, h)
        x = (x.astype(F32) + sa * gate_sa).astype(x.dtype)

        h = self.norm_cross(x) if self.norm_cross is not None else x
        ca = cross_attention(self.cross_attn, h)
        x = x + ca
        if taps is not None:
            taps.update(self_attn=sa, cross_attn=ca)
        return x, (shift_ff, scale_ff, gate_ff)

    def ffn_half(self, x, ffn_mod: tuple[jax.Array, jax.Array, jax.Array], *, taps: Taps | None = None) -> jax.Array:
        """Modulated LayerNorm, feed-forward and gated residual; `taps` receives "ffn" and "output"."""
        shift_ff, scale_ff, gate_ff = ffn_mod
        h = (layer_norm(x, self.eps) * (1 + scale_ff) + shift_ff).astype(x.dtype)
        ff = self.ffn(h)
        x = (x.astype(F32) + ff.astype(F32) * gate_ff).astype(x.dtype)
        if taps is not None:
            taps.update(ffn=ff, output=x)
        return x

    def __call__(self, x, context, context_img, mod, rope, splits=(None, None), *, self_attention=None,
                 cross_attention=None) -> tuple[jax.Array, Taps]:
        """The whole block: `attention_half` then `ffn_half`; returns (x, taps)."""
        taps: Taps = {}
        x, ffn_mod = self.attention_half(x, context, context_img, mod, rope, splits, self_attention=self_attention,
                                         cross_attention=cross_attention, taps=taps)
        return self.ffn_half(x, ffn_mod, taps=taps), taps


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["k", "v", "k_img", "v_img", "text", "image"], meta_fields=[]
)
@dataclasses.dataclass
class CrossKV:
    """Per-layer cross-attention keys/values [layers, B, tokens, heads, head_dim] (+ embeddings, for taps)."""

    k: jax.Array
    v: jax.Array
    k_img: jax.Array | None
    v_img: jax.Array | None
    text: jax.Array  # text embedding [B, S, D]
    image: jax.Array | None  # image embedding [B, N, D]


def token_grid(cfg: DitConfig, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Post-patch (frames, height, width) token grid of latents of that size."""
    pt, ph, pw = cfg.patch_size
    return frames // pt, height // ph, width // pw


def unstack_block_taps(block_taps: Taps | None, num_layers: int, seq: int | None = None) -> Taps:
    """Scan-stacked block taps {name: [layers, B, L, ...]} -> {"blocks.{i}.{name}": [B, L, ...]}, tokens cut
    to the first `seq` (context-parallel padding)."""
    taps: Taps = {}
    for name, stacked in (block_taps or {}).items():
        for i in range(num_layers):
            taps[f"blocks.{i}.{name}"] = stacked[i] if seq is None else stacked[i][:, :seq]
    return taps


class WanTransformer(nnx.Module):
    """Wan DiT. `dtype` is the activation and weight dtype; float32 islands follow the reference."""

    def __init__(
        self,
        cfg: DitConfig,
        *,
        dtype=jnp.float32,
        attention_backend: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        d, pd = cfg.inner_dim, self.dtype
        pt, ph, pw = cfg.patch_size
        scale = (pt * ph * pw * cfg.in_channels) ** -0.5
        self.patch_kernel = nnx.Param(
            jax.random.uniform(rngs.params(), (pt, ph, pw, cfg.in_channels, d), F32, -scale, scale).astype(pd)
        )
        self.patch_bias = nnx.Param(jnp.zeros((d,), pd))
        self.time_embed = Mlp(cfg.freq_dim, d, d, jax.nn.silu, param_dtype=F32, rngs=rngs)
        self.time_proj = Dense(d, 6 * d, param_dtype=pd, rngs=rngs)
        self.text_embed = Mlp(cfg.text_dim, d, d, gelu_tanh, param_dtype=pd, rngs=rngs)
        self.image_embed = ImageEmbedding(cfg, param_dtype=pd, rngs=rngs) if cfg.has_image_tokens else None

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, param_dtype=pd, attention_backend=attention_backend, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.head = Dense(d, cfg.out_channels * pt * ph * pw, param_dtype=pd, rngs=rngs)
        self.head_modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 2, d), F32) / d**0.5)

    # The forward in pieces (`__call__` chains them; jax_impl.causal reuses them around its own attention).
    def embed_patches(self, latents: jax.Array) -> jax.Array:
        """Patch embedding [B, F, H, W, C] -> tokens [B, L, D]: a strided 3D conv written as patchify + one matmul."""
        cfg, dt = self.cfg, self.dtype
        b, f, h, w, _ = latents.shape
        pt, ph, pw = cfg.patch_size
        grid = token_grid(cfg, f, h, w)
        x = latents.astype(dt).reshape(b, grid[0], pt, grid[1], ph, grid[2], pw, -1)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, math.prod(grid), -1)
        kernel = self.patch_kernel.value.reshape(-1, cfg.inner_dim)
        x = jnp.einsum("bli,io->blo", x, kernel, preferred_element_type=F32)
        return (x + self.patch_bias.value.astype(F32)).astype(dt)

    def embed_time(self, t: jax.Array) -> tuple[jax.Array, jax.Array, Taps]:
        """Timesteps [B] or per token [B, L] -> (temb [B, 1 or L, D], modulation [B, 1 or L, 6, D] float32, taps)."""
        temb = self.time_embed(timestep_embedding(t, self.cfg.freq_dim)).astype(self.dtype)
        tproj = self.time_proj(jax.nn.silu(temb))
        taps = {"time_embedding": temb, "time_projection": tproj}
        if temb.ndim == 2:  # [B, D] -> [B, 1, D]: one vector broadcast over tokens
            temb, tproj = temb[:, None], tproj[:, None]
        mod = tproj.reshape(*tproj.shape[:2], 6, self.cfg.inner_dim).astype(F32)
        return temb, mod, taps

    def embed_context(self, text: jax.Array, image: jax.Array | None = None):
        """Text (and CLIP image) embeddings -> (context [B, S, D], context_img [B, N, D] or None, taps)."""
        context = self.text_embed(text.astype(self.dtype))
        taps = {"text_embedding": context}
        context_img = None
        if self.image_embed is not None:
            context_img = self.image_embed(image.astype(self.dtype))
            taps["image_embedding"] = context_img
        return context, context_img, taps

    def embed_tokens(self, latents, timestep, *, seq_split: SequenceSplit | None = None):
        """Patch tokens and time conditioning: (x [B, L, D], temb, modulation, taps).

        timestep: scalar, [B] or per token [B, L]; with `seq_split`, per-token timesteps are padded and split
        like the tokens (the tokens themselves are split by the caller, after embedding).
        """
        b = latents.shape[0]
        x = self.embed_patches(latents)
        taps: Taps = {"patch_embedding": x}
        # Time conditioning: one vector per sample, or per token (TI2V keeps the first frame clean).
        t = jnp.broadcast_to(timestep, (b,) + timestep.shape[1:]) if timestep.ndim else jnp.full((b,), timestep)
        if seq_split is not None and t.ndim == 2:  # per-token: split (padded) timesteps like the tokens
            t = seq_split.tokens(pad_axis(t, 1, seq_split.padded(t.shape[1])))
        temb, mod, time_taps = self.embed_time(t)
        return x, temb, mod, taps | time_taps

    def embed(self, latents, timestep, text, image=None, *, seq_split: SequenceSplit | None = None):
        """Everything the blocks need: (tokens x, temb, modulation, context, context_img, taps)."""
        x, temb, mod, taps = self.embed_tokens(latents, timestep, seq_split=seq_split)
        context, context_img, context_taps = self.embed_context(text, image)
        return x, temb, mod, context, context_img, taps | context_taps

    def cross_kv(self, text: jax.Array, image: jax.Array | None = None) -> "CrossKV":
        """Every layer's cross-attention keys/values of the text (and image) tokens: they depend on the context
        only, so a caller that runs the model many times on one prompt computes them once (jax_impl.causal)."""
        context, context_img, _ = self.embed_context(text, image)
        _, kv = self.scan_blocks(None, lambda block, _, __: (None, block.cross_attn.context_kv(context, context_img)))
        return CrossKV(*kv, context, context_img)

    def block_stack(self, layers: slice | None = None):
        """(graphdef, stacked state) of the blocks, or of the sub-range `layers` (e.g. slice(16, 40)): the state
        has a leading layer axis; `nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))` is one block."""
        graphdef, stacked = nnx.split(self.blocks)
        if layers is not None:
            if layers.step not in (None, 1):
                raise ValueError(f"layers must be a contiguous range, got {layers}")
            stacked = jax.tree.map(lambda a: a[layers], stacked)
        return graphdef, stacked

    def scan_blocks(self, x, step: Callable, xs=None, *, gather: Callable | None = None, unroll: int = 1,
                    layers: slice | None = None):
        """Run the blocks in order under `lax.scan`: `step(block, x, xs_i) -> (x, y)` with `xs_i` this layer's
        slice of `xs` (arrays with a leading layer axis, or None). Returns (x, the y's stacked).
        `layers` runs only that contiguous sub-range of the blocks (`xs` then covers those layers only), so
        0..k then k..n is the whole stack. `gather(layer_state)` runs on a layer's weights before use
        (context parallel: FSDP all-gather)."""
        graphdef, stacked = self.block_stack(layers)

        def body(x, inputs):
            layer_state, layer_xs = inputs
            if gather is not None:
                layer_state = gather(layer_state)
            return step(nnx.merge(graphdef, layer_state), x, layer_xs)

        return jax.lax.scan(body, x, (stacked, xs), unroll=unroll)

    def apply_head(self, x, temb, latent_shape, *, seq_split: SequenceSplit | None = None):
        """Final modulated norm, head and unpatchify: tokens [B, L(+padding), D] -> (head tokens [B, L, out *
        patch], prediction [B, F, H, W, out_channels]); `latent_shape` is the input latents' shape."""
        cfg = self.cfg
        b, f, h, w = latent_shape[:4]
        pt, ph, pw = cfg.patch_size
        grid = token_grid(cfg, f, h, w)
        m = self.head_modulation.value[None] + temb[:, :, None].astype(F32)  # [B, 1 or L, 2, D]
        x = (layer_norm(x, cfg.eps) * (1 + m[:, :, 1]) + m[:, :, 0]).astype(self.dtype)
        x = self.head(x)
        if seq_split is not None:  # keep the head token-split (else XLA may gather tokens, not weights)
            x = seq_split.tokens(x)
        x = x[:, : math.prod(grid)]  # drops context-parallel padding, if any
        out = x.reshape(b, *grid, pt, ph, pw, cfg.out_channels)
        out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, f, h, w, cfg.out_channels)
        return x, out

    def forward(
        self,
        latents: jax.Array,
        timestep: jax.Array,
        text: jax.Array | None = None,
        image: jax.Array | None = None,
        *,
        cross: "CrossKV | None" = None,
        self_attention: SelfAttention = full_attention,
        past: tuple[jax.Array, jax.Array] | None = None,
        frame_offset: int | jax.Array = 0,
        keep_kv: bool = False,
        capture: bool = False,
        seq_split: SequenceSplit | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None, Taps]:
        """The one forward: embed -> rotary tables -> scan the blocks -> head. Inputs are not checked here.

        The plain model (`__call__`), the block-causal pass over the whole video and the cached block step
        (jax_impl.causal) differ only in the arguments:
          self_attention: the policy (`full_attention`, or a `MaskedAttention`);
          cross: precomputed per-layer context keys/values (`cross_kv`) instead of `text`/`image`;
          past: per-layer cached (k, v) [layers, B, S, heads, head_dim] given to the policy;
          frame_offset: first frame's rotary position (may be traced: the cache's block counter);
          keep_kv: also return every layer's own self-attention (k, v), stacked (for the cache).
        Returns (prediction [B, F, H, W, out_channels], own (k, v) or None, taps; empty unless `capture`).
        """
        cfg = self.cfg
        grid = token_grid(cfg, *latents.shape[1:4])
        x, temb, mod, taps = self.embed_tokens(latents, timestep, seq_split=seq_split)
        context = context_img = None
        if cross is None:
            context, context_img, context_taps = self.embed_context(text, image)
            taps |= context_taps

        rope = rope_tables(grid, cfg.rope_split, cfg.rope_max_seq_len, frame_offset)
        seq, splits = x.shape[1], (None, None)
        if seq_split is not None:  # context parallel: pad tokens to a multiple of the devices, split them
            n = seq_split.padded(seq)
            x = seq_split.tokens(pad_axis(x, 1, n))
            rope = tuple(pad_axis(r, 0, n) for r in rope)
            if mod.shape[1] > 1:  # per-token timesteps
                mod, temb = seq_split.tokens(pad_axis(mod, 1, n)), seq_split.tokens(pad_axis(temb, 1, n))
            context, context_img = seq_split.replicated((context, context_img))
            splits = (seq_split.with_kv_len(seq), seq_split.with_kv_len(None))

        def step(block, x, xs):
            past_i, cross_i = xs
            own_kv = []  # the self-attention's own keys/values, for a cache

            def sa(attn, h):
                out, kv = self_attention(attn, h, rope, past_i, splits[0])
                own_kv.append(kv)
                return out

            ca = None if cross_i is None else (lambda attn, h: attn.cross(h, cross_i))
            x, block_taps = block(x, context, context_img, mod, rope, splits, self_attention=sa, cross_attention=ca)
            if seq_split is not None:
                x = seq_split.tokens(x)
            return x, (own_kv[0] if keep_kv else None, block_taps if capture else None)

        cross_xs = None if cross is None else (cross.k, cross.v, cross.k_img, cross.v_img)
        # unroll=2: two blocks per loop iteration lets XLA overlap one block's weight slicing with the
        # other's compute (0.3-1% on an H100) at a small compile-time cost.
        gather = seq_split.replicated if seq_split is not None else None  # FSDP: gather each layer's weights
        x, (kv, block_taps) = self.scan_blocks(x, step, (past, cross_xs), gather=gather, unroll=2)
        if capture:
            taps.update(unstack_block_taps(block_taps, cfg.num_layers, seq))

        taps["head"], out = self.apply_head(x, temb, latents.shape, seq_split=seq_split)
        taps["output"] = out
        return out, kv, (taps if capture else {})

    def __call__(
        self,
        latents: jax.Array,
        timestep: jax.Array,
        text: jax.Array,
        image: jax.Array | None = None,
        *,
        capture: bool = False,
        seq_split: SequenceSplit | None = None,
    ):
        """Predict the flow (velocity) for `latents` at `timestep` given text (and image) embeddings.

        latents [B, F, H, W, C]; timestep scalar, [B] or per-token [B, L]; text [B, S, text_dim];
        image [B, N, image_dim] for Wan2.1 I2V. Returns [B, F, H, W, out_channels] (and taps).
        `seq_split` runs it context-parallel (see `jax_impl.sharding`): tokens padded at the end to a
        multiple of the mesh axis and split over it, each layer's weights gathered just before use.
        """
        timestep = jnp.asarray(timestep)
        check_dit_inputs(self.cfg, latents.shape, timestep.shape, text.shape, None if image is None else image.shape)
        out, _, taps = self.forward(latents, timestep, text, image, capture=capture, seq_split=seq_split)
        return (out, taps) if capture else out
