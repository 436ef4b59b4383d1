"""Tiny random FantasyWorld checkpoints in the released key layout, and loading them into the torch reference.

`write_tiny_fantasyworld_pipeline` writes a whole runnable FantasyWorld checkpoint: a tiny Wan2.1-I2V base
pipeline with the model folder in `fantasyworld/` (what `wanport generate --fantasyworld` reads).

A checkpoint folder holds `config.json` (FantasyWorldConfig), `model.pth` (a plain dict of tensors,
as the public code's `torch.load` expects; we only ever read it back with weights_only=True) and the
same tensors as `model.safetensors`. Every parameter is perturbed away from its initialisation (unit
norms, zero biases, zero gates and 0.01 LayerScales would hide whole code paths from a parity test).
Like the public model's `state_dict()`, the files also hold a few tensors of the pipeline's base
components (`pipe.text_encoder.*`, `pipe.image_encoder.*`, `pipe.vae.*`), which readers set aside
(`weights.fantasyworld_map.fantasyworld_file_keys`). Reading goes through the one checkpoint engine.
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
from weights.checkpoint import Checkpoint
from weights.configs.fantasyworld import FantasyWorldConfig
from weights.configs.presets import get_preset
from weights.fantasyworld_map import FANTASYWORLD, RELEASED, TORCH, fantasyworld_entries, relayout
from weights.safetensors_io import CheckpointError, open_reader, save_tensors

CONFIG, PICKLE, SAFETENSORS = "config.json", "model.pth", "model.safetensors"
MODEL_DIR = "fantasyworld"  # the model folder inside a FantasyWorld pipeline folder
BASE_PRESET = "tiny-wan2.1-i2v-14b"  # the tiny base pipeline (encoders, VAE, scheduler) of the tiny FantasyWorld
# A few tensors of each base component, named as the public module tree names them (DiffSynth's WanTextEncoder,
# WanImageEncoder wrapping the open-clip ViT as `model`, WanVideoVAE wrapping the VAE as `model`); the shapes are
# small stand-ins: readers set these tensors aside whatever they hold.
BASE_COMPONENT_SHAPES = {
    "pipe.text_encoder.token_embedding.weight": (16, 8),
    "pipe.text_encoder.blocks.0.attn.q.weight": (8, 8),
    "pipe.text_encoder.norm.weight": (8,),
    "pipe.image_encoder.model.visual.patch_embedding.weight": (8, 3, 2, 2),
    "pipe.image_encoder.model.visual.transformer.0.attn.to_qkv.weight": (24, 8),
    "pipe.vae.model.encoder.conv1.weight": (4, 3, 3, 3, 3),
    "pipe.vae.model.conv2.weight": (4, 4, 1, 1, 1),
}


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


def base_component_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Random stand-ins for the base components' tensors a released file carries (`BASE_COMPONENT_SHAPES`)."""
    rng = np.random.default_rng(seed + 7)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in BASE_COMPONENT_SHAPES.items()}


def write_tiny_fantasyworld(folder: str | os.PathLike, cfg: FantasyWorldConfig | None = None, *, seed: int = 0,
                            force: bool = False, base_components: bool = True) -> Path:
    """Write config.json, model.pth and model.safetensors (released layout) for a random model; atomic. With
    `base_components` (default) both files also hold the base components' tensors, as the released file's
    state dict does."""
    cfg = cfg or FantasyWorldConfig.tiny()
    tensors = released_state(build_model(cfg, seed))
    if base_components:
        tensors.update(base_component_tensors(seed))
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
    """The model's tensors in one file (.safetensors, or .pth with `allow_pickle`, read weights-only), as
    stored, under the names the map uses (the base components' tensors set aside by the map's hook)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    reader = open_reader(path, allow_pickle=allow_pickle)
    return {name: reader.get(key) for name, key in FANTASYWORLD.file_keys(reader.keys()).names.items()}


def load_fantasyworld(folder: str | os.PathLike, *, allow_pickle: bool = False) -> FantasyWorld:
    """The torch reference from a checkpoint folder in any of the map's layouts (safetensors preferred over
    model.pth), through the one checkpoint engine."""
    ckpt = Checkpoint(folder, FANTASYWORLD, allow_pickle=allow_pickle)
    model = FantasyWorld(ckpt.config)
    state = {e.name(TORCH): torch.from_numpy(np.array(ckpt.get(e, TORCH), dtype=np.float32)) for e in ckpt.entries}
    model.load_state_dict(state, strict=True)
    return model.eval()
