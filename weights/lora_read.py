"""Read Wan DiT LoRA files in every layout found in the wild onto the DiT map (see docs/loras.md).

Layouts (detected from the keys and said in one log line):
- diffusers / PEFT: `transformer.blocks.0.attn1.to_q.lora_A.weight` / `lora_B.weight` (+ `lora_B.bias`),
  alpha from the `lora_adapter_metadata` JSON diffusers writes into the safetensors header, from a PEFT
  adapter folder's `adapter_config.json`, or from `.alpha` keys; no alpha means alpha = rank.
- original Wan / ComfyUI / LightX2V: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` /
  `lora_up.weight` + `.alpha` (also `lora_A`/`lora_B`, with or without the `diffusion_model.` prefix),
  full deltas `.diff` (weights, norms, parameters), `.diff_b` (biases) and LightX2V's `.diff_m` (a
  block's or the head's modulation table).
- kohya / musubi-tuner: `lora_unet_blocks_0_self_attn_q.lora_down.weight` + `.alpha`.

Everything that cannot be applied as asked is refused with the keys listed, before any merge work:
nothing is dropped silently. No jax or torch here.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from weights.configs.dit import DitConfig
from weights.entry import Entry
from weights.lora import Lora, LoraError, Pair, Target
from weights.lora_names import (
    KOHYA_PREFIX, NAMINGS, PREFIXES, Module, flatten, indexes, modulation_module, names_only_config,
)
from weights.safetensors_io import SafetensorsFile

logger = logging.getLogger("wanport.lora")

# Key suffix -> what it holds. Longest first, so `.diff_b` is not read as `.diff` + "_b".
SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
# Other adapter kinds (DoRA, LoCon mid, LoHa, LoKr, ...): refused by name, never silently dropped.
_UNSUPPORTED = re.compile(r"(dora_scale|lora_mid|lora_magnitude|hada_|lokr_|\.a1\.|\.b1\.|w_norm|b_norm|set_weight)")
SHOWN = 8  # names listed in an error before "... and N more"
PEFT_ALPHA_DEFAULT = 8  # LoraConfig's defaults, used when a PEFT config leaves r or lora_alpha out
PEFT_RANK_DEFAULT = 8


def _listing(names: Sequence[str]) -> str:
    more = f" ... and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


# --- opening ----------------------------------------------------------------------------------------
def _open(path: Path) -> tuple[SafetensorsFile, dict | None]:
    """The tensor file and its PEFT config (diffusers' header metadata or a PEFT folder's json)."""
    if path.is_dir():
        for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
            if (path / name).is_file():
                conf = None
                if (path / "adapter_config.json").is_file():
                    try:
                        conf = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
                    except ValueError as e:
                        raise LoraError(f"{path / 'adapter_config.json'}: not valid JSON ({e})") from None
                return _open_file(path / name, conf)
        found = sorted(p.name for p in path.glob("*.safetensors"))
        raise LoraError(
            f"{path}: a folder, but no adapter_model.safetensors (PEFT) or pytorch_lora_weights.safetensors "
            f"(diffusers) in it" + (f"; give the file itself: {', '.join(found)}" if found else "")
        )
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"{path}: LoRA files are read as .safetensors only (pickled .pt/.bin/.ckpt files can run code)")
    return _open_file(path, None)


def _open_file(path: Path, conf: dict | None) -> tuple[SafetensorsFile, dict | None]:
    f = SafetensorsFile(path)
    meta = f.metadata.get("lora_adapter_metadata")
    if conf is None and meta:
        try:
            raw = json.loads(meta)
        except ValueError as e:
            raise LoraError(f"{path}: header metadata lora_adapter_metadata is not valid JSON ({e})") from None
        # diffusers prefixes each key with the component ("transformer.r"); a bare PEFT dict has none
        prefixed = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith("transformer.")}
        conf = prefixed or raw
    return f, conf


def _pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name it ends (regex)."""
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", module):
            return k
    return None


