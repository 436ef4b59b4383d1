"""Helpers shared by the bench scripts: full-size random-weight models without init-time memory spikes."""

from __future__ import annotations

import functools
import math
import os
import sys
import time

import jax  # importing starts no backend: safe in the parent process of the bench scripts
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_dit(cfg, *, dtype="bfloat16", attention_backend: str = "auto", seed: int = 0, device=None):
    """A WanTransformer with N(0, 0.02) weights made directly in `dtype` (see `random_module`)."""
    from jax_impl.dit import WanTransformer

    dtype = jnp.dtype(dtype)
    return random_module(lambda: WanTransformer(cfg, dtype=dtype, attention_backend=attention_backend,
                                                rngs=nnx.Rngs(0)), seed=seed, device=device)


def random_module(factory, *, seed: int = 0, std: float = 0.02, device=None, slice_bytes: int = 1 << 28):
    """The NNX module `factory()` builds, with N(0, std) weights made one parameter at a time in its own dtype.

    Building the model inside one jit would make every float32 random tensor at once (about 2x the model in
    float32 for a 14B expert); filling an abstract model leaf by leaf, and a leaf whose float32 draw exceeds
    `slice_bytes` a slice of its first axis at a time into a donated buffer, keeps the peak at the model's
    size plus one slice (drawing a whole stacked [40, 5120, 13824] leaf at once cost ~22 GiB of float32 bits
    and normals on an H100, which inflated the measured device peak of the forward). Norm gains ("scale",
    "*_norm") are 1, as in a real checkpoint.
    """
    abstract = nnx.eval_shape(factory)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    device = device or jax.devices()[0]
    key = jax.random.key(seed)
    with jax.default_device(device):
        for i, (path, var) in enumerate(flat):
            shape, dt = var.value.shape, var.value.dtype
            name = str(path[-1])
            if name == "scale" or name.endswith("norm"):
                var.value = jnp.ones(shape, dt)
            else:
                var.value = _sliced_normal(jax.random.fold_in(key, i), shape, dt, std, slice_bytes)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _sliced_normal(key, shape: tuple[int, ...], dtype, std: float, slice_bytes: int):
    row_bytes = 4 * math.prod(shape[1:]) if shape else 4
    if not shape or shape[0] * row_bytes <= slice_bytes or shape[0] == 1:
        return _normal(key, shape, dtype, std)
    rows = max(1, slice_bytes // row_bytes)
    out = jnp.zeros(shape, dtype)
    for start in range(0, shape[0], rows):
        n = min(rows, shape[0] - start)
        out = _put_rows(out, _normal(jax.random.fold_in(key, start), (n, *shape[1:]), dtype, std), jnp.int32(start))
    return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key, shape, dtype, std):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(buf, rows, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, rows, start, axis=0)


# A bench child that holds a whole model (or two A14B experts) gets 94% of the card for JAX's pool instead of
# its default 75%; the parent starts no backend, so nothing else competes for the memory.
JAX_CHILD_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.94"}


def child_env() -> dict[str, str]:
    """The environment for a JAX bench child: ours, with JAX_CHILD_ENV where the user has not set those."""
    return JAX_CHILD_ENV | dict(os.environ)


def memory_analysis(compiled) -> dict:
    """XLA's own account of a compiled program's buffers (bytes): argument, output, temp, alias."""
    try:
        m = compiled.memory_analysis()
        return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    except Exception as e:  # not every platform implements it
        return {"error": str(e)}


def place_experts(experts, mode: str, schedule, noise, inputs, guidance: float, *, cfg_batch: bool = True) -> dict:
    """Keep every expert on the device, or move all but the first to host memory (`sampling.sample` brings each
    in at its switch). mode "yes" / "no" decides; "auto" keeps them resident when both experts' weights plus XLA's
    memory analysis of one guided step (the largest program of a run) fit in 97% of JAX's pool. Returns what the
    decision rested on, for the bench's JSON."""
    from jax_impl import sampling, schedulers

    graphdef, params = nnx.split(experts[0])
    model_bytes = sum(x.nbytes for m in experts for x in jax.tree.leaves(nnx.state(m)))
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform == "gpu" else None
    # compiled here, this step is the one the run calls later (jit shares the executable)
    step = memory_analysis(sampling.denoise_step.lower(
        graphdef, params, schedulers.init_state(schedule, noise), jnp.int32(0), jnp.float32(schedule.timesteps[0]),
        inputs, jnp.float32(guidance), jnp.int32(-1), guided=True, cfg_batch=cfg_batch).compile())
    need = None
    if "temp" in step:
        expert_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        need = model_bytes + step["argument"] - expert_bytes + step["temp"] + step["output"]
    if mode == "auto":
        offloaded = bool(limit and (need is None or need > 0.97 * limit))
    else:
        offloaded = mode == "yes"
    if offloaded:
        for m in experts[1:]:
            sampling.offload(m)
    return {"model_bytes": model_bytes, "offloaded": offloaded, "pool_bytes": limit, "step_memory": step,
            "resident_need_bytes": need}


OFFLOAD_HELP = ("keep the idle expert in host memory (auto: when both experts' weights and XLA's memory analysis of "
                "one guided step would not fit in 97%% of JAX's pool)")


def median_time(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of `repeats` calls of `fn` (each blocked until done) after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def peak_bytes(device=None) -> int | None:
    """Peak device memory in use so far (None where the platform does not report it)."""
    try:
        return (device or jax.devices()[0]).memory_stats().get("peak_bytes_in_use")
    except Exception:
        return None
