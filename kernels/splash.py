"""TPU Splash Attention behind `kernels.attention(..., backend="splash")`.

Splash tiles q and k/v into fixed blocks and refuses sequence lengths that are not block multiples.
Wan's lengths are not (32760 and 75600 video tokens, 257 image tokens), so we pad both sequences up,
give the padded KEYS their own segment id so no real query puts softmax weight on them, and slice the
padded QUERY rows off the output. Padding keys with zeros alone is wrong: a zero key still scores
exp(0) = 1 against every query and drags the output toward the mean of the padded values.

Splash does not scale by 1/sqrt(head_dim) itself, so q is scaled before the kernel. Off TPU the Pallas
kernel runs in interpret mode (slow but exact), which is how CI tests it on CPU; inside `compile_for(gen)`
it is built for a TPU of that generation even on a CPU host (ahead-of-time compiles, `jax_impl.tpu_compile`).

Block sizes come from one table per TPU generation (`BLOCKS`, reasons beside each row); explicit
`block_*` arguments override it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

LANES = 128  # TPU lane width: every block size must be a multiple of it

# Defaults for Wan: 32760 self-attention tokens pad to 32768 with these, 75600 to 75776 (0.2 %);
# short cross-attention sequences (512 text, 257 image) shrink the block to the padded length instead.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 1024
DEFAULT_BLOCK_KV_COMPUTE = 512


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Splash forward block sizes: q rows per block, k/v rows fetched per block, k/v rows per inner matmul."""

    block_q: int
    block_kv: int
    block_kv_compute: int


# Per generation. A q block reuses each fetched k/v block for 4 * block_q * head_dim flops per
# 4 * head_dim bytes, so block_q is its arithmetic intensity (flop/byte) against the HBM stream of K/V.
# Rule: block_q = the smallest power of two >= 2x the chip's ridge point (peak bf16 FLOP/s / HBM bytes/s,
# Google Cloud's published figures, see TPU_SPECS in jax_impl/tpu_compile.py), so streaming K/V costs at
# most half the matmul time; block_kv_compute = 4 MXU widths (128 on v5, 256 on v6e/TPU7x); block_kv
# 1-2x that. Each row is checked to compile for its generation at head_dim 128 within the default
# scoped VMEM (16 MiB on v5e/v5p: 2048/2048/512 does not fit there). Not tuned by running: no TPU.
BLOCKS: dict[str, Blocks] = {
    "v5e": Blocks(512, 1024, 512),  # ridge 197e12 / 819e9 = 240 flop/B -> 512
    "v5p": Blocks(512, 1024, 512),  # ridge 459e12 / 2765e9 = 166 -> 512
    "v6e": Blocks(2048, 2048, 1024),  # ridge 918e12 / 1638e9 = 560 -> 2048; 256-wide MXUs
    "v7x": Blocks(1024, 2048, 1024),  # ridge 2307e12 / 7380e9 = 313 -> 1024; 256-wide MXUs
}
DEFAULT_BLOCKS = Blocks(DEFAULT_BLOCK_Q, DEFAULT_BLOCK_KV, DEFAULT_BLOCK_KV_COMPUTE)  # other platforms

# device_kind prefixes (as JAX reports them) -> generation, most specific first.
DEVICE_KINDS = (("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5p", "v5p"), ("TPU v5", "v5p"),
                ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("TPU7x", "v7x"), ("TPU v7", "v7x"))

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("splash_target", default=None)


def generation(device_kind: str) -> str | None:
    """The BLOCKS key of a JAX `device_kind` ("TPU v5 lite" -> "v5e"), or None if it is not in the table."""
    for prefix, gen in DEVICE_KINDS:
        if device_kind.startswith(prefix):
            return gen
    return None


@contextlib.contextmanager
def compile_for(gen: str) -> Iterator[None]:
    """Within this block, splash is traced as the compiled TPU kernel (never interpreted) with `gen`'s blocks.

    For ahead-of-time compiles on a CPU host: the traced function must also be lowered for TPU devices.
    """
    if gen not in BLOCKS:
        raise ValueError(f"unknown TPU generation {gen!r}; known: {', '.join(BLOCKS)}")
    token = _TARGET.set(gen)
    try:
        yield
    finally:
        _TARGET.reset(token)


