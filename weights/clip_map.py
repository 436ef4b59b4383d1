"""The name/layout map of the CLIP vision tower between transformers' CLIPVisionModel and our Flax model.

One `Entry` per tensor (`weights.entry`; the transformers name in the `diffusers` slot, no `wan` name),
with the Flax path of `jax_impl.encoders.clip.ClipVisionEncoder` (layer index after "layers"). Linear weights
are transposed to [in, out]; the patch-embedding conv kernel keeps torch's [D, C, P, P] (the model
contracts it as is). Files written by transformers 4 prefix every name with `vision_model.` and may hold
the `position_ids` buffer; `canonical_keys` removes both.
"""

from __future__ import annotations

from weights.configs.encoders import ClipVisionConfig
from weights.entry import Entry, FileKeys, WeightMap

PREFIX = "vision_model."
BUFFERS = ("embeddings.position_ids",)


def _entry(name: str, flax: str, shape: tuple[int, ...], kind: str = "copy") -> Entry:
    return Entry(name, None, flax, shape, kind)


def _linear(e: list[Entry], name: str, flax: str, d_in: int, d_out: int) -> None:
    e.append(_entry(f"{name}.weight", f"{flax}.kernel", (d_out, d_in), "linear"))
    e.append(_entry(f"{name}.bias", f"{flax}.bias", (d_out,)))


def _norm(e: list[Entry], name: str, flax: str, d: int) -> None:
    e.append(_entry(f"{name}.weight", f"{flax}.scale", (d,)))
    e.append(_entry(f"{name}.bias", f"{flax}.bias", (d,)))


def clip_vision_entries(cfg: ClipVisionConfig) -> list[Entry]:
    """Every tensor of a CLIP vision tower with this config (post_layernorm included: it is in every file)."""
    d, p, m = cfg.hidden_size, cfg.patch_size, cfg.intermediate_size
    e = [
        _entry("embeddings.class_embedding", "class_embedding", (d,)),
        _entry("embeddings.patch_embedding.weight", "patch_kernel", (d, cfg.num_channels, p, p)),
        _entry("embeddings.position_embedding.weight", "position_embedding", (cfg.num_positions, d)),
    ]
    _norm(e, "pre_layrnorm", "pre_norm", d)
    for i in range(cfg.num_hidden_layers):
        b, fl = f"encoder.layers.{i}", f"layers.{i}"
        for t, f in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
            _linear(e, f"{b}.self_attn.{t}", f"{fl}.{f}", d, d)
        _norm(e, f"{b}.layer_norm1", f"{fl}.norm1", d)
        _linear(e, f"{b}.mlp.fc1", f"{fl}.fc1", d, m)
        _linear(e, f"{b}.mlp.fc2", f"{fl}.fc2", m, d)
        _norm(e, f"{b}.layer_norm2", f"{fl}.norm2", d)
    _norm(e, "post_layernorm", "post_norm", d)
    return e


def canonical_keys(keys: list[str]) -> FileKeys:
    """{name in `clip_vision_entries` -> name in the file}: the `vision_model.` prefix removed, buffers set aside."""
    out, buffers = {}, []
    for k in keys:
        name = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if name in BUFFERS:
            buffers.append(k)
        else:
            out[name] = k
    return FileKeys(out, dropped=tuple(buffers), why="buffers transformers saves, not weights")


CLIP = WeightMap(
    what="CLIP vision tower",
    subfolder="image_encoder",
    signatures={"diffusers": ()},
    entries=clip_vision_entries,
    read_config=lambda raw, keys, source: ClipVisionConfig.from_dict(raw, source=source),
    canonical_keys=canonical_keys,
    prefer="model",
)

__all__ = ["CLIP", "clip_vision_entries", "canonical_keys"]
