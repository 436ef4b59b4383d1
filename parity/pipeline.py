"""End-to-end parity: our JAX pipeline against diffusers' Wan pipelines on the same folder, image, prompt, noise.

Both sides load the same pipeline folder; diffusers runs `WanImageToVideoPipeline` (or `WanPipeline` for
text-only TI2V) with the same starting noise, and a step callback records its latents after every step.
We compare those latents step by step (relative L2) and the decoded frames (PSNR, SSIM where frames are
large enough), and check which experts each side used. Our side encodes with torch_ref's encoders (the
ones diffusers runs), so the comparison isolates the JAX DiT, scheduler and VAE; the JAX encoders have their
own parity (`parity.encoders`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from jax_impl.pipeline import Pipeline
from parity import metrics
from parity.encoders import TORCH_ENCODERS
from parity.tolerances import FRAME_PSNR_MIN, SAMPLER_TOL as STEP_TOL


@dataclasses.dataclass
class PipelineParity:
    step_rel_l2: list[float]
    experts: list[int]
    frames_psnr: float
    frames_max_abs: float
    ours_frames: np.ndarray  # [B, F, H, W, 3] in [0, 1]
    ref_frames: np.ndarray

    @property
    def passed(self) -> bool:
        return max(self.step_rel_l2) <= STEP_TOL and self.frames_psnr >= FRAME_PSNR_MIN

    def summary(self) -> str:
        worst = int(np.argmax(self.step_rel_l2))
        return (
            f"{len(self.step_rel_l2)} steps, experts used {sorted(set(self.experts))}; worst latent rel L2 "
            f"{self.step_rel_l2[worst]:.2e} at step {worst} (tolerance {STEP_TOL:.0e}); final frames PSNR "
            f"{self.frames_psnr:.1f} dB (minimum {FRAME_PSNR_MIN:.0f}), max abs {self.frames_max_abs:.2e}: "
            f"{'PASSED' if self.passed else 'FAILED'}"
        )


def _cf(x: np.ndarray):
    """Channels-last numpy [B, F, H, W, C] -> channels-first torch [B, C, F, H, W]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def diffusers_pipeline(folder: str | os.PathLike, text_only: bool = False):
    import torch
    from diffusers import WanImageToVideoPipeline, WanPipeline

    cls = WanPipeline if text_only else WanImageToVideoPipeline
    return cls.from_pretrained(os.fspath(folder), torch_dtype=torch.float32)


def run_diffusers(folder, settings, *, prompt: str, negative_prompt: str, image, noise: np.ndarray,
                  text_only: bool = False) -> tuple[list[np.ndarray], list[int], np.ndarray]:
    """(latents after each step channels-last, expert per step, frames [B, F, H, W, 3] in [0, 1])."""
    import torch

    pipe = diffusers_pipeline(folder, text_only)
    pipe.set_progress_bar_config(disable=True)
    if settings.shift is not None:  # set on the config before set_timesteps runs inside __call__
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=settings.shift,
                                                          shift=settings.shift)
    steps: list[np.ndarray] = []
    experts: list[int] = []
    boundary = getattr(pipe.config, "boundary_ratio", None)

    def on_step(p, i, t, kw):
        steps.append(np.moveaxis(kw["latents"].detach().float().numpy(), 1, -1).copy())
        experts.append(0 if boundary is None or float(t) >= boundary * 1000 else 1)
        return {}

    kwargs: dict[str, Any] = dict(
        prompt=prompt, negative_prompt=negative_prompt, height=settings.height, width=settings.width,
        num_frames=settings.frames, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
        latents=_cf(noise), output_type="np", callback_on_step_end=on_step,
    )
    if not text_only:
        kwargs.update(image=image, guidance_scale_2=settings.guidance_2)
    with torch.no_grad():
        frames = pipe(**kwargs).frames
    return steps, experts, np.asarray(frames, np.float32)


def pipeline_parity(folder: str | os.PathLike, settings, *, prompt: str = "a cat walks on the beach",
                    negative_prompt: str = "blurry, low quality", image=None) -> PipelineParity:
    """Run both pipelines on `folder` with `settings` (fp32, CPU-sized) and compare."""
    pipe = Pipeline(Path(folder), encoders=TORCH_ENCODERS)
    text_only = image is None
    noise = np.asarray(np.random.default_rng(settings.seed).standard_normal(pipe.latent_shape(settings)), np.float32)
    ours_steps: list[np.ndarray] = []
    ours_experts: list[int] = []

    def record(info):
        ours_steps.append(np.asarray(info["latents"]))
        ours_experts.append(info["expert"])

    encoded = pipe.encode(settings, prompt=prompt, image=image, negative_prompt=negative_prompt)
    latents = pipe.denoise(encoded, settings, noise=noise, on_step=record, progress=False)
    ours = pipe.decode(latents) * 0.5 + 0.5
    ref_steps, ref_experts, ref = run_diffusers(folder, settings, prompt=prompt, negative_prompt=negative_prompt,
                                                image=image, noise=noise, text_only=text_only)
    if len(ref_steps) != len(ours_steps):
        raise AssertionError(f"diffusers ran {len(ref_steps)} steps, we ran {len(ours_steps)}")
    if ref_experts != ours_experts:
        raise AssertionError(f"expert schedule differs: diffusers {ref_experts}, ours {ours_experts}")
    rel = [metrics.rel_l2(a, b) for a, b in zip(ours_steps, ref_steps)]
    return PipelineParity(
        step_rel_l2=rel, experts=ours_experts, frames_psnr=metrics.psnr(ours, ref, metrics.RANGE_UNIT),
        frames_max_abs=metrics.max_abs(ours, ref), ours_frames=ours, ref_frames=ref,
    )
