"""TPU Splash Attention behind `kernels.attention(..., backend="splash")`.

Splash tiles q and k/v into fixed blocks and refuses sequence lengths that are not block multiples.
Wan's lengths are not (32760 and 75600 video tokens, 257 image tokens), so we pad both sequences up,
give the padded KEYS their own segment id so no real query puts softmax weight on them, and slice the
padded QUERY rows off the output. Padding keys with zeros alone is wrong: a zero key still scores
exp(0) = 1 against every query and drags the output toward the mean of the padded values.

Splash does not scale by 1/sqrt(head_dim) itself, so q is scaled before the kernel. Off TPU the Pallas
kernel runs in interpret mode (slow but exact), which is how CI tests it on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

LANES = 128  # TPU lane width: every block size must be a multiple of it

# Defaults for Wan: 32760 self-attention tokens pad to 32768 with these, 75600 to 75776 (0.2 %);
# short cross-attention sequences (512 text, 257 image) shrink the block to the padded length instead.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 1024
DEFAULT_BLOCK_KV_COMPUTE = 512

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
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
    block_kv_compute: int = DEFAULT_BLOCK_KV_COMPUTE,
    interpret: bool | None = None,
) -> jax.Array:
    """Splash attention on `[batch, seq, heads, head_dim]` inputs of any sequence lengths.

    `interpret=None` runs the compiled kernel on TPU and the Pallas interpreter everywhere else.
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    return _splash_padded(
        q,
        k,
        v,
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv_compute,
        interpret=bool(interpret),
        mask_padded_keys=True,
    )


__all__ = ["splash_attention", "fit_blocks", "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_KV", "DEFAULT_BLOCK_KV_COMPUTE"]
