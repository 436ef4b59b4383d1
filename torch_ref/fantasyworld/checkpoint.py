"""Tiny random FantasyWorld checkpoints in the released key layout, and loading them into the torch reference.

`write_tiny_fantasyworld_pipeline` writes a whole runnable FantasyWorld checkpoint: a tiny Wan2.1-I2V base
pipeline with the model folder in `fantasyworld/` (what `wanport generate --fantasyworld` reads).

A checkpoint folder holds `config.json` (FantasyWorldConfig), `model.pth` (a plain dict of tensors,
as the public code's `torch.load` expects; we only ever read it back with weights_only=True) and the
same tensors as `model.safetensors`. Every parameter is perturbed away from its initialisation (unit
norms, zero biases, zero gates and 0.01 LayerScales would hide whole code paths from a parity test).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from torch_ref.checkpoints import write_tiny_checkpoint
from torch_ref.fantasyworld.model import FantasyWorld
from weights.atomic import atomic_folder
from weights.configs.fantasyworld import FantasyWorldConfig
from weights.configs.presets import get_preset
from weights.fantasyworld_map import RELEASED, TORCH, fantasyworld_entries, relayout
from weights.safetensors_io import CheckpointError, load_tensors, save_tensors

CONFIG, PICKLE, SAFETENSORS = "config.json", "model.pth", "model.safetensors"
MODEL_DIR = "fantasyworld"  # the model folder inside a FantasyWorld pipeline folder
BASE_PRESET = "tiny-wan2.1-i2v-14b"  # the tiny base pipeline (encoders, VAE, scheduler) of the tiny FantasyWorld
# The public model's state dict also holds its frozen encoders; they come from the base checkpoint.
IGNORED_PREFIXES = ("pipe.text_encoder.", "pipe.image_encoder.", "pipe.vae.")


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init: constant inits (norm gains, biases, gates, LayerScale, learned
    tokens) get N(0, 0.2) added, random ones 10% of their own spread."""
    g = torch.Generator().manual_seed(seed + 1)
    for p in module.parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        spread = float(p.float().std()) if p.numel() > 1 else 0.0
        p.add_((0.2 if spread < 1e-3 else 0.1 * spread) * noise.to(p.dtype))


def build_model(cfg: FantasyWorldConfig, seed: int = 0) -> FantasyWorld:
    """The torch reference with seeded, perturbed random weights (float32, eval mode)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FantasyWorld(cfg)
    perturb(model, seed)
    return model.eval()


def torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def released_state(model: FantasyWorld) -> dict[str, np.ndarray]:
    """The model's tensors under the released checkpoint's names and layouts."""
    return relayout(torch_state(model), fantasyworld_entries(model.cfg), TORCH, RELEASED, "torch reference")


def write_tiny_fantasyworld(folder: str | os.PathLike, cfg: FantasyWorldConfig | None = None, *, seed: int = 0,
                            force: bool = False) -> Path:
    """Write config.json, model.pth and model.safetensors (released layout) for a random model; atomic."""
    cfg = cfg or FantasyWorldConfig.tiny()
    tensors = released_state(build_model(cfg, seed))
    with atomic_folder(folder, force=force) as tmp:
        cfg.to_json(tmp / CONFIG)
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, tmp / PICKLE)
        save_tensors(tmp / SAFETENSORS, tensors, {"format": "pt", "layout": "fantasyworld-released"})
    return Path(folder)


def write_tiny_fantasyworld_pipeline(out: str | os.PathLike, cfg: FantasyWorldConfig | None = None, *, seed: int = 0,
                                     force: bool = False) -> Path:
    """A whole tiny FantasyWorld checkpoint: the tiny Wan2.1-I2V pipeline (diffusers layout; its transformer/ has
    the FantasyWorld config's Wan shape) with the random FantasyWorld model in `fantasyworld/` (released
    layout, weights seeded by `seed`). Atomic: the folder appears complete or not at all."""
    cfg = cfg or FantasyWorldConfig.tiny()
    base = dataclasses.replace(get_preset(BASE_PRESET), transformer=cfg.wan)
    with atomic_folder(out, force=force, writer="wanport make-tiny", job="write") as tmp:
        write_tiny_checkpoint(base, tmp, seed=seed, force=True)  # fills tmp (replacing the empty folder)
        write_tiny_fantasyworld(tmp / MODEL_DIR, cfg, seed=seed)
    return Path(out)


def read_released(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Tensors of a released-layout file (.safetensors, or .pth with `allow_pickle`, read weights-only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        tensors, _ = load_tensors(path)
    elif path.suffix in (".pth", ".pt", ".bin"):
        if not allow_pickle:
            raise CheckpointError(f"{path} is a pickle; pass allow_pickle=True (--allow-pickle) to read it weights-only, "
                                  "or convert it to safetensors first")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling raises many types; all mean "not a plain weights file"
            raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise CheckpointError(f"{path}: expected a flat dict of named tensors")
        tensors = {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
    else:
        raise CheckpointError(f"{path}: unknown weights format {path.suffix!r} (expected .safetensors or .pth)")
    return {k: v for k, v in tensors.items() if not k.startswith(IGNORED_PREFIXES)}


def load_fantasyworld(folder: str | os.PathLike, *, allow_pickle: bool = False) -> FantasyWorld:
    """The torch reference from a checkpoint folder (safetensors preferred over model.pth)."""
    folder = Path(folder)
    cfg = FantasyWorldConfig.from_json(folder / CONFIG)
    path = folder / SAFETENSORS if (folder / SAFETENSORS).is_file() else folder / PICKLE
    tensors = relayout(read_released(path, allow_pickle=allow_pickle), fantasyworld_entries(cfg), RELEASED, TORCH, str(path))
    model = FantasyWorld(cfg)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, strict=True)
    return model.eval()
