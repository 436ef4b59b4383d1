"""The Wan diffusion transformer's configuration, read and written as diffusers' or the original Wan config.json.

The config folder fully describes the model, so nothing is guessed from tensor shapes. Both sides (the Flax
model, the diffusers reference) and the converter share it; it imports neither torch nor jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from weights.configs.base import ConfigError, JsonConfig, check_field_types

# Types of the original Wan repository's config.json keys that `DitConfig.from_wan_dict` reads.
_WAN_FIELD_TYPES: dict[str, Any] = {
    "dim": int, "num_heads": int, "in_dim": int, "out_dim": int, "text_dim": int, "freq_dim": int, "ffn_dim": int,
    "num_layers": int, "cross_attn_norm": bool, "eps": float, "image_dim": int, "patch_size": tuple[int, ...],
    "model_type": str,
}


@dataclasses.dataclass(frozen=True)
class DitConfig(JsonConfig):
    """Hyper-parameters of the Wan diffusion transformer; names follow diffusers' WanTransformer3DModel."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    DIFFUSERS_CLASS = "WanTransformer3DModel"

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ConfigError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.qk_norm not in ("rms_norm_across_heads",):
            raise ConfigError(f"qk_norm={self.qk_norm!r} is not supported; Wan uses 'rms_norm_across_heads'")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ConfigError("image_dim and added_kv_proj_dim must be set together (Wan2.1 I2V) or both be None")
        if self.attention_head_dim % 2:
            raise ConfigError(f"attention_head_dim must be even for rotary embeddings, got {self.attention_head_dim}")
        sizes = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim", "freq_dim",
                 "ffn_dim", "num_layers", "rope_max_seq_len", "image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
        for name in sizes:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.patch_size) < 1:
            raise ConfigError(f"patch_size entries must be >= 1, got {list(self.patch_size)}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_image_tokens(self) -> bool:
        return self.image_dim is not None

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Head-dim channels given to the (frame, height, width) rotary axes, as Wan splits them."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw

    def param_count(self) -> int:
        """Number of parameters, computed from the shapes alone (no model built)."""
        d, f, L = self.inner_dim, self.ffn_dim, self.num_layers
        pt, ph, pw = self.patch_size
        patch = pt * ph * pw
        n = patch * self.in_channels * d + d  # patch embedding
        n += self.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d  # time embedder + projection
        n += self.text_dim * d + d + d * d + d  # text projection
        if self.has_image_tokens:
            di = self.image_dim
            n += 2 * di + (di * di + di) + (di * d + d) + 2 * d  # LN, MLP di->di->d, LN
            if self.pos_embed_seq_len:
                n += self.pos_embed_seq_len * self.image_dim
        attn = 4 * (d * d + d) + 2 * d  # q, k, v, o with q/k norms
        block = 2 * attn + 2 * (d * f) + f + d + 6 * d
        if self.cross_attn_norm:
            block += 2 * d
        if self.has_image_tokens:
            block += 2 * (self.added_kv_proj_dim * d + d) + d
        n += L * block
        n += d * self.out_channels * patch + self.out_channels * patch + 2 * d  # head
        return n

    # --- diffusers config.json -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return {"_class_name": self.DIFFUSERS_CLASS, **d}

    # --- original Wan repository config.json ("WanModel") ------------------------------------------
    @classmethod
    def from_wan_dict(cls, raw: dict[str, Any], has_image_branch: bool, source: str = "config") -> "DitConfig":
        """Translate the original repository's config. Whether the CLIP image branch exists is read from
        the weights (`img_emb.*` keys): Wan2.1 I2V has it, Wan2.2 A14B (also model_type "i2v") does not."""
        check_field_types(raw, _WAN_FIELD_TYPES, source)
        try:
            dim, heads = int(raw["dim"]), int(raw["num_heads"])
            cfg = cls(
                patch_size=tuple(raw.get("patch_size", (1, 2, 2))),
                num_attention_heads=heads,
                attention_head_dim=dim // heads,
                in_channels=int(raw["in_dim"]),
                out_channels=int(raw["out_dim"]),
                text_dim=int(raw.get("text_dim", 4096)),
                freq_dim=int(raw.get("freq_dim", 256)),
                ffn_dim=int(raw["ffn_dim"]),
                num_layers=int(raw["num_layers"]),
                cross_attn_norm=bool(raw.get("cross_attn_norm", True)),
                eps=float(raw.get("eps", 1e-6)),
                image_dim=int(raw.get("image_dim", 1280)) if has_image_branch else None,
                added_kv_proj_dim=dim if has_image_branch else None,
                pos_embed_seq_len=514 if raw.get("model_type") == "flf2v" else None,
            )
        except KeyError as e:
            raise ConfigError(f"{source}: original-Wan config lacks the key {e.args[0]!r}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if dim % heads:
            raise ConfigError(f"{source}: dim={dim} is not divisible by num_heads={heads}")
        return cfg

    def to_wan_dict(self) -> dict[str, Any]:
        model_type = {True: "i2v", False: "t2v"}[self.has_image_tokens or self.in_channels == 36]
        if self.in_channels == 48:
            model_type = "ti2v"
        if self.pos_embed_seq_len:
            model_type = "flf2v"
        return {
            "_class_name": "WanModel",
            "model_type": model_type,
            "patch_size": list(self.patch_size),
            "text_len": 512,
            "in_dim": self.in_channels,
            "dim": self.inner_dim,
            "ffn_dim": self.ffn_dim,
            "freq_dim": self.freq_dim,
            "text_dim": self.text_dim,
            "out_dim": self.out_channels,
            "num_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "window_size": [-1, -1],
            "qk_norm": True,
            "cross_attn_norm": self.cross_attn_norm,
            "eps": self.eps,
            # Not in the original files (CLIP ViT-H is always 1280 wide there); kept for tiny models.
            **({"image_dim": self.image_dim} if self.has_image_tokens and self.image_dim != 1280 else {}),
        }


# ------------------------------------------------------------------------------------------------
# Input checks: one home for the DiT's shape rules and their messages (the Flax forward, the block-causal
# paths of both sides and the pipeline call these before any work starts).
# ------------------------------------------------------------------------------------------------
def check_patch_grid(cfg: DitConfig, **sizes: int) -> None:
    """Each latent size (`frames=`, `height=`, `width=`) must be a multiple of its patch size."""
    patch = dict(zip(("frames", "height", "width"), cfg.patch_size))
    for name, n in sizes.items():
        if n % patch[name]:
            raise ValueError(f"latent {name}={n} is not divisible by the patch size {patch[name]}; pad or resize the video")


def check_context(cfg: DitConfig, batch: int, text_shape: Sequence[int], image_shape: Sequence[int] | None) -> None:
    """Text embeddings [batch, tokens, text_dim]; CLIP image tokens [batch, tokens, image_dim] exactly when the
    model has image cross-attention (Wan2.1 I2V)."""
    if len(text_shape) != 3 or text_shape[2] != cfg.text_dim:
        raise ValueError(f"text embeddings must be [batch, tokens, {cfg.text_dim}], got {tuple(text_shape)}")
    if text_shape[0] != batch:
        raise ValueError(f"text embeddings have batch {text_shape[0]}, the latents have batch {batch}; pass one per sample")
    if cfg.has_image_tokens and image_shape is None:
        raise ValueError("this is an I2V model with CLIP image tokens: pass `image` [batch, 257, image_dim]")
    if image_shape is not None:
        if not cfg.has_image_tokens:
            raise ValueError("this model has no image cross-attention; do not pass `image` tokens")
        if cfg.pos_embed_seq_len:  # FLF2V: first and last image of each sample stacked on the batch axis
            want = (2 * batch, cfg.pos_embed_seq_len // 2, cfg.image_dim)
            if tuple(image_shape) != want:
                raise ValueError(f"first-last-frame image tokens must be {list(want)} ([first, last] image of "
                                 f"each sample, as diffusers stacks them), got {tuple(image_shape)}")
            return
        if len(image_shape) != 3 or image_shape[2] != cfg.image_dim:
            raise ValueError(f"image tokens must be [batch, tokens, {cfg.image_dim}], got {tuple(image_shape)}")
        if image_shape[0] != batch:
            raise ValueError(f"image tokens have batch {image_shape[0]}, the latents have batch {batch}")


def check_latent_channels(cfg: DitConfig, channels: int) -> None:
    if channels != cfg.in_channels:
        hint = " (I2V: 16 noise + 4 mask + 16 condition channels)" if cfg.in_channels == 36 else ""
        raise ValueError(f"latents have {channels} channels, this model takes {cfg.in_channels}{hint}")


def check_dit_inputs(
    cfg: DitConfig,
    latent_shape: Sequence[int],
    timestep_shape: Sequence[int],
    text_shape: Sequence[int],
    image_shape: Sequence[int] | None = None,
) -> int:
    """Shapes of one DiT call (latents [B, F, H, W, C], timestep scalar/[B]/[B, tokens], text, image), checked
    with messages that name the fix; returns the number of video tokens."""
    if len(latent_shape) != 5:
        raise ValueError(f"latents must be [batch, frames, height, width, channels], got shape {tuple(latent_shape)}")
    b, f, h, w, c = (int(n) for n in latent_shape)
    check_latent_channels(cfg, c)
    check_patch_grid(cfg, frames=f, height=h, width=w)
    check_context(cfg, b, text_shape, image_shape)
    pt, ph, pw = cfg.patch_size
    seq = (f // pt) * (h // ph) * (w // pw)
    nt = len(timestep_shape)
    if nt not in (0, 1, 2) or (nt >= 1 and timestep_shape[0] not in (1, b)):
        raise ValueError(f"timestep must be a scalar, [batch] or [batch, tokens]; got {tuple(timestep_shape)}")
    if nt == 2 and timestep_shape[1] != seq:
        raise ValueError(f"per-token timesteps have {timestep_shape[1]} entries, the video has {seq} tokens")
    return seq
