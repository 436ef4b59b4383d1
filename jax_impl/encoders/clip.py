"""The CLIP vision tower (transformers' CLIPVisionModel) in Flax NNX: Wan2.1 I2V's image encoder, ViT-H/14.

Pixels are channels-last [B, H, W, C]. The patch embedding is a stride-`patch_size` convolution without
bias, computed as one matmul over the image cut into patches; its kernel keeps torch's [D, C, P, P] layout,
so loading copies it. Then the class token, learned position embeddings, `pre_layrnorm` and pre-norm encoder
layers (attention scaled by 1/sqrt(head_dim), MLP with the config's `hidden_act`).

Wan takes `hidden_states[-2]`: the residual stream after all layers but the last, without `post_layernorm`.
`penultimate` computes exactly that and skips the last layer's work. The layers are stacked and run under
`lax.scan`; `capture=True` returns the parity taps: embeddings, pre_layrnorm, layers.{i}.{self_attn, mlp,
output}, post_layernorm (the pooled class token, only when every layer ran).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from weights.configs.encoders import ClipVisionConfig
from jax_impl.layers import ACTIVATIONS, F32, Dense, LayerNorm, fused_dense

Taps = dict[str, jax.Array]


class ClipLayer(nnx.Module):
    """Pre-norm self-attention and MLP, each added to the residual stream (kept in the model dtype, as torch)."""

    def __init__(self, cfg: ClipVisionConfig, *, dtype, rngs: nnx.Rngs):
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.norm1 = LayerNorm(d, eps=eps, affine=True)
        self.q = Dense(d, d, param_dtype=dtype, rngs=rngs)
        self.k = Dense(d, d, param_dtype=dtype, rngs=rngs)
        self.v = Dense(d, d, param_dtype=dtype, rngs=rngs)
        self.o = Dense(d, d, param_dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=eps, affine=True)
        self.fc1 = Dense(d, cfg.intermediate_size, param_dtype=dtype, rngs=rngs)
        self.fc2 = Dense(cfg.intermediate_size, d, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cfg: ClipVisionConfig, backend: str) -> tuple[jax.Array, Taps]:
        b, t, _ = x.shape
        q, k, v = (y.reshape(b, t, cfg.num_attention_heads, -1) for y in fused_dense(self.norm1(x), [self.q, self.k, self.v]))
        attn = self.o(kernels.attention(q, k, v, backend=backend).reshape(b, t, -1))
        x = x + attn.astype(x.dtype)
        h = self.fc1(self.norm2(x))
        mlp = self.fc2(ACTIVATIONS[cfg.hidden_act](h.astype(F32)).astype(h.dtype))
        x = x + mlp.astype(x.dtype)
        return x, {"self_attn": attn, "mlp": mlp, "output": x}


class ClipVisionEncoder(nnx.Module):
    """CLIP ViT: pixels [B, H, W, C] (normalised, image_size square) -> hidden states [B, 1 + patches, D]."""

    def __init__(self, cfg: ClipVisionConfig, *, dtype=jnp.float32, attention_backend: str = "auto", rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.attention_backend = attention_backend
        d, p = cfg.hidden_size, cfg.patch_size
        init = lambda shape, std: nnx.Param((std * jax.random.normal(rngs.params(), shape, F32)).astype(self.dtype))  # noqa: E731
        self.patch_kernel = init((d, cfg.num_channels, p, p), 0.02)
        self.class_embedding = init((d,), d**-0.5)
        self.position_embedding = init((cfg.num_positions, d), 0.02)
        self.pre_norm = LayerNorm(d, eps=cfg.layer_norm_eps, affine=True)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> ClipLayer:
            return ClipLayer(cfg, dtype=self.dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.post_norm = LayerNorm(d, eps=cfg.layer_norm_eps, affine=True)

    def embed(self, pixels: jax.Array) -> jax.Array:
        """Class token + patch embeddings (a conv of stride P as one matmul) + position embeddings."""
        cfg = self.cfg
        b, h, w, c = pixels.shape
        if h != cfg.image_size or w != cfg.image_size or c != cfg.num_channels:
            raise ValueError(f"pixels are {h}x{w}x{c}; this CLIP takes {cfg.image_size}x{cfg.image_size}x{cfg.num_channels}")
        g, p = cfg.grid, cfg.patch_size
        x = pixels[:, : g * p, : g * p].astype(self.dtype).reshape(b, g, p, g, p, c)
        patches = jnp.einsum("bgiwjc,dcij->bgwd", x, self.patch_kernel.value).reshape(b, g * g, -1)
        cls = jnp.broadcast_to(self.class_embedding.value, (b, 1, cfg.hidden_size)).astype(patches.dtype)
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.value[None]

    def __call__(self, pixels: jax.Array, *, num_layers: int | None = None, capture: bool = False):
        """The residual stream after the first `num_layers` layers (default all: transformers' last_hidden_state);
        `num_layers=k` equals transformers' `hidden_states[k]`."""
        cfg = self.cfg
        n = cfg.num_hidden_layers if num_layers is None else num_layers
        if not 0 <= n <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers={n} is outside 0..{cfg.num_hidden_layers}")
        x = self.embed(pixels)
        taps: Taps = {"embeddings": x}
        x = self.pre_norm(x)
        taps["pre_layrnorm"] = x
        graphdef, stacked = nnx.split(self.layers)
        stacked = jax.tree.map(lambda a: a[:n], stacked)

        def body(x, layer_state):
            x, layer_taps = nnx.merge(graphdef, layer_state)(x, cfg, self.attention_backend)
            return x, (layer_taps if capture else None)

        if n:
            x, layer_taps = jax.lax.scan(body, x, stacked)
        if not capture:
            return x
        for name, stacked_tap in (layer_taps.items() if n else ()):
            for i in range(n):
                taps[f"layers.{i}.{name}"] = stacked_tap[i]
        if n == cfg.num_hidden_layers:
            taps["post_layernorm"] = self.post_norm(x[:, 0])
        return x, taps

    def penultimate(self, pixels: jax.Array) -> jax.Array:
        """What Wan uses as image tokens: `hidden_states[-2]`, the stream before the last layer."""
        return self(pixels, num_layers=self.cfg.num_hidden_layers - 1)


def layer_names(num_layers: int) -> list[str]:
    """The taps of `ClipVisionEncoder(..., capture=True)` over all layers, in forward order."""
    names = ["embeddings", "pre_layrnorm"]
    for i in range(num_layers):
        names += [f"layers.{i}.{n}" for n in ("self_attn", "mlp", "output")]
    return names + ["post_layernorm"]


__all__ = ["ClipVisionEncoder", "layer_names"]
