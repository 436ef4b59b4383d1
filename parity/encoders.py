"""Parity of the Flax encoders against transformers, layer by layer, and of the JAX encoders at the pipeline level.

Layers: our UMT5 encoder against transformers' UMT5EncoderModel (embed; per layer the position bias, the
self-attention and feed-forward outputs and the layer output; the final norm) and our CLIP vision tower
against CLIPVisionModel (embeddings, pre_layrnorm, per layer self-attention, MLP and output, the pooled
post_layernorm, and `penultimate`: Wan's image tokens, hidden_states[-2]). Same weights, same inputs,
same report contract as `parity.dit`: float32 within `FP32_TOL` relative L2 per layer; bfloat16 within
`BF16_FACTOR` x transformers-bf16's own error against transformers-fp32.

Presets are transformers configs written with seeded weights where every parameter is perturbed (no norm
gain stuck at 1, no bias at 0, bias tables moved), so a bug in any parameter's use shows: "tiny" is the
pipeline's tiny encoder config (`torch_ref.encoders.write_tiny_encoders`), "odd" has widths that are not
powers of two, 3 heads, other bucket counts, and an image size that leaves pixels no patch covers.

Pipeline level (`pipeline_parity`): `JaxTextEncoder`/`JaxImageEncoder` against `torch_ref.encoders`'
TextEncoder/ImageEncoder on the same pipeline folder, prompts and images (tokenizer, cleaning, padding
rows zeroed, preprocessing, penultimate selection). `TORCH_ENCODERS` is torch_ref's pair as the JAX pipeline
takes it (`jax_impl.pipeline.EncoderSet`): parity is the layer that knows both sides, so the command line's
`--encoders torch` comes from here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from jax_impl.encoders.clip import layer_names as clip_layer_names
from jax_impl.encoders.umt5 import layer_names as umt5_layer_names
from jax_impl.frozen_jit import frozen_jit
from jax_impl.loading import load_clip_vision, load_umt5
from jax_impl.pipeline import JAX_ENCODERS, EncoderSet
from parity.report import Report, compare_layers, measured_bf16_layers
from parity.tolerances import BF16_FACTOR, BF16_FLOOR, FP32_TOL
from torch_ref.capture import capture, to_numpy
from torch_ref.encoders import ImageEncoder, TextEncoder

# torch_ref's encoders (transformers' UMT5 and CLIP, float32): the reference the JAX encoders are measured against
TORCH_ENCODERS = EncoderSet("torch", TextEncoder, ImageEncoder)

MODELS = {"text-encoder": ("umt5", "text_encoder"), "image-encoder": ("clip", "image_encoder")}

UMT5_PRESETS: dict[str, dict] = {
    # torch_ref.encoders.write_tiny_encoders at text_dim=32 (vocab: its tokenizer's 118 pieces)
    "tiny": dict(vocab_size=118, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=32),
    "odd": dict(vocab_size=101, d_model=36, d_kv=12, d_ff=52, num_layers=3, num_heads=3,
                relative_attention_num_buckets=10, relative_attention_max_distance=20, layer_norm_epsilon=1e-5),
}
CLIP_PRESETS: dict[str, dict] = {
    # torch_ref.encoders.write_tiny_encoders at image_dim=24
    "tiny": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=16, projection_dim=24),
    "odd": dict(hidden_size=30, intermediate_size=44, num_hidden_layers=3, num_attention_heads=3, image_size=46,
                patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6),
}
PRESETS = {"text-encoder": UMT5_PRESETS, "image-encoder": CLIP_PRESETS}


# --- reference models ------------------------------------------------------------------------------------
def perturb_(model, seed: int, scale: float = 0.1) -> None:
    """Add seeded noise to every parameter (10% of its spread; 0.1 where it is constant: norms, zero biases)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            spread = float(p.float().std()) if p.numel() > 1 else 0.0
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.add_((noise * scale * (spread if spread > 0 else 1.0)).to(p.dtype))


