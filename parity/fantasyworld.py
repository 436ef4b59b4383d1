"""Layer-by-layer parity of the Flax FantasyWorld forward against our PyTorch reference on the same weights.

Both sides load one tiny checkpoint in the released key layout (`torch_ref.fantasyworld.checkpoint`
writes it, every weight perturbed off its init): the reference through its map re-lay, the Flax model
through the one checkpoint engine (`jax_impl.fantasyworld.model.load_fantasyworld`). The taps are named
as the torch reference names them: camera features, every Wan block before the branch, the geometry
tokens, each joint layer's frame / video / geometry streams, the velocity and (with `heads`) the
predictions. float32: every tap must be within `FP32_TOL` relative L2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from jax_impl.fantasyworld.model import FantasyWorld, load_fantasyworld
from parity.report import Report, compare_layers
from parity.tolerances import FP32_TOL
from torch_ref.fantasyworld.checkpoint import load_fantasyworld as load_reference
from torch_ref.fantasyworld.checkpoint import write_tiny_fantasyworld
from torch_ref.fantasyworld.model import FantasyWorld as ReferenceModel
from weights.configs.fantasyworld import FantasyWorldConfig

TEXT_LEN = 512  # diffusers' I2V attention takes the last 512 context tokens as text: the length is fixed
PREDICTIONS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")


@dataclasses.dataclass(frozen=True)
class FantasyWorldInputs:
    latents: np.ndarray  # [B, 36, F, H, W] (torch layout; Flax gets it channels-last)
    timestep: np.ndarray  # [B]
    text: np.ndarray  # [B, 512, text_dim]
    image: np.ndarray  # [B, 257, image_dim]
    rays: np.ndarray | None  # [B, frames, height, width, 6] Plucker rays, or None (no camera)


def make_inputs(cfg: FantasyWorldConfig, *, seed: int = 0, camera: bool = True, timestep: float = 731.0) -> FantasyWorldInputs:
    """Deterministic random inputs at the config's video size (latents = size / 8, frames (n-1)/4 + 1)."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = (cfg.frames - 1) // 4 + 1, cfg.height // 8, cfg.width // 8
    rnd = lambda *shape: torch.randn(*shape, generator=g).numpy()  # noqa: E731
    return FantasyWorldInputs(
        latents=rnd(1, cfg.wan.in_channels, f, h, w),
        timestep=np.array([timestep], np.float32),
        text=rnd(1, TEXT_LEN, cfg.wan.text_dim),
        image=rnd(1, 257, cfg.wan.image_dim),
        rays=rnd(1, cfg.frames, cfg.height, cfg.width, 6) if camera else None,
    )


def layer_order(cfg: FantasyWorldConfig, *, camera: bool = True, heads: bool = False) -> list[str]:
    """Tap names in forward order."""
    names = ["camera_features"] if camera else []
    names += [f"wan.blocks.{i}" for i in range(cfg.branch_start)] + ["geo.tokens"]
    names += [f"layers.{j}.{s}" for j in range(cfg.joint_layers) for s in ("frame", "video", "geo")]
    names.append("output")
    if heads:
        names += [f"pred.{k}" for k in PREDICTIONS]
    return names


def _channels_last(taps: dict) -> dict:
    """The reference's velocity [B, C, F, H, W] -> [B, F, H, W, C], the Flax layout."""
    return taps | {"output": np.transpose(taps["output"], (0, 2, 3, 4, 1))}


@torch.no_grad()
def run_reference(model: ReferenceModel, inputs: FantasyWorldInputs, *, heads: bool = False) -> dict[str, np.ndarray]:
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    _, _, taps = model(t(inputs.latents), t(inputs.timestep), t(inputs.text), t(inputs.image), t(inputs.rays),
                       heads=heads, capture=True)
    return _channels_last({k: v.numpy() for k, v in taps.items()})


@functools.partial(nnx.jit, static_argnames="heads")  # eager dispatch is ~10x slower on a CPU; one trace per shape
def _flax_taps(model: FantasyWorld, latents, timestep, text, image, rays, heads: bool):
    return model(latents, timestep, text, image, rays, heads=heads, capture=True)[2]


def run_flax(model: FantasyWorld, inputs: FantasyWorldInputs, *, heads: bool = False) -> dict[str, np.ndarray]:
    j = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
    taps = _flax_taps(model, j(np.transpose(inputs.latents, (0, 2, 3, 4, 1))), j(inputs.timestep), j(inputs.text),
                      j(inputs.image), j(inputs.rays), heads)
    return {k: np.asarray(v) for k, v in taps.items()}


def compare_fantasyworld(flax_model: FantasyWorld, reference: ReferenceModel, inputs: FantasyWorldInputs, *,
                         heads: bool = False, meta: dict | None = None) -> Report:
    ours, ref = run_flax(flax_model, inputs, heads=heads), run_reference(reference, inputs, heads=heads)
    for name in ref:
        if name in ours and np.shape(ours[name]) != np.shape(ref[name]):
            raise ValueError(f"tap {name}: Flax shape {np.shape(ours[name])} != reference {np.shape(ref[name])}")
    order = layer_order(flax_model.cfg, camera=inputs.rays is not None, heads=heads)
    return Report(compare_layers(ours, ref, FP32_TOL, order), dict(meta or {}, model="fantasyworld", dtype="float32"))


def fantasyworld_parity(folder: str | Path | None = None, *, seed: int = 0, camera: bool = True, heads: bool = False,
                        attention_backend: str = "xla") -> Report:
    """Parity report of a FantasyWorld checkpoint folder (default: a fresh tiny one, weights seeded by `seed`)."""
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            folder = write_tiny_fantasyworld(Path(tmp) / "fantasyworld", seed=seed)
        flax_model = load_fantasyworld(folder, attention_backend=attention_backend)
        reference = load_reference(folder)
        inputs = make_inputs(flax_model.cfg, seed=seed, camera=camera)
        return compare_fantasyworld(flax_model, reference, inputs, heads=heads,
                                    meta={"folder": str(folder), "seed": seed, "camera": camera})


def main(argv: list[str] | None = None) -> int:
    """`python -m parity.fantasyworld [--heads] [--no-camera] [--json PATH]`: the tiny model's parity table."""
    p = argparse.ArgumentParser(description="FantasyWorld parity: Flax joint forward vs the torch reference, per tap.")
    p.add_argument("--folder", help="checkpoint folder (default: a fresh tiny random one)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    p.add_argument("--heads", action="store_true", help="also run and compare the camera, depth and point heads")
    p.add_argument("--no-camera", action="store_true", help="no camera rays (the adapters are skipped)")
    p.add_argument("--json", help="also write the report as JSON to this path")
    a = p.parse_args(argv)
    report = fantasyworld_parity(a.folder, seed=a.seed, camera=not a.no_camera, heads=a.heads)
    print(report.table())
    if a.json:
        report.write_json(a.json)
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
