"""Layer-capture hooks on diffusers modules, named as in the parity report.

Captured tensors are converted to the JAX side's channels-last float32 numpy layout here, so the
comparison code never needs to know which framework a tensor came from.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


@contextlib.contextmanager
def capture(hooks: dict[str, tuple[torch.nn.Module, Callable]]) -> Iterator[dict[str, np.ndarray]]:
    """Within the block, each module's forward output is passed through its fn and stored under its name."""
    taps: dict[str, np.ndarray] = {}
    handles = []
    for name, (module, fn) in hooks.items():
        def hook(_m, _inp, out, name=name, fn=fn):
            got = fn(out)
            for key, value in got.items() if isinstance(got, dict) else [(name, got)]:
                taps[key] = to_numpy(value)
        handles.append(module.register_forward_hook(hook))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


def dit_hooks(model) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """Hooks on a diffusers WanTransformer3DModel matching `jax_impl.dit` taps."""

    def embedder(out):
        temb, tproj, text, image = out
        d = {"time_embedding": temb, "time_projection": tproj, "text_embedding": text}
        if image is not None:
            d["image_embedding"] = image
        return d

    hooks: dict[str, tuple[torch.nn.Module, Callable]] = {
        "patch_embedding": (model.patch_embedding, lambda y: y.flatten(2).transpose(1, 2)),
        "condition_embedder": (model.condition_embedder, embedder),
    }
    for i, block in enumerate(model.blocks):
        hooks[f"blocks.{i}.self_attn"] = (block.attn1, lambda y: y)
        hooks[f"blocks.{i}.cross_attn"] = (block.attn2, lambda y: y)
        hooks[f"blocks.{i}.ffn"] = (block.ffn, lambda y: y)
        hooks[f"blocks.{i}.output"] = (block, lambda y: y)
    hooks["head"] = (model.proj_out, lambda y: y)
    return hooks


def dit_layer_order(num_layers: int, has_image: bool) -> list[str]:
    names = ["patch_embedding", "time_embedding", "time_projection", "text_embedding"]
    names += ["image_embedding"] if has_image else []
    for i in range(num_layers):
        names += [f"blocks.{i}.{n}" for n in ("self_attn", "cross_attn", "ffn", "output")]
    return names + ["head", "output"]


@torch.no_grad()
def run_dit(model, latents: np.ndarray, timestep: np.ndarray, text: np.ndarray, image: np.ndarray | None):
    """Run diffusers' transformer on channels-last numpy inputs; returns (output, taps) channels-last."""
    dtype = model.patch_embedding.weight.dtype  # activations' dtype; some modules stay float32
    dev = model.patch_embedding.weight.device
    x = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 4, 1, 2, 3))).to(dev, dtype)
    kwargs = {}
    if image is not None:
        kwargs["encoder_hidden_states_image"] = torch.from_numpy(image).to(dev, dtype)
    with capture(dit_hooks(model)) as taps:
        out = model(
            hidden_states=x,
            timestep=torch.from_numpy(timestep).to(dev),
            encoder_hidden_states=torch.from_numpy(text).to(dev, dtype),
            return_dict=False,
            **kwargs,
        )[0]
    taps["output"] = to_numpy(out).transpose(0, 2, 3, 4, 1)
    return taps["output"], taps
