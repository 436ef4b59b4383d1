"""Compile Wan for real TPU topologies on any host (a CPU is enough) and read what XLA says about it.

With `jax[tpu]` installed, libtpu compiles ahead of time for a named TPU topology without a TPU
(`jax.experimental.topologies`). Everything here is abstract: the models come from `nnx.eval_shape`, every
argument is a `jax.ShapeDtypeStruct` carrying the sharding it would have, so a 14B model costs no memory.
Compiled per target:

* the guided denoising step (`sampling.denoise_step`: CFG as a batch of 2, UniPC update) of the DiT in
  bf16, weights FSDP-split and tokens context-parallel over all devices (`jax_impl.sharding`), attention
  through the Splash TPU kernel with padding and key masking (`kernels.splash`, blocks for the generation);
* the VAE decode chunk steps (first and steady-state chunk) on one device, in diffusers' spatial tiles
  when whole frames would not fit (`jax_impl.vae_memory` does the accounting).

For each program: XLA's per-device argument, output, temporary and aliased bytes, the peak (argument +
output + temporary - alias) against the device's HBM, FLOPs and bytes accessed, compile time. XLA counts no
FLOPs inside the Splash custom call, so attention FLOPs are added from the shapes (`splash_flops`). The
time per step is a roofline ESTIMATE (max of FLOPs / peak and bytes / bandwidth): nothing runs on a TPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time
from typing import Any

from jax_impl import conditioning, sampling, schedulers, vae_memory
from jax_impl.dit import WanTransformer
from jax_impl.sharding import AXIS, param_shardings
from jax_impl.vae import WanVAE
from kernels import splash
from kernels.context_parallel import SequenceSplit
from kernels.splash import BLOCKS, fit_blocks
from weights.configs.presets import get_preset
from weights.configs.vae import get_vae_preset

GIB = 2**30


# --------------------------------------------------------------------------------------------------
# Chips and targets
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation, per chip, from Google Cloud's published specifications (`source`)."""

    generation: str  # kernels.splash.BLOCKS key
    topology_prefix: str  # libtpu's topology name prefix ("v5p:2x2x1")
    peak_bf16_flops: float  # FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    hbm_bytes: int  # per chip
    devices_per_chip: int  # JAX devices per chip (TPU7x shows its two TensorCores as two devices)
    name_counts_cores: bool  # "v5p-8" counts TensorCores (2 per chip); "v5e-8" counts chips
    dims: int  # 3-D torus (v5p, TPU7x) or 2-D (v5e, v6e)
    chips_per_host: int
    source: str


