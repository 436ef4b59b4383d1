"""The FantasyWorld generation run in JAX: image + prompt + camera trajectory -> video, depth, points, cameras.

A FantasyWorld checkpoint is a Wan2.1-I2V pipeline folder (the base model the released weights were trained
on: text and image encoders, VAE, scheduler, transformer/) with a `fantasyworld/` model folder beside its
parts: config.json (`FantasyWorldConfig`) and the whole FantasyWorld model (`model.safetensors` in the
released, torch-reference or Flax layout; the released `model.pth` only with `allow_pickle`). The base
`Pipeline` (`jax_impl.pipeline`) checks the folder, encodes the prompt, the image's CLIP tokens and the I2V
condition, and decodes the latents; this module adds what differs from a plain Wan run
(docs/fantasyworld.md, sections 6-8):

- camera: Plucker rays of the trajectory (`weights.trajectory`: poses relative to frame 0, translations
  divided by the scene scale, the released ray intrinsics), given to every model call;
- sampler: DiffSynth's flow-match levels (`schedulers.diffsynth_schedule`, shift 5 by default), Euler steps,
  classifier-free guidance `v_neg + g (v_pos - v_neg)` with both passes through the whole joint model;
- geometry: the camera, depth and point heads run once, on the conditional pass of the last step (at its
  input latents, as the public code does), not on the clean latents.

`generate_fantasyworld` is the whole run with every input and output checked before any work starts; the
files it writes are described in `jax_impl.fantasyworld.outputs`. Runs are not staged (no --resume).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl import sampling, schedulers
from jax_impl.dit import token_grid
from jax_impl.fantasyworld.camera import plucker_rays
from jax_impl.fantasyworld.model import FantasyWorld, load_fantasyworld
from jax_impl.fantasyworld.outputs import (PLY_MIN_CONFIDENCE, PLY_STRIDE, check_outputs, frame_ranges, output_paths,
                                           write_geometry)
from jax_impl.media import load_image, to_uint8, write_mp4
from jax_impl.noise import initial_noise
from jax_impl.pipeline import DEFAULT_NEGATIVE, JAX_ENCODERS, EncoderSet, Pipeline, PipelineError, load_embeddings
from jax_impl.settings import GenerateSettings
from jax_impl.stages import Encoded
from weights.checkpoint import Checkpoint
from weights.configs.base import read_json
from weights.configs.fantasyworld import FantasyWorldConfig
from weights.fantasyworld_map import FANTASYWORLD
from weights.trajectory import Trajectory, ray_cameras, read_trajectory

F32 = jnp.float32
MODEL_DIR = "fantasyworld"
# What the Wan half must share with the base pipeline's transformer/ for the encoders and the VAE to fit it.
_SHARED_FIELDS = ("in_channels", "out_channels", "text_dim", "image_dim", "patch_size")


class FantasyWorldError(PipelineError):
    """A checkpoint or request FantasyWorld cannot run; the message names the problem and the fix."""


def read_fantasyworld_config(folder: str | os.PathLike) -> FantasyWorldConfig:
    """The config of `folder`/fantasyworld/, or an error saying why `folder` is not a FantasyWorld checkpoint."""
    folder = Path(folder)
    path = folder / MODEL_DIR / "config.json"
    if not path.is_file():
        hint = (" (it is a plain Wan pipeline folder)" if (folder / "model_index.json").is_file() else
                "; point --checkpoint at the pipeline folder above it" if folder.name == MODEL_DIR else "")
        raise FantasyWorldError(
            f"{folder}: no {MODEL_DIR}/config.json, so this is not a FantasyWorld checkpoint{hint}. A FantasyWorld "
            f"checkpoint is a Wan2.1-I2V pipeline folder with a {MODEL_DIR}/ model folder (`wanport make-tiny "
            "--fantasyworld` writes a tiny one)")
    return FantasyWorldConfig.from_dict(read_json(path), source=str(path))


def default_settings(cfg: FantasyWorldConfig) -> dict[str, Any]:
    """The public inference defaults the config carries (released: 336x592, 81 frames, 50 steps, shift 5,
    guidance 5), as GenerateSettings fields."""
    return {"frames": cfg.frames, "height": cfg.height, "width": cfg.width, "steps": cfg.steps, "shift": cfg.shift,
            "guidance": cfg.guidance}


def camera_rays(traj: Trajectory, height: int, width: int, *, scale: float = 1.0) -> jax.Array:
    """Plucker rays [1, frames, height, width, 6] the released model was conditioned on (relative poses,
    translations / `scale`, the released ray intrinsics; docs/fantasyworld.md section 6)."""
    c2w, k = ray_cameras(traj, height, width, scale=scale, released=True)
    return plucker_rays(jnp.asarray(c2w), jnp.asarray(k), height, width)[None]


def _double(a):
    return None if a is None else jnp.concatenate([a, a], axis=0)


@functools.partial(jax.jit, static_argnames=("graphdef", "guided", "cfg_batch"))
def fantasyworld_step(graphdef, params, sampler: schedulers.SamplerState, i, t, inputs: sampling.DenoiseInputs,
                      rays, scale, heads, first_bad, *, guided: bool, cfg_batch: bool):
    """One Euler step of the joint model; returns (sampler state, predictions, first non-finite step so far).

    `heads` (a traced bool, so every step shares one compiled function): run the geometry heads on the
    conditional pass's taps (batch row 0); otherwise the predictions are zeros of the same shapes."""
    model: FantasyWorld = nnx.merge(graphdef, params)
    x, timestep = sampling.model_input(sampler.sample, inputs, t, model.wan.dtype)
    if guided and cfg_batch:
        both, taps, _ = model.forward(_double(x), _double(timestep), jnp.concatenate([inputs.text, inputs.negative_text]),
                                      _double(inputs.image), _double(rays))
        v_cond, v_uncond = jnp.split(both.astype(F32), 2, axis=0)
    else:
        v_cond, taps, _ = model.forward(x, timestep, inputs.text, inputs.image, rays)
        v_cond = v_cond.astype(F32)
        v_uncond = model.forward(x, timestep, inputs.negative_text, inputs.image, rays)[0].astype(F32) if guided else v_cond
    v = v_uncond + scale * (v_cond - v_uncond) if guided else v_cond
    sampler, _ = schedulers.step(sampler, v, i)
    used = {*model.cfg.dpt_layers, len(taps) - 1}  # the layers the heads read: DPT taps and the last (camera head)
    cond_taps = [tap[:1] if j in used else None for j, tap in enumerate(taps)]
    grid_hw = token_grid(model.cfg.wan, *x.shape[1:4])[1:]
    predict = lambda taps: model.predict(taps, grid_hw)  # noqa: E731
    shapes = jax.eval_shape(predict, cond_taps)
    pred = jax.lax.cond(heads, predict, lambda _: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes), cond_taps)
    bad = (first_bad < 0) & ~jnp.all(jnp.isfinite(sampler.sample))
    return sampler, pred, jnp.where(bad, jnp.asarray(i, jnp.int32), first_bad)


