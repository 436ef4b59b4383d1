"""Per-layer error of one JAX DiT against another on the same input (FP8 vs bf16, bf16 vs float32).

Both models run the same forward; the reference's taps are kept on the device and the other model's are
compared to them inside its own jitted forward, block by block under the scan, so only one scalar per tap comes
back and the compared model's activations are never stacked. Memory: the reference's stacked block taps (one
[layers, B, L, D] array per tap kind) plus one model at a time, so `fp8_layer_errors` can run an A14B expert at
480p x 81 frames on one 80 GB GPU with `sublayers=False` (block outputs only: 40 x 335 MB in bf16).

The rows are rel L2 = |test - ref| / |ref| per tap, in forward order: embeddings, each block's self_attn /
cross_attn / ffn (with `sublayers`) and output, then head and output. `format_layer_errors` prints them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.dit import WanTransformer, set_attention_backend, token_grid
from jax_impl.rope import rope_tables
from jax_impl.fp8 import quantize_model
from jax_impl.frozen_jit import frozen_jit
from weights.configs.presets import get_preset

F32 = jnp.float32
SUBLAYERS = ("self_attn", "cross_attn", "ffn")
EMBED_TAPS = ("patch_embedding", "time_embedding", "time_projection", "text_embedding", "image_embedding")


@dataclasses.dataclass(frozen=True)
class LayerError:
    name: str
    rel_l2: float


def _rel_l2(a: jax.Array, b: jax.Array) -> jax.Array:
    # the barrier keeps XLA from folding this float32 cast into the producing matmul, which would skip the
    # model's own bf16 rounding and report an error the real forward does not have
    a, b = jax.lax.optimization_barrier((a, b))
    d = a.astype(F32) - b.astype(F32)
    return jnp.sqrt(jnp.sum(d * d)) / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(b.astype(F32)))), 1e-30)


def _forward(model: WanTransformer, inputs, block_fn: Callable, xs):
    """The DiT forward (no context parallel) with `block_fn(block_taps, xs_i) -> y` run after every block;
    returns (embedding taps, stacked y, head tokens, output)."""
    latents, timestep, text, image = inputs
    grid = token_grid(model.cfg, *latents.shape[1:4])
    x, temb, mod, context, context_img, taps = model.embed(latents, jnp.asarray(timestep), text, image)
    rope = rope_tables(grid, model.cfg.rope_split, model.cfg.rope_max_seq_len)

    def step(block, x, xs_i):
        x, block_taps = block(x, context, context_img, mod, rope, (None, None))
        return x, block_fn(block_taps, xs_i)

    x, ys = model.scan_blocks(x, step, xs)
    head, out = model.apply_head(x, temb, latents.shape)
    return taps, ys, head, out


def _tap_kinds(sublayers: bool) -> tuple[str, ...]:
    return (SUBLAYERS + ("output",)) if sublayers else ("output",)


@frozen_jit(static_argnames=("sublayers",))
def reference_taps(model: WanTransformer, inputs, sublayers: bool = True) -> dict:
    """The reference run: {"embed": {...}, "blocks": {kind: [layers, B, L, D]}, "head": ..., "output": ...}."""
    kinds = _tap_kinds(sublayers)
    taps, ys, head, out = _forward(model, inputs, lambda t, _: {k: t[k] for k in kinds}, None)
    return {"embed": taps, "blocks": ys, "head": head, "output": out}


@frozen_jit
def _compare(model: WanTransformer, inputs, ref: dict) -> dict:
    kinds = tuple(ref["blocks"])
    taps, ys, head, out = _forward(model, inputs, lambda t, r: {k: _rel_l2(t[k], r[k]) for k in kinds}, ref["blocks"])
    return {"embed": {k: _rel_l2(taps[k], ref["embed"][k]) for k in ref["embed"]}, "blocks": ys,
            "head": _rel_l2(head, ref["head"]), "output": _rel_l2(out, ref["output"])}


def compare_to_reference(model: WanTransformer, inputs, ref: dict) -> list[LayerError]:
    """Run `model` on `inputs` (latents, timestep, text, image) and compare every tap to `ref` (`reference_taps`
    of the same inputs), in forward order."""
    errs = jax.device_get(_compare(model, inputs, ref))
    rows = [LayerError(k, float(errs["embed"][k])) for k in EMBED_TAPS if k in errs["embed"]]
    kinds = [k for k in SUBLAYERS + ("output",) if k in errs["blocks"]]
    for i in range(model.cfg.num_layers):
        rows += [LayerError(f"blocks.{i}.{k}", float(errs["blocks"][k][i])) for k in kinds]
    return rows + [LayerError("head", float(errs["head"])), LayerError("output", float(errs["output"]))]


def layer_errors(ref_model: WanTransformer, model: WanTransformer, inputs, *, sublayers: bool = True) -> list[LayerError]:
    """Per-layer rel L2 of `model` against `ref_model`, both run on `inputs` (latents, timestep, text, image)."""
    ref = reference_taps(ref_model, inputs, sublayers)
    return compare_to_reference(model, inputs, ref)


def fp8_layer_errors(model: WanTransformer, inputs, *, sublayers: bool = True, weight_scaling: str = "channel",
                     act_scaling: str | None = "token", attention_backend: str | None = None) -> list[LayerError]:
    """The FP8 DiT against the bf16 one: runs `model` as it is, quantises it IN PLACE (jax_impl.fp8.quantize_model:
    the block linears become Fp8Dense) and runs it again. One copy of the weights at a time; `model` is FP8 after.
    `attention_backend` (e.g. "cudnn_fp8"): the FP8 run's attention back-end (default: the model's own)."""
    ref = reference_taps(model, inputs, sublayers)
    # The reference taps wait in host memory while the model is quantised: quantising a stacked [40, 5120, 13824]
    # weight briefly needs float32 copies of it, and beside the bf16 weights and 13 GiB of taps that ran an
    # A14B expert at 480p x 81 frames out of an 80 GB card's memory.
    ref = jax.device_get(ref)
    quantize_model(model, weight_scaling=weight_scaling, act_scaling=act_scaling)
    if attention_backend is not None:
        set_attention_backend(model, attention_backend)
    return compare_to_reference(model, inputs, jax.device_put(ref))


def format_layer_errors(rows: list[LayerError], title: str = "per-layer rel L2") -> str:
    """A table: one line per tap, blocks' taps side by side, and the worst block and final output's error."""
    lines = [title]
    blocks: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.name.startswith("blocks."):
            _, i, kind = r.name.split(".", 2)
            blocks.setdefault(int(i), {})[kind] = r.rel_l2
    kinds = list(next(iter(blocks.values()), {}))
    for r in rows:
        if not r.name.startswith("blocks.") and r.name not in ("head", "output"):
            lines.append(f"  {r.name:<18} {r.rel_l2:>10.3e}")
    if blocks:
        lines.append(f"  {'block':<18} " + " ".join(f"{k:>10}" for k in kinds))
        for i, errs in sorted(blocks.items()):
            lines.append(f"  {i:<18} " + " ".join(f"{errs[k]:>10.3e}" for k in kinds))
    for r in rows:
        if r.name in ("head", "output"):
            lines.append(f"  {r.name:<18} {r.rel_l2:>10.3e}")
    if blocks:
        worst = max((r for r in rows if r.name.startswith("blocks.")), key=lambda r: r.rel_l2)
        lines.append(f"  worst block tap: {worst.name} {worst.rel_l2:.3e}")
    return "\n".join(lines)


def random_fp8_table(preset: str = "tiny-wan2.1-t2v-1.3b", *, seed: int = 0, latent_shape=(3, 10, 14),
                     sublayers: bool = True) -> str:
    """The FP8-vs-bf16 table of a preset's DiT with random (NNX-initialised) weights on random inputs: what a CLI
    prints for `--precision fp8` checks on tiny presets (full-size ones: bench/fp8.py, on a GPU)."""
    import numpy as np

    cfg = get_preset(preset).transformer
    r = np.random.default_rng(seed)
    inputs = (jnp.asarray(r.standard_normal((1, *latent_shape, cfg.in_channels)), F32), jnp.array([500.0], F32),
              jnp.asarray(r.standard_normal((1, 7, cfg.text_dim)), F32),
              jnp.asarray(r.standard_normal((1, 5, cfg.image_dim)), F32) if cfg.has_image_tokens else None)
    model = WanTransformer(cfg, dtype=jnp.bfloat16, attention_backend="xla", rngs=nnx.Rngs(seed))
    rows = fp8_layer_errors(model, inputs, sublayers=sublayers)
    return format_layer_errors(rows, f"per-layer rel L2, FP8 vs bf16 DiT ({preset}, random weights, seed {seed})")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Print the FP8-vs-bf16 per-layer error table of a (tiny) preset's DiT "
                                             "with random weights.")
    ap.add_argument("--preset", default="tiny-wan2.1-t2v-1.3b")
    ap.add_argument("--seed", type=int, default=0)
    cli = ap.parse_args()
    print(random_fp8_table(cli.preset, seed=cli.seed))


__all__ = ["LayerError", "compare_to_reference", "fp8_layer_errors", "format_layer_errors", "layer_errors",
           "random_fp8_table", "reference_taps"]
