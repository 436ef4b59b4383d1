"""Configs of the Wan encoders, read from the `config.json` / `preprocessor_config.json` transformers writes.

transformers configs carry many keys that do not change an encoder's forward (dropout, decoder sizes, token
ids, versions); those are ignored. The keys that do are read, and a value this project cannot compute
(a T5 config instead of UMT5, a non-gated feed-forward, an unknown activation) is refused by name here,
before any weight is read. No jax or torch import: the weight maps and both runtimes share these.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from weights.configs.base import ConfigError, JsonConfig

# transformers activation names -> the function our models apply (jax_impl.encoders.{umt5,clip}.ACTIVATIONS)
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "quick_gelu", "relu", "silu")


def _get(raw: dict[str, Any], key: str, default: Any, source: str, kind=int) -> Any:
    value = raw.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key}={value!r} is not a valid {kind.__name__}") from None


@dataclasses.dataclass(frozen=True)
class Umt5Config(JsonConfig):
    """The UMT5 encoder stack (transformers' UMT5EncoderModel). Defaults are transformers' (so a config.json
    lacking a key means what it means there); `umt5_xxl()` is the size Wan uses."""

    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"

    def __post_init__(self) -> None:
        if self.dense_act_fn not in ACTIVATIONS:
            raise ConfigError(f"dense_act_fn={self.dense_act_fn!r} is not supported; known: {', '.join(ACTIVATIONS)}")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError("relative_attention_num_buckets must be at least 4 (half per direction, half of those exact)")

    @classmethod
    def umt5_xxl(cls) -> "Umt5Config":
        """google/umt5-xxl's encoder with Wan's vocabulary (256384 embeddings)."""
        return cls(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def param_count(self) -> int:
        d, f, n = self.d_model, self.d_ff, self.inner_dim
        layer = 4 * d * n + self.relative_attention_num_buckets * self.num_heads + 3 * d * f + 2 * d
        return self.vocab_size * d + self.num_layers * layer + d

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "Umt5Config":
        model_type = raw.get("model_type", "umt5")
        if model_type != "umt5":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}; this encoder is UMT5's (a relative position bias in every "
                "layer). T5/mT5 share layer 0's bias across layers and would compute something else."
            )
        if raw.get("is_decoder", False):
            raise ConfigError(f"{source}: is_decoder is true; only the (bidirectional) UMT5 encoder is supported")
        # transformers derives the activation from feed_forward_proj ("gated-gelu" means gelu_new), but an
        # explicit dense_act_fn / is_gated_act in config.json wins (both are written by save_pretrained).
        ffp = str(raw.get("feed_forward_proj", "gated-gelu"))
        parts = ffp.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConfigError(f"{source}: feed_forward_proj={ffp!r} is not 'gated-ACT' or 'ACT'")
        act = "gelu_new" if ffp == "gated-gelu" else parts[-1]
        act = str(raw.get("dense_act_fn", act))
        if not raw.get("is_gated_act", parts[0] == "gated"):
            raise ConfigError(f"{source}: a non-gated feed-forward ({ffp!r}) is not supported; UMT5 uses 'gated-gelu'")
        fields = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw and f.name != "dense_act_fn"}
        kinds = {f.name: (float if f.name == "layer_norm_epsilon" else int) for f in dataclasses.fields(cls)}
        fields = {k: _get(fields, k, None, source, kinds[k]) for k in fields}
        return cls(**fields, dense_act_fn=act)

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "feed_forward_proj": "gated-gelu",
                **dataclasses.asdict(self), "is_gated_act": True}


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(JsonConfig):
    """The CLIP vision tower (transformers' CLIPVisionModel). Defaults are transformers'; `vit_h14()` is Wan's."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def vit_h14(cls) -> "ClipVisionConfig":
        """The open-clip ViT-H/14 vision tower of Wan2.1 I2V (257 tokens of 1280 at 224 px)."""
        return cls(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   patch_size=14, hidden_act="gelu")

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; known: {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        if self.image_size < self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is smaller than patch_size={self.patch_size}")

    @property
    def grid(self) -> int:
        """Patches per side (a conv with stride patch_size: trailing pixels that fill no patch are dropped)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + 1  # patches and the class token

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ClipVisionConfig":
        if raw.get("model_type") == "clip" and isinstance(raw.get("vision_config"), dict):
            raw = raw["vision_config"]  # a full CLIPConfig: its vision tower
        model_type = raw.get("model_type", "clip_vision_model")
        if model_type != "clip_vision_model":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'clip_vision_model' (CLIPVisionModel)")
        defaults = cls()
        fields = {}
        for f in dataclasses.fields(cls):
            kind = {"hidden_act": str, "layer_norm_eps": float}.get(f.name, int)
            fields[f.name] = _get(raw, f.name, getattr(defaults, f.name), source, kind)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ClipProcessorConfig(JsonConfig):
    """CLIPImageProcessor's settings: resize the shortest edge (or to height x width), center crop, rescale,
    normalise. `resample` is a PIL filter number (3 = bicubic)."""

    do_resize: bool = True
    shortest_edge: int | None = 224
    resize_hw: tuple[int, int] | None = None
    resample: int = 3
    do_center_crop: bool = True
    crop_hw: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ClipProcessorConfig":
        kind = raw.get("image_processor_type", "CLIPImageProcessor")
        if not str(kind).startswith("CLIPImageProcessor"):
            raise ConfigError(f"{source}: image_processor_type is {kind!r}, expected CLIPImageProcessor")
        d = cls()
        size = raw.get("size", {"shortest_edge": 224})
        if isinstance(size, int):  # legacy: an int is the shortest edge for CLIP
            size = {"shortest_edge": size}
        if not isinstance(size, dict):
            raise ConfigError(f"{source}: size={size!r} is neither an int nor a dict")
        shortest, resize_hw = None, None
        if size.get("shortest_edge") is not None and size.get("longest_edge") is None:
            shortest = _get(size, "shortest_edge", None, source)
        elif size.get("height") is not None and size.get("width") is not None:
            resize_hw = (_get(size, "height", None, source), _get(size, "width", None, source))
        else:
            raise ConfigError(f"{source}: size={size} is not supported; give {{'shortest_edge': N}} or height and width")
        crop = raw.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if not isinstance(crop, dict) or not {"height", "width"} <= set(crop):
            raise ConfigError(f"{source}: crop_size={crop!r} needs height and width")
        mean, std = raw.get("image_mean", d.image_mean), raw.get("image_std", d.image_std)
        if isinstance(mean, (int, float)):
            mean = [mean] * 3
        if isinstance(std, (int, float)):
            std = [std] * 3
        flag = lambda k: bool(raw.get(k, getattr(d, k)))  # noqa: E731
        return cls(
            do_resize=flag("do_resize"), shortest_edge=shortest, resize_hw=resize_hw,
            resample=_get(raw, "resample", d.resample, source),
            do_center_crop=flag("do_center_crop"),
            crop_hw=(_get(crop, "height", None, source), _get(crop, "width", None, source)),
            do_rescale=flag("do_rescale"), rescale_factor=_get(raw, "rescale_factor", d.rescale_factor, source, float),
            do_normalize=flag("do_normalize"),
            image_mean=tuple(float(m) for m in mean), image_std=tuple(float(s) for s in std),
            do_convert_rgb=flag("do_convert_rgb"),
        )

    def to_dict(self) -> dict[str, Any]:
        size = {"shortest_edge": self.shortest_edge} if self.resize_hw is None else dict(zip(("height", "width"), self.resize_hw))
        return {
            "image_processor_type": "CLIPImageProcessor", "do_resize": self.do_resize, "size": size,
            "resample": self.resample, "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_hw[0], "width": self.crop_hw[1]}, "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std), "do_convert_rgb": self.do_convert_rgb,
        }


__all__ = ["Umt5Config", "ClipVisionConfig", "ClipProcessorConfig", "ConfigError", "ACTIVATIONS"]