def _peft_alpha(conf: dict, module: str) -> tuple[float, int]:
    """(alpha, rank the config promises) for one module, as PEFT's LoraConfig resolves them."""
    r, a = conf.get("r", PEFT_RANK_DEFAULT), conf.get("lora_alpha", PEFT_ALPHA_DEFAULT)
    rp, ap = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    if (k := _pattern_key(rp, module)) is not None:
        r = rp[k]
    if (k := _pattern_key(ap, module)) is not None:
        a = ap[k]
    return float(a), int(r)


# --- key parsing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Key:
    key: str
    prefix: str
    path: str  # module path with the prefix and suffix removed
    kind: str  # down | up | up_bias | alpha | diff | diff_b | diff_m


def _split(key: str) -> _Key | None:
    for suffix, kind in SUFFIXES:
        if key.endswith(suffix):
            rest = key[: -len(suffix)]
            prefix = next((p for p in PREFIXES if rest.startswith(p)), "")
            return _Key(key, prefix, rest[len(prefix):], kind)
    return None


def _lookup(index: dict[str, Module], naming: str, k: _Key) -> Module | None:
    path = modulation_module(k.path) if k.kind == "diff_m" else k.path
    return index.get(flatten(path) if naming == "kohya" else path)


def _naming(keys: list[_Key]) -> str:
    """The naming most of the keys' module paths resolve in (judged on a config that has every module
    they mention, so keys for modules the actual model lacks still count)."""
    ix = indexes(names_only_config([k.path for k in keys]))
    votes = Counter()
    for n in NAMINGS:
        votes[n] = sum(_lookup(ix[n], n, k) is not None for k in keys)
    if any(k.prefix == KOHYA_PREFIX for k in keys):
        votes["kohya"] += 0.5  # `patch_embedding` resolves in every naming: break ties by prefix
    elif any(k.prefix in ("diffusion_model.", "model.diffusion_model.") for k in keys):
        votes["wan"] += 0.5
    naming, n = votes.most_common(1)[0]
    if n < 1:
        raise LoraError(
            f"none of the {len(keys)} LoRA keys names a Wan DiT module in the diffusers, original-Wan or kohya "
            f"spelling (first: {_listing([k.key for k in keys])}); is this a LoRA for another model?"
        )
    return naming


def _describe(naming: str, keys: list[_Key], pairs: list[Pair], alpha_from: str, n_full: Counter) -> str:
    prefixes = sorted({k.prefix for k in keys}) or [""]
    styles = sorted({"lora_A/lora_B" if k.key.endswith((".lora_A.weight", ".lora_B.weight")) else "lora_down/lora_up"
                     for k in keys if k.kind in ("up", "down")})
    ranks = sorted({p.rank for p in pairs})
    parts = [f"{naming} names", "prefix " + "/".join(repr(p) for p in prefixes)]
    if styles:
        parts.append(", ".join(styles))
    if pairs:
        parts.append(f"{len(pairs)} low-rank pairs (rank {'/'.join(map(str, ranks))}, alpha {alpha_from})")
    if n_full:
        parts.append("full deltas " + ", ".join(f"{k} x{v}" for k, v in sorted(n_full.items())))
    if n_full.get("diff_m"):
        parts.append("LightX2V-style modulation deltas")
    return "; ".join(parts)


