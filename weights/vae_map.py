"""The one name/layout map of the Wan VAE (AutoencoderKLWan) between diffusers and Flax.

Every tensor appears once as an `Entry`: its diffusers name, its Flax path (`jax_impl.vae.WanVAE`'s
parameter path joined with "."), its diffusers shape and the layout change:
Conv3d (O, I, T, H, W) -> (T, H, W, I, O); Conv2d (O, I, H, W) -> (H, W, I, O); the RMS-norm gains
(C, 1, 1[, 1]) -> (C,). The list is built from the config alone, so a folder's tensors are checked
before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weights.configs.vae import VaeConfig
from weights.safetensors_io import CheckpointError

LAYOUTS = ("diffusers", "flax")


@dataclass(frozen=True)
class Entry:
    diffusers: str
    flax: str
    shape: tuple[int, ...]  # diffusers (torch) shape
    kind: str  # "conv3d", "conv2d", "gain" (squeeze the broadcast axes) or "copy"

    def name(self, layout: str) -> str:
        return getattr(self, layout)

    def flax_shape(self) -> tuple[int, ...]:
        if self.kind == "conv3d":
            o, i, t, h, w = self.shape
            return (t, h, w, i, o)
        if self.kind == "conv2d":
            o, i, h, w = self.shape
            return (h, w, i, o)
        if self.kind == "gain":
            return self.shape[:1]
        return self.shape

    def layout_shape(self, layout: str) -> tuple[int, ...]:
        return self.flax_shape() if layout == "flax" else self.shape

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "conv3d":
            return np.ascontiguousarray(x.transpose(2, 3, 4, 1, 0))
        if self.kind == "conv2d":
            return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
        if self.kind == "gain":
            return np.ascontiguousarray(x.reshape(x.shape[0]))
        return x

    def from_flax(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "conv3d":
            return np.ascontiguousarray(x.transpose(4, 3, 0, 1, 2))
        if self.kind == "conv2d":
            return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
        if self.kind == "gain":
            return np.ascontiguousarray(x.reshape(self.shape))
        return x

    def convert(self, x: np.ndarray, src: str, dst: str) -> np.ndarray:
        """Re-lay a tensor from `src` to `dst` layout; a pure permutation/reshape, bit-exact both ways."""
        if src == dst:
            return x
        return self.to_flax(x) if dst == "flax" else self.from_flax(x)


class _Builder:
    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def conv3d(self, d: str, f: str, c_in: int, c_out: int, k: tuple[int, int, int]) -> None:
        self.entries.append(Entry(f"{d}.weight", f"{f}.kernel", (c_out, c_in, *k), "conv3d"))
        self.entries.append(Entry(f"{d}.bias", f"{f}.bias", (c_out,), "copy"))

    def conv2d(self, d: str, f: str, c_in: int, c_out: int, k: int) -> None:
        self.entries.append(Entry(f"{d}.weight", f"{f}.kernel", (c_out, c_in, k, k), "conv2d"))
        self.entries.append(Entry(f"{d}.bias", f"{f}.bias", (c_out,), "copy"))

    def norm(self, d: str, f: str, dim: int, images: bool = False) -> None:
        self.entries.append(Entry(f"{d}.gamma", f"{f}.gamma", (dim, 1, 1) if images else (dim, 1, 1, 1), "gain"))

    def resblock(self, p: str, c_in: int, c_out: int) -> None:
        self.norm(f"{p}.norm1", f"{p}.norm1", c_in)
        self.conv3d(f"{p}.conv1", f"{p}.conv1", c_in, c_out, (3, 3, 3))
        self.norm(f"{p}.norm2", f"{p}.norm2", c_out)
        self.conv3d(f"{p}.conv2", f"{p}.conv2", c_out, c_out, (3, 3, 3))
        if c_in != c_out:
            self.conv3d(f"{p}.conv_shortcut", f"{p}.conv_shortcut", c_in, c_out, (1, 1, 1))

    def mid(self, p: str, dim: int) -> None:
        self.resblock(f"{p}.resnets.0", dim, dim)
        a = f"{p}.attentions.0"
        self.norm(f"{a}.norm", f"{a}.norm", dim, images=True)
        self.conv2d(f"{a}.to_qkv", f"{a}.to_qkv", dim, 3 * dim, 1)
        self.conv2d(f"{a}.proj", f"{a}.proj", dim, dim, 1)
        self.resblock(f"{p}.resnets.1", dim, dim)

    def resample(self, d: str, f: str, dim: int, mode: str, out_dim: int | None = None) -> None:
        if mode.startswith("upsample"):
            self.conv2d(f"{d}.resample.1", f"{f}.resample", dim, out_dim or dim // 2, 3)
            if mode == "upsample3d":
                self.conv3d(f"{d}.time_conv", f"{f}.time_conv", dim, 2 * dim, (3, 1, 1))
        else:
            self.conv2d(f"{d}.resample.1", f"{f}.resample", dim, dim, 3)
            if mode == "downsample3d":
                self.conv3d(f"{d}.time_conv", f"{f}.time_conv", dim, dim, (3, 1, 1))


def vae_entries(cfg: VaeConfig) -> list[Entry]:
    """Every tensor of an AutoencoderKLWan with this config, in module order."""
    b = _Builder()
    n = len(cfg.dim_mult)
    # encoder
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    b.conv3d("encoder.conv_in", "encoder.conv_in", cfg.in_channels, dims[0], (3, 3, 3))
    k = 0
    for i, (ci, co) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == n - 1
        if cfg.is_residual:
            p = f"encoder.down_blocks.{i}"
            for j in range(cfg.num_res_blocks):
                b.resblock(f"{p}.resnets.{j}", ci if j == 0 else co, co)
            if not last:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                b.resample(f"{p}.downsampler", f"{p}.downsampler", co, mode)
        else:
            for j in range(cfg.num_res_blocks):
                b.resblock(f"encoder.down_blocks.{k}", ci if j == 0 else co, co)
                k += 1
            if not last:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                b.resample(f"encoder.down_blocks.{k}", f"encoder.down_blocks.{k}", co, mode)
                k += 1
    b.mid("encoder.mid_block", dims[-1])
    b.norm("encoder.norm_out", "encoder.norm_out", dims[-1])
    b.conv3d("encoder.conv_out", "encoder.conv_out", dims[-1], 2 * cfg.z_dim, (3, 3, 3))
    b.conv3d("quant_conv", "quant_conv", 2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1))
    b.conv3d("post_quant_conv", "post_quant_conv", cfg.z_dim, cfg.z_dim, (1, 1, 1))
    # decoder
    dims = [cfg.decoder_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    b.conv3d("decoder.conv_in", "decoder.conv_in", cfg.z_dim, dims[0], (3, 3, 3))
    b.mid("decoder.mid_block", dims[0])
    for i, (ci, co) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0 and not cfg.is_residual:
            ci //= 2
        p = f"decoder.up_blocks.{i}"
        for j in range(cfg.num_res_blocks + 1):
            b.resblock(f"{p}.resnets.{j}", ci if j == 0 else co, co)
        if i != n - 1:
            mode = "upsample3d" if cfg.temperal_upsample[i] else "upsample2d"
            if cfg.is_residual:
                b.resample(f"{p}.upsampler", f"{p}.upsampler", co, mode, co)
            else:
                b.resample(f"{p}.upsamplers.0", f"{p}.upsampler", co, mode)
    b.norm("decoder.norm_out", "decoder.norm_out", dims[-1])
    b.conv3d("decoder.conv_out", "decoder.conv_out", dims[-1], cfg.out_channels, (3, 3, 3))
    return b.entries


def detect_layout(keys: list[str] | set[str]) -> str:
    keys = set(keys)
    if "encoder.conv_in.kernel" in keys:
        return "flax"
    if "encoder.conv_in.weight" in keys:
        return "diffusers"
    raise ValueError("cannot tell the VAE checkpoint layout: neither encoder.conv_in.weight nor encoder.conv_in.kernel found")


def check_keys(entries: list[Entry], found: dict[str, tuple[int, ...]], layout: str, source: str) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor (names and both shapes)."""
    expected = {en.name(layout): en.layout_shape(layout) for en in entries}
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    bad = [f"{k}: checkpoint {list(found[k])}, config expects {list(s)}" for k, s in expected.items()
           if k in found and tuple(found[k]) != tuple(s)]
    if missing or extra or bad:
        parts = []
        if bad:
            parts.append("mis-shaped: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
        raise CheckpointError(
            f"{source} ({layout} layout) does not match its VAE config: " + " | ".join(parts)
            + ". Check that vae/config.json belongs to these weights (Wan2.1 vs Wan2.2 VAE, base_dim, z_dim)."
        )
