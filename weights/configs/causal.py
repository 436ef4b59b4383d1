"""How a video is generated block by block (block-causal, streaming), and the shape checks of that mode.

Pure Python and numpy, shared by the Flax model (`jax_impl.causal`) and the torch reference
(`torch_ref.causal`), so both sides validate the same way and with the same messages.
`block_causal_mask` is the attention pattern: block i sees block j <= i, within the window plus the sink.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from weights.configs.dit import DitConfig, check_context, check_patch_grid
from weights.configs.scheduler import shift_sigma

NUM_TRAIN_TIMESTEPS = 1000.0
DEFAULT_TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)


@dataclasses.dataclass(frozen=True)
class CausalConfig:
    """How the video is generated block by block.

    frames_per_block: latent frames per block. window: latent frames a block attends to besides the sink
    (the first block), counting the block itself; None = everything before. timesteps: the few-step
    schedule per block (model timesteps in (0, 1000], strictly decreasing). shift: flow shift applied to
    sigma = t / 1000 (sigma' = shift * s / (1 + (shift - 1) * s)); 1.0 uses the timesteps as given.
    """

    frames_per_block: int
    window: int | None = None
    timesteps: tuple[float, ...] = DEFAULT_TIMESTEPS
    shift: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Types and ranges of every field (timesteps and shift finite), normalised in place; in one place,
        run when the config is made, so before any stage."""
        fpb = self.frames_per_block
        if isinstance(fpb, bool) or not isinstance(fpb, (int, np.integer)) or fpb < 1:
            raise ValueError(f"frames_per_block (--frames-per-block) must be a positive integer (latent frames), "
                             f"got {fpb!r}")
        object.__setattr__(self, "frames_per_block", int(fpb))
        w = self.window
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, (int, np.integer)):
                raise ValueError(f"window (--window) must be an integer number of latent frames or None, got {w!r}")
            if w < fpb or w % fpb:
                up = max(fpb, -(-int(w) // fpb) * fpb)
                raise ValueError(
                    f"window={w} latent frames must be a multiple of frames_per_block={fpb} and at least {fpb} "
                    f"(it counts whole blocks, the current one included); use --window {up}"
                )
            object.__setattr__(self, "window", int(w))
        try:
            ts = tuple(float(t) for t in self.timesteps)
        except (TypeError, ValueError):
            raise ValueError(f"timesteps (--causal-steps) must be numbers, got {self.timesteps!r}") from None
        if not ts:
            raise ValueError("timesteps (--causal-steps) must list at least one denoising step, e.g. 1000,750,500,250")
        if any(not (0.0 < t <= NUM_TRAIN_TIMESTEPS) for t in ts):
            raise ValueError(f"timesteps (--causal-steps) must lie in (0, {NUM_TRAIN_TIMESTEPS:g}], got {ts}")
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps (--causal-steps) must be strictly decreasing (noisy to clean), got {ts}")
        object.__setattr__(self, "timesteps", ts)
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float, np.integer, np.floating)) \
                or not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"shift (--causal-shift) must be a finite number > 0, got {self.shift!r}")

    @property
    def window_blocks(self) -> int | None:
        """Blocks a block attends to besides the sink, itself included (None: all earlier blocks)."""
        return None if self.window is None else self.window // self.frames_per_block

    def num_blocks(self, num_frames: int) -> int:
        if num_frames < 1 or num_frames % self.frames_per_block:
            divisors = [d for d in range(1, num_frames + 1) if num_frames % d == 0]
            raise ValueError(
                f"frames_per_block={self.frames_per_block} does not divide the {num_frames} latent frames; "
                f"use --frames-per-block in {divisors} or change the number of frames"
            )
        return num_frames // self.frames_per_block

    def schedule(self) -> tuple[list[float], list[float]]:
        """(model timesteps, sigmas) of the per-block schedule after the shift warp."""
        sig = [shift_sigma(t / NUM_TRAIN_TIMESTEPS, self.shift) for t in self.timesteps]
        return [s * NUM_TRAIN_TIMESTEPS for s in sig], sig


def condition_channels(cfg: DitConfig) -> int:
    """Channels of the I2V condition concatenated after the noisy latents (4 mask + 16 latent; 0 for T2V)."""
    return cfg.in_channels - cfg.out_channels


def check_block_frames(cfg: DitConfig, ccfg: CausalConfig) -> None:
    pt = cfg.patch_size[0]
    if ccfg.frames_per_block % pt:
        raise ValueError(f"frames_per_block={ccfg.frames_per_block} must be a multiple of the temporal patch size {pt}")


def check_causal_inputs(
    cfg: DitConfig,
    ccfg: CausalConfig,
    latent_shape: Sequence[int],
    text_shape: Sequence[int],
    image_shape: Sequence[int] | None = None,
    condition_shape: Sequence[int] | None = None,
) -> int:
    """Validate shapes up front with errors naming the fix; returns the number of blocks.

    latent_shape is (batch, frames, height, width[, channels]) of the generated latents.
    """
    b, f, h, w = (int(n) for n in latent_shape[:4])
    if len(latent_shape) == 5 and latent_shape[4] != cfg.out_channels:
        raise ValueError(f"noise has {latent_shape[4]} channels, the model generates {cfg.out_channels}")
    check_block_frames(cfg, ccfg)
    blocks = ccfg.num_blocks(f)
    pt = cfg.patch_size[0]
    check_patch_grid(cfg, height=h, width=w)
    if f // pt > cfg.rope_max_seq_len:
        raise ValueError(
            f"{f} latent frames exceed the model's rotary range rope_max_seq_len={cfg.rope_max_seq_len} "
            "(positions keep counting across blocks, also with a window); generate fewer frames"
        )
    check_context(cfg, b, text_shape, image_shape)
    cc = condition_channels(cfg)
    if cc and condition_shape is None:
        raise ValueError(
            f"this image-to-video model takes {cfg.in_channels} input channels: pass `condition` "
            f"[batch, frames, height, width, {cc}] (4 mask + {cc - 4} first-frame latent channels, see jax_impl.conditioning.concat_condition)"
        )
    if condition_shape is not None:
        if not cc:
            raise ValueError("this model takes no latent condition (in_channels == out_channels); drop `condition`")
        cs = tuple(int(n) for n in condition_shape)
        if len(cs) != 5 or cs[4] != cc:
            raise ValueError(f"condition must be [batch, frames, height, width, {cc}] channels-last, got {cs}")
        if cs[0] != b:
            raise ValueError(f"condition has batch {cs[0]}, the latents have batch {b}")
        if cs[1] != f:
            raise ValueError(
                f"condition has {cs[1]} latent frames, the video has {f}: build it for the whole video "
                "(first-frame latent, the other frames encoded zeros, mask 1 on the first frame only)"
            )
        if cs[2:4] != (h, w):
            raise ValueError(f"condition is {cs[2]}x{cs[3]} latent pixels, the video is {h}x{w}")
    return blocks


def block_causal_mask(num_blocks: int, tokens_per_block: int, window_blocks: int | None = None, xp=np):
    """Boolean [L, L] mask (True = attend): block i sees block j <= i; with a window only the sink (block 0)
    and the last `window_blocks` blocks (i - window_blocks < j <= i).

    `xp` is numpy (the torch reference) or jax.numpy: inside a jitted function the mask is then computed in
    the graph from the token positions, so no [L, L] constant is embedded in the program.
    """
    block = xp.arange(num_blocks * tokens_per_block) // tokens_per_block
    q, k = block[:, None], block[None, :]
    mask = k <= q
    if window_blocks is not None:
        mask = mask & ((k == 0) | (k > q - window_blocks))
    return mask
