"""The UMT5 encoder (transformers' UMT5EncoderModel) in Flax NNX: Wan's text encoder, UMT5-XXL.

What makes it UMT5 rather than T5, and where a port most easily goes wrong:
- every layer has its own relative-position bias table (T5 computes one in layer 0 and reuses it);
- buckets are bidirectional: half for keys after the query, half for keys before, each half exact for
  short distances and logarithmic up to `relative_attention_max_distance` (`relative_position_buckets`);
- scores are not scaled by 1/sqrt(d_kv) (the scale is folded into the trained weights);
- RMS norms without mean subtraction, variance in float32, then rounded to the weight's dtype before the gain;
- gated feed-forward act(x wi_0) * (x wi_1) wo, with `wo` kept in float32 in half precision, as transformers'
  `_keep_in_fp32_modules = ["wo"]` does; its float32 output makes the residual stream float32 there, so
  ours keeps the residual in float32 throughout.
Layers are stacked (a leading layer axis per parameter) and run under `lax.scan`, as the DiT's blocks.
`capture=True` also returns the taps the parity report compares: embed, layers.{i}.{position_bias,
self_attn, ffn, output}, output.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from weights.configs.encoders import Umt5Config
from jax_impl.layers import ACTIVATIONS, F32, dense

Taps = dict[str, jax.Array]


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[q_len, k_len] bucket of each (query, key) pair for a bidirectional encoder, as transformers computes it.

    Computed on the host from the static lengths (no device work; the same on every back-end), in float32
    like transformers, so positions whose log ratio is an exact integer (16, 32, 64 for UMT5-XXL) fall into
    the same bucket as in the reference.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]  # key position - query position
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half  # keys after the query use the upper half
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) at distance 0 takes the exact branch anyway
        ratio = np.log(dist.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
        large = max_exact + (ratio * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


def t5_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMS norm: variance in float32, normalised value rounded to the gain's dtype, then scaled (T5's order)."""
    h = x.astype(F32)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)
    return h.astype(scale.dtype) * scale


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype))


class Umt5Layer(nnx.Module):
    """Self-attention with this layer's relative-position bias, then the gated feed-forward; pre-norm residuals."""

    def __init__(self, cfg: Umt5Config, *, dtype, rngs: nnx.Rngs):
        d, n, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
        self.attn_norm = nnx.Param(jnp.ones((d,), dtype))
        self.q = _param(rngs, (d, n), (d * cfg.d_kv) ** -0.5, dtype)
        self.k = _param(rngs, (d, n), d**-0.5, dtype)
        self.v = _param(rngs, (d, n), d**-0.5, dtype)
        self.o = _param(rngs, (n, d), n**-0.5, dtype)
        self.rel_bias = _param(rngs, (cfg.relative_attention_num_buckets, cfg.num_heads), d**-0.5, dtype)
        self.ffn_norm = nnx.Param(jnp.ones((d,), dtype))
        self.wi_0 = _param(rngs, (d, f), d**-0.5, dtype)
        self.wi_1 = _param(rngs, (d, f), d**-0.5, dtype)
        self.wo = _param(rngs, (f, d), f**-0.5, F32)  # float32 in every mode (transformers keeps it so)

    def attention(self, h: jax.Array, buckets: jax.Array, key_mask: jax.Array, heads: int) -> tuple[jax.Array, jax.Array]:
        """Unscaled softmax(q k^T + bias) v over unmasked keys; returns (output, position bias [q, k, heads]).

        Scores and softmax are float32; masked keys get float32's lowest value (as transformers' additive mask),
        so a query whose keys are all padding still gets finite, uniform weights.
        """
        b, s, _ = h.shape
        q, k, v = (dense(h, w.value).reshape(b, s, heads, -1) for w in (self.q, self.k, self.v))
        bias = jnp.take(self.rel_bias.value, buckets, axis=0)  # [q, k, heads]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32)
        scores = scores + jnp.transpose(bias, (2, 0, 1)).astype(F32)[None]
        scores = jnp.where(key_mask, scores, jnp.finfo(F32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=F32).astype(v.dtype)
        return dense(out.reshape(b, s, -1), self.o.value), bias

    def feed_forward(self, h: jax.Array, act) -> jax.Array:
        """act(h wi_0) * (h wi_1), in float32, then `wo` (float32): float32 output whatever the model dtype."""
        gate = act(dense(h, self.wi_0.value).astype(F32)) * dense(h, self.wi_1.value).astype(F32)
        return dense(gate, self.wo.value)

    def __call__(self, x: jax.Array, buckets: jax.Array, key_mask: jax.Array, cfg: Umt5Config) -> tuple[jax.Array, Taps]:
        """x: the float32 residual stream [B, S, D]."""
        eps = cfg.layer_norm_epsilon
        attn, bias = self.attention(t5_norm(x, self.attn_norm.value, eps), buckets, key_mask, cfg.num_heads)
        x = x + attn.astype(F32)
        ffn = self.feed_forward(t5_norm(x, self.ffn_norm.value, eps), ACTIVATIONS[cfg.dense_act_fn])
        x = x + ffn.astype(F32)
        return x, {"position_bias": bias, "self_attn": attn, "ffn": ffn, "output": x}


class Umt5Encoder(nnx.Module):
    """UMT5 encoder: token ids and attention mask -> last hidden state [B, S, d_model] in `dtype`."""

    def __init__(self, cfg: Umt5Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), 1.0, self.dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> Umt5Layer:
            return Umt5Layer(cfg, dtype=self.dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.d_model,), self.dtype))

    def __call__(self, ids: jax.Array, mask: jax.Array, *, capture: bool = False):
        """ids [B, S] int, mask [B, S] (1 = token, 0 = padding). Padding rows are computed, not zeroed:
        they attend to the prompt's tokens, as in transformers; `JaxTextEncoder` zeroes them."""
        cfg = self.cfg
        seq = ids.shape[1]
        buckets = jnp.asarray(
            relative_position_buckets(seq, seq, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        )
        key_mask = mask.astype(bool)[:, None, None, :]
        x = jnp.take(self.embed.value, ids, axis=0)
        taps: Taps = {"embed": x}
        graphdef, stacked = nnx.split(self.layers)

        def body(x, layer_state):
            x, layer_taps = nnx.merge(graphdef, layer_state)(x, buckets, key_mask, cfg)
            return x, (layer_taps if capture else None)

        x, layer_taps = jax.lax.scan(body, x.astype(F32), stacked)
        out = t5_norm(x, self.final_norm.value, cfg.layer_norm_epsilon)
        if not capture:
            return out
        for name, stacked_tap in layer_taps.items():
            for i in range(cfg.num_layers):
                taps[f"layers.{i}.{name}"] = stacked_tap[i]
        taps["output"] = out
        return out, taps


def layer_names(num_layers: int) -> list[str]:
    """The taps of `Umt5Encoder(..., capture=True)` in forward order (the parity report's rows)."""
    names = ["embed"]
    for i in range(num_layers):
        names += [f"layers.{i}.{n}" for n in ("position_bias", "self_attn", "ffn", "output")]
    return names + ["output"]


__all__ = ["Umt5Encoder", "relative_position_buckets", "t5_norm", "layer_names"]
