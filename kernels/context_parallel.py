"""Context parallelism: the token (sequence) axis of attention split over one axis of a device mesh.

Each device keeps its slice of the queries. For self-attention, the keys and values are split the same
way, so each device all-gathers them to full length and then attends its query slice to all of them;
for cross-attention (text or image tokens) the keys and values are already whole on every device.
The local attention is `kernels.backends.local_attention` with the configured back-end, so cuDNN
(or splash) still does the work; only the K/V all-gather is added.

Uneven lengths: a sharded axis must divide evenly, so callers pad the token axis at its END up to a
multiple of the device count (`SequenceSplit.padded`). After the all-gather the keys/values are cut
back to the true length `kv_len` before the local call, so padded keys never enter the softmax and
no mask is needed (masks cost memory and are not supported by every back-end). Padded query rows
produce finite values that the caller drops.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kernels.backends import local_attention


@dataclasses.dataclass(frozen=True)
class SequenceSplit:
    """How the token axis is split: `mesh` and its `axis`; `kv_len` set only for self-attention.

    kv_len=None: keys/values are replicated (cross-attention). kv_len=n: keys/values are split over
    `axis` like the queries; after the gather, the first n (the real, unpadded tokens) are kept.
    """

    mesh: Mesh
    axis: str = "devices"
    kv_len: int | None = None

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]

    def padded(self, n: int) -> int:
        """n rounded up to a multiple of the number of devices along the axis."""
        return -(-n // self.size) * self.size

    def with_kv_len(self, kv_len: int | None) -> SequenceSplit:
        return dataclasses.replace(self, kv_len=kv_len)

    def tokens(self, x: jax.Array) -> jax.Array:
        """Constrain x `[batch, tokens, ...]` to be split over the axis along tokens."""
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(None, self.axis)))

    def replicated(self, tree):
        """Constrain every array in `tree` to be whole on every device (an all-gather of FSDP weights)."""
        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def pad_axis(x: jax.Array, axis: int, to: int) -> jax.Array:
    """Zero-pad `x` at the end of `axis` up to length `to` (a no-op when it already has that length)."""
    extra = to - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot pad axis {axis} of length {x.shape[axis]} down to {to}")
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def split_attention(q: jax.Array, k: jax.Array, v: jax.Array, split: SequenceSplit, **attention_kw) -> jax.Array:
    """Attention with q split by sequence over `split.axis`; see the module docstring.

    `attention_kw` (backend and its options) go to the local attention call unchanged.
    """
    n = split.size
    if q.shape[1] % n:
        raise ValueError(
            f"context-parallel attention splits {q.shape[1]} query tokens over {n} devices ('{split.axis}'), "
            f"which does not divide; pad the token axis to {split.padded(q.shape[1])} first "
            "(WanTransformer does this when given seq_split) or use a device count that divides it"
        )
    if attention_kw.get("mask") is not None:
        raise ValueError("context-parallel attention takes no mask; padded keys are cut off after the gather")
    attention_kw.pop("mask", None)
    split_spec = P(None, split.axis)
    if split.kv_len is None:
        kv_spec = P()  # cross-attention: text/image keys and values whole on every device

        def local(q, k, v):
            return local_attention(q, k, v, **attention_kw)

    else:
        if k.shape[1] % n or not 0 < split.kv_len <= k.shape[1]:
            raise ValueError(f"self-attention keys of length {k.shape[1]} cannot be split {n} ways keeping "
                             f"{split.kv_len}; pad them like the queries")
        kv_spec = split_spec

        def local(q, k, v):
            k = jax.lax.all_gather(k, split.axis, axis=1, tiled=True)[:, : split.kv_len]
            v = jax.lax.all_gather(v, split.axis, axis=1, tiled=True)[:, : split.kv_len]
            return local_attention(q, k, v, **attention_kw)

    fn = jax.shard_map(
        local, mesh=split.mesh, in_specs=(split_spec, kv_spec, kv_spec), out_specs=split_spec, check_vma=False
    )
    return fn(q, k, v)


__all__ = ["SequenceSplit", "pad_axis", "split_attention"]
