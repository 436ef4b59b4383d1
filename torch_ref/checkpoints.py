"""Write small random-weight pipeline folders in the real diffusers layout.

No model hub is reachable, so tests and the demo use checkpoints this project writes itself with
diffusers' and transformers' own classes: the files are what `save_pretrained` produces for the real
models (transformer[_2]/, vae/, text_encoder/, tokenizer/, image_encoder/, image_processor/, scheduler/,
model_index.json), only small, so `WanImageToVideoPipeline.from_pretrained` loads them as it loads Wan's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from weights.configs.presets import Preset, get_preset
from weights.configs.vae import get_vae_preset
from torch_ref.encoders import write_tiny_encoders
from torch_ref.models import build_transformer
from torch_ref.vae import build_vae
from weights.atomic import atomic_folder

TRANSFORMER_DIRS = ("transformer", "transformer_2")
# model_index.json entries: component -> [library, class] as diffusers writes them.
_LIBRARIES = {
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "transformer_2": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "image_encoder": ["transformers", "CLIPVisionModel"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
}


def write_scheduler_config(folder: Path, shift: float) -> None:
    """scheduler/scheduler_config.json: UniPC multistep in flow-prediction mode with the preset's shift."""
    from diffusers import UniPCMultistepScheduler

    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
    ).save_config(folder)


def write_tiny_checkpoint(
    preset: str | Preset,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    force: bool = False,
) -> Path:
    """Write a whole tiny pipeline folder for `preset` (see the module docstring) and return its path.

    Deterministic in `seed` (the second expert uses seed + 1, the VAE seed + 2, the encoders seed + 3).
    `max_shard_size` (e.g. "50KB") splits the transformer weights into shards with a
    `diffusion_pytorch_model.safetensors.index.json`. The folder is built next to `out` and renamed into
    place only when complete.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out)
    with atomic_folder(out, force=force, writer="wanport make-tiny", job="write") as tmp:
        for i in range(preset.num_experts):
            model = build_transformer(preset.transformer, seed=seed + i)
            kwargs = {"safe_serialization": True}
            if max_shard_size is not None:
                kwargs["max_shard_size"] = max_shard_size
            model.save_pretrained(tmp / TRANSFORMER_DIRS[i], **kwargs)
        build_vae(get_vae_preset(preset.vae), seed=seed + 2).save_pretrained(tmp / "vae", safe_serialization=True)
        write_scheduler_config(tmp / "scheduler", preset.flow_shift)
        cfg = preset.transformer
        encoders = write_tiny_encoders(
            tmp, text_dim=cfg.text_dim, image_dim=cfg.image_dim if cfg.has_image_tokens else None, seed=seed + 3
        )
        components = list(TRANSFORMER_DIRS[: preset.num_experts]) + ["vae", "scheduler"] + encoders
        index = {
            "_class_name": "WanImageToVideoPipeline" if preset.task == "i2v" else "WanPipeline",
            "_wanport_preset": preset.name,
            "_wanport_seed": seed,
        }
        for name, lib in _LIBRARIES.items():
            index[name] = lib if name in components else [None, None]
        index["boundary_ratio"] = preset.boundary_ratio
        index["expand_timesteps"] = preset.task == "ti2v"
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
