"""The one name/layout map of the Wan VAE (AutoencoderKLWan) between diffusers and Flax.

Every tensor appears once as an `Entry` (`weights.entry`; no original-release name): its diffusers name,
its Flax path (`jax_impl.vae.WanVAE`'s parameter path joined with "."), its diffusers shape and the layout
change: Conv3d (O, I, T, H, W) -> (T, H, W, I, O); Conv2d (O, I, H, W) -> (H, W, I, O); the RMS-norm gains
(C, 1, 1[, 1]) -> (C,) ("flatten"). The list is built from the config alone, so a folder's tensors are
checked before any model is built. `VAE` is the map the checkpoint engine opens VAE folders with.
"""

from __future__ import annotations

from weights.configs.vae import VaeConfig
from weights.entry import Entry, WeightMap


class _Builder:
    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def conv3d(self, d: str, f: str, c_in: int, c_out: int, k: tuple[int, int, int]) -> None:
        self.entries.append(Entry(f"{d}.weight", None, f"{f}.kernel", (c_out, c_in, *k), "conv3d"))
        self.entries.append(Entry(f"{d}.bias", None, f"{f}.bias", (c_out,), "copy"))

    def conv2d(self, d: str, f: str, c_in: int, c_out: int, k: int) -> None:
        self.entries.append(Entry(f"{d}.weight", None, f"{f}.kernel", (c_out, c_in, k, k), "conv2d"))
        self.entries.append(Entry(f"{d}.bias", None, f"{f}.bias", (c_out,), "copy"))

    def norm(self, d: str, f: str, dim: int, images: bool = False) -> None:
        self.entries.append(Entry(f"{d}.gamma", None, f"{f}.gamma", (dim, 1, 1) if images else (dim, 1, 1, 1), "flatten"))

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


VAE = WeightMap(
    what="VAE",
    subfolder="vae",
    signatures={"diffusers": ("encoder.conv_in.weight",), "flax": ("encoder.conv_in.kernel",)},
    entries=vae_entries,
    read_config=lambda raw, keys, source: VaeConfig.from_dict(raw, source=source),
    hint="Check that vae/config.json belongs to these weights (Wan2.1 vs Wan2.2 VAE, base_dim, z_dim).",
)