# --- reading ----------------------------------------------------------------------------------------
def read_lora(
    path: str | Path,
    cfg: DitConfig | None = None,
    *,
    ignore_missing: bool = False,
    log: Callable[[str], None] | None = None,
) -> Lora:
    """Read a LoRA file (or PEFT/diffusers LoRA folder) against the DiT config `cfg`.

    Refused before any merge work, with the offending keys listed: keys for modules `cfg` does
    not have (unless `ignore_missing`: then they are skipped and listed in the log), unknown or
    unsupported adapter kinds (DoRA, LoHa, LoKr, ...), half pairs, alphas without pairs, tensors that do
    not fit the module's shape, and a tensor given two updates. With `cfg=None` the LoRA is read on its
    names alone (for converting between layouts): nothing is missing and shapes are not checked.
    """
    path = Path(path)
    log = log or logger.info
    f, conf = _open(path)
    src = str(path)
    keys, unknown = [], []
    for key in f.keys():
        (keys.append(k) if (k := _split(key)) is not None else unknown.append(key))
    if unknown:
        kinds = [k for k in unknown if _UNSUPPORTED.search(k)]
        what = "adapter kinds wanport does not merge (DoRA/LoCon/LoHa/LoKr: only plain LoRA and diffs)" if kinds else \
            "keys that are not LoRA tensors (expected .lora_A/.lora_B/.lora_down/.lora_up/.alpha/.diff/.diff_b/.diff_m)"
        raise LoraError(f"{src}: {len(unknown)} {what}: {_listing(unknown)}")
    if not keys:
        raise LoraError(f"{src}: the file holds no tensors")
    naming = _naming(keys)
    check_shapes = cfg is not None
    index = indexes(cfg if cfg is not None else names_only_config([k.path for k in keys]))[naming]

    groups: dict[str, dict[str, _Key]] = {}
    missing: list[str] = []
    for k in keys:
        mod = _lookup(index, naming, k)
        if mod is None or (k.kind in ("diff_b", "up_bias") and mod.bias is None):
            missing.append(k.key)
            continue
        slot = "modulation" if k.kind == "diff_m" else k.kind
        g = groups.setdefault(mod.name, {})
        if slot in g or (slot == "diff" and "modulation" in g) or (slot == "modulation" and "diff" in g):
            raise LoraError(f"{src}: {k.key} and {g.get(slot, g.get('diff', g.get('modulation'))).key} update the same tensor")
        g[slot] = k
    if missing:
        if not ignore_missing:
            raise LoraError(f"{src}: {len(missing)} LoRA tensor(s) name modules this model does not have: "
                            f"{_listing(missing)}.{_missing_hint(missing, cfg)} Pass ignore_missing "
                            f"(--lora-ignore-missing) to merge the rest and skip these.")
        log(f"LoRA {src}: skipping {len(missing)} tensor(s) for modules this model does not have: {_listing(missing)}")

    built = _Builder(f, conf, check_shapes)
    for name, g in groups.items():
        if problem := built.module(index[name], g):
            raise LoraError(f"{src}: {problem}")
    desc = _describe(naming, keys, built.pairs, "/".join(sorted(built.alpha_from)) or "absent: factor 1", built.full_kinds)
    log(f"LoRA {src}: {desc}; {len(built.targets)} DiT tensors updated")
    return Lora(src, naming, built.targets, missing if ignore_missing else [], desc, checked=check_shapes)


def _missing_hint(missing: list[str], cfg: DitConfig | None) -> str:
    if all(re.search(r"k_img|v_img|img_emb|add_[kv]_proj|image_embedder|norm_added_k", k) for k in missing):
        return (" They belong to the CLIP image branch (k_img/v_img/img_emb) of Wan2.1 I2V, which this model "
                "lacks; LoRAs made on Wan2.1 I2V carry them (LightX2V's Wan2.2 I2V distill LoRAs do too, "
                "ModelTC/LightX2V#1246), and skipping them is then what you want.")
    blocks = [int(m.group(1)) for k in missing if (m := re.search(r"blocks[._](\d+)[._]", k))]
    if cfg is not None and blocks and max(blocks) >= cfg.num_layers:
        return (f" The LoRA has blocks up to {max(blocks)}, the model {cfg.num_layers} ({cfg.num_layers - 1} last): "
                "it was made for another model size.")
    return ""


