"""The Wan diffusion transformer (Wan2.1 T2V/I2V, Wan2.2 A14B experts, TI2V-5B) in Flax NNX.

Layout is channels-last throughout `jax_impl`: latents are `[batch, frames, height, width, channels]`.
The blocks are stored stacked (one leading layer axis per parameter) and run under `jax.lax.scan`, so
compile time does not grow with depth. Numerics follow the PyTorch reference: norms, modulation and
the time embedder run in float32, everything else in the model dtype.

Calling the model with `capture=True` also returns a dict of intermediate activations ("taps") named
as in the parity report: patch_embedding, time_embedding, time_projection, text_embedding,
image_embedding, blocks.{i}.{self_attn,cross_attn,ffn,output}, head, output.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from kernels.context_parallel import SequenceSplit, pad_axis
from jax_impl.config import DitConfig
from jax_impl.layers import F32, Dense, LayerNorm, RMSNorm, fused_dense, gelu_exact, gelu_tanh
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

    def cross(self, x: jax.Array, kv: tuple, split: SequenceSplit | None = None) -> jax.Array:
        """Cross-attention of `x` on `context_kv` keys/values."""
        k, v, k_img, v_img = kv
        q = self._heads(self.norm_q(self.q(x)))
        out = kernels.attention(q, k, v, backend=self.backend, sequence_split=split)
        if k_img is not None:
            out = out + kernels.attention(q, k_img, v_img, backend=self.backend, sequence_split=split)
        return self.output(out)

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


class Block(nnx.Module):
    """Self-attention, cross-attention and feed-forward, modulated by six per-block vectors."""

    def __init__(self, cfg: DitConfig, *, param_dtype, attention_backend: str, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.eps = cfg.eps
        kw = dict(param_dtype=param_dtype, attention_backend=attention_backend, rngs=rngs)
        self.self_attn = Attention(cfg, image_kv=False, **kw)
        self.cross_attn = Attention(cfg, image_kv=cfg.has_image_tokens, **kw)
        self.norm_cross = LayerNorm(d, eps=cfg.eps, affine=True) if cfg.cross_attn_norm else None
        self.ffn = Mlp(d, cfg.ffn_dim, d, gelu_tanh, param_dtype=param_dtype, rngs=rngs)
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 6, d), F32) / d**0.5)

    def __call__(
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
    ) -> tuple[jax.Array, Taps]:
        """x [B, L, D]; mod: [B, 1 or L, 6, D] float32 time projection (the table is added in float32).

        `self_attention(attn, h)` and `cross_attention(attn, h)` replace the default
        `attn(h, rope=rope, split=splits[0])` and `attn(h, context, context_img, split=splits[1])` (the
        block-causal DiT passes its masked, cached attention and precomputed context keys/values).
        """
        if self_attention is None:
            self_attention = lambda attn, h: attn(h, rope=rope, split=splits[0])  # noqa: E731
        if cross_attention is None:
            cross_attention = lambda attn, h: attn(h, context, context_img, split=splits[1])  # noqa: E731
        m = self.modulation.value[None] + mod
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (m[:, :, i] for i in range(6))
        plain = _plain_norm(self.eps)

        h = (plain(x) * (1 + scale_sa) + shift_sa).astype(x.dtype)
        sa = self_attention(self.self_attn, h)
        x = (x.astype(F32) + sa * gate_sa).astype(x.dtype)

        h = self.norm_cross(x) if self.norm_cross is not None else x
        ca = cross_attention(self.cross_attn, h)
        x = x + ca

        h = (plain(x) * (1 + scale_ff) + shift_ff).astype(x.dtype)
        ff = self.ffn(h)
        x = (x.astype(F32) + ff.astype(F32) * gate_ff).astype(x.dtype)
        return x, {"self_attn": sa, "cross_attn": ca, "ffn": ff, "output": x}


def _plain_norm(eps: float):
    """Non-affine LayerNorm in float32 (returns float32: callers modulate before rounding)."""

    def f(x: jax.Array) -> jax.Array:
        h = x.astype(F32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        return (h - mean) * jax.lax.rsqrt(var + eps)

    return f


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

    # ------------------------------------------------------------------------------------------
    def check_inputs(self, latents, timestep, text, image) -> None:
        """Shape checks with messages that name the fix; run at trace time, so they cost nothing."""
        cfg = self.cfg
        if latents.ndim != 5:
            raise ValueError(f"latents must be [batch, frames, height, width, channels], got shape {latents.shape}")
        b, f, h, w, c = latents.shape
        if c != cfg.in_channels:
            hint = " (I2V: 16 noise + 4 mask + 16 condition channels)" if cfg.in_channels == 36 else ""
            raise ValueError(f"latents have {c} channels, this model takes {cfg.in_channels}{hint}")
        for name, n, p in zip(("frames", "height", "width"), (f, h, w), cfg.patch_size):
            if n % p:
                raise ValueError(f"latent {name}={n} is not divisible by the patch size {p}; pad or resize the video")
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text embeddings must be [{b}, tokens, {cfg.text_dim}], got {text.shape}")
        seq = (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
        if timestep.ndim not in (0, 1, 2) or (timestep.ndim >= 1 and timestep.shape[0] not in (1, b)):
            raise ValueError(f"timestep must be a scalar, [batch] or [batch, tokens]; got {timestep.shape}")
        if timestep.ndim == 2 and timestep.shape[1] != seq:
            raise ValueError(f"per-token timesteps have {timestep.shape[1]} entries, the video has {seq} tokens")
        if cfg.has_image_tokens and image is None:
            raise ValueError("this is an I2V model with image tokens: pass `image` (CLIP tokens [batch, 257, dim])")
        if image is not None:
            if not cfg.has_image_tokens:
                raise ValueError("this model has no image cross-attention; do not pass `image` tokens")
            if cfg.pos_embed_seq_len:  # FLF2V: first and last image of each sample stacked on the batch axis
                want = (2 * b, cfg.pos_embed_seq_len // 2, cfg.image_dim)
                if tuple(image.shape) != want:
                    raise ValueError(f"first-last-frame image tokens must be {list(want)} ([first, last] image of "
                                     f"each sample, as diffusers stacks them), got {image.shape}")
            elif image.ndim != 3 or image.shape[0] != b or image.shape[2] != cfg.image_dim:
                raise ValueError(f"image tokens must be [{b}, tokens, {cfg.image_dim}], got {image.shape}")

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

    def embed(self, latents, timestep, text, image=None, *, seq_split: SequenceSplit | None = None):
        """Everything the blocks need: (tokens x, temb, modulation, context, context_img, taps).

        timestep: scalar, [B] or per token [B, L]; with `seq_split`, per-token timesteps are padded and split
        like the tokens (the tokens themselves are split by the caller, after `embed`).
        """
        b = latents.shape[0]
        x = self.embed_patches(latents)
        taps: Taps = {"patch_embedding": x}
        # Time conditioning: one vector per sample, or per token (TI2V keeps the first frame clean).
        t = jnp.broadcast_to(timestep, (b,) + timestep.shape[1:]) if timestep.ndim else jnp.full((b,), timestep)
        if seq_split is not None and t.ndim == 2:  # per-token: split (padded) timesteps like the tokens
            t = seq_split.tokens(pad_axis(t, 1, seq_split.padded(t.shape[1])))
        temb, mod, time_taps = self.embed_time(t)
        context, context_img, context_taps = self.embed_context(text, image)
        return x, temb, mod, context, context_img, taps | time_taps | context_taps

    def scan_blocks(self, x, step: Callable, xs=None, *, gather: Callable | None = None, unroll: int = 1):
        """Run the blocks in order under `lax.scan`: `step(block, x, xs_i) -> (x, y)` with `xs_i` this layer's
        slice of `xs` (arrays with a leading layer axis, or None). Returns (x, the y's stacked).
        `gather(layer_state)` runs on a layer's weights before use (context parallel: FSDP all-gather)."""
        graphdef, stacked = nnx.split(self.blocks)

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
        x = (_plain_norm(cfg.eps)(x) * (1 + m[:, :, 1]) + m[:, :, 0]).astype(self.dtype)
        x = self.head(x)
        if seq_split is not None:  # keep the head token-split (else XLA may gather tokens, not weights)
            x = seq_split.tokens(x)
        x = x[:, : math.prod(grid)]  # drops context-parallel padding, if any
        out = x.reshape(b, *grid, pt, ph, pw, cfg.out_channels)
        out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, f, h, w, cfg.out_channels)
        return x, out

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
        self.check_inputs(latents, timestep, text, image)
        cfg = self.cfg
        grid = token_grid(cfg, *latents.shape[1:4])
        x, temb, mod, context, context_img, taps = self.embed(latents, timestep, text, image, seq_split=seq_split)

        rope = rope_tables(grid, cfg.rope_split, cfg.rope_max_seq_len)
        seq, splits = x.shape[1], (None, None)
        if seq_split is not None:  # context parallel: pad tokens to a multiple of the devices, split them
            n = seq_split.padded(seq)
            x = seq_split.tokens(pad_axis(x, 1, n))
            rope = tuple(pad_axis(r, 0, n) for r in rope)
            if mod.shape[1] > 1:  # per-token timesteps
                mod, temb = seq_split.tokens(pad_axis(mod, 1, n)), seq_split.tokens(pad_axis(temb, 1, n))
            context, context_img = seq_split.replicated((context, context_img))
            splits = (seq_split.with_kv_len(seq), seq_split.with_kv_len(None))

        def step(block, x, _):
            x, block_taps = block(x, context, context_img, mod, rope, splits)
            if seq_split is not None:
                x = seq_split.tokens(x)
            return x, (block_taps if capture else None)

        # unroll=2: two blocks per loop iteration lets XLA overlap one block's weight slicing with the
        # other's compute (0.3-1% on an H100) at a small compile-time cost.
        gather = seq_split.replicated if seq_split is not None else None  # FSDP: gather each layer's weights
        x, block_taps = self.scan_blocks(x, step, gather=gather, unroll=2)
        if capture:
            taps.update(unstack_block_taps(block_taps, cfg.num_layers, seq))

        taps["head"], out = self.apply_head(x, temb, latents.shape, seq_split=seq_split)
        taps["output"] = out
        return (out, taps) if capture else out
