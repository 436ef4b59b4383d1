"""Build and load diffusers' Wan models from this project's configs."""

from __future__ import annotations

import os

import torch
from diffusers import WanTransformer3DModel

from weights.configs.dit import DitConfig
from torch_ref.perturb import perturb_constant_parameters


def diffusers_kwargs(cfg: DitConfig) -> dict:
    """`WanTransformer3DModel(**diffusers_kwargs(cfg))` builds the model `cfg` describes."""
    kwargs = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    return kwargs


def build_transformer(cfg: DitConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    """A diffusers WanTransformer3DModel with deterministic random weights drawn from `seed`.

    diffusers' init leaves the q/k norms, the cross-attention norm and the image-embedder norms at
    identity; they get seeded noise too (`torch_ref.perturb`), so every weight is seen by the parity tests.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**diffusers_kwargs(cfg))
        perturb_constant_parameters(model)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def load_transformer(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    """Load a transformer folder (config.json + safetensors, sharded or not) with diffusers' own loader.

    In bfloat16 diffusers keeps its float32 modules (norms, time embedder, modulation tables) in float32,
    as users running the pipeline get.
    """
    model = WanTransformer3DModel.from_pretrained(os.fspath(path), torch_dtype=dtype)
    return model.eval()