CHIPS: dict[str, Chip] = {
    "v5e": Chip("v5e", "v5e", 197e12, 819e9, 16 * GIB, 1, False, 2, 8, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "v5p", 459e12, 2765e9, 95 * GIB, 1, True, 3, 4, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "v6e", 918e12, 1638e9, 32 * GIB, 1, False, 2, 8, "https://cloud.google.com/tpu/docs/v6e"),
    "v7x": Chip("v7x", "tpu7x", 2307e12, 7380e9, 192 * GIB, 2, True, 3, 4,
                "https://cloud.google.com/tpu/docs/tpu7x"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "tpu7x": "v7x", "v6": "v6e"}

# Slice shapes by chip count (Google's documented shapes; 1 chip only for the 2-D generations).
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice as users name it (`v5p-8`), its libtpu topology (`v5p:2x2x1`) and its size."""

    name: str
    chip: Chip
    topology: str
    chips: int

    @property
    def devices(self) -> int:
        return self.chips * self.chip.devices_per_chip

    @property
    def hbm_per_device(self) -> int:
        return self.chip.hbm_bytes // self.chip.devices_per_chip

    @property
    def flops_per_device(self) -> float:
        return self.chip.peak_bf16_flops / self.chip.devices_per_chip

    @property
    def bandwidth_per_device(self) -> float:
        return self.chip.hbm_bandwidth / self.chip.devices_per_chip


def target_names(generation: str) -> list[str]:
    """Every slice name this module knows for one generation, smallest first."""
    chip = CHIPS[generation]
    shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    per = 2 if chip.name_counts_cores else 1
    return [f"{generation}-{n * per}" for n in shapes]


def parse_target(name: str) -> Target:
    """`v5p-8` (TensorCores: 4 chips), `v5e-8`/`v6e-8` (chips), `v7x-8` (TensorCores: 4 chips)."""
    m = re.fullmatch(r"(?:tpu)?(v\d[a-z]*|7x|v7x)-(\d+)", name.strip().lower())
    known = ", ".join(n for g in CHIPS for n in target_names(g)[:4]) + ", ..."
    if not m:
        raise ValueError(f"unknown TPU target {name!r}: use a slice name such as {known}")
    gen = m.group(1) if m.group(1) != "7x" else "v7x"
    gen = ALIASES.get(gen, gen)
    if gen not in CHIPS:
        raise ValueError(f"unknown TPU generation {m.group(1)!r} in {name!r}; known: {', '.join(CHIPS)}")
    chip, count = CHIPS[gen], int(m.group(2))
    chips, odd = divmod(count, 2) if chip.name_counts_cores else (count, 0)
    shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    if odd or chips not in shapes:
        raise ValueError(f"{name!r} is not a {gen} slice this tool knows; choose one of "
                         f"{', '.join(target_names(gen))}")
    return Target(f"{gen}-{count}", chip, f"{chip.topology_prefix}:{shapes[chips]}", chips)


def quiet_libtpu(target: Target | None = None) -> None:
    """Tell libtpu what it would otherwise try to discover on a TPU VM (and warn about at length on any
    other host). Only defaults: values already set, as on a real TPU VM, are kept."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name if target else "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if not has_tpu_devices():
        # libtpu takes a host-wide lock (/tmp/libtpu_lockfile) meant to keep two processes off one TPU; with
        # no TPU here it would only stop two compiles (or a test run beside a bench) from running at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def has_tpu_devices() -> bool:
    """Whether this host has TPU chips attached (their device files), i.e. is a TPU VM."""
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def libtpu_available() -> str | None:
    """None if TPU topologies can be compiled for here, else the reason (with the fix)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return "libtpu is not installed: pip install -e '.[tpu]' (it brings jax[tpu], pinned to this jax)"
    return None


@functools.lru_cache(maxsize=None)
def topology_devices(target: Target) -> tuple:
    """The compile-only TPU devices of the target's topology (no TPU needed)."""
    reason = libtpu_available()
    if reason:
        raise RuntimeError(reason)
    quiet_libtpu(target)
    from jax.experimental import topologies

    shape = [int(v) for v in target.topology.split(":")[1].split("x")] + [1]
    host = [min(shape[0], 2), min(shape[1], 4 if target.chip.chips_per_host == 8 else 2), 1]
    devices = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                           chips_per_host_bounds=host).devices
    if len(devices) != target.devices:
        raise RuntimeError(f"{target.topology} gave {len(devices)} devices, expected {target.devices}")
    return tuple(devices)


def mesh_for(target: Target, devices: int | None = None):
    """A 1-D mesh (`jax_impl.sharding.AXIS`) over the first `devices` (default: all) of the target."""
    import numpy as np
    from jax.sharding import Mesh


    devs = topology_devices(target)[: devices or target.devices]
    return Mesh(np.array(devs), (AXIS,))


# --------------------------------------------------------------------------------------------------
# What XLA says about one compiled program
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Program:
    """One compiled program, per device. `peak_bytes` = argument + output + temp - alias (+ `extra_bytes`:
    what stays resident beside it, e.g. the idle A14B expert). FLOPs: XLA's plus the Splash kernels'."""

    name: str
    devices: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    code_bytes: int
    xla_flops: float  # XLA's cost analysis: a while loop's body counted once, custom calls not at all
    xla_bytes_accessed: float
    loop_trips: int  # iterations of the program's while loop (the layer scan), read from the HLO
    attention_flops: float  # the Splash kernels', from their shapes (`splash_flops`)
    compile_s: float
    extra_bytes: int = 0
    note: str = ""

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes + self.extra_bytes

    @property
    def flops(self) -> float:
        """XLA's FLOPs with the loop body counted `loop_trips` times (the few FLOPs outside the loop are
        counted that often too: an overestimate of well under 1% for the DiT), plus the Splash kernels'."""
        return self.xla_flops * self.loop_trips + self.attention_flops

    @property
    def bytes_accessed(self) -> float:
        """XLA's bytes accessed, loop body counted `loop_trips` times (as `flops`)."""
        return self.xla_bytes_accessed * self.loop_trips

    def fits(self, target: Target) -> bool:
        return self.peak_bytes <= target.hbm_per_device

    def roofline_s(self, target: Target) -> float:
        """Lower bound on the run time from peak FLOP/s and HBM bandwidth (an estimate, not a measurement)."""
        return max(self.flops / target.flops_per_device, self.bytes_accessed / target.bandwidth_per_device)

    def as_dict(self, target: Target) -> dict:
        d = dataclasses.asdict(self)
        d.update(peak_bytes=self.peak_bytes, flops=self.flops, bytes_accessed=self.bytes_accessed,
                 fits=self.fits(target), hbm_fraction=self.peak_bytes / target.hbm_per_device,
                 roofline_s=self.roofline_s(target))
        return d


