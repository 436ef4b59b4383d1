"""LoRAs merged into an already built DiT (a model kept in memory between runs); merging at load time is
`weights.lora_apply.apply_loras`, which needs no JAX."""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from weights.lora import merged_tensor
from weights.lora_apply import LoraSpec, read_loras


def apply_loras_to_model(
    model, loras: Sequence[LoraSpec], *, ignore_missing: bool = False, log: Callable[[str], None] | None = None,
):
    """Merge `loras` into an already built `jax_impl.dit.WanTransformer` in place (and return it), for a
    model kept in memory between runs. Each touched parameter is merged on the host in float32 and cast
    to the parameter's dtype: the same numbers `load_dit(apply_loras(...))` gives when the model's dtype
    is the checkpoint's (a bf16 model from a bf16 file, float32 from float32). Irreversible: reload the
    model to drop a LoRA."""
    scaled = read_loras(model.cfg, loras, ignore_missing=ignore_missing, log=log)
    state = nnx.state(model)
    flat = {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}
    for entry in dict.fromkeys(e for lora, _ in scaled for e in lora.targets):
        parts = entry.flax.split(".")
        if parts[0] == "blocks":  # stacked layers: one slice of the stacked parameter
            var, layer = flat[("blocks", *parts[2:])], int(parts[1])
            base = np.asarray(var.value[layer], np.float32)
            merged = merged_tensor(entry, base, scaled, "flax")
            var.value = var.value.at[layer].set(jnp.asarray(merged, var.value.dtype))
        else:
            var = flat[tuple(parts)]
            merged = merged_tensor(entry, np.asarray(var.value, np.float32), scaled, "flax")
            var.value = jnp.asarray(merged, var.value.dtype)
    nnx.update(model, state)
    return model


__all__ = ["apply_loras_to_model"]