def write_encoder(model: str, preset: str | dict, out: str | os.PathLike, *, seed: int = 0,
                  max_shard_size: str | None = None) -> Path:
    """Write a perturbed random-weight transformers model folder (config.json + safetensors) and return it.

    `preset` is a name in `PRESETS[model]` or transformers config kwargs; `max_shard_size` (e.g. "20KB") shards
    the weights with an index json, as diffusers pipelines store UMT5-XXL.
    """
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    kwargs = PRESETS[model][preset] if isinstance(preset, str) else dict(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model == "text-encoder":
            net = UMT5EncoderModel(UMT5Config(feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                              decoder_start_token_id=0, **kwargs))
        else:
            net = CLIPVisionModel(CLIPVisionConfig(**kwargs))
    perturb_(net, seed + 1)
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    net.save_pretrained(out, safe_serialization=True, **extra)
    return Path(out)


def _model_folder(model: str, folder: str | os.PathLike) -> Path:
    """A model folder, or a pipeline folder holding it in text_encoder/ or image_encoder/."""
    folder = Path(folder)
    sub = folder / MODELS[model][1]
    return sub if not (folder / "config.json").is_file() and (sub / "config.json").is_file() else folder


def _load_torch(model: str, folder: Path, dtype: str):
    import torch
    from transformers import CLIPVisionModel, UMT5EncoderModel

    cls = UMT5EncoderModel if model == "text-encoder" else CLIPVisionModel
    # from_pretrained, as the pipelines load it: in bfloat16 UMT5 keeps `wo` in float32 (_keep_in_fp32_modules)
    return cls.from_pretrained(os.fspath(folder), torch_dtype=getattr(torch, dtype)).eval()


def _load_jax(model: str, folder: Path, dtype: str):
    import jax.numpy as jnp

    if model == "text-encoder":
        return load_umt5(folder, dtype=jnp.dtype(dtype))
    return load_clip_vision(folder, dtype=jnp.dtype(dtype), attention_backend="xla")


# --- inputs ----------------------------------------------------------------------------------------------
def text_inputs(vocab_size: int, *, batch: int = 2, text_len: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids and a mask: the first row full, the others a third and two thirds long, padding id 0 after."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, size=(batch, text_len)).astype(np.int32)
    mask = np.ones((batch, text_len), np.int32)
    for b in range(1, batch):
        n = max(1, text_len * (1 + (b - 1) % 2) // 3)
        mask[b, n:] = 0
        ids[b, n:] = 0
    return ids, mask


def image_inputs(image_size: int, channels: int = 3, *, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Random normalised pixels [B, H, W, C], channels-last."""
    return np.random.default_rng(seed).standard_normal((batch, image_size, image_size, channels), dtype=np.float32)


# --- capture ---------------------------------------------------------------------------------------------
def _first(y):
    return y[0] if isinstance(y, tuple) else y


def umt5_hooks(net) -> dict:
    """Hooks on a transformers UMT5EncoderModel matching `jax_impl.encoders.umt5` taps."""
    enc = net.encoder
    hooks = {"embed": (enc.embed_tokens, _first)}
    for i, block in enumerate(enc.block):
        attn = block.layer[0].SelfAttention
        hooks[f"layers.{i}.position_bias"] = (attn.relative_attention_bias, _first)  # [q, k, heads]
        hooks[f"layers.{i}.self_attn"] = (attn, _first)
        hooks[f"layers.{i}.ffn"] = (block.layer[1].DenseReluDense, _first)
        hooks[f"layers.{i}.output"] = (block, _first)
    hooks["output"] = (enc.final_layer_norm, _first)
    return hooks


def clip_hooks(net) -> dict:
    """Hooks on a transformers CLIPVisionModel matching `jax_impl.encoders.clip` taps."""
    hooks = {"embeddings": (net.embeddings, _first), "pre_layrnorm": (net.pre_layrnorm, _first)}
    for i, layer in enumerate(net.encoder.layers):
        hooks[f"layers.{i}.self_attn"] = (layer.self_attn, _first)
        hooks[f"layers.{i}.mlp"] = (layer.mlp, _first)
        hooks[f"layers.{i}.output"] = (layer, _first)
    hooks["post_layernorm"] = (net.post_layernorm, _first)
    return hooks


def run_torch(model: str, net, inputs) -> dict[str, np.ndarray]:
    """transformers' forward with every tap captured (float32 numpy); images also give `penultimate`."""
    import torch

    with torch.no_grad():
        if model == "text-encoder":
            ids, mask = (torch.from_numpy(a.astype(np.int64)) for a in inputs)
            with capture(umt5_hooks(net)) as taps:
                net(input_ids=ids, attention_mask=mask)
            return dict(taps)
        pixels = torch.from_numpy(np.ascontiguousarray(inputs.transpose(0, 3, 1, 2))).to(net.dtype)
        with capture(clip_hooks(net)) as taps:
            out = net(pixel_values=pixels, output_hidden_states=True)
        return dict(taps) | {"penultimate": to_numpy(out.hidden_states[-2])}


def run_jax(model: str, net, inputs) -> dict[str, np.ndarray]:
    """Our forward with every tap (float32 numpy); images also give `penultimate` (the pipeline's call)."""
    import jax
    import jax.numpy as jnp

    f32 = lambda tree: jax.tree.map(lambda a: np.asarray(a.astype(jnp.float32)), tree)  # noqa: E731
    if model == "text-encoder":
        _, taps = frozen_jit(lambda m, i, k: m(i, k, capture=True))(net, *inputs)
        return f32(taps)
    _, taps = frozen_jit(lambda m, p: m(p, capture=True))(net, inputs)
    return f32(taps) | {"penultimate": f32(frozen_jit(lambda m, p: m.penultimate(p))(net, inputs))}


def layer_order(model: str, cfg) -> list[str]:
    if model == "text-encoder":
        return umt5_layer_names(cfg.num_layers)
    return clip_layer_names(cfg.num_hidden_layers) + ["penultimate"]


# --- reports ---------------------------------------------------------------------------------------------
def model_parity(model: str, folder: str | os.PathLike, *, dtype: str = "float32", batch: int = 2,
                 text_len: int | None = None, seed: int = 0, meta: dict | None = None) -> Report:
    """Every captured layer of our encoder against transformers' on the model folder `folder`."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    if batch < 1 or (text_len is not None and text_len < 1):
        raise ValueError(f"batch and text_len must be positive, got {batch} and {text_len}")
    folder = _model_folder(model, folder)
    ours = _load_jax(model, folder, dtype)
    cfg = ours.cfg
    if model == "text-encoder":
        inputs = text_inputs(cfg.vocab_size, batch=batch, text_len=text_len or 64, seed=seed)
        shape = {"batch": batch, "text_len": int(inputs[0].shape[1]), "tokens": inputs[1].sum(1).tolist()}
    else:
        inputs = image_inputs(cfg.image_size, cfg.num_channels, batch=batch, seed=seed)
        shape = {"pixels": list(inputs.shape)}
    order = layer_order(model, cfg)
    meta = dict(meta or {}) | {"model": model, "dtype": dtype, "checkpoint": str(folder), **shape}
    mine = run_jax(model, ours, inputs)
    ref = run_torch(model, _load_torch(model, folder, "float32"), inputs)
    if dtype == "float32":
        return Report(compare_layers(mine, ref, FP32_TOL, order), meta | {"tolerance": f"rel_l2 <= {FP32_TOL}"})
    theirs = run_torch(model, _load_torch(model, folder, "bfloat16"), inputs)
    layers = measured_bf16_layers(mine, ref, theirs, order, BF16_FACTOR, BF16_FLOOR)
    return Report(layers, meta | {"tolerance": f"rel_l2 vs transformers-fp32 <= {BF16_FACTOR} x transformers-bf16's own error"})


def preset_parity(model: str, preset: str, *, seed: int = 0, workdir: str | None = None, **kw) -> Report:
    """Parity on a freshly written, perturbed encoder of `preset` ("tiny" or "odd")."""
    if preset not in PRESETS.get(model, {}):
        raise ValueError(f"unknown {model} preset {preset!r}; choose from {', '.join(PRESETS.get(model, {}))}")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = write_encoder(model, preset, Path(tmp) / MODELS[model][1], seed=seed)
        report = model_parity(model, folder, seed=seed, **kw)
    report.meta.update(preset=preset, checkpoint=None)
    return report


def pipeline_parity(folder: str | os.PathLike, prompts: list[str], images: list | None = None, *,
                    tol: float = FP32_TOL) -> Report:
    """JaxTextEncoder / JaxImageEncoder against torch_ref's encoders (float32) on a pipeline folder: one row for
    the prompt embeddings (and one for the image tokens when `images` are given and the folder has CLIP)."""
    folder = Path(folder)
    mine = {"prompt_embeds": JAX_ENCODERS.text(folder)(prompts)}
    ref = {"prompt_embeds": TORCH_ENCODERS.text(folder)(prompts)}
    if images:
        mine["image_embeds"] = JAX_ENCODERS.image(folder)(images)
        ref["image_embeds"] = TORCH_ENCODERS.image(folder)(images)
    return Report(compare_layers(mine, ref, tol), {"model": "encoders", "checkpoint": str(folder), "prompts": len(prompts),
                                                   "images": len(images or []), "tolerance": f"rel_l2 <= {tol}"})


__all__ = ["TORCH_ENCODERS", "model_parity", "preset_parity", "pipeline_parity", "write_encoder", "perturb_", "PRESETS", "MODELS"]