def loop_trip_counts(hlo: str) -> list[int | None]:
    """Trip count of every while loop in a compiled program, from its condition `i < N` (None: unreadable)."""
    counts: list[int | None] = []
    for cond in re.findall(r"\bwhile\([^)]*\), condition=%?([\w.\-]+)", hlo):
        body = re.search(r"^%?" + re.escape(cond) + r" .*?^}", hlo, re.M | re.S)
        m = body and re.search(r"constant\((\d+)\)", body.group(0))
        counts.append(int(m.group(1)) if m and "direction=LT" in body.group(0) else None)
    return counts


def loop_trips(hlo: str, expected: tuple[int, ...] = ()) -> int:
    """Trip count of the program's main while loop (1 without one): XLA's cost analysis counts a loop body once.

    The DiT's layer scan is the main loop. Some TPU generations' compiles add small loops of their own (v6e);
    then the main loop is the one whose trip count is the first of `expected` found (the scan's trip count:
    layers / unroll)."""
    counts = loop_trip_counts(hlo)
    if not counts:
        return 1
    if len(counts) == 1 and counts[0] is not None and (not expected or counts[0] in expected):
        return counts[0]
    for trips in expected:
        if trips in counts:
            return trips
    raise ValueError(f"while loops with trip counts {counts} in the compiled program, none of the expected "
                     f"{list(expected)}: cannot scale its cost analysis")


def splash_kernels(hlo: str) -> list[str]:
    """The HLO lines of the compiled Splash kernels (Mosaic TPU custom calls named after splash's forward)."""
    return [ln for ln in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in ln and "splash_mha_fwd" in ln]


def analyse(name: str, compiled, devices: int, compile_s: float, attention_flops: float = 0.0,
            extra_bytes: int = 0, note: str = "", expected_trips: tuple[int, ...] = ()) -> Program:
    ma = compiled.memory_analysis()
    hlo = compiled.as_text()
    trips, counts = loop_trips(hlo, expected_trips), loop_trip_counts(hlo)
    if len(counts) > 1:
        others = list(counts)
        others.remove(trips)
        note = (note + "; " if note else "") + (f"XLA added while loops (trip counts {others}) beside the "
                                                f"{trips}-trip layer loop; their bodies are counted once")
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per partition
        cost = cost[0] if cost else {}
    return Program(
        name=name, devices=devices, argument_bytes=int(ma.argument_size_in_bytes),
        output_bytes=int(ma.output_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes),
        alias_bytes=int(ma.alias_size_in_bytes), code_bytes=int(ma.generated_code_size_in_bytes),
        xla_flops=float(cost.get("flops", 0.0)), xla_bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        loop_trips=trips, attention_flops=float(attention_flops), compile_s=compile_s,
        extra_bytes=int(extra_bytes), note=note,
    )


def _timed_compile(lowered) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def _abstract(tree, sharding_tree):
    """`tree`'s arrays as ShapeDtypeStructs carrying the matching shardings (a tree, or one for all)."""
    import jax

    if not isinstance(sharding_tree, (dict, list, tuple)) and hasattr(sharding_tree, "mesh"):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_tree), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding_tree)


