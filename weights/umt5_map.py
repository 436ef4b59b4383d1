"""The name/layout map of the UMT5 encoder between transformers' UMT5EncoderModel and our Flax model.

One `Entry` per tensor (`weights.entry`): the transformers name (in the `diffusers` slot; the original Wan
release's T5 file is a pickle with other names and is not mapped, so `wan` is None), the Flax path of
`jax_impl.encoders.umt5.Umt5Encoder` with the layer index after "layers", the torch shape and the layout
change (linear weights transposed to [in, out]).

The token embedding is tied: transformers stores `shared.weight`, older or hand-made files may hold
`encoder.embed_tokens.weight` instead or as well; `canonical_keys` folds them into one.
"""

from __future__ import annotations

from weights.configs.encoders import Umt5Config
from weights.entry import Entry, FileKeys, WeightMap

EMBED = "shared.weight"
EMBED_ALIAS = "encoder.embed_tokens.weight"


def _entry(name: str, flax: str, shape: tuple[int, ...], kind: str) -> Entry:
    return Entry(name, None, flax, shape, kind)


def umt5_entries(cfg: Umt5Config) -> list[Entry]:
    """Every tensor of a UMT5 encoder with this config, in transformers' order."""
    d, n, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    e = [_entry(EMBED, "embed", (cfg.vocab_size, d), "copy")]
    for i in range(cfg.num_layers):
        b, fl = f"encoder.block.{i}.layer", f"layers.{i}"
        attn = f"{b}.0.SelfAttention"
        e.append(_entry(f"{b}.0.layer_norm.weight", f"{fl}.attn_norm", (d,), "copy"))
        for p in ("q", "k", "v"):
            e.append(_entry(f"{attn}.{p}.weight", f"{fl}.{p}", (n, d), "linear"))
        e.append(_entry(f"{attn}.o.weight", f"{fl}.o", (d, n), "linear"))
        e.append(_entry(f"{attn}.relative_attention_bias.weight", f"{fl}.rel_bias",
                        (cfg.relative_attention_num_buckets, cfg.num_heads), "copy"))
        e.append(_entry(f"{b}.1.layer_norm.weight", f"{fl}.ffn_norm", (d,), "copy"))
        ff = f"{b}.1.DenseReluDense"
        e.append(_entry(f"{ff}.wi_0.weight", f"{fl}.wi_0", (f, d), "linear"))
        e.append(_entry(f"{ff}.wi_1.weight", f"{fl}.wi_1", (f, d), "linear"))
        e.append(_entry(f"{ff}.wo.weight", f"{fl}.wo", (d, f), "linear"))
    e.append(_entry("encoder.final_layer_norm.weight", "final_norm", (d,), "copy"))
    return e


def canonical_keys(keys: list[str]) -> FileKeys:
    """{name in `umt5_entries` -> name in the file}. With both embedding names present `shared.weight` is
    used, as transformers ties `encoder.embed_tokens` to it (the other is set aside)."""
    if EMBED_ALIAS in keys and EMBED not in keys:
        return FileKeys({(EMBED if k == EMBED_ALIAS else k): k for k in keys})
    tied = (EMBED_ALIAS,) if EMBED_ALIAS in keys else ()
    return FileKeys({k: k for k in keys if k != EMBED_ALIAS}, dropped=tied,
                    why=f"the copy of {EMBED} that transformers ties to it")


UMT5 = WeightMap(
    what="UMT5 text encoder",
    subfolder="text_encoder",
    signatures={"diffusers": ()},
    entries=umt5_entries,
    read_config=lambda raw, keys, source: Umt5Config.from_dict(raw, source=source),
    canonical_keys=canonical_keys,
    prefer="model",
)

__all__ = ["UMT5", "umt5_entries", "canonical_keys", "EMBED", "EMBED_ALIAS"]
