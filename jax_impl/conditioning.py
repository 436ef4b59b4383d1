"""Image conditioning of the Wan I2V models, channels-last, as one typed value per kind.

Wan2.1 I2V and Wan2.2 I2V-A14B (36 input channels): the image (and optionally a last frame) followed by
zero frames is VAE-encoded and normalised with the VAE's own mean/std; a 4-channel-per-latent-frame mask
marks the given frames; the DiT input is concat(noisy latents 16, mask 4, condition 16).

Wan2.2 TI2V-5B (48 channels): only the first frame is encoded; its latent replaces latent frame 0 at every
step and that frame's tokens get timestep 0 (per-token timesteps), so the model treats it as clean.

Each kind is a flax.struct dataclass (a pytree, so it passes through jit): `NoCondition`,
`ConcatCondition(mask_latent)`, `FirstFrameCondition(latent, denoise_mask, token_timestep_factors)`, with
the two operations the samplers need, `model_input(latents, t) -> (x, timestep)` and `finalize(latents)`.
`encode_condition` builds one in the encode stage (TI2V's masks too); `jax_impl.stages` stores it with the
stage (kind in the metadata, arrays by name) and `condition_from_arrays` reads it back into the same type.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Union

import flax.struct
import numpy as np

from jax_impl.latents import normalize
from weights.configs.vae import VaeConfig


def check_video_size(frames: int, height: int, width: int, vae: VaeConfig, patch: tuple[int, int, int]) -> None:
    """Frames must be 4k+1 and height/width multiples of the VAE's spatial factor times the patch size."""
    t = vae.temporal_factor
    if frames < 1 or (frames - 1) % t:
        lo = max(1, (frames - 1) // t * t + 1)
        raise ValueError(
            f"frames={frames} is not {t}k+1: the causal VAE compresses 1 + {t}k frames into 1 + k latent frames; "
            f"use {lo} or {lo + t}"
        )
    latent_frames = 1 + (frames - 1) // t
    if latent_frames % patch[0]:
        raise ValueError(f"frames={frames} gives {latent_frames} latent frames, not a multiple of the DiT's temporal "
                         f"patch {patch[0]}")
    for name, n, p in (("height", height, patch[1]), ("width", width, patch[2])):
        multiple = vae.spatial_factor * p
        if n < multiple or n % multiple:
            lo = max(multiple, n // multiple * multiple)
            raise ValueError(
                f"{name}={n} is not a multiple of {multiple} (VAE {vae.spatial_factor}x times patch {p}); "
                f"use {lo} or {lo + multiple}"
            )


def latent_grid(frames: int, height: int, width: int, vae: VaeConfig) -> tuple[int, int, int]:
    f, h, w, _ = vae.latent_shape(frames, height, width)
    return f, h, w


def latent_frame_mask(batch: int, latent_frames: int, h: int, w: int, temporal_factor: int = 4,
                      last_frame: bool = False) -> np.ndarray:
    """[batch, latent_frames, h, w, t] float32: which pixel frames are given (the first; the last with
    `last_frame`), t = temporal_factor slots per latent frame.

    Latent frame 0 stands for pixel frame 0 alone, so its t slots repeat that frame's flag; latent frame
    k >= 1 stands for pixel frames tk-t+1 .. tk, one slot each.
    """
    t = temporal_factor
    given = np.zeros(1 + t * (latent_frames - 1), np.float32)
    given[0] = 1.0
    if last_frame:
        given[-1] = 1.0
    slots = np.concatenate([np.repeat(given[:1], t), given[1:]]).reshape(latent_frames, t)
    return np.broadcast_to(slots[None, :, None, None, :], (batch, latent_frames, h, w, t)).astype(np.float32)


def i2v_condition(latent_condition: Any, *, last_frame: bool = False, temporal_factor: int = 4) -> Any:
    """Normalised VAE latents [B, F, h, w, z] of (image, zeros..., [last image]) -> the DiT's condition channels
    [B, F, h, w, t + z]: the given-frame mask, then the latents (diffusers' I2V `prepare_latents`, channels-last).

    The one builder of Wan2.1 I2V / A14B conditioning: the plain and the block-causal samplers both use it.
    Works on numpy or jax arrays.
    """
    b, f, h, w, _ = latent_condition.shape
    mask = latent_frame_mask(b, f, h, w, temporal_factor, last_frame)
    if isinstance(latent_condition, np.ndarray):
        return np.concatenate([mask.astype(latent_condition.dtype), latent_condition], axis=-1)
    import jax.numpy as jnp

    return jnp.concatenate([jnp.asarray(mask, latent_condition.dtype), latent_condition], axis=-1)


def condition_video(image: np.ndarray, frames: int, last_image: np.ndarray | None = None) -> np.ndarray:
    """[1, frames, H, W, 3]: the image, zero frames, and optionally the last image (pixels in [-1, 1])."""
    video = np.zeros((1, frames) + image.shape, np.float32)
    video[0, 0] = image
    if last_image is not None:
        if last_image.shape != image.shape:
            raise ValueError(f"last image {last_image.shape} and first image {image.shape} differ in size")
        video[0, -1] = last_image
    return video


# ------------------------------------------------------------------------------------------------
# The condition as one typed value: built once in the encode stage, stored with it, used by both samplers
# ------------------------------------------------------------------------------------------------
def _full_timesteps(latents, t):
    import jax.numpy as jnp

    return jnp.full((latents.shape[0],), t, jnp.float32)


@flax.struct.dataclass
class NoCondition:
    """Text-to-video (and TI2V without an image): the latents are the model input."""

    KIND: ClassVar[str] = "none"

    def model_input(self, latents, t):
        """(DiT input, timestep [B]) for the current latents at timestep `t`."""
        return latents, _full_timesteps(latents, t)

    def finalize(self, latents):
        """The sampled latents as the video's latents."""
        return latents

    def frames(self, sl: slice) -> "NoCondition":
        """The condition of the latent frames `sl` (a block of the block-causal sampler)."""
        return self

    def arrays(self) -> dict[str, Any]:
        return {}


@flax.struct.dataclass
class ConcatCondition:
    """Wan2.1 I2V / Wan2.2 I2V-A14B: mask (4) and condition latents (z) concatenated after the noisy latents."""

    mask_latent: Any  # [B, F, h, w, 4 + z] (see `i2v_condition`)
    KIND: ClassVar[str] = "concat"

    def model_input(self, latents, t):
        import jax.numpy as jnp

        return jnp.concatenate([latents, self.mask_latent.astype(latents.dtype)], axis=-1), _full_timesteps(latents, t)

    def finalize(self, latents):
        return latents

    def frames(self, sl: slice) -> "ConcatCondition":
        return ConcatCondition(self.mask_latent[:, sl])

    def arrays(self) -> dict[str, Any]:
        return {"mask_latent": self.mask_latent}


@flax.struct.dataclass
class FirstFrameCondition:
    """Wan2.2 TI2V-5B: latent frame 0 is the image's clean latent at every step, and its tokens get timestep 0."""

    latent: Any  # [B, 1, h, w, z], the image's normalised latent
    denoise_mask: Any  # [1, F, h, w, 1]: 1 on the latent frames that are denoised, 0 on frame 0 (the image's)
    token_timestep_factors: Any  # [F/pt * h/ph * w/pw]: per-token factor of t (0 on frame 0's tokens, else 1)
    KIND: ClassVar[str] = "first_frame"

    @classmethod
    def build(cls, latent, latent_frames: int, patch: tuple[int, int, int]) -> "FirstFrameCondition":
        """The condition of a video of `latent_frames` latent frames, masks included, from the image's latent."""
        _, _, h, w, _ = latent.shape
        mask = np.ones((1, latent_frames, h, w, 1), np.float32)
        mask[:, 0] = 0.0
        pt, ph, pw = patch
        return cls(latent, mask, mask[0, ::pt, ::ph, ::pw, 0].reshape(-1))

    def finalize(self, latents):
        return (1 - self.denoise_mask) * self.latent + self.denoise_mask * latents

    def model_input(self, latents, t):
        import jax.numpy as jnp

        factors = self.token_timestep_factors
        return self.finalize(latents), jnp.broadcast_to(factors * t, (latents.shape[0], factors.shape[0]))

    def frames(self, sl: slice) -> "FirstFrameCondition":
        raise ValueError("block-causal generation does not support TI2V's first-frame conditioning")

    def arrays(self) -> dict[str, Any]:
        return {"latent": self.latent, "denoise_mask": self.denoise_mask,
                "token_timestep_factors": self.token_timestep_factors}


Conditioning = Union[NoCondition, ConcatCondition, FirstFrameCondition]
KINDS: dict[str, type] = {c.KIND: c for c in (NoCondition, ConcatCondition, FirstFrameCondition)}


def condition_from_arrays(kind: str, arrays: dict[str, Any]) -> Conditioning:
    """The condition of `kind` from its arrays by name (as `arrays()` gave them): how a stage file is read back."""
    if kind not in KINDS:
        raise ValueError(f"unknown conditioning kind {kind!r}; kinds are {sorted(KINDS)}")
    cls = KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    if set(arrays) != names:
        raise ValueError(f"a {kind!r} condition has the arrays {sorted(names)}, got {sorted(arrays)}")
    return cls(**arrays)


def encode_condition(vae_model, kind: str, image: np.ndarray, frames: int, batch: int = 1,
                     last_image: np.ndarray | None = None, patch: tuple[int, int, int] = (1, 2, 2)) -> Conditioning:
    """VAE-encode the conditioning frames with `vae_model` (a jax_impl.vae.WanVAE) and normalise them; the typed
    condition of a `frames`-frame video (`patch`: the DiT's, for TI2V's per-token timesteps)."""
    import jax.numpy as jnp

    cfg = vae_model.cfg
    if kind == "first_frame":
        if last_image is not None:
            raise ValueError("TI2V conditions on the first frame only; drop the last image")
        z = normalize(vae_model.encode(jnp.asarray(image[None, None])), cfg)
        latent_frames = cfg.latent_shape(frames, *image.shape[:2])[0]
        return FirstFrameCondition.build(np.repeat(np.asarray(z, np.float32), batch, axis=0), latent_frames, patch)
    if kind != "concat":
        raise ValueError(f"unknown conditioning kind {kind!r}")
    z = normalize(vae_model.encode(jnp.asarray(condition_video(image, frames, last_image))), cfg)
    z = np.repeat(np.asarray(z, np.float32), batch, axis=0)
    return ConcatCondition(i2v_condition(z, last_frame=last_image is not None, temporal_factor=cfg.temporal_factor))