def per_device_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the first device's shard)."""
    import jax
    import numpy as np

    total = 0
    for a in jax.tree.leaves(abstract_tree):
        shape = a.sharding.shard_shape(a.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total


# --------------------------------------------------------------------------------------------------
# The guided denoising step
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Video:
    """What is generated: pixels, frames, and the derived latent grid and token count of `preset`."""

    preset: str
    height: int
    width: int
    frames: int

    @functools.cached_property
    def _preset(self):

        return get_preset(self.preset)

    @property
    def dit(self):
        return self._preset.transformer

    @property
    def vae(self):

        return get_vae_preset(self._preset.vae)

    @property
    def experts(self) -> int:
        return self._preset.num_experts

    def check(self) -> None:
        """Sizes the pipeline accepts, checked before anything compiles."""
        if self.frames < 1 or (self.frames - 1) % self.vae.temporal_factor:
            t = self.vae.temporal_factor
            lo = max(self.frames - 1, 0) // t * t + 1
            raise ValueError(f"--frames {self.frames} is not {t}k+1; use {lo} or {lo + t}")
        step = self.vae.spatial_factor * self.dit.patch_size[1]
        if self.height % step or self.width % step:
            raise ValueError(f"--size {self.height}x{self.width}: height and width must be multiples of {step} "
                             f"for {self.preset} (VAE {self.vae.spatial_factor}x, patch {self.dit.patch_size[1]})")

    @property
    def latent(self) -> tuple[int, int, int, int]:
        return self.vae.latent_shape(self.frames, self.height, self.width)

    @property
    def tokens(self) -> int:
        f, h, w, _ = self.latent
        pt, ph, pw = self.dit.patch_size
        return (f // pt) * (h // ph) * (w // pw)


def splash_flops(cfg, batch: int, tokens: int, devices: int, text_len: int, image_len: int, gen: str) -> float:
    """FLOPs per device that the Splash kernels execute in one DiT forward (padded blocks included):
    4 * batch * heads * q * k * head_dim per attention, self (q split over devices, K/V gathered), text and
    image cross-attention, times the layers. XLA's cost analysis counts none of it (a custom call)."""

    b = BLOCKS[gen]
    q_local = -(-tokens // devices)
    total = 0.0
    for kv in [tokens, text_len] + ([image_len] if image_len else []):
        bq, bkv, _ = fit_blocks(q_local, kv, b.block_q, b.block_kv, b.block_kv_compute)
        total += 4.0 * batch * cfg.num_attention_heads * math.ceil(q_local / bq) * bq * math.ceil(kv / bkv) * bkv \
            * cfg.attention_head_dim
    return total * cfg.num_layers


def denoise_args(video: Video, mesh, *, text_len: int = 512, dtype: str = "bfloat16", attention: str = "splash",
                 steps: int = 40):
    """(graphdef, abstract sharded arguments of `sampling.denoise_step`, per-device parameter bytes)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P


    cfg = video.dit
    model = nnx.eval_shape(lambda: WanTransformer(cfg, dtype=jnp.dtype(dtype), attention_backend=attention,
                                                  rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    params = _abstract(state, param_shardings(state, mesh))
    rep = NamedSharding(mesh, P())
    f, h, w, z = video.latent
    sds = jax.ShapeDtypeStruct
    schedule = schedulers.make_schedule(schedulers.SchedulerConfig(kind="unipc", shift=video._preset.flow_shift), steps)
    sampler = jax.eval_shape(lambda x: schedulers.init_state(schedule, x), sds((1, f, h, w, z), jnp.float32))
    text = sds((1, text_len, cfg.text_dim), jnp.float32)
    inputs = sampling.DenoiseInputs(text=text, negative_text=text)
    if cfg.has_image_tokens:
        inputs = inputs.replace(image=sds((1, 257, cfg.image_dim), jnp.float32))
    if cfg.in_channels > cfg.out_channels:  # I2V: mask + condition latents concatenated
        mask_latent = sds((1, f, h, w, cfg.in_channels - cfg.out_channels), jnp.float32)
        inputs = inputs.replace(condition=conditioning.ConcatCondition(mask_latent=mask_latent))
    elif video._preset.task == "ti2v":  # first-frame latent kept, per-token timesteps
        condition = jax.eval_shape(lambda lat: conditioning.FirstFrameCondition.build(lat, f, cfg.patch_size),
                                   sds((1, 1, h, w, z), jnp.float32))
        inputs = inputs.replace(condition=condition)
    scalars = (sds((), jnp.int32), sds((), jnp.float32))
    args = (params, _abstract(sampler, rep), *_abstract(scalars, rep), _abstract(inputs, rep),
            _abstract(sds((), jnp.float32), rep), _abstract(sds((), jnp.int32), rep))
    return graphdef, args, per_device_bytes(params)


def compile_denoise_step(target: Target, video: Video, *, text_len: int = 512, dtype: str = "bfloat16",
                         attention: str = "splash", devices: int | None = None):
    """Compile one guided denoising step for `target` (CFG batch 2, FSDP + context parallel, Splash).

    Returns (Program, compiled, per-device parameter bytes). `attention="xla"` (no Splash) and `devices`
    (fewer devices than the target has) exist for tests that check what goes missing without them.
    """

    mesh = mesh_for(target, devices)
    n = mesh.devices.size
    context = splash.compile_for(target.chip.generation) if attention == "splash" else contextlib.nullcontext()
    with context:
        graphdef, args, param_bytes = denoise_args(video, mesh, text_len=text_len, dtype=dtype, attention=attention)
        lowered = sampling.denoise_step.lower(graphdef, *args, guided=True, cfg_batch=True,
                                              seq_split=SequenceSplit(mesh, AXIS))
        compiled, seconds = _timed_compile(lowered)
    if attention == "splash" and not splash_kernels(compiled.as_text()):
        raise RuntimeError("the denoising step compiled without a Splash TPU kernel (was it traced in interpret "
                           "mode, outside kernels.splash.compile_for?)")
    cfg = video.dit
    flops = splash_flops(cfg, 2, video.tokens, n, text_len, 257 if cfg.has_image_tokens else 0,
                         target.chip.generation) if attention == "splash" else 0.0
    # the layer scan runs 2 layers per iteration (`WanTransformer.__call__`: unroll=2), or 1
    program = analyse("denoise step", compiled, n, seconds, attention_flops=flops,
                      expected_trips=(cfg.num_layers // 2, cfg.num_layers))
    return program, compiled, param_bytes


# --------------------------------------------------------------------------------------------------
# The VAE decode
# --------------------------------------------------------------------------------------------------
_VAE_DONE: dict = {}


def compile_vae_decode(target: Target, video: Video, *, dtype: str = "float32", tile: str = "auto"):
    """Compile the VAE decode chunk steps for one device of `target` (whole frames, or diffusers' tiles when
    whole frames do not fit in its HBM or `tile="on"`). Returns (programs, vae_memory.MemoryEstimate,
    weight bytes, tiled). The VAE runs on one device, so results are shared by all slices of a generation."""
    key = (target.chip.generation, video.vae, video.latent, dtype, tile)
    if key not in _VAE_DONE:
        _VAE_DONE[key] = _compile_vae_decode(target, video, dtype, tile)
    return _VAE_DONE[key]


def _compile_vae_decode(target: Target, video: Video, dtype: str, tile: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P


    if tile not in ("auto", "on", "off"):
        raise ValueError(f"VAE tile must be auto, on or off, got {tile!r}")
    mesh = mesh_for(target, 1)
    one = NamedSharding(mesh, P())
    model = nnx.eval_shape(lambda: WanVAE(video.vae, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    weights = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(nnx.state(model)))
    f, h, w, z = video.latent
    shape = (1, f, h, w, z)

    def run(tiled: bool):
        programs: list[Program] = []

        def compile_step(table, state, x, caches):
            compiled, seconds = _timed_compile(table.jitted.lower(*_abstract((state, x, caches), one)))
            kind = "first chunk" if caches is None else "steady chunk"
            tile_note = f" tile {x.shape[2]}x{x.shape[3]}" if tiled else ""
            programs.append(analyse(f"vae decode {kind}{tile_note}", compiled, 1, seconds,
                                    note=f"latent {tuple(x.shape)}"))
            return compiled

        est = vae_memory.estimate(model, "decode", shape, dtype=jnp.dtype(dtype), tile=tiled,
                                  compile_step=compile_step)
        return programs, est

    programs, est = run(tile == "on")
    tiled = tile == "on" and est.tiled
    if tile == "auto" and est.peak_bytes + weights > target.hbm_per_device:
        programs, est = run(True)
        tiled = est.tiled
    return programs, est, weights, tiled


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    """Everything compiled for one target and video; `rows()` is the table, `as_dict()` the JSON."""

    target: Target
    video: Video
    step: Program
    param_bytes: int  # one expert's parameters per device
    vae: list[Program]
    vae_peak_bytes: int
    vae_tiled: bool
    blocks: Any
    steps: int = 40
    vae_compiled: bool = True  # False: VAE decode not compiled, `fits` speaks for the step alone

    def with_vae(self, programs: list[Program], peak_bytes: int, tiled: bool) -> "Report":
        """This report with a VAE decode compiled elsewhere (it runs on one device: one per generation)."""
        return dataclasses.replace(self, vae=programs, vae_peak_bytes=peak_bytes, vae_tiled=tiled, vae_compiled=True)

    def rows(self) -> list[tuple[str, Program]]:
        rows = []
        if self.video.experts == 2:
            also = f"; {self.step.note}" if self.step.note else ""
            offloaded = dataclasses.replace(self.step, name="denoise step, experts offloaded",
                                            note="one expert's params on the device; the other in host memory" + also)
            resident = dataclasses.replace(self.step, name="denoise step, both experts resident",
                                           extra_bytes=self.param_bytes,
                                           note="the idle expert's params stay on the device" + also)
            rows += [("dit", resident), ("dit", offloaded)]
        else:
            rows.append(("dit", self.step))
        rows += [("vae", p) for p in self.vae]
        return rows

    def fits(self, experts: str = "resident") -> bool:
        """The step (with both experts resident or offloaded) and the VAE decode (if compiled) fit one
        device each."""
        step = self.step.peak_bytes + (self.param_bytes if experts == "resident" and self.video.experts == 2 else 0)
        return step <= self.target.hbm_per_device and self.vae_peak_bytes <= self.target.hbm_per_device

    def estimate_s(self) -> dict:
        step = self.step.roofline_s(self.target)
        return {"step_s": step, "denoise_s": step * self.steps, "steps": self.steps,
                "bound": "compute" if self.step.flops / self.target.flops_per_device
                >= self.step.bytes_accessed / self.target.bandwidth_per_device else "memory"}

    def as_dict(self) -> dict:
        t, v = self.target, self.video
        return {
            "target": t.name, "topology": t.topology, "chips": t.chips, "devices": t.devices,
            "hbm_per_device": t.hbm_per_device, "peak_bf16_flops_per_device": t.flops_per_device,
            "hbm_bandwidth_per_device": t.bandwidth_per_device, "spec_source": t.chip.source,
            "preset": v.preset, "size": f"{v.height}x{v.width}", "frames": v.frames, "tokens": v.tokens,
            "latent": list(v.latent), "experts": v.experts,
            "splash_blocks": dataclasses.asdict(self.blocks), "param_bytes_per_device": self.param_bytes,
            "programs": [dict(p.as_dict(t), part=part) for part, p in self.rows()],
            "vae_compiled": self.vae_compiled, "vae_peak_bytes": self.vae_peak_bytes, "vae_tiled": self.vae_tiled,
            "fits_resident": self.fits("resident"), "fits_offloaded": self.fits("offloaded"),
            "estimate": self.estimate_s(),
        }


def compile_report(target: str | Target, preset: str, height: int, width: int, frames: int, *,
                   text_len: int = 512, dtype: str = "bfloat16", vae_dtype: str = "float32",
                   vae_tile: str = "auto", steps: int = 40, vae: bool = True) -> Report:
    """Compile the denoising step and the VAE decode of `preset` at that size for `target`."""

    target = parse_target(target) if isinstance(target, str) else target
    video = Video(preset, height, width, frames)
    video.check()
    step, _, param_bytes = compile_denoise_step(target, video, text_len=text_len, dtype=dtype)
    programs, est, weights, tiled = compile_vae_decode(target, video, dtype=vae_dtype, tile=vae_tile) if vae \
        else ([], None, 0, False)
    return Report(target, video, step, param_bytes, programs, (est.peak_bytes + weights) if est else 0, tiled,
                  BLOCKS[target.chip.generation], steps, vae_compiled=vae)


def format_table(report: Report) -> str:
    t, v = report.target, report.video
    b = report.blocks
    lines = [
        f"{v.preset} {v.height}x{v.width}x{v.frames} ({v.tokens} tokens) on {t.name} = {t.topology}, "
        f"{t.chips} chips, {t.devices} devices of {t.hbm_per_device / GIB:.0f} GiB; Splash blocks q/kv/kv_compute "
        f"{b.block_q}/{b.block_kv}/{b.block_kv_compute}",
        f"{'program':<40} {'arg GiB':>8} {'out GiB':>8} {'temp GiB':>8} {'alias GiB':>9} {'peak GiB':>8} "
        f"{'of HBM':>7} {'fits':>4} {'TFLOP':>9} {'GB accessed':>11} {'compile s':>9}",
    ]
    for _, p in report.rows():
        lines.append(
            f"{p.name:<40} {p.argument_bytes / GIB:>8.2f} {p.output_bytes / GIB:>8.2f} {p.temp_bytes / GIB:>8.2f} "
            f"{p.alias_bytes / GIB:>9.2f} {p.peak_bytes / GIB:>8.2f} {p.peak_bytes / t.hbm_per_device:>7.0%} "
            f"{'yes' if p.fits(t) else 'NO':>4} {p.flops / 1e12:>9.1f} {p.bytes_accessed / 1e9:>11.1f} "
            f"{p.compile_s:>9.1f}")
    if not report.vae_compiled:
        lines.append("VAE decode not compiled (--no-vae): 'fits' below speaks for the denoising step alone")
    elif report.vae:
        lines.append(f"VAE decode peak per device (weights + largest chunk step + result buffer"
                     f"{' + tile rows' if report.vae_tiled else ''}): {report.vae_peak_bytes / GIB:.2f} GiB, "
                     f"{'tiled' if report.vae_tiled else 'whole frames'}")
    e = report.estimate_s()
    lines.append(f"ESTIMATE (roofline, not measured): {e['step_s']:.2f} s per guided step ({e['bound']}-bound), "
                 f"{e['denoise_s']:.0f} s for {e['steps']} steps; fits with experts "
                 f"resident: {'yes' if report.fits('resident') else 'NO'}, offloaded: "
                 f"{'yes' if report.fits('offloaded') else 'NO'}")
    return "\n".join(lines)


def model_param_bytes(video: Video, dtype: str = "bfloat16") -> int:
    """Bytes of one expert's parameters (whole, unsharded), from shapes only."""
    import jax
    import jax.numpy as jnp
    from flax import nnx


    model = nnx.eval_shape(lambda: WanTransformer(video.dit, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(nnx.state(model)))


def smallest_fitting(generation: str, preset: str, height: int, width: int, frames: int, *,
                     max_chips: int = 256, compile=None, **kw) -> tuple[dict[str, Report | None], list[dict]]:
    """Compile on ever larger slices of one generation until the step with both experts resident (and with
    the idle expert offloaded) and the VAE decode fit. Returns ({"resident": report or None, "offloaded":
    ...}: the smallest slice that fits each way, a row per slice tried). `compile(target, preset, height,
    width, frames)` replaces `compile_report` (a caller's cache)."""
    compile = compile or functools.partial(compile_report, **kw)
    found: dict[str, Report | None] = {"resident": None, "offloaded": None}
    tried = []
    video = Video(preset, height, width, frames)
    weights = model_param_bytes(video)
    for name in target_names(generation):
        target = parse_target(name)
        if target.chips > max_chips:
            break
        floor = weights / target.devices  # the parameters alone, split perfectly: no compile can beat that
        if floor > target.hbm_per_device:
            tried.append({"target": name, "skipped": f"one expert's parameters alone need {floor / GIB:.1f} GiB "
                                                     f"per device > {target.hbm_per_device / GIB:.0f} GiB"})
            continue
        try:
            report = compile(name, preset, height, width, frames)
        except Exception as e:  # XLA refuses, at compile time, a program whose buffers exceed the HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            tried.append({"target": name, "fits_resident": False, "fits_offloaded": False,
                          "compile_error": str(e).splitlines()[0][:300]})
            continue
        tried.append({"target": name, "fits_resident": report.fits("resident"),
                      "fits_offloaded": report.fits("offloaded"), "step_peak_bytes": report.step.peak_bytes,
                      "param_bytes_per_device": report.param_bytes, "vae_peak_bytes": report.vae_peak_bytes})
        for mode in found:
            if found[mode] is None and report.fits(mode):
                found[mode] = report
        if all(found.values()):
            break
    return found, tried


__all__ = ["CHIPS", "Target", "parse_target", "target_names", "Video", "Program", "Report", "compile_report",
           "compile_denoise_step", "compile_vae_decode", "format_table", "smallest_fitting", "model_param_bytes",
           "splash_flops", "libtpu_available", "quiet_libtpu"]