@dataclass
class _Builder:
    """Turns each module's keys into Targets, collecting what the log line reports."""

    f: SafetensorsFile
    conf: dict | None
    check: bool  # shapes are checked against the model (False: names-only reading)
    targets: dict[Entry, Target] = field(default_factory=dict)
    pairs: list[Pair] = field(default_factory=list)
    full_kinds: Counter = field(default_factory=Counter)
    alpha_from: set[str] = field(default_factory=set)

    def module(self, mod: Module, g: dict[str, _Key]) -> str | None:
        """Add one module's targets; return what is wrong with them instead of raising."""
        if ("up" in g) != ("down" in g):
            have, lack = ("up", "down") if "up" in g else ("down", "up")
            return f"{g[have].key} has no {lack} matrix to pair with"
        pair = None
        if "up" in g:
            pair = self._pair(mod, g)
            if isinstance(pair, str):
                return pair
        elif "alpha" in g:
            return f"{g['alpha'].key}: an alpha without a lora_down/lora_up (lora_A/lora_B) pair"
        for slot, entry in (("diff", mod.weight), ("modulation", mod.weight), ("diff_b", mod.bias), ("up_bias", mod.bias)):
            if slot not in g:
                continue
            full = self.f.get(g[slot].key, copy=False)
            if self.check and tuple(full.shape) != tuple(entry.shape):
                return f"{g[slot].key}: shape {list(full.shape)}, the model's {entry.name('diffusers')} is {list(entry.shape)}"
            if slot == "up_bias" and pair is None:
                return f"{g[slot].key}: a lora_B bias without its lora_A/lora_B pair"
            if slot == "up_bias" and "diff_b" in g:
                return f"{g['diff_b'].key} and {g[slot].key} both update {entry.name('diffusers')}"
            if pair is not None and entry is mod.weight:
                return (f"{g[slot].key}: {mod.name} has both a low-rank pair and a full delta; loaders disagree on "
                        "that (ComfyUI and diffusers apply only the delta, LightX2V both), so wanport refuses it")
            self.targets[entry] = Target(entry, full=full, full_scale=pair.factor if slot == "up_bias" else 1.0)
            self.full_kinds[{"modulation": "diff_m", "up_bias": "lora_B.bias"}.get(slot, slot)] += 1
        return None

    def _pair(self, mod: Module, g: dict[str, _Key]) -> Pair | str:
        e = mod.weight
        if mod.is_param or e.kind not in ("linear", "conv3d"):
            return f"{g['up'].key}: a low-rank pair on {mod.name}, which is not a linear or convolution layer"
        up, down = self.f.get(g["up"].key, copy=False), self.f.get(g["down"].key, copy=False)
        if bad := _pair_shape_problem(up, down, e, self.check):
            return f"{mod.name}: {bad}"
        alpha, rslora = None, False
        if "alpha" in g:
            a = self.f.get(g["alpha"].key)
            if a.size != 1:
                return f"{g['alpha'].key} should hold one number (the alpha), holds shape {list(a.shape)}"
            alpha = float(a.reshape(-1)[0])
            self.alpha_from.add(".alpha keys")
        elif self.conf is not None:
            alpha, promised = _peft_alpha(self.conf, mod.name)
            rslora = bool(self.conf.get("use_rslora", False))
            if promised != down.shape[0]:
                return (f"{mod.name}: the PEFT config gives it rank {promised}, its matrices have rank {down.shape[0]}; "
                        "config and weights do not belong together")
            self.alpha_from.add("PEFT config")
        pair = Pair(up, down, alpha, rslora)
        self.pairs.append(pair)
        self.targets[e] = Target(e, pair=pair)
        return pair


def _pair_shape_problem(up: np.ndarray, down: np.ndarray, e: Entry, check: bool) -> str | None:
    if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0] or math.prod(up.shape[2:]) != 1:
        return f"up {list(up.shape)} and down {list(down.shape)} do not form a low-rank pair (up: out x rank, down: rank x in)"
    if check and (up.shape[0], *down.shape[1:]) != (e.shape[0], *e.shape[1:]):
        return (f"up {list(up.shape)} @ down {list(down.shape)} does not fit {e.name('diffusers')} {list(e.shape)} "
                "(a LoRA for another model size?)")
    return None