def current_blocks() -> tuple[str | None, Blocks]:
    """(generation, block sizes) splash uses now: the `compile_for` target, else the TPU it runs on."""
    gen = _TARGET.get()
    if gen is None and jax.default_backend() == "tpu":
        gen = generation(jax.devices()[0].device_kind)
    return gen, BLOCKS.get(gen, DEFAULT_BLOCKS)


REAL, PADDING = 0, 1  # segment ids: queries are all REAL, so they only attend to REAL keys


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check_block(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0 or value % LANES:
        raise ValueError(f"splash {name} must be a positive multiple of {LANES}, got {value!r}")


def fit_blocks(q_len: int, kv_len: int, block_q: int, block_kv: int, block_kv_compute: int) -> tuple[int, int, int]:
    """Block sizes actually used: never larger than the sequence rounded up to a lane multiple,
    so a 512-token text sequence is not padded to a 1024 block."""
    for name, value in (("block_q", block_q), ("block_kv", block_kv), ("block_kv_compute", block_kv_compute)):
        _check_block(name, value)
    bq = min(block_q, _round_up(q_len, LANES))
    bkv = min(block_kv, _round_up(kv_len, LANES))
    bkvc = min(block_kv_compute, bkv)
    if bkv % bkvc:  # the kernel wants block_kv to be a multiple of block_kv_compute
        bkvc = bkv
    return bq, bkv, bkvc


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, q_len: int, kv_len: int, bq: int, bkv: int, bkvc: int, interpret: bool):
    """One kernel per padded shape; building it processes the mask in numpy, so cache it."""
    mask = sa.MultiHeadMask([sa.FullMask((q_len, kv_len)) for _ in range(heads)])
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkvc)
    with jax.ensure_compile_time_eval():  # mask metadata must be concrete, even when traced under jit
        return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_padded(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_q: int,
    block_kv: int,
    block_kv_compute: int,
    interpret: bool,
    mask_padded_keys: bool,
) -> jax.Array:
    """Pad, run splash per batch element, unpad. `mask_padded_keys=False` exists only so a test can
    show that the unmasked variant is wrong; the public entry point always masks."""
    b, q_len, heads, d = q.shape
    kv_len = k.shape[1]
    bq, bkv, bkvc = fit_blocks(q_len, kv_len, block_q, block_kv, block_kv_compute)
    q_pad, kv_pad = _round_up(q_len, bq), _round_up(kv_len, bkv)

    scale = 1.0 / math.sqrt(d)
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)

    def to_hsd(x: jax.Array, length: int) -> jax.Array:  # [b, s, h, d] -> [b, h, s_padded, d]
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    qh, kh, vh = to_hsd(qs, q_pad), to_hsd(k, kv_pad), to_hsd(v, kv_pad)
    kv_ids = jnp.where(jnp.arange(kv_pad) < kv_len, REAL, PADDING) if mask_padded_keys else jnp.full(kv_pad, REAL)
    segments = sa.SegmentIds(q=jnp.full(q_pad, REAL, jnp.int32), kv=kv_ids.astype(jnp.int32))
    kernel = _kernel(heads, q_pad, kv_pad, bq, bkv, bkvc, interpret)
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(qh, kh, vh, segments)  # [b, h, q_pad, d]
    return out.transpose(0, 2, 1, 3)[:, :q_len]


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_q: int | None = None,
    block_kv: int | None = None,
    block_kv_compute: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Splash attention on `[batch, seq, heads, head_dim]` inputs of any sequence lengths.

    Block sizes left None come from `BLOCKS` (`current_blocks`). `interpret=None` runs the compiled kernel
    on TPU or inside `compile_for`, and the Pallas interpreter everywhere else.
    """
    _, blocks = current_blocks()
    if interpret is None:
        interpret = _TARGET.get() is None and jax.default_backend() != "tpu"
    return _splash_padded(
        q,
        k,
        v,
        block_q=blocks.block_q if block_q is None else block_q,
        block_kv=blocks.block_kv if block_kv is None else block_kv,
        block_kv_compute=blocks.block_kv_compute if block_kv_compute is None else block_kv_compute,
        interpret=bool(interpret),
        mask_padded_keys=True,
    )


__all__ = ["splash_attention", "fit_blocks", "compile_for", "current_blocks", "generation", "Blocks", "BLOCKS",
           "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_KV", "DEFAULT_BLOCK_KV_COMPUTE"]
