"""The sampler's configuration, read and written as diffusers' `scheduler/scheduler_config.json`, and Wan's
flow shift: the one formula every schedule (UniPC, Euler, the block-causal sampler) warps its noise levels with.

The shift is a field of the immutable config, so it is fixed before any schedule exists. Options of the
diffusers schedulers that this port does not model must hold the values the Wan pipelines use, or the file
is refused by name. No torch, no jax.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from weights.configs.base import ConfigError, JsonConfig, check_config_keys, check_field_types

KINDS = ("unipc", "euler")
_CLASS_OF_KIND = {"unipc": "UniPCMultistepScheduler", "euler": "FlowMatchEulerDiscreteScheduler"}
_KIND_OF_CLASS = {v: k for k, v in _CLASS_OF_KIND.items()}
_SHIFT_KEY = {"unipc": "flow_shift", "euler": "shift"}
_MAX_SOLVER_ORDER = 3

# diffusers options that this port does not model. Each must hold the value given here (the one the Wan
# pipelines use); a key absent from the file takes diffusers' default, which is checked the same way.
# key -> (required value, diffusers' default)
_FIXED: dict[str, dict[str, tuple[Any, Any]]] = {
    "unipc": {
        "prediction_type": ("flow_prediction", "epsilon"),
        "use_flow_sigmas": (True, False),
        "predict_x0": (True, True),
        # bh1 (and lower_order_final=False) make diffusers' last step, into noise level 0, produce inf/nan.
        "solver_type": ("bh2", "bh2"),
        "lower_order_final": (True, True),
        "final_sigmas_type": ("zero", "zero"),
        "thresholding": (False, False),
        "use_karras_sigmas": (False, False),
        "use_exponential_sigmas": (False, False),
        "use_beta_sigmas": (False, False),
        "use_dynamic_shifting": (False, False),
        "disable_corrector": ([], []),
        "solver_p": (None, None),
        "shift_terminal": (None, None),
    },
    "euler": {
        "use_dynamic_shifting": (False, False),
        "invert_sigmas": (False, False),
        "shift_terminal": (None, None),
        "use_karras_sigmas": (False, False),
        "use_exponential_sigmas": (False, False),
        "use_beta_sigmas": (False, False),
        "stochastic_sampling": (False, False),
    },
}

# diffusers options that have no effect on a flow-sigma schedule once the options above hold (the beta
# schedule only feeds the non-flow noise levels, etc.). Accepted and dropped.
_INERT: dict[str, set[str]] = {
    "unipc": {
        "beta_start", "beta_end", "beta_schedule", "trained_betas", "timestep_spacing", "steps_offset",
        "rescale_betas_zero_snr", "dynamic_thresholding_ratio", "sample_max_value", "time_shift_type",
        "sigma_min", "sigma_max",
    },
    "euler": {"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type"},
}
_MODELED_TYPES = {"num_train_timesteps": int, "flow_shift": float, "shift": float, "solver_order": int}
_MODELED = {
    "unipc": {"num_train_timesteps", "flow_shift", "solver_order"},
    "euler": {"num_train_timesteps", "shift"},
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(JsonConfig):
    """A flow-matching sampler. `shift` is diffusers' `flow_shift` (UniPC) or `shift` (Euler); Wan uses 3.0
    for 480p and 5.0 for 720p. `solver_order` applies to UniPC only (its B(h) variant is always bh2)."""

    kind: str
    shift: float
    num_train_timesteps: int = 1000
    solver_order: int = 2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"scheduler kind {self.kind!r} is not supported; choose one of {list(KINDS)}")
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)):
            raise ConfigError(f"shift must be a number, got {self.shift!r}")
        object.__setattr__(self, "shift", float(self.shift))
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ConfigError(f"shift must be a finite number > 0, got {self.shift}")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int):
            raise ConfigError(f"num_train_timesteps must be an int, got {self.num_train_timesteps!r}")
        if self.num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.kind == "unipc":
            order = self.solver_order
            if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= _MAX_SOLVER_ORDER:
                raise ConfigError(
                    f"solver_order must be an int in 1..{_MAX_SOLVER_ORDER}, got {self.solver_order!r} "
                    "(Wan uses 2)"
                )
        elif self.solver_order != 2:
            raise ConfigError("solver_order is a UniPC option; leave it at its default for kind='euler'")

    @property
    def history_size(self) -> int:
        """How many past x0 predictions the sampler state keeps."""
        return self.solver_order if self.kind == "unipc" else 1

    # --- diffusers scheduler_config.json ----------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "scheduler_config") -> "SchedulerConfig":
        cls_name = raw.get("_class_name")
        if cls_name not in _KIND_OF_CLASS:
            raise ConfigError(
                f"{source}: scheduler _class_name {cls_name!r} is not supported; this project samples with "
                f"{sorted(_KIND_OF_CLASS)}. Replace the scheduler config with one of those (the Wan pipelines "
                "ship UniPCMultistepScheduler)."
            )
        kind = _KIND_OF_CLASS[cls_name]
        if kind == "unipc" and "shift" in raw:
            raise ConfigError(f"{source}: UniPCMultistepScheduler has no 'shift' option; rename it 'flow_shift'")
        if kind == "euler" and "flow_shift" in raw:
            raise ConfigError(
                f"{source}: FlowMatchEulerDiscreteScheduler has no 'flow_shift' option; rename it 'shift'"
            )
        known = _MODELED[kind] | set(_FIXED[kind]) | _INERT[kind]
        fields = check_config_keys(cls_name, raw, known, source)
        check_field_types(fields, _MODELED_TYPES, source)
        for key, (required, default) in _FIXED[kind].items():
            value = fields.get(key, default)
            if value != required:
                how = "remove the key or set it" if default == required else "set it"
                given = "is absent, so diffusers uses" if key not in fields else "is"
                raise ConfigError(
                    f"{source}: {cls_name} option {key!r} {given} {value!r}, which this project does not "
                    f"support; {how} to {json.dumps(required)} (the value the Wan pipelines use)."
                )
        kw: dict[str, Any] = {
            "kind": kind,
            "shift": fields.get(_SHIFT_KEY[kind], 1.0),
            "num_train_timesteps": fields.get("num_train_timesteps", 1000),
        }
        if kind == "unipc":
            kw["solver_order"] = fields.get("solver_order", 2)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "_class_name": _CLASS_OF_KIND[self.kind],
            "num_train_timesteps": self.num_train_timesteps,
            _SHIFT_KEY[self.kind]: self.shift,
        }
        if self.kind == "unipc":
            d["solver_order"] = self.solver_order
        for key, (required, _) in _FIXED[self.kind].items():
            d[key] = list(required) if isinstance(required, list) else required
        return d


def shift_sigma(sigma, shift: float, dtype=None):
    """Wan's flow shift of noise level(s) `sigma` in [0, 1]: shift * sigma / (1 + (shift - 1) * sigma).

    Works on floats and numpy arrays in their own precision. With `dtype` (np.float32) every operand is in that
    dtype, `shift` and `shift - 1` each rounded once from the exact value, as diffusers makes its float32 tables.
    """
    scale, minus_one, one = shift, shift - 1.0, 1.0
    if dtype is not None:
        scale, minus_one, one = dtype(scale), dtype(minus_one), dtype(one)
    return scale * sigma / (one + minus_one * sigma)


def parse_timesteps(text: str) -> tuple[float, ...]:
    """`--timesteps 1000,750,500,250` as a tuple of floats (commas, optional spaces)."""
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--timesteps {text!r}: expected comma-separated numbers, e.g. 1000,750,500,250") from None
