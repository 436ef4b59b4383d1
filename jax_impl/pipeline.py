"""The staged Wan generation pipeline in JAX: encode -> denoise -> decode -> mp4.

`Pipeline(folder)` opens a pipeline folder in the diffusers layout (model_index.json, transformer/,
transformer_2/, vae/, scheduler/, text_encoder/ + tokenizer/, image_encoder/ + image_processor/); a
transformer folder may hold diffusers-, original-Wan- or Flax-layout weights (see `wanport convert`).
Every component is checked before anything runs, so a missing one is named up front.

Stages and their files (see `jax_impl.stages`): `encode` writes prompt/negative/image embeddings and the
VAE-encoded image condition; `denoise` writes the final latents; `decode` turns latents into frames.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from jax_impl import conditioning as cond
from jax_impl import sampling, schedulers
from jax_impl.vae_config import VaeConfig

EXPERT_DIRS = (("transformer", "transformer_2"), ("high_noise_model", "low_noise_model"))
DEFAULT_NEGATIVE = ""


class PipelineError(ValueError):
    """A pipeline folder that cannot be used as it is; the message names what is missing and the fix."""


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """What shapes one generation. Frames 4k+1; height and width multiples of VAE factor x patch (16 or 32)."""

    frames: int = 81
    height: int = 480
    width: int = 832
    steps: int = 40
    shift: float | None = None  # None: the checkpoint's scheduler/scheduler_config.json
    scheduler: str | None = None  # None: the checkpoint's; or "unipc" / "euler"
    guidance: float = 3.5
    guidance_2: float | None = None  # low-noise expert of the A14B; None: same as guidance
    guidance_steps: int | None = None  # guidance truncation: CFG for the first N steps only
    cfg_batch: bool = True
    seed: int = 0
    batch: int = 1
    fps: int = 16

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "fps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.guidance_steps is not None and self.guidance_steps < 0:
            raise ValueError(f"guidance_steps must be >= 0, got {self.guidance_steps}")


def _read_index(folder: Path) -> dict[str, Any]:
    index_path = folder / "model_index.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not index_path.is_file():
        hint = " It looks like a single model folder; point --checkpoint at the pipeline folder above it." if (
            folder / "config.json").is_file() else ""
        raise PipelineError(f"{folder}: no model_index.json, so this is not a pipeline folder.{hint}")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PipelineError(f"{index_path}: not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise PipelineError(f"{index_path}: expected a JSON object")
    return index


def _per_sample(x: np.ndarray, batch: int) -> np.ndarray:
    """One row shared by every video of the batch is repeated; per-sample rows are kept as they are."""
    return np.repeat(x, batch, 0) if x.shape[0] == 1 else x


def _listed(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


class Pipeline:
    """Loaded components of one pipeline folder; the DiT(s) and VAE in JAX, the encoders in torch."""

    def __init__(self, folder: str | os.PathLike, *, dtype=None, attention_backend: str = "auto",
                 load_encoders: bool = True, vae_options=None):
        import jax.numpy as jnp

        from weights.dit_io import load_dit
        from weights.vae_io import load_vae

        self.folder = Path(folder)
        index = _read_index(self.folder)
        self.index = index
        expert_dirs = next((dirs for dirs in EXPERT_DIRS if (self.folder / dirs[0]).is_dir()), None)
        if expert_dirs is None:
            raise PipelineError(f"{self.folder}: missing the transformer/ folder (the diffusion model)")
        names = [d for d in expert_dirs if (self.folder / d).is_dir()]
        wanted = [d for d in ("transformer", "transformer_2") if _listed(index, d)]
        if expert_dirs[0] == "transformer" and len(wanted) > len(names):
            raise PipelineError(f"{self.folder}: model_index.json lists {wanted} but only {names} exist")
        self.boundary_ratio = index.get("boundary_ratio")
        if len(names) == 2 and self.boundary_ratio is None:
            self.boundary_ratio = 0.9  # Wan2.2 A14B default: t >= 900 on the high-noise expert
        for part in ("vae", "scheduler"):
            if not (self.folder / part).is_dir():
                raise PipelineError(f"{self.folder}: missing the {part}/ folder; copy it from the original pipeline")
        self.dtype = jnp.dtype(dtype or jnp.float32)
        self.experts = [load_dit(self.folder / n, dtype=self.dtype, attention_backend=attention_backend) for n in names]
        self.dit_config = self.experts[0].cfg
        from jax_impl.latents import VaeOptions

        self.vae_options = vae_options or VaeOptions()  # VAE dtype and spatial tiling
        self.vae = load_vae(self.folder / "vae", dtype=jnp.dtype(self.vae_options.dtype))
        self.vae_config: VaeConfig = self.vae.cfg
        self.scheduler_config = schedulers.SchedulerConfig.from_json(self.folder / "scheduler" / "scheduler_config.json")
        if self.dit_config.in_channels == self.vae_config.z_dim + 4 + self.vae_config.z_dim:
            self.conditioning = "concat"
        elif index.get("expand_timesteps"):
            self.conditioning = "first_frame"
        else:
            self.conditioning = "none"
        self._text_encoder = self._image_encoder = None
        if load_encoders:
            self._check_encoders()

    # --- components ------------------------------------------------------------------------------------
    def _check_encoders(self) -> None:
        need = ["tokenizer", "text_encoder"]
        if self.dit_config.has_image_tokens:
            need += ["image_processor", "image_encoder"]
        missing = [n for n in need if not (self.folder / n).is_dir()]
        if missing:
            raise PipelineError(
                f"{self.folder}: missing {', '.join(n + '/' for n in missing)}; copy them from the original pipeline, "
                "or pass precomputed embeddings (--embeddings FILE with prompt_embeds[, negative_prompt_embeds, "
                "image_embeds])"
            )

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from torch_ref.encoders import TextEncoder

            self._check_encoders()
            self._text_encoder = TextEncoder(self.folder)
        return self._text_encoder

    @property
    def image_encoder(self):
        if self._image_encoder is None:
            from torch_ref.encoders import ImageEncoder

            self._check_encoders()
            self._image_encoder = ImageEncoder(self.folder)
        return self._image_encoder

    def schedule(self, settings: GenerateSettings) -> schedulers.Schedule:
        """The schedule for `settings`: the shift is part of the config before the timesteps are made."""
        cfg = self.scheduler_config
        if settings.scheduler is not None and settings.scheduler != cfg.kind:
            cfg = schedulers.SchedulerConfig(kind=settings.scheduler, shift=cfg.shift,
                                             num_train_timesteps=cfg.num_train_timesteps)
        if settings.shift is not None:
            cfg = cfg.replace(shift=settings.shift)
        return schedulers.make_schedule(cfg, settings.steps)

    def check_settings(self, settings: GenerateSettings, has_image: bool) -> None:
        cond.check_video_size(settings.frames, settings.height, settings.width, self.vae_config,
                              self.dit_config.patch_size)
        if self.conditioning == "concat" and not has_image:
            raise ValueError("this is an image-to-video checkpoint: give an image (--image)")

    # --- stage 1: encode -------------------------------------------------------------------------------
    def encode(self, settings: GenerateSettings, *, prompt: str | None = None, image=None, last_image=None,
               negative_prompt: str = DEFAULT_NEGATIVE, embeddings: dict[str, np.ndarray] | None = None
               ) -> dict[str, np.ndarray]:
        """Prompt/negative/image embeddings and the image condition, as float32 numpy arrays.

        `image` and `last_image` are PIL images; `embeddings` may supply prompt_embeds,
        negative_prompt_embeds and image_embeds instead of running the encoders.
        """
        from jax_impl.media import image_to_array

        self.check_settings(settings, image is not None)
        out: dict[str, np.ndarray] = {}
        emb = dict(embeddings or {})
        b = settings.batch
        if "prompt_embeds" in emb:
            text = np.asarray(emb["prompt_embeds"], np.float32)
            neg = emb.get("negative_prompt_embeds")
            neg = None if neg is None else np.asarray(neg, np.float32)
        else:
            if prompt is None:
                raise ValueError("give a prompt (--prompt) or precomputed prompt_embeds")
            text, neg = np.split(self.text_encoder([prompt, negative_prompt]), 2)
        if text.shape[-1] != self.dit_config.text_dim:
            raise ValueError(f"prompt embeddings have width {text.shape[-1]}, the DiT takes {self.dit_config.text_dim}")
        out["prompt_embeds"] = _per_sample(text, b)
        if neg is not None:
            out["negative_prompt_embeds"] = _per_sample(neg, b)
        if self.dit_config.has_image_tokens:
            if "image_embeds" in emb:
                img = np.asarray(emb["image_embeds"], np.float32)
            else:
                images = [image] + ([last_image] if last_image is not None else [])
                img = self.image_encoder(images)
            out["image_embeds"] = _per_sample(img, b)
        if self.conditioning != "none" and image is not None:
            pixels = image_to_array(image, settings.height, settings.width)
            last = None if last_image is None else image_to_array(last_image, settings.height, settings.width)
            c = cond.encode_condition(self.vae_options.bind(self.vae), self.conditioning, pixels, settings.frames,
                                      batch=b, last_image=last)
            out["condition" if c.kind == "concat" else "first_latent"] = c.tensor
        return out

    # --- stage 2: denoise ------------------------------------------------------------------------------
    def latent_shape(self, settings: GenerateSettings) -> tuple[int, ...]:
        f, h, w, z = self.vae_config.latent_shape(settings.frames, settings.height, settings.width)
        return (settings.batch, f, h, w, z)

    def denoise(self, encoded: dict[str, np.ndarray], settings: GenerateSettings, *, noise: np.ndarray | None = None,
                on_step: sampling.StepCallback | None = None, progress: bool = True) -> np.ndarray:
        """Final latents [B, F, h, w, z] (float32) from the encode stage's arrays."""
        shape = self.latent_shape(settings)
        if noise is None:
            noise = sampling.initial_noise(settings.seed, shape)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, these settings need {shape}")
        inputs = sampling.DenoiseInputs(
            text=encoded["prompt_embeds"],
            negative_text=encoded.get("negative_prompt_embeds"),
            image=encoded.get("image_embeds"),
            condition=encoded.get("condition"),
        )
        if "first_latent" in encoded:
            keep = cond.first_frame_keep(*shape[1:4])
            inputs = inputs.replace(first_latent=encoded["first_latent"], keep=keep,
                                    token_keep=cond.token_timesteps(keep, self.dit_config.patch_size))
        guidance = sampling.Guidance(settings.guidance, settings.guidance_2, settings.guidance_steps,
                                     settings.cfg_batch)
        latents = sampling.sample(self.experts, self.schedule(settings), noise, inputs, guidance,
                                  boundary_ratio=self.boundary_ratio, on_step=on_step, progress=progress)
        return np.asarray(latents, np.float32)

    def denoise_causal(self, encoded: dict[str, np.ndarray], settings: GenerateSettings, causal,
                       progress: bool = True) -> np.ndarray:
        """Block-causal generation (`jax_impl.causal`): a few steps per block of latent frames, each block
        attending to a KV cache of the ones before (within `causal.window`). No guidance: causal Wan models
        are distilled to run without it. Returns the latents [B, F, h, w, z] (float32)."""
        from jax_impl import causal as causal_mod

        if len(self.experts) != 1:
            raise ValueError("block-causal generation takes a single-expert checkpoint (Wan2.1 T2V/I2V style)")
        if "first_latent" in encoded:
            raise ValueError("block-causal generation does not support TI2V's first-frame conditioning")
        f, h, w = self.latent_shape(settings)[1:4]
        blocks = causal_mod.sample_blocks(
            self.experts[0], encoded["prompt_embeds"], config=causal, shape=(f, h, w),
            image=encoded.get("image_embeds"), condition=encoded.get("condition"), seed=settings.seed,
        )
        if progress:
            from tqdm import tqdm

            blocks = tqdm(blocks, total=causal.num_blocks(f), desc="blocks", unit="block", dynamic_ncols=True)
        return np.concatenate([np.asarray(b, np.float32) for b in blocks], axis=1)

    # --- stage 3: decode -------------------------------------------------------------------------------
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Video [B, frames, H, W, 3] in [-1, 1] (float32) from normalised latents."""
        import jax.numpy as jnp

        from jax_impl.latents import decode_latents

        video = decode_latents(self.vae_options.bind(self.vae), jnp.asarray(latents, jnp.float32))
        return np.asarray(video, np.float32)


def generate(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prompt: str | None,
    image_path: str | os.PathLike | None,
    settings: GenerateSettings,
    negative_prompt: str = DEFAULT_NEGATIVE,
    last_image_path: str | os.PathLike | None = None,
    embeddings_path: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    dtype=None,
    attention_backend: str = "auto",
    causal=None,
    log=print,
    vae_options=None,
) -> dict[str, Any]:
    """Run encode -> denoise -> decode, writing each stage's file under `work_dir` and the mp4 at `out`.

    With `resume`, a stage whose file exists (and matches the checkpoint and settings) is not re-run.
    `causal` (a `jax_impl.causal.CausalConfig`) switches the denoise stage to block-causal generation.
    """
    from jax_impl.media import load_image, to_uint8, write_mp4
    from jax_impl.stages import load_stage, save_stage
    from weights.safetensors_io import load_tensors

    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.stem + ".stages")
    encoded_path, latents_path = work / "encoded.safetensors", work / "latents.safetensors"
    # Read every input before the first stage runs, so bad input fails fast and writes nothing.
    image = load_image(image_path) if image_path is not None else None
    last_image = load_image(last_image_path) if last_image_path is not None else None
    embeddings = load_tensors(embeddings_path)[0] if embeddings_path is not None else None
    t0 = time.perf_counter()
    pipe = Pipeline(checkpoint, dtype=dtype, attention_backend=attention_backend,
                    load_encoders=embeddings is None, vae_options=vae_options)
    pipe.check_settings(settings, image is not None)
    if causal is not None:  # validate the block layout before any stage runs
        causal.num_blocks(pipe.latent_shape(settings)[1])
    shape_meta = {"frames": settings.frames, "height": settings.height, "width": settings.width,
                  "batch": settings.batch, "checkpoint": str(Path(checkpoint).resolve())}
    timings: dict[str, float] = {"load": time.perf_counter() - t0}

    def reusable(path: Path, stage: str, expect: dict[str, Any]) -> dict[str, np.ndarray] | None:
        if not (resume and path.is_file()):
            return None
        arrays, meta = load_stage(path, stage)
        if any(meta.get(k) != v for k, v in expect.items()):
            log(f"[resume] {path.name} was made with other settings; recomputing")
            return None
        log(f"[resume] reusing {path}")
        return arrays

    t = time.perf_counter()
    encode_meta = {**shape_meta, "prompt": prompt, "negative_prompt": negative_prompt}
    encoded = reusable(encoded_path, "encoded", encode_meta)
    if encoded is None:
        encoded = pipe.encode(settings, prompt=prompt, image=image, last_image=last_image,
                              negative_prompt=negative_prompt, embeddings=embeddings)
        save_stage(encoded_path, "encoded", encoded, encode_meta)
    timings["encode"] = time.perf_counter() - t
    log(f"[1/3] encoded: {encoded_path} ({timings['encode']:.1f} s)")

    t = time.perf_counter()
    denoise_meta = {**shape_meta, "settings": dataclasses.asdict(settings),
                    "causal": None if causal is None else dataclasses.asdict(causal)}
    latents = reusable(latents_path, "latents", denoise_meta)
    if latents is None:
        if causal is None:
            latents = {"latents": pipe.denoise(encoded, settings)}
        else:
            latents = {"latents": pipe.denoise_causal(encoded, settings, causal)}
        save_stage(latents_path, "latents", latents, denoise_meta)
    timings["denoise"] = time.perf_counter() - t
    log(f"[2/3] denoised: {latents_path} ({timings['denoise']:.1f} s)")

    t = time.perf_counter()
    video = pipe.decode(latents["latents"])
    frames = to_uint8(video[0])
    write_mp4(out, frames, fps=settings.fps)
    for k in range(1, video.shape[0]):
        write_mp4(out.with_name(f"{out.stem}_{k}{out.suffix}"), to_uint8(video[k]), fps=settings.fps)
    timings["decode"] = time.perf_counter() - t
    log(f"[3/3] decoded {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}: {out} "
        f"({timings['decode']:.1f} s)")
    return {"video": out, "encoded": encoded_path, "latents": latents_path, "frames": int(frames.shape[0]),
            "timings": timings}
