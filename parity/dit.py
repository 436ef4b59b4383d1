"""Layer-by-layer parity of the Flax DiT against diffusers on the same weights and inputs.

float32: every captured layer must be within `FP32_TOL` relative L2 of diffusers.
bfloat16: the tolerance is measured, not chosen: both implementations run in bfloat16 and are compared
against diffusers in float32; ours passes a layer when its error is at most `BF16_FACTOR` times the
error diffusers itself makes in bfloat16 at that layer.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jax_impl.frozen_jit import frozen_jit
from jax_impl.loading import load_dit
from parity.report import Report, compare_layers, measured_bf16_layers
from parity.tolerances import BF16_FACTOR, BF16_FLOOR, FP32_TOL
from torch_ref.capture import dit_layer_order, run_dit
from torch_ref.checkpoints import TRANSFORMER_DIRS, write_tiny_checkpoint
from torch_ref.models import load_transformer
from weights.checkpoint import Checkpoint
from weights.configs.presets import get_preset
from weights.convert import convert
from weights.dit_map import DIT



@dataclasses.dataclass(frozen=True)
class DitInputs:
    latents: np.ndarray  # [B, F, H, W, C] channels-last
    timestep: np.ndarray  # [B] or [B, L] float32
    text: np.ndarray  # [B, S, text_dim]
    image: np.ndarray | None  # [B, N, image_dim] or None


def make_inputs(
    cfg,
    *,
    batch: int = 1,
    frames: int = 2,
    height: int = 8,
    width: int = 8,
    text_len: int | None = None,
    prompt_len: int | None = None,
    image_len: int = 257,
    per_token_timesteps: bool | None = None,
    seed: int = 0,
) -> DitInputs:
    """Deterministic random inputs for a DiT config. Latent sizes are in latent units.

    Wan2.1 I2V needs 512 text tokens: diffusers splits image from text tokens by assuming 512.
    `prompt_len` zeroes the text rows past it, as the pipelines do for a prompt shorter than the tokenizer's
    512-token padding. TI2V models get per-token timesteps with the first latent frame at t=0, as the
    pipeline does.
    """
    rng = np.random.default_rng(seed)
    if text_len is None:
        text_len = 512 if cfg.has_image_tokens else 16
    if cfg.has_image_tokens and text_len != 512:
        raise ValueError("Wan2.1 I2V parity needs text_len=512 (diffusers assumes 512 text tokens)")
    if prompt_len is not None and not 1 <= prompt_len <= text_len:
        raise ValueError(f"prompt_len={prompt_len} must be between 1 and the text length {text_len}")
    latents = rng.standard_normal((batch, frames, height, width, cfg.in_channels), dtype=np.float32)
    if per_token_timesteps is None:
        per_token_timesteps = cfg.in_channels == 48
    t = rng.uniform(0, 1000, size=(batch,)).astype(np.float32)
    if per_token_timesteps:
        pt, ph, pw = cfg.patch_size
        grid = (frames // pt, height // ph, width // pw)
        tok = np.broadcast_to(t[:, None, None, None], (batch, *grid)).copy()
        tok[:, 0] = 0.0  # first latent frame is the clean conditioning image
        t = tok.reshape(batch, -1)
    text = rng.standard_normal((batch, text_len, cfg.text_dim), dtype=np.float32)
    if prompt_len is not None:
        text[:, prompt_len:] = 0.0
    image = rng.standard_normal((batch, image_len, cfg.image_dim), dtype=np.float32) if cfg.has_image_tokens else None
    return DitInputs(latents, t, text, image)


def jax_forward(model, inputs: DitInputs):
    """Run our Flax model with capture; returns (output, taps) as float32 numpy."""
    out, taps = _jitted_forward(model, inputs.latents, inputs.timestep, inputs.text, inputs.image)
    taps = jax.tree.map(lambda a: np.asarray(a.astype(jnp.float32)), taps)
    return np.asarray(out.astype(jnp.float32)), taps


@frozen_jit
def _jitted_forward(model, latents, timestep, text, image):
    return model(latents, timestep, text, image, capture=True)


def load_models(folder, dtype: str, attention_backend: str = "xla", reference_folder=None) -> dict:
    """Our model in `dtype`, plus diffusers in float32 (the reference) and, for bf16, in bf16.

    `reference_folder`: where diffusers reads the same weights when `folder` is not in its layout (a
    conversion of `folder` to the diffusers layout); default `folder`.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    ref = reference_folder or folder
    models = {
        "jax": load_dit(folder, dtype=jnp.dtype(dtype), attention_backend=attention_backend),
        "torch_fp32": load_transformer(ref, dtype=torch.float32),
    }
    if dtype == "bfloat16":
        models["torch_bf16"] = load_transformer(ref, dtype=torch.bfloat16)
    return models