class FantasyWorldPipeline:
    """A FantasyWorld checkpoint (see the module docstring) opened and checked; the model loads on first use."""

    def __init__(self, folder: str | os.PathLike, *, dtype=None, attention_backend: str = "auto",
                 encoders: EncoderSet = JAX_ENCODERS, vae_options=None, allow_pickle: bool = False, log=print):
        self.folder = Path(folder)
        read_fantasyworld_config(self.folder)  # "not a FantasyWorld checkpoint" before anything else
        self.base = Pipeline(self.folder, dtype=dtype, attention_backend=attention_backend, load_encoders=False,
                             vae_options=vae_options, encoders=encoders, log=log)
        self.model_folder = self.folder / MODEL_DIR
        self.checkpoint = Checkpoint(self.model_folder, FANTASYWORLD, allow_pickle=allow_pickle)  # names, shapes
        self.config: FantasyWorldConfig = self.checkpoint.config
        self.allow_pickle = allow_pickle
        self._check_fit()
        self._model: FantasyWorld | None = None

    def _check_fit(self) -> None:
        if self.base.conditioning != "concat" or len(self.base.expert_dirs) != 1:
            raise FantasyWorldError(f"{self.folder}: FantasyWorld runs on a Wan2.1 image-to-video base pipeline (one "
                                    "transformer, concat conditioning); this folder is another kind of Wan pipeline")
        wan, base = self.config.wan, self.base.dit_config
        diff = [f"{k} {getattr(wan, k)} vs {getattr(base, k)}" for k in _SHARED_FIELDS if getattr(wan, k) != getattr(base, k)]
        if diff:
            raise FantasyWorldError(f"{self.model_folder}/config.json: its Wan half does not fit the base pipeline's "
                                    f"transformer/ ({'; '.join(diff)}); {MODEL_DIR}/ must be built on this base model")

    @property
    def model(self) -> FantasyWorld:
        if self._model is None:
            self._model = load_fantasyworld(self.model_folder, dtype=self.base.dtype,
                                            attention_backend=self.base.attention_backend, allow_pickle=self.allow_pickle)
        return self._model

    def schedule(self, settings: GenerateSettings) -> schedulers.Schedule:
        return schedulers.diffsynth_schedule(self.config.shift if settings.shift is None else settings.shift,
                                             settings.steps)

    def check_request(self, settings: GenerateSettings, trajectory: Trajectory, *, prompt: str | None,
                      negative_prompt: str = DEFAULT_NEGATIVE, has_image: bool = False,
                      embeddings: dict[str, np.ndarray] | None = None, source: str = "--embeddings") -> None:
        """Everything about one run that can be checked before the model loads."""
        if settings.batch != 1:
            raise FantasyWorldError(f"FantasyWorld makes one video per run (its heads predict one scene); drop --batch "
                                    f"{settings.batch}")
        if settings.scheduler not in (None, "euler"):
            raise FantasyWorldError("FantasyWorld samples with DiffSynth's flow-match Euler steps; drop --scheduler "
                                    f"{settings.scheduler}")
        if trajectory.frames % 4 != 1:
            raise FantasyWorldError(f"the camera trajectory has {trajectory.frames} cameras, one per video frame, but "
                                    "Wan videos have 4k+1 frames (e.g. 81): give a trajectory of 4k+1 cameras")
        if trajectory.frames != settings.frames:
            raise FantasyWorldError(f"the camera trajectory has {trajectory.frames} cameras, the video has "
                                    f"{settings.frames} frames; give one camera per frame: drop --frames (it follows the "
                                    f"trajectory) or use a trajectory of {settings.frames} cameras")
        self.base.check_request(settings, prompt=prompt, negative_prompt=negative_prompt, has_image=has_image,
                                embeddings=embeddings, source=source)

    def encode(self, settings: GenerateSettings, *, prompt: str | None, image, negative_prompt: str = DEFAULT_NEGATIVE,
               embeddings: dict[str, np.ndarray] | None = None) -> Encoded:
        """Prompt and negative prompt (UMT5), the image's CLIP tokens and the I2V condition: the base pipeline's."""
        return self.base.encode(settings, prompt=prompt, image=image, negative_prompt=negative_prompt,
                                embeddings=embeddings)

    def denoise(self, encoded: Encoded, settings: GenerateSettings, rays: jax.Array, *, noise: np.ndarray | None = None,
                progress: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(final latents [1, f, h, w, z] float32, the heads' predictions of batch row 0 as numpy: pose_enc
        [frames, 9], depth [frames, H, W, 1], depth_conf, world_points, world_points_conf)."""
        shape = self.base.latent_shape(settings)
        noise = initial_noise(settings.seed, shape) if noise is None else noise
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, these settings need {shape}")
        want = (1, settings.frames, settings.height, settings.width, 6)
        if tuple(rays.shape) != want:
            raise ValueError(f"camera rays have shape {tuple(rays.shape)}, these settings need {want}")
        condition = encoded.condition
        if condition.KIND != "concat":
            raise ValueError(f"the encode stage holds a {condition.KIND!r} condition; FantasyWorld takes the I2V "
                             "image condition: encode with an image")
        inputs = sampling.DenoiseInputs(text=encoded["prompt_embeds"], negative_text=encoded.get("negative_prompt_embeds"),
                                        image=encoded.get("image_embeds"), condition=condition)
        inputs = jax.tree.map(lambda a: None if a is None else jnp.asarray(a), inputs)
        guidance = sampling.Guidance(settings.guidance, None, settings.guidance_steps, settings.cfg_batch)
        schedule = self.schedule(settings)
        graphdef, params = nnx.split(self.model)
        state = schedulers.init_state(schedule, noise)
        first_bad, pred = jnp.int32(-1), None
        steps = range(schedule.num_steps)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="denoise", unit="step", dynamic_ncols=True)
        for i in steps:
            last = i == schedule.num_steps - 1
            state, p, first_bad = fantasyworld_step(
                graphdef, params, state, jnp.int32(i), jnp.float32(schedule.timesteps[i]), inputs, rays,
                jnp.float32(guidance.scale), jnp.bool_(last), first_bad,
                guided=guidance.active(i, 0, inputs.negative_text is not None), cfg_batch=guidance.cfg_batch)
            if last:
                pred = p
        bad = int(first_bad)
        if bad >= 0:
            raise sampling.NonFiniteLatents(
                f"sampling produced non-finite latents (NaN or inf) at step {bad} of {schedule.num_steps} "
                f"(t={float(schedule.timesteps[bad]):g}) with guidance {guidance.scale:g}; lower the guidance, or "
                "check the weights")
        return np.asarray(state.sample, np.float32), {k: np.asarray(v[0], np.float32) for k, v in pred.items()}

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Video [1, frames, H, W, 3] in [-1, 1] (the base pipeline's VAE)."""
        return self.base.decode(latents)


@dataclasses.dataclass(frozen=True)
class PointCloudOptions:
    """How the .ply is built: every `stride`-th row and column, depth confidence >= `min_confidence`
    (the public code's defaults: 4 and 1.0, which keeps every finite point)."""

    stride: int = PLY_STRIDE
    min_confidence: float = PLY_MIN_CONFIDENCE

    def validate(self) -> None:
        if isinstance(self.stride, bool) or not isinstance(self.stride, (int, np.integer)) or self.stride < 1:
            raise ValueError(f"--point-stride must be an integer >= 1, got {self.stride!r}")
        if not np.isfinite(self.min_confidence):
            raise ValueError(f"--point-confidence must be a finite number, got {self.min_confidence}")


def generate_fantasyworld(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prompt: str | None,
    image_path: str | os.PathLike,
    camera_path: str | os.PathLike,
    settings: GenerateSettings,
    negative_prompt: str = DEFAULT_NEGATIVE,
    embeddings_path: str | os.PathLike | None = None,
    camera_scale: float = 1.0,
    points: PointCloudOptions = PointCloudOptions(),
    dtype=None,
    attention_backend: str = "auto",
    vae_options=None,
    encoders: EncoderSet = JAX_ENCODERS,
    allow_pickle: bool = False,
    log=print,
) -> dict[str, Any]:
    """Encode -> denoise (heads on the last step) -> decode, then write the mp4 at `out` and, beside it, the
    depth maps, the point cloud and the cameras (`jax_impl.fantasyworld.outputs.output_paths`).

    Every output path, input file and option, the trajectory against the frame count, and the checkpoint are
    checked before any model runs; the outputs are written only once everything is computed."""
    settings.validate()
    points.validate()
    paths = output_paths(out)
    check_outputs(paths)
    if not (isinstance(camera_scale, (int, float)) and np.isfinite(camera_scale) and camera_scale > 0):
        raise ValueError(f"--camera-scale must be a positive number (the scene scale translations are divided by; "
                         f"1 leaves them as given), got {camera_scale}")
    trajectory = read_trajectory(camera_path)
    image = load_image(image_path) if image_path is not None else None
    embeddings = load_embeddings(embeddings_path) if embeddings_path is not None else None
    t0 = time.perf_counter()
    pipe = FantasyWorldPipeline(checkpoint, dtype=dtype, attention_backend=attention_backend, encoders=encoders,
                                vae_options=vae_options, allow_pickle=allow_pickle, log=log)
    pipe.check_request(settings, trajectory, prompt=prompt, negative_prompt=negative_prompt, has_image=image is not None,
                       embeddings=embeddings, source=str(embeddings_path))
    if embeddings and "prompt_embeds" in embeddings and "negative_prompt_embeds" not in embeddings \
            and settings.guidance > 1:
        log(f"note: {embeddings_path} has no negative_prompt_embeds, so classifier-free guidance is off")
    timings: dict[str, float] = {"load": time.perf_counter() - t0}

    t = time.perf_counter()
    encoded = pipe.encode(settings, prompt=prompt, image=image, negative_prompt=negative_prompt, embeddings=embeddings)
    rays = camera_rays(trajectory, settings.height, settings.width, scale=camera_scale)
    timings["encode"] = time.perf_counter() - t
    log(f"[1/4] encoded the prompt, image and {trajectory.frames} cameras ({timings['encode']:.1f} s)")

    t = time.perf_counter()
    latents, predictions = pipe.denoise(encoded, settings, rays)
    timings["denoise"] = time.perf_counter() - t
    log(f"[2/4] denoised {settings.steps} steps, geometry heads on the last ({timings['denoise']:.1f} s)")

    t = time.perf_counter()
    frames = to_uint8(pipe.decode(latents)[0])
    timings["decode"] = time.perf_counter() - t
    log(f"[3/4] decoded {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} ({timings['decode']:.1f} s)")

    t = time.perf_counter()
    counts = write_geometry(paths, frames, predictions, stride=points.stride, min_confidence=points.min_confidence)
    write_mp4(paths.video, frames, fps=settings.fps)
    timings["write"] = time.perf_counter() - t
    log(f"[4/4] wrote {paths.video}, {paths.depth.name}, {paths.depth_conf.name}, {paths.points.name} "
        f"({counts['points']} of {counts['candidates']} points), {paths.cameras.name}")
    if counts["skipped_frames"]:
        log(f"note: the camera head predicted no usable field of view (not in (0, pi)) for frame(s) "
            f"{frame_ranges(counts['skipped_frames'])}; they add no points to the point cloud")
    return {"paths": paths, "frames": int(frames.shape[0]), "points": counts["points"],
            "candidates": counts["candidates"], "timings": timings}
