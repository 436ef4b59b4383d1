"""Attention throughput at Wan's real shapes: JAX (cuDNN) against torch SDPA (flash and cuDNN back-ends).

    python bench/attention.py --json attention.json      # on an NVIDIA GPU, bf16, 40 heads x 128
    python bench/attention.py --tiny                     # tiny shapes, runs anywhere (CI keeps it working)

TFLOP/s counts 4 * B * H * Sq * Sk * D flops per call (two matmuls, multiply-add = 2 flops), the usual
convention, so numbers compare with published attention benchmarks. Each implementation is warmed up
(compilation, autotuning) and then timed call by call with explicit synchronisation; we report the median.
One implementation failing (e.g. a back-end missing on this machine) is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch in the same process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int

    @property
    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim


WAN_SHAPES = [
    Shape("self 480p (32760)", 1, 40, 32760, 32760, 128),
    Shape("self 720p (75600)", 1, 40, 75600, 75600, 128),
    Shape("cross text (32760x512)", 1, 40, 32760, 512, 128),
]
TINY_SHAPES = [
    Shape("tiny self (256)", 1, 2, 256, 256, 64),
    Shape("tiny cross (256x77)", 1, 2, 256, 77, 64),
]
GPU_IMPLS = ["jax-cudnn", "torch-flash", "torch-cudnn"]
TINY_IMPLS = ["jax-xla", "torch-math"] + GPU_IMPLS  # GPU ones are recorded as skipped off-GPU
# Timing probes, not back-ends: JAX's Pallas Mosaic GPU flash attention for Hopper (FA3-style warp specialisation)
# with block_kv 128 or 64. It takes no mask, so q and kv are zero-padded to a multiple of 128 (32760 -> 32768):
# the padded keys change the result (a back-end would have to correct it with the returned log-sum-exp); TFLOP/s
# count the unpadded shape's FLOPs, the useful work.
PROBE_IMPLS = ["jax-mosaic-kv128", "jax-mosaic-kv64"]


def _inputs(shape: Shape, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(shape.batch, shape.q_len), (shape.batch, shape.kv_len), (shape.batch, shape.kv_len)]
    return [rng.standard_normal((*s, shape.heads, shape.head_dim), dtype=np.float32) for s in sizes]


def _time(call: Callable[[], None], warmup: int, repeats: int, clock: Callable[[Callable[[], None]], float]) -> list[float]:
    for _ in range(warmup):
        call()
    return [clock(call) for _ in range(repeats)]


def _host_clock(sync: Callable[[], None]) -> Callable[[Callable[[], None]], float]:
    def clock(call):
        sync()
        start = time.perf_counter()
        call()
        sync()
        return (time.perf_counter() - start) * 1e3

    return clock


def _cuda_clock(call) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _jax_runner(impl: str, arrays: list[np.ndarray], dtype) -> Callable[[], None]:
    import kernels

    backend = impl.removeprefix("jax-")
    if backend == "cudnn" and jax.default_backend() != "gpu":
        raise _Skip("needs JAX on an NVIDIA GPU")
    q, k, v = (jnp.asarray(a, dtype) for a in arrays)
    fn = jax.jit(lambda q, k, v: kernels.attention(q, k, v, backend=backend))
    return lambda: fn(q, k, v).block_until_ready()


def _mosaic_runner(impl: str, arrays: list[np.ndarray], dtype) -> Callable[[], None]:
    if jax.default_backend() != "gpu":
        raise _Skip("needs JAX on a Hopper GPU")
    import functools

    from jax.experimental.pallas.ops.gpu import attention_mgpu

    def padded(a: np.ndarray) -> jax.Array:
        return jnp.asarray(np.pad(a, ((0, 0), (0, -a.shape[1] % 128), (0, 0), (0, 0))), dtype)

    q, k, v = (padded(a) for a in arrays)
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=int(impl.rsplit("kv", 1)[1]), max_concurrent_steps=2)
    fn = jax.jit(functools.partial(attention_mgpu.attention, config=config))
    return lambda: fn(q, k, v).block_until_ready()


_TORCH_KERNELS = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION", "torch-math": "MATH"}


def _torch_runner(impl: str, arrays: list[np.ndarray], dtype) -> Callable[[], None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if impl != "torch-math" and not torch.cuda.is_available():
        raise _Skip("needs torch with CUDA")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16, jnp.float32: torch.float32}[dtype]
    q, k, v = (torch.from_numpy(a).to(device, tdtype).transpose(1, 2).contiguous() for a in arrays)
    backend = getattr(SDPBackend, _TORCH_KERNELS[impl])

    @torch.no_grad()
    def call():
        with sdpa_kernel(backend):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return call


class _Skip(Exception):
    """The implementation cannot run on this machine (not an error)."""


def bench(shapes: list[Shape], impls: list[str], dtype, warmup: int, repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        arrays = _inputs(shape)
        for impl in impls:
            row = {"shape": shape.name, **dataclasses.asdict(shape), "impl": impl, "dtype": jnp.dtype(dtype).name}
            try:
                if impl.startswith("jax-mosaic"):
                    call = _mosaic_runner(impl, arrays, dtype)
                    clock = _host_clock(lambda: None)
                elif impl.startswith("jax-"):
                    call = _jax_runner(impl, arrays, dtype)
                    clock = _host_clock(lambda: None)  # the runner blocks until ready itself
                else:
                    call = _torch_runner(impl, arrays, dtype)
                    clock = _cuda_clock if torch.cuda.is_available() else _host_clock(lambda: None)
                times = _time(call, warmup, repeats, clock)
                median = statistics.median(times)
                row |= {"status": "ok", "median_ms": median, "min_ms": min(times), "tflops": shape.flops / (median * 1e-3) / 1e12}
            except _Skip as why:
                row |= {"status": f"skipped: {why}"}
            except Exception as err:  # noqa: BLE001 - one back-end failing must not hide the others' numbers
                row |= {"status": f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
            finally:
                call = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'shape':<26} {'impl':<12} {'median ms':>10} {'TFLOP/s':>9}  status"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"{r['shape']:<26} {r['impl']:<12} {r['median_ms']:>10.3f} {r['tflops']:>9.2f}  ok")
        else:
            lines.append(f"{r['shape']:<26} {r['impl']:<12} {'-':>10} {'-':>9}  {r['status']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes plus CPU-capable impls (for CI)")
    parser.add_argument("--impls", help=f"comma list; default {','.join(GPU_IMPLS)} ({','.join(TINY_IMPLS)} with --tiny); "
                                        f"timing probes: {','.join(PROBE_IMPLS)}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    impls = args.impls.split(",") if args.impls else (TINY_IMPLS if args.tiny else GPU_IMPLS)
    unknown = [i for i in impls if i not in set(TINY_IMPLS + PROBE_IMPLS)]
    if unknown:
        parser.error(f"unknown impl(s) {unknown}; choose from {', '.join(TINY_IMPLS + PROBE_IMPLS)}")
    dtype = getattr(jnp, args.dtype)
    rows = bench(TINY_SHAPES if args.tiny else WAN_SHAPES, impls, dtype, args.warmup, args.repeats)
    print(table(rows))
    if args.json:
        meta = {
            "jax": jax.__version__,
            "jax_platform": jax.default_backend(),
            "jax_devices": [d.device_kind for d in jax.devices()],
            "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "host": platform.node(),
            "flops_formula": "4*B*H*Sq*Sk*D",
            "warmup": args.warmup,
            "repeats": args.repeats,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
