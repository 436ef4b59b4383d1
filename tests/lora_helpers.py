"""Seeded random LoRAs for the LoRA tests, built as `weights.lora.Lora` objects and written by our writer.

Each builder picks, per DiT tensor, what a LoRA in the wild may hold for it: a low-rank pair (linear
layers and the patch convolution), a bias delta (PEFT `lora_B.bias` or Wan `diff_b`), or a full delta
(`diff` on norms, weights and parameters, `diff_m` on modulation tables). Every value is non-trivial.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from weights.dit_map import DitConfig, Entry, dit_entries
from weights.lora import Lora, Pair, Target

# alphas cycled over the pairs: != rank, a power-of-two ratio, a non-dyadic ratio, and absent
ALPHAS = (8.0, 3.0, None, 2.0)


def role(e: Entry) -> str:
    n = e.diffusers
    return "weight" if n.endswith(".weight") else "bias" if n.endswith(".bias") else "param"


def is_norm(e: Entry) -> bool:
    return re.search(r"norm|image_embedder\.norm[12]", e.diffusers) is not None


def random_lora(
    cfg: DitConfig,
    seed: int,
    *,
    rank: int = 4,
    pair: Callable[[Entry], bool] = lambda e: True,
    bias: Callable[[Entry], str | None] = lambda e: None,  # None | "peft" | "diff_b"
    full: Callable[[Entry], bool] = lambda e: False,
    alphas: tuple = ALPHAS,
) -> Lora:
    """A LoRA for `cfg`: pairs on linear/conv weights where `pair`, bias deltas where `bias` says how,
    full deltas on other tensors (norms, parameters, weights without a pair) where `full`."""
    rng = np.random.default_rng(seed)
    targets: dict[Entry, Target] = {}
    modules: dict[str, Target] = {}
    i = 0
    for e in dit_entries(cfg):
        r = role(e)
        if r == "weight" and e.kind in ("linear", "conv3d") and pair(e):
            out, rest = e.shape[0], e.shape[1:]
            up = (0.2 * rng.standard_normal((out, rank) + (1,) * (len(rest) - 1))).astype(np.float32)
            down = (0.2 * rng.standard_normal((rank,) + tuple(rest))).astype(np.float32)
            t = Target(e, pair=Pair(up, down, alphas[i % len(alphas)]))
            i += 1
            targets[e] = modules[e.diffusers[: -len(".weight")]] = t
        elif r == "bias" and (how := bias(e)) is not None:
            owner = modules.get(e.diffusers[: -len(".bias")])
            if how == "peft" and owner is None:
                continue
            scale = owner.pair.factor if how == "peft" else 1.0
            targets[e] = Target(e, full=(0.1 * rng.standard_normal(e.shape)).astype(np.float32), full_scale=scale)
        elif e not in targets and full(e):
            targets[e] = Target(e, full=(0.1 * rng.standard_normal(e.shape)).astype(np.float32))
    return Lora("random", "diffusers", targets)


def kohya_keys(wan_tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """musubi-tuner's spelling of a wan-layout file: `lora_unet_` + the module path with `_` for `.`."""
    out = {}
    for k, v in wan_tensors.items():
        body = k.removeprefix("diffusion_model.")
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if body.endswith(suffix):
                out["lora_unet_" + body[: -len(suffix)].replace(".", "_") + suffix] = v
                break
        else:
            raise ValueError(f"no kohya spelling for {k}")
    return out


def fuse_in_diffusers(models: list, loads: list[tuple[str, float, int]]) -> None:
    """diffusers' own path: `load_lora_weights` (expert 2 via load_into_transformer_2), then `fuse_lora`
    at the given strengths, adapters unloaded. Changes `models` in place."""
    from diffusers import WanPipeline

    two = len(models) > 1
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=models[0], vae=None, scheduler=None,
                       transformer_2=models[1] if two else None, boundary_ratio=0.9 if two else None)
    for i, (path, _, expert) in enumerate(loads):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}", load_into_transformer_2=expert == 2)
    for expert, model in enumerate(models, start=1):
        names = [f"l{i}" for i, (_, _, x) in enumerate(loads) if x == expert]
        if names:
            model.set_adapters(names, weights=[s for _, s, x in loads if x == expert])
            model.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
