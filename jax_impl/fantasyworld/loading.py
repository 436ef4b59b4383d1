"""Put named tensors (Flax layout, `weights.fantasyworld_map` names) into an NNX module's parameters.

Every parameter must be given and every given tensor must land somewhere, with its exact shape; the
error lists all problems by name, so a wrong map or a wrong config is caught before anything runs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from weights.safetensors_io import CheckpointError


def param_names(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Dotted parameter paths of a module and their shapes (`trunk.0.norm1.scale`)."""
    return {".".join(str(p) for p in path): tuple(var.value.shape)
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def load_params(module: nnx.Module, tensors: dict[str, np.ndarray], source: str = "weights") -> nnx.Module:
    """Assign `tensors` {path: array} to the module's parameters in place (float32 kept as given)."""
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    names = {".".join(str(p) for p in path) for path, _ in flat}
    missing = sorted(names - tensors.keys())
    extra = sorted(tensors.keys() - names)
    bad = []
    for path, var in flat:
        key = ".".join(str(p) for p in path)
        if key in tensors and tuple(np.shape(tensors[key])) != tuple(var.value.shape):
            bad.append(f"{key}: given {list(np.shape(tensors[key]))}, module has {list(var.value.shape)}")
    if missing or extra or bad:
        parts = [f"{what} {len(v)}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}"
                 for what, v in (("missing", missing), ("unexpected", extra), ("mis-shaped", bad)) if v]
        raise CheckpointError(f"{source} do not fit {type(module).__name__}: " + " | ".join(parts))
    for path, var in flat:
        var.value = jnp.asarray(tensors[".".join(str(p) for p in path)], dtype=var.value.dtype)
    nnx.update(module, nnx.from_flat_state(flat))
    return module


def build_loaded(make, tensors: dict[str, np.ndarray], source: str = "weights") -> nnx.Module:
    """`make()` built abstractly (no random init: shapes only) and filled from `tensors`."""
    return load_params(nnx.eval_shape(make), tensors, source)