def compare_dit(models: dict, inputs: DitInputs, dtype: str, meta: dict | None = None) -> Report:
    """Per-layer comparison of loaded models on `inputs` (see module docstring for tolerances)."""
    cfg = models["jax"].cfg
    order = dit_layer_order(cfg.num_layers, cfg.has_image_tokens)
    meta = dict(meta or {}) | {
        "model": "dit",
        "dtype": dtype,
        "latent_shape": list(inputs.latents.shape),
        "text_len": int(inputs.text.shape[1]),
    }
    _, ours = jax_forward(models["jax"], inputs)
    _, ref = run_dit(models["torch_fp32"], inputs.latents, inputs.timestep, inputs.text, inputs.image)
    if dtype == "float32":
        return Report(compare_layers(ours, ref, FP32_TOL, order), meta | {"tolerance": f"rel_l2 <= {FP32_TOL}"})
    _, theirs = run_dit(models["torch_bf16"], inputs.latents, inputs.timestep, inputs.text, inputs.image)
    layers = measured_bf16_layers(ours, ref, theirs, order, BF16_FACTOR, BF16_FLOOR)
    meta["tolerance"] = f"rel_l2 vs diffusers-fp32 <= {BF16_FACTOR} x diffusers-bf16's own error"
    return Report(layers, meta)


def dit_parity(
    folder: str | Path,
    *,
    dtype: str = "float32",
    inputs: DitInputs | None = None,
    attention_backend: str = "xla",
    reference_folder: str | Path | None = None,
    **input_kwargs,
) -> Report:
    """Compare every captured layer of our DiT with diffusers' on the checkpoint in `folder` (diffusers reads
    `reference_folder` instead when given: the same weights in its layout)."""
    models = load_models(folder, dtype, attention_backend, reference_folder)
    if inputs is None:
        inputs = make_inputs(models["jax"].cfg, **input_kwargs)
    return compare_dit(models, inputs, dtype, {"checkpoint": str(folder), "attention": attention_backend})


def folder_parity(folder: str | Path, **kw) -> Report:
    """DiT parity on a folder in any layout the converter writes: diffusers reads a temporary
    diffusers-layout conversion when the folder is in the original-Wan or Flax layout; ours reads it as is."""
    layout = Checkpoint(folder, DIT).layout
    if layout == "diffusers":
        return dit_parity(folder, **kw)
    with tempfile.TemporaryDirectory(prefix="wanport-parity-") as tmp:
        ref = convert(folder, Path(tmp) / "diffusers", to="diffusers")
        report = dit_parity(folder, reference_folder=ref, **kw)
    report.meta["layout"] = layout
    return report


def preset_parity(preset: str, *, dtype: str = "float32", seed: int = 0, workdir: str | None = None, **kw) -> Report:
    """Parity on a freshly written tiny checkpoint of `preset` (every expert for two-expert models)."""
    p = get_preset(preset)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = write_tiny_checkpoint(p, Path(tmp) / "ckpt", seed=seed)
        reports = [dit_parity(root / TRANSFORMER_DIRS[i], dtype=dtype, seed=seed, **kw) for i in range(p.num_experts)]
    if len(reports) == 1:
        return reports[0]
    layers = [dataclasses.replace(l, name=f"{TRANSFORMER_DIRS[i]}.{l.name}") for i, r in enumerate(reports) for l in r.layers]
    return Report(layers, reports[0].meta | {"experts": p.num_experts})
