"""The one name/layout map of the Wan DiT between diffusers, the original Wan repository and Flax.

Every tensor of a model appears once, as an `Entry` naming it in each layout, with its diffusers
shape and the layout change to Flax. Loading, converting and the key checks all read this list, so a
missing, extra or mis-shaped tensor is reported by name in whichever layout the user has.

Flax checkpoint keys are the paths of `jax_impl.dit.WanTransformer`'s parameters with the layer
index after "blocks" (`blocks.3.self_attn.q.kernel`); the model stores the blocks stacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jax_impl.config import DitConfig
from weights.safetensors_io import CheckpointError

LAYOUTS = ("diffusers", "wan", "flax")


def transpose2d(x: np.ndarray, rows: int = 128) -> np.ndarray:
    """A contiguous transpose done in bands of rows: about 3x faster than `ascontiguousarray(x.T)` on
    large matrices (the band stays in cache), and the same bits."""
    if x.ndim != 2 or x.size < 1 << 16:
        return np.ascontiguousarray(x.T)
    r, c = x.shape
    out = np.empty((c, r), dtype=x.dtype)
    for i in range(0, r, rows):
        out[:, i : i + rows] = x[i : i + rows].T
    return out


@dataclass(frozen=True)
class Entry:
    diffusers: str
    wan: str
    flax: str
    shape: tuple[int, ...]  # torch-side (diffusers and wan share layouts)
    kind: str  # "linear" (transposed in Flax), "conv3d" (channels-last in Flax), "copy"

    def name(self, layout: str) -> str:
        return getattr(self, layout)

    def flax_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return self.shape[::-1]
        if self.kind == "conv3d":
            o, i, t, h, w = self.shape
            return (t, h, w, i, o)
        return self.shape

    def layout_shape(self, layout: str) -> tuple[int, ...]:
        return self.flax_shape() if layout == "flax" else self.shape

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return transpose2d(x)
        if self.kind == "conv3d":
            return np.ascontiguousarray(x.transpose(2, 3, 4, 1, 0))
        return x

    def from_flax(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return transpose2d(x)
        if self.kind == "conv3d":
            return np.ascontiguousarray(x.transpose(4, 3, 0, 1, 2))
        return x

    def convert(self, x: np.ndarray, src: str, dst: str) -> np.ndarray:
        """Re-lay a tensor from layout `src` to `dst`; a pure permutation, so bit-exact both ways."""
        if src == dst or {src, dst} == {"diffusers", "wan"}:
            return x
        return self.to_flax(x) if dst == "flax" else self.from_flax(x)


def _linear(entries: list[Entry], d: str, w: str, f: str, d_in: int, d_out: int) -> None:
    entries.append(Entry(f"{d}.weight", f"{w}.weight", f"{f}.kernel", (d_out, d_in), "linear"))
    entries.append(Entry(f"{d}.bias", f"{w}.bias", f"{f}.bias", (d_out,), "copy"))


def _norm(entries: list[Entry], d: str, w: str, f: str, dim: int, bias: bool) -> None:
    entries.append(Entry(f"{d}.weight", f"{w}.weight", f"{f}.scale", (dim,), "copy"))
    if bias:
        entries.append(Entry(f"{d}.bias", f"{w}.bias", f"{f}.bias", (dim,), "copy"))


def dit_entries(cfg: DitConfig) -> list[Entry]:
    """Every tensor of a Wan DiT with this config, in module order (diffusers' state dict lists each
    module's own `scale_shift_table` before its sub-modules; here it comes last)."""
    d, e = cfg.inner_dim, []
    pt, ph, pw = cfg.patch_size
    e.append(Entry("patch_embedding.weight", "patch_embedding.weight", "patch_kernel", (d, cfg.in_channels, pt, ph, pw), "conv3d"))
    e.append(Entry("patch_embedding.bias", "patch_embedding.bias", "patch_bias", (d,), "copy"))
    ce = "condition_embedder"
    _linear(e, f"{ce}.time_embedder.linear_1", "time_embedding.0", "time_embed.fc1", cfg.freq_dim, d)
    _linear(e, f"{ce}.time_embedder.linear_2", "time_embedding.2", "time_embed.fc2", d, d)
    _linear(e, f"{ce}.time_proj", "time_projection.1", "time_proj", d, 6 * d)
    _linear(e, f"{ce}.text_embedder.linear_1", "text_embedding.0", "text_embed.fc1", cfg.text_dim, d)
    _linear(e, f"{ce}.text_embedder.linear_2", "text_embedding.2", "text_embed.fc2", d, d)
    if cfg.has_image_tokens:
        ie, di = f"{ce}.image_embedder", cfg.image_dim
        _norm(e, f"{ie}.norm1", "img_emb.proj.0", "image_embed.norm1", di, bias=True)
        _linear(e, f"{ie}.ff.net.0.proj", "img_emb.proj.1", "image_embed.mlp.fc1", di, di)
        _linear(e, f"{ie}.ff.net.2", "img_emb.proj.3", "image_embed.mlp.fc2", di, d)
        _norm(e, f"{ie}.norm2", "img_emb.proj.4", "image_embed.norm2", d, bias=True)
        if cfg.pos_embed_seq_len:
            e.append(Entry(f"{ie}.pos_embed", "img_emb.emb_pos", "image_embed.pos_embed", (1, cfg.pos_embed_seq_len, di), "copy"))
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        for dn, wn, fn, cross in (("attn1", "self_attn", "self_attn", False), ("attn2", "cross_attn", "cross_attn", True)):
            for dp, wp in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o")):
                _linear(e, f"{b}.{dn}.{dp}", f"{b}.{wn}.{wp}", f"{b}.{fn}.{wp}", d, d)
            _norm(e, f"{b}.{dn}.norm_q", f"{b}.{wn}.norm_q", f"{b}.{fn}.norm_q", d, bias=False)
            _norm(e, f"{b}.{dn}.norm_k", f"{b}.{wn}.norm_k", f"{b}.{fn}.norm_k", d, bias=False)
            if cross and cfg.has_image_tokens:
                kv = cfg.added_kv_proj_dim
                _linear(e, f"{b}.{dn}.add_k_proj", f"{b}.{wn}.k_img", f"{b}.{fn}.k_img", kv, d)
                _linear(e, f"{b}.{dn}.add_v_proj", f"{b}.{wn}.v_img", f"{b}.{fn}.v_img", kv, d)
                _norm(e, f"{b}.{dn}.norm_added_k", f"{b}.{wn}.norm_k_img", f"{b}.{fn}.norm_k_img", d, bias=False)
        if cfg.cross_attn_norm:  # the original repo calls the cross-attention norm "norm3"
            _norm(e, f"{b}.norm2", f"{b}.norm3", f"{b}.norm_cross", d, bias=True)
        _linear(e, f"{b}.ffn.net.0.proj", f"{b}.ffn.0", f"{b}.ffn.fc1", d, cfg.ffn_dim)
        _linear(e, f"{b}.ffn.net.2", f"{b}.ffn.2", f"{b}.ffn.fc2", cfg.ffn_dim, d)
        e.append(Entry(f"{b}.scale_shift_table", f"{b}.modulation", f"{b}.modulation", (1, 6, d), "copy"))
    _linear(e, "proj_out", "head.head", "head", d, cfg.out_channels * pt * ph * pw)
    e.append(Entry("scale_shift_table", "head.modulation", "head_modulation", (1, 2, d), "copy"))
    return e


def detect_layout(keys: list[str] | set[str]) -> str:
    """Which layout a set of checkpoint keys is in, from names only one layout uses."""
    keys = set(keys)
    if "patch_kernel" in keys:
        return "flax"
    if "proj_out.weight" in keys or any(k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    if "head.head.weight" in keys or any(k.startswith("time_embedding.") for k in keys):
        return "wan"
    raise ValueError("cannot tell the checkpoint layout: none of the diffusers, original-Wan or Flax DiT key names found")


CONFIG_HINT = "Check that config.json belongs to these weights (preset, layer count, I2V vs T2V)."


def check_keys(
    entries: list[Entry], found: dict[str, tuple[int, ...]], layout: str, source: str, hint: str = CONFIG_HINT,
) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor (names and both shapes);
    `hint` ends the message with what to check."""
    expected = {en.name(layout): en.layout_shape(layout) for en in entries}
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected and not k.endswith("norm_added_q.weight")]
    bad = [f"{k}: checkpoint {list(found[k])}, config expects {list(s)}" for k, s in expected.items() if k in found and tuple(found[k]) != tuple(s)]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
        if bad:
            parts.append("mis-shaped: " + "; ".join(bad[:8]))
        raise CheckpointError(
            f"{source} ({layout} layout) does not match its config: " + " | ".join(parts) + ". " + hint
        )
