"""Model configurations as plain dataclasses.

One config type per model part. Each reads and writes the `config.json` that diffusers stores next to
the weights, so a checkpoint folder fully describes the model and nothing is guessed from tensor shapes.
This module imports neither torch nor jax: both sides and the converter share it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any

from weights.atomic import atomic_write

PathLike = str | os.PathLike


class ConfigError(ValueError):
    """A config.json that does not describe a model this project can build."""


def _check_keys(cls_name: str, raw: dict[str, Any], known: set[str], source: str) -> dict[str, Any]:
    # Keys starting with "_" are diffusers bookkeeping (_class_name, _diffusers_version, ...).
    fields = {k: v for k, v in raw.items() if not k.startswith("_")}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown {cls_name} config keys {unknown}. This project knows {sorted(known)}; "
            "check that the folder holds the right model (a transformer config in vae/, say)."
        )
    return fields


def _type_name(tp: Any) -> str:
    """How a JSON value of type `tp` is described to a person: 'int', 'number or null', 'list of 3 int'."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0])}"
    return {int: "int", float: "number", bool: "true/false", str: "string", type(None): "null"}.get(tp, str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def check_field_types(values: dict[str, Any], types_: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming the file, the field and the expected type for the first value of `values`
    whose key is in `types_` and whose value does not have that type (JSON lists stand for tuples; a
    number must be finite; true/false is not a number)."""
    for key, value in values.items():
        if key in types_ and not _matches(value, types_[key]):
            raise ConfigError(
                f"{source}: field {key!r} is {json.dumps(value, default=str)[:80]} ({type(value).__name__}); "
                f"expected {_type_name(types_[key])}"
            )


def field_types(cls: type) -> dict[str, Any]:
    """The declared types of a config dataclass's fields (resolved from their annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


class JsonConfig:
    """File and copy helpers shared by the config dataclasses (each defines from_dict/to_dict)."""

    @classmethod
    def from_json(cls, path: PathLike):
        return cls.from_dict(_read_json(path), source=str(path))

    def to_json(self, path: PathLike) -> None:
        _write_json(path, self.to_dict())

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    @classmethod
    def _diffusers_fields(cls, raw: dict[str, Any], source: str) -> dict[str, Any]:
        """The dataclass fields of a diffusers config.json, after checking its keys and `_class_name`."""
        fields = _check_keys(cls.__name__, raw, {f.name for f in dataclasses.fields(cls)}, source)
        check_field_types(fields, field_types(cls), source)
        cls_name = raw.get("_class_name", cls.DIFFUSERS_CLASS)
        if cls_name != cls.DIFFUSERS_CLASS:
            raise ConfigError(f"{source}: _class_name is {cls_name!r}, expected {cls.DIFFUSERS_CLASS!r}")
        return fields


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
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "DitConfig":
        fields = cls._diffusers_fields(raw, source)
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

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



def _read_json(path: PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _write_json(path: PathLike, data: dict[str, Any]) -> None:
    """Write JSON atomically: a crash leaves either the old file or the new one, never half of one (nor a temp file)."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"  # serialise first: a bad value writes nothing
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
