"""Named model presets: the published Wan shapes and tiny look-alikes for tests and the demo.

A preset names a whole checkpoint: the transformer, whether a second (low-noise) expert exists and
where the sampler switches to it. Tiny presets keep every structural feature of their big sibling
(image tokens, 36 or 48 channels, two experts) at widths a laptop CPU runs in milliseconds.
"""

from __future__ import annotations

import dataclasses

from weights.configs.dit import DitConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    transformer: DitConfig
    description: str
    num_experts: int = 1  # 2 for Wan2.2 A14B: `transformer` (high noise) and `transformer_2` (low noise)
    boundary_ratio: float | None = None  # high-noise expert while t >= boundary_ratio * 1000
    task: str = "t2v"  # t2v | i2v | ti2v
    vae: str = "wan2.1"  # VAE preset name (weights.configs.vae); tiny presets use "tiny-" + vae
    flow_shift: float = 5.0  # the scheduler's shift written into scheduler/scheduler_config.json

    @property
    def is_tiny(self) -> bool:
        return self.name.startswith("tiny-")


_WAN_1_3B = DitConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
_WAN_14B = DitConfig(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
_WAN_5B = DitConfig(
    num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48
)

# Tiny look-alikes: 2 heads of 16 (rotary split 8/4/4), 2 layers, small text and image widths.
_TINY = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=32)


# Tiny at Wan's real head width: 2 heads of 128 (rotary split 44/42/42; at 16 a wrong split can equal the
# right one), the rest as small as `_TINY`. The parity tests run these on odd, non-square token grids.
_TINY_HD128 = dict(_TINY, attention_head_dim=128)


def _tiny(cfg: DitConfig, sizes: dict = _TINY) -> DitConfig:
    changes = dict(sizes)
    if cfg.has_image_tokens:
        changes.update(image_dim=24, added_kv_proj_dim=sizes["num_attention_heads"] * sizes["attention_head_dim"])
    return cfg.replace(**changes)


_FULL = [
    Preset("wan2.1-t2v-1.3b", _WAN_1_3B, "Wan2.1 text-to-video, 1.3B"),
    Preset("wan2.1-t2v-14b", _WAN_14B, "Wan2.1 text-to-video, 14B"),
    Preset(
        "wan2.1-i2v-14b",
        _WAN_14B.replace(in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
        "Wan2.1 image-to-video 14B (480p/720p), CLIP image tokens in cross-attention",
        task="i2v",
        flow_shift=3.0,
    ),
    Preset(
        "wan2.2-i2v-a14b",
        _WAN_14B.replace(in_channels=36),
        "Wan2.2 image-to-video, two 14B experts switched at t >= 900",
        num_experts=2,
        boundary_ratio=0.9,
        task="i2v",
    ),
    Preset(
        "wan2.2-ti2v-5b", _WAN_5B, "Wan2.2 text/image-to-video 5B, per-token timesteps", task="ti2v", vae="wan2.2"
    ),
]

PRESETS: dict[str, Preset] = {}
for _p in _FULL:
    PRESETS[_p.name] = _p
    PRESETS["tiny-" + _p.name] = dataclasses.replace(
        _p,
        name="tiny-" + _p.name,
        transformer=_tiny(_p.transformer),
        description="tiny " + _p.description,
        vae="tiny-" + _p.vae,
    )
for _p in _FULL:
    PRESETS["tiny-hd128-" + _p.name] = dataclasses.replace(
        _p,
        name="tiny-hd128-" + _p.name,
        transformer=_tiny(_p.transformer, _TINY_HD128),
        description="tiny, 2 heads of the real width 128: " + _p.description,
        vae="tiny-" + _p.vae,
    )


def get_preset(name: str) -> Preset:
    """Look a preset up by name (case-insensitive), with a helpful error listing the known names."""
    key = name.lower()
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)} (see `wanport presets`)")
    return PRESETS[key]
