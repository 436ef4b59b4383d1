"""The original Wan repositories' DiT state-dict layout (key names and shapes), written from their model code.

Source of the naming rules: `WanModel` and its sub-modules in `wan/modules/model.py` of
- Wan-Video/Wan2.1 at commit 76e9427657c74f7d063f6c50fce9529900c59e28 (the file's last change, "Format the
  code (#402)"; the repository head read was 9737cba9c1c3c4d04b33fcad41c111989865d315), and
- Wan-Video/Wan2.2 at commit d18200b833203b3686e989e64cd687591725824d (the file's last change; head read
  42bf4cfaa384bc21833865abc2f9e6c0e67233dc).
The hyper-parameters are those of `wan/configs/wan_*.py` in the same commits; in_dim/out_dim come from
the published checkpoints' config.json, as listed in diffusers' scripts/convert_wan_to_diffusers.py
(commit 58eb52c0803ea9af3abec60841c2a093bdf1f951).

What those definitions give, restated as rules (this code is ours, written from the rules, not copied):
- embeddings: `patch_embedding` Conv3d(in_dim -> dim, kernel = stride = patch_size); `text_embedding` and
  `time_embedding` are Sequential(Linear, activation, Linear) -> indices 0 and 2; `time_projection` is
  Sequential(SiLU, Linear(dim, 6 dim)) -> index 1.
- each block: `norm1`, `norm2` are LayerNorms without affine parameters (no tensors); `self_attn` and
  `cross_attn` each have Linear q, k, v, o (dim -> dim) and RMS norms `norm_q`, `norm_k` (a `weight` of
  size dim) when qk_norm; `norm3` is an affine LayerNorm (weight, bias) when cross_attn_norm; Wan2.1's
  image-conditioned models (model_type i2v, flf2v) add `cross_attn.k_img`, `cross_attn.v_img` (Linear
  dim -> dim) and `cross_attn.norm_k_img`; `ffn` is Sequential(Linear(dim, ffn_dim), GELU, Linear(ffn_dim,
  dim)) -> 0 and 2; `modulation` is a (1, 6, dim) parameter.
- `head`: a non-affine norm, `head.head` Linear(dim -> prod(patch_size) * out_dim), `head.modulation` (1, 2, dim).
- Wan2.1 i2v/flf2v only: `img_emb.proj` = Sequential(LayerNorm(1280), Linear(1280, 1280), GELU,
  Linear(1280, dim), LayerNorm(dim)) -> 0, 1, 3, 4; flf2v adds `img_emb.emb_pos` (1, 514, 1280).
  Wan2.2's WanModel has no image branch: its i2v models condition through the 36 input channels only.
- `freqs` (the RoPE table) is a plain attribute, not a registered buffer: it is not in the state dict.
"""

from __future__ import annotations

import dataclasses
import math

CLIP_DIM = 1280  # the ViT-H/14 width MLPProj is built with


@dataclasses.dataclass(frozen=True)
class WanModelSpec:
    """The constructor arguments of an original `WanModel` (plus which repository defines it)."""

    repo: str  # "Wan2.1" or "Wan2.2"
    model_type: str  # t2v | i2v | flf2v (Wan2.1); t2v | i2v | ti2v (Wan2.2)
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    freq_dim: int = 256
    text_dim: int = 4096
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True

    @property
    def image_branch(self) -> bool:
        return self.repo == "Wan2.1" and self.model_type in ("i2v", "flf2v")


# The published models, by this project's full-size preset name.
PUBLISHED: dict[str, WanModelSpec] = {
    "wan2.1-t2v-1.3b": WanModelSpec("Wan2.1", "t2v", 1536, 8960, 12, 30, 16, 16),
    "wan2.1-t2v-14b": WanModelSpec("Wan2.1", "t2v", 5120, 13824, 40, 40, 16, 16),
    "wan2.1-i2v-14b": WanModelSpec("Wan2.1", "i2v", 5120, 13824, 40, 40, 36, 16),
    "wan2.2-i2v-a14b": WanModelSpec("Wan2.2", "i2v", 5120, 13824, 40, 40, 36, 16),  # both experts
    "wan2.2-ti2v-5b": WanModelSpec("Wan2.2", "ti2v", 3072, 14336, 24, 30, 48, 48),
}


def wan_state_dict_shapes(spec: WanModelSpec) -> dict[str, tuple[int, ...]]:
    """{key: shape} of `WanModel(**spec).state_dict()`, in registration order, from the rules above."""
    d = spec.dim
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, d_in: int, d_out: int) -> None:
        out[f"{name}.weight"] = (d_out, d_in)
        out[f"{name}.bias"] = (d_out,)

    def layer_norm(name: str, n: int) -> None:  # affine LayerNorm
        out[f"{name}.weight"] = (n,)
        out[f"{name}.bias"] = (n,)

    def attention(name: str, image: bool) -> None:
        for proj in ("q", "k", "v", "o"):
            linear(f"{name}.{proj}", d, d)
        if spec.qk_norm:
            out[f"{name}.norm_q.weight"] = (d,)
            out[f"{name}.norm_k.weight"] = (d,)
        if image:
            linear(f"{name}.k_img", d, d)
            linear(f"{name}.v_img", d, d)
            if spec.qk_norm:
                out[f"{name}.norm_k_img.weight"] = (d,)

    out["patch_embedding.weight"] = (d, spec.in_dim, *spec.patch_size)
    out["patch_embedding.bias"] = (d,)
    linear("text_embedding.0", spec.text_dim, d)
    linear("text_embedding.2", d, d)
    linear("time_embedding.0", spec.freq_dim, d)
    linear("time_embedding.2", d, d)
    linear("time_projection.1", d, 6 * d)
    for i in range(spec.num_layers):
        b = f"blocks.{i}"
        attention(f"{b}.self_attn", image=False)
        if spec.cross_attn_norm:
            layer_norm(f"{b}.norm3", d)
        attention(f"{b}.cross_attn", image=spec.image_branch)
        linear(f"{b}.ffn.0", d, spec.ffn_dim)
        linear(f"{b}.ffn.2", spec.ffn_dim, d)
        out[f"{b}.modulation"] = (1, 6, d)
    linear("head.head", d, math.prod(spec.patch_size) * spec.out_dim)
    out["head.modulation"] = (1, 2, d)
    if spec.image_branch:
        layer_norm("img_emb.proj.0", CLIP_DIM)
        linear("img_emb.proj.1", CLIP_DIM, CLIP_DIM)
        linear("img_emb.proj.3", CLIP_DIM, d)
        layer_norm("img_emb.proj.4", d)
        if spec.model_type == "flf2v":
            out["img_emb.emb_pos"] = (1, 2 * 257, CLIP_DIM)
    return out
