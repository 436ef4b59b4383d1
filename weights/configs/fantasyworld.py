"""Hyper-parameters of FantasyWorld (a geometry branch on the Wan2.1-I2V-14B DiT), framework-neutral.

One frozen dataclass holds the Wan half (a `DitConfig`) and every added module's sizes, named after
what they are (see docs/fantasyworld.md for where each number comes from in the public code). Both
the PyTorch reference and the Flax modules are built from it; it imports neither torch nor jax.
`full()` is the released 14B model, `tiny()` a look-alike with every structural feature (adapter on
some joint layers and not others, repeated DPT taps, all temporal-upsampler cache paths) that runs on a
CPU in seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from weights.configs.base import ConfigError, JsonConfig
from weights.configs.dit import DitConfig
from weights.configs.presets import get_preset


@dataclasses.dataclass(frozen=True)
class FantasyWorldConfig(JsonConfig):
    wan: DitConfig
    branch_start: int = 16  # Wan blocks run plainly before the geometry branch starts
    adapter_blocks: int = 25  # Wan blocks 0 .. adapter_blocks-1 carry the camera adapter
    # geometry stream (VGGT-style aggregator)
    geo_dim: int = 1024
    geo_heads: int = 16
    geo_mlp_ratio: int = 4
    register_tokens: int = 4
    geo_rope_base: float = 100.0
    geo_freq_dim: int = 256
    cam_token_in: int = 36  # unused camera-token projector (4 poses x 9 values), present in the checkpoint
    cam_token_hidden: int = 128
    # bidirectional cross-attention between the two streams
    bicross_dim: int = 1152
    bicross_heads: int = 12
    # camera conditioning (Plucker rays -> per-token features -> adapter in Wan cross-attention)
    camera_channels: int = 6
    camera_downscale: int = 8  # pixel-unshuffle factor: the VAE's spatial factor
    camera_groups: int = 2  # GroupNorm groups
    camera_dim: int = 5120  # pose encoder's Conv3d width (a fixed default upstream, not the Wan width)
    camera_context_dim: int = 2048  # per-token camera feature width fed to the adapters
    # camera head
    head_trunk_depth: int = 4
    head_heads: int = 16
    head_iterations: int = 4
    # DPT heads
    dpt_features: int = 256
    dpt_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_layers: tuple[int, int, int, int] = (23, 17, 11, 7)  # joint layers tapped, finest level first
    dpt_hidden: int = 32
    dpt_patch: int = 16  # pixels per token side: VAE factor 8 x patch 2
    # inference defaults of the public code
    height: int = 336
    width: int = 592
    frames: int = 81
    steps: int = 50
    guidance: float = 5.0
    shift: float = 5.0

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def joint_layers(self) -> int:
        return self.wan.num_layers - self.branch_start

    @property
    def wan_dim(self) -> int:
        return self.wan.inner_dim

    @property
    def head_dim_in(self) -> int:
        """Width of the tapped tokens: frame-block and joint-layer outputs concatenated."""
        return 2 * self.geo_dim

    @property
    def patch_start(self) -> int:
        """Index of the first patch token in a frame (camera token + register tokens before it)."""
        return 1 + self.register_tokens

    @property
    def adapter_hidden(self) -> int:
        return min(self.wan_dim, self.camera_context_dim) // 2

    @property
    def adapter_shift_hidden(self) -> int:
        return self.camera_context_dim // 5

    @property
    def camera_unshuffled(self) -> int:
        return self.camera_channels * self.camera_downscale**2

    def bicross_rope_split(self) -> tuple[int, int, int]:
        """(frame, height, width) channels of the bidirectional attention's 3D RoPE (Wan's rule)."""
        d = self.bicross_dim // self.bicross_heads
        return d - 2 * (d // 3), d // 3, d // 3

    def adapter_layers(self) -> range:
        return range(min(self.adapter_blocks, self.wan.num_layers))

    def validate(self) -> "FantasyWorldConfig":
        """Raise ConfigError naming the inconsistent field (run on every construction)."""
        problems = []
        if not 0 < self.branch_start < self.wan.num_layers:
            problems.append(f"branch_start={self.branch_start} must lie in 1..{self.wan.num_layers - 1}")
        if not self.wan.has_image_tokens or self.wan.in_channels != 36:
            problems.append("the Wan half must be an I2V model (36 input channels, CLIP image tokens)")
        if self.geo_dim % self.geo_heads or (self.geo_dim // self.geo_heads) % 4:
            problems.append(f"geo_dim/geo_heads must be a multiple of 4 (2D RoPE), got {self.geo_dim}/{self.geo_heads}")
        if self.bicross_dim % self.bicross_heads or any(s % 2 for s in self.bicross_rope_split()):
            problems.append(f"bicross head dim {self.bicross_dim}/{self.bicross_heads} must split into even 3D RoPE parts")
        if self.head_dim_in % self.head_heads:
            problems.append(f"camera head width {self.head_dim_in} is not divisible by head_heads={self.head_heads}")
        if any(not 0 <= i < self.joint_layers for i in self.dpt_layers):
            problems.append(f"dpt_layers {self.dpt_layers} must index the {self.joint_layers} joint layers")
        if self.dpt_features % 2 or self.dpt_patch != 16:
            problems.append("dpt_features must be even and dpt_patch 16 (VAE factor 8 x patch 2)")
        if self.camera_channels != 6:
            problems.append("camera_channels must be 6 (Plucker rays: o x d, d)")
        if self.frames % 4 != 1 or self.height % 16 or self.width % 16:
            problems.append(f"frames must be 4k+1 and height/width multiples of 16, got {self.frames}x{self.height}x{self.width}")
        if problems:
            raise ConfigError("FantasyWorld config: " + "; ".join(problems))
        return self

    # ---------------------------------------------------------------- presets
    @classmethod
    def full(cls) -> "FantasyWorldConfig":
        """The released FantasyWorld-Wan2.1-I2V-14B-480P."""
        return cls(wan=get_preset("wan2.1-i2v-14b").transformer)

    @classmethod
    def tiny(cls) -> "FantasyWorldConfig":
        """4 Wan blocks (2 before the branch, 2 joint layers; the adapter on blocks 0-2, so one joint layer
        has it and one does not), widths of a few dozen, 9 frames of 48x64 (3 latent frames of 3x4 tokens)."""
        wan = get_preset("tiny-wan2.1-i2v-14b").transformer.replace(num_layers=4)
        return cls(
            wan=wan, branch_start=2, adapter_blocks=3,
            geo_dim=32, geo_heads=2, register_tokens=4, geo_freq_dim=32, cam_token_hidden=8,
            bicross_dim=24, bicross_heads=2,
            camera_dim=48, camera_context_dim=16,
            head_trunk_depth=2, head_heads=2, head_iterations=4,
            dpt_features=16, dpt_channels=(8, 16, 24, 24), dpt_layers=(1, 1, 0, 0), dpt_hidden=8,
            height=48, width=64, frames=9, steps=2,
        )

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["wan"] = self.wan.to_dict()
        d["_class_name"] = "FantasyWorld"
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "FantasyWorldConfig":
        if not isinstance(raw, dict) or raw.get("_class_name") != "FantasyWorld" or not isinstance(raw.get("wan"), dict):
            raise ConfigError(f"{source}: not a FantasyWorld config (needs _class_name 'FantasyWorld' and a 'wan' object)")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in fields)
        if unknown:
            raise ConfigError(f"{source}: unknown FantasyWorld config keys {unknown}")
        kw = {k: v for k, v in raw.items() if k in fields and k != "wan"}
        for k in ("dpt_channels", "dpt_layers"):
            if k in kw:
                kw[k] = tuple(kw[k])
        try:
            return cls(wan=DitConfig.from_dict(raw["wan"], source=f"{source} (wan)"), **kw)
        except TypeError as e:  # a wrongly typed field
            raise ConfigError(f"{source}: {e}") from None
