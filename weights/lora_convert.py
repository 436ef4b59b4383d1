"""Write a LoRA in the diffusers, original-Wan or ComfyUI layout (`wanport convert-lora`).

Tensors are written with the bits they were read with; only names change, so a round trip through any
layouts gives back the original tensors bit for bit. Alphas travel as numbers: `.alpha` scalar keys
(float32) in the Wan layouts, PEFT's `lora_adapter_metadata` JSON (r, lora_alpha, rank_pattern,
alpha_pattern) in the diffusers layout, which is what diffusers' `load_lora_weights` reads.

The three layouts differ in what they can say:
- diffusers: `transformer.<diffusers module>.lora_A.weight` / `lora_B.weight`, biases as PEFT's
  `lora_B.bias` (scaled by the module's alpha / rank, as PEFT does). Full-tensor deltas (norms,
  modulation, positional embedding, a bias delta whose module has alpha != rank) have no PEFT form: they
  are written as `.diff` / `.diff_b` keys, which wanport reads and diffusers' loader refuses (loudly).
- wan: `diffusion_model.<Wan module>.lora_down.weight` / `lora_up.weight` + `.alpha`, `.diff`, `.diff_b`,
  and modulation deltas as LightX2V writes them: `blocks.N.diff_m`, `head.diff_m`.
- comfy: as wan, but modulation deltas as ComfyUI's loader finds them: `blocks.N.modulation.diff`.
A PEFT `lora_B.bias` on a module whose alpha != rank has no exact Wan form (diff_b is unscaled): it is
written scaled, which rounds, and the conversion says so.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from weights.atomic import check_output_path
from weights.configs.dit import DitConfig
from weights.entry import Entry
from weights.lora import Lora, LoraError, Target
from weights.lora_read import read_lora
from weights.safetensors_io import TensorSpec, write_safetensors

logger = logging.getLogger("wanport.lora")
LORA_LAYOUTS = ("diffusers", "wan", "comfy")
PREFIX = {"diffusers": "transformer.", "wan": "diffusion_model.", "comfy": "diffusion_model."}


def _split_name(entry: Entry, naming: str) -> tuple[str, str]:
    """(module, role) of an entry in a naming: role 'weight', 'bias' or 'param' (a bare parameter)."""
    n = entry.name(naming)
    for role in ("weight", "bias"):
        if n.endswith("." + role):
            return n[: -len(role) - 1], role
    return n, "param"


def _full_key(entry: Entry, to: str) -> str:
    naming = "diffusers" if to == "diffusers" else "wan"
    module, role = _split_name(entry, naming)
    if role == "param" and to == "wan" and module.endswith(".modulation"):
        return module[: -len(".modulation")] + ".diff_m"
    return module + (".diff_b" if role == "bias" else ".diff")


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def lora_tensors(lora: Lora, to: str) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """(tensors by key, safetensors header metadata, warnings) of `lora` in layout `to`."""
    if to not in LORA_LAYOUTS:
        raise ValueError(f"unknown LoRA layout {to!r}; choose one of {', '.join(LORA_LAYOUTS)}")
    naming = "diffusers" if to == "diffusers" else "wan"
    prefix = PREFIX[to]
    out: dict[str, np.ndarray] = {}
    peft_modules: dict[str, tuple[int, float | None, bool]] = {}  # module -> (rank, alpha, rslora)
    no_peft_form: list[str] = []
    rounded: list[str] = []
    by_module: dict[str, Target] = {}
    for entry, t in lora.targets.items():
        if t.pair is not None:
            module, _ = _split_name(entry, naming)
            by_module[module] = t
            p = t.pair
            if to == "diffusers":
                out[f"{prefix}{module}.lora_A.weight"] = p.down
                out[f"{prefix}{module}.lora_B.weight"] = p.up
                peft_modules[module] = (p.rank, p.alpha, p.rslora)
            else:
                out[f"{prefix}{module}.lora_down.weight"] = p.down
                out[f"{prefix}{module}.lora_up.weight"] = p.up
                alpha = p.alpha
                if p.rslora:  # alpha / sqrt(r) == alpha' / r
                    alpha = alpha * math.sqrt(p.rank)
                    rounded.append(f"{module} (rsLoRA alpha)")
                if alpha is not None:
                    out[f"{prefix}{module}.alpha"] = np.array(alpha, np.float32)
    for entry, t in lora.targets.items():
        if t.full is None:
            continue
        module, role = _split_name(entry, naming)
        owner = by_module.get(module)
        if to == "diffusers" and role == "bias" and owner is not None and owner.pair.factor == t.full_scale:
            out[f"{prefix}{module}.lora_B.bias"] = t.full  # PEFT scales it by the same factor: exact
            continue
        full = t.full
        if t.full_scale != 1.0:  # a PEFT lora_B.bias going where biases are unscaled: bake the factor in
            full = (np.asarray(full, np.float32) * np.float32(t.full_scale)).astype(t.full.dtype)
            rounded.append(f"{module} (lora_B.bias x alpha/rank {t.full_scale:g})")
        out[prefix + _full_key(entry, to)] = full
        if to == "diffusers":
            no_peft_form.append(entry.name("diffusers"))
    warnings = []
    if no_peft_form:
        warnings.append(
            f"{len(no_peft_form)} full-tensor delta(s) have no PEFT form ({', '.join(no_peft_form[:4])}"
            f"{' ...' if len(no_peft_form) > 4 else ''}): written as .diff/.diff_b keys, which wanport reads but "
            "diffusers' load_lora_weights refuses; use --to wan or comfy for a file other tools load whole"
        )
    if rounded:
        warnings.append(f"{len(rounded)} value(s) rescaled, so not bit-exact: {', '.join(rounded[:4])}"
                        f"{' ...' if len(rounded) > 4 else ''}")
    metadata = {"wanport_lora_layout": to}
    if peft_modules and any(a is not None for _, a, _ in peft_modules.values()):
        metadata["lora_adapter_metadata"] = json.dumps(_peft_config(peft_modules, any(k.endswith(".lora_B.bias") for k in out)),
                                                       indent=2, sort_keys=True)
    return out, metadata, warnings


def _peft_config(modules: dict[str, tuple[int, float | None, bool]], lora_bias: bool) -> dict:
    """diffusers' lora_adapter_metadata for these modules: the common rank and alpha, the rest as patterns
    (escaped module names, which PEFT matches as regexes ending the module path)."""
    alphas = {m: (r if a is None else a) for m, (r, a, _) in modules.items()}
    r0 = Counter(r for r, _, _ in modules.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    rslora = {rs for _, _, rs in modules.values()}
    if len(rslora) > 1:
        raise LoraError("a LoRA mixing rsLoRA and plain scaling cannot be written as one PEFT config")
    conf = {
        "r": r0,
        "lora_alpha": _number(a0),
        "rank_pattern": {re.escape(m): r for m, (r, _, _) in modules.items() if r != r0},
        "alpha_pattern": {re.escape(m): _number(a) for m, a in alphas.items() if a != a0},
        "target_modules": sorted(modules),
        "lora_bias": lora_bias,
        "use_rslora": rslora.pop(),
    }
    return {f"transformer.{k}": v for k, v in conf.items()}


def write_lora(path: str | Path, lora: Lora, to: str, *, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Write `lora` in layout `to` as one safetensors file, whole or not at all."""
    path, log = Path(path), log or logger.info
    check_output_path(path, flag="LoRA output", suffix=".safetensors")
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; choose another output or pass --force to replace it")
    tensors, metadata, warnings = lora_tensors(lora, to)
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(k, np.asarray(v).dtype, tuple(np.shape(v))) for k, v in tensors.items()]
    write_safetensors(path, specs, lambda k: np.asarray(tensors[k]), metadata)
    for w in warnings:
        log(f"LoRA {path}: warning: {w}")
    log(f"LoRA {path}: wrote {len(tensors)} tensors in the {to} layout")
    return path


def convert_lora(
    src: str | Path,
    dst: str | Path,
    to: str,
    cfg: DitConfig | None = None,
    *,
    force: bool = False,
    ignore_missing: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Read a LoRA in any layout and write it in layout `to` (diffusers | wan | comfy). With `cfg`, the
    LoRA is checked against that model first (names and shapes); without, it is converted on its names."""
    if to not in LORA_LAYOUTS:
        raise ValueError(f"unknown LoRA layout {to!r}; choose one of {', '.join(LORA_LAYOUTS)}")
    check_output_path(dst, flag="LoRA output", suffix=".safetensors")
    if Path(dst).exists() and not force:
        raise FileExistsError(f"{dst} already exists; choose another output or pass --force to replace it")
    lora = read_lora(src, cfg, ignore_missing=ignore_missing, log=log)
    return write_lora(dst, lora, to, force=force, log=log)
