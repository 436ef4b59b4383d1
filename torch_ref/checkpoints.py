"""Write small random-weight checkpoints in the real diffusers folder layout.

No model hub is reachable, so tests and the demo use checkpoints this project writes itself with
diffusers' own classes: the files are what `save_pretrained` produces for the real models, only small.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jax_impl.presets import Preset, get_preset
from torch_ref.models import build_transformer
from weights.atomic import atomic_folder

TRANSFORMER_DIRS = ("transformer", "transformer_2")


def write_tiny_checkpoint(
    preset: str | Preset,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    force: bool = False,
) -> Path:
    """Write `out/transformer[/_2]/{config.json, *.safetensors}` and `out/model_index.json`.

    Deterministic in `seed` (the second expert uses seed + 1). `max_shard_size` (e.g. "50KB") splits
    the weights into shards with a `diffusion_pytorch_model.safetensors.index.json`. The folder is
    built next to `out` and renamed into place only when complete.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out)
    with atomic_folder(out, force=force) as tmp:
        for i in range(preset.num_experts):
            model = build_transformer(preset.transformer, seed=seed + i)
            kwargs = {"safe_serialization": True}
            if max_shard_size is not None:
                kwargs["max_shard_size"] = max_shard_size
            model.save_pretrained(tmp / TRANSFORMER_DIRS[i], **kwargs)
        index = {
            "_class_name": "WanImageToVideoPipeline" if preset.task == "i2v" else "WanPipeline",
            "_wanport_preset": preset.name,
            "_wanport_seed": seed,
        }
        for i in range(preset.num_experts):
            index[TRANSFORMER_DIRS[i]] = ["diffusers", "WanTransformer3DModel"]
        if preset.boundary_ratio is not None:
            index["boundary_ratio"] = preset.boundary_ratio
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
