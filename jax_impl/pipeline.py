"""The staged Wan generation pipeline in JAX: encode -> denoise -> decode -> mp4.

`Pipeline(folder)` opens a pipeline folder in the diffusers layout (model_index.json, transformer/,
transformer_2/, vae/, scheduler/, text_encoder/ + tokenizer/, image_encoder/ + image_processor/); a
transformer folder may hold diffusers-, original-Wan- or Flax-layout weights (see `wanport convert`).
Opening reads every config (type-checked), validates the header and size of every weight file it will
use, parses the encoders' JSON files and checks that the parts fit each other (DiT channels against the
VAE, text and image widths against the encoders), so a missing, damaged or mismatched part is named before
any stage runs. The weights are loaded when a stage first needs them.

The encoders come in through an interface, not an import: `TextEncoder` and `ImageEncoder` are Protocols
(a callable from prompts or PIL images to float32 numpy arrays), and an `EncoderSet` names one
implementation and builds its encoders from the folder when first needed. The default is `JAX_ENCODERS`
(`jax_impl.encoders`, no torch); the command line (`wanport --encoders torch`) or the parity code may hand
in torch_ref's, which satisfy the same Protocols structurally. This module never imports torch_ref.

Stages and their files (see `jax_impl.stages`): `encode` writes prompt/negative/image embeddings and the
VAE-encoded image condition; `denoise` writes the final latents; `decode` turns latents into frames. Each
stage file is keyed by everything that determines it (`encode_inputs`, `denoise_inputs`), so `--resume`
reuses exactly what is still valid.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Collection, Protocol, Sequence

import numpy as np

from jax_impl import causal as causal_mod
from jax_impl import conditioning as cond
from jax_impl import sampling, schedulers, step_cache
from jax_impl.encoders.image import JaxImageEncoder
from jax_impl.encoders.text import JaxTextEncoder
from jax_impl.fp8_loading import load_dit_fp8
from jax_impl.latents import VaeOptions, decode_latents
from jax_impl.loading import load_dit, load_vae
from jax_impl.media import image_to_array, load_image, to_uint8, write_mp4
from jax_impl.noise import initial_noise
from jax_impl.settings import GenerateSettings
from jax_impl.stages import Encoded, reuse_stage, save_stage, stage_key
from kernels.backends import resolve_backend
from weights.atomic import check_output_path
from weights.checkpoint import Checkpoint, folder_identity
from weights.lora import parse_lora_arg
from weights.lora_apply import apply_loras
from weights.manifest import file_digest
from weights.safetensors_io import load_tensors, validate_tree
from weights.single_file import open_dit
from weights.configs.base import check_field_types, read_json
from weights.configs.causal import check_causal_inputs
from weights.configs.scheduler import SchedulerConfig
from weights.configs.vae import VaeConfig
from weights.dit_map import DIT
from weights.vae_map import VAE

EXPERT_DIRS = (("transformer", "transformer_2"), ("high_noise_model", "low_noise_model"))
ENCODER_PARTS = {"text": ("tokenizer", "text_encoder"), "image": ("image_processor", "image_encoder")}
EMBEDDING_NAMES = ("prompt_embeds", "negative_prompt_embeds", "image_embeds")
DEFAULT_NEGATIVE = ""


class PipelineError(ValueError):
    """A pipeline folder that cannot be used as it is; the message names what is missing and the fix."""


class TextEncoder(Protocol):
    """Prompts -> float32 [len(prompts), 512, text_dim]: each prompt cleaned (`weights.configs.prompt`),
    tokenized to 512 tokens, and the rows past its tokens zero."""

    def __call__(self, prompts: list[str]) -> np.ndarray: ...


class ImageEncoder(Protocol):
    """PIL images -> float32 [1, tokens * len(images), image_dim]: CLIP's penultimate hidden states."""

    def __call__(self, images: list) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class EncoderSet:
    """One encoder implementation: `name` ("jax", "torch") goes into the encode stage's resume key, since the
    two compute the embeddings in different ways; `text` and `image` build the encoders from the pipeline
    folder, called only when a stage needs them (never when precomputed embeddings replace them)."""

    name: str
    text: Callable[[Path], TextEncoder]
    image: Callable[[Path], ImageEncoder]


JAX_ENCODERS = EncoderSet("jax", JaxTextEncoder, JaxImageEncoder)


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
    except (UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"{index_path}: not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise PipelineError(f"{index_path}: expected a JSON object")
    check_field_types(index, {"boundary_ratio": float | None, "expand_timesteps": bool | None}, str(index_path))
    ratio = index.get("boundary_ratio")
    if ratio is not None and not 0 < ratio < 1:
        raise PipelineError(f"{index_path}: boundary_ratio must lie in (0, 1) (Wan2.2 A14B uses 0.875/0.9), "
                            f"got {ratio}")
    return index


def _read_config(path: Path, types: dict[str, Any]) -> dict[str, Any]:
    """A component's config.json, with the fields in `types` present and of those types."""
    raw = read_json(path)
    missing = [k for k in types if k not in raw]
    if missing:
        raise PipelineError(f"{path}: no {', '.join(missing)} field; is this the right model's config?")
    check_field_types(raw, types, str(path))
    return raw


def _per_sample(x: np.ndarray, batch: int) -> np.ndarray:
    """One row shared by every video of the batch is repeated; per-sample rows are kept as they are."""
    return np.repeat(x, batch, 0) if x.shape[0] == 1 else x


def _listed(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def _lora_spec(spec) -> tuple[Path, float]:
    """`"FILE[:SCALE]"` or `(file, scale)` as (path, strength)."""
    if isinstance(spec, tuple):
        return Path(spec[0]), float(spec[1])
    path, scale = parse_lora_arg(str(spec))
    return Path(path), scale


def _lora_identity(path: Path) -> str:
    """sha256 of a LoRA file, or of a PEFT folder's files."""
    if path.is_dir():
        return ",".join(f"{f.name}:{file_digest(f)}" for f in sorted(path.iterdir()) if f.is_file())
    return file_digest(path)


def load_embeddings(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Precomputed embeddings (--embeddings): a safetensors file, validated like any weight file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    return load_tensors(path)[0]


class Pipeline:
    """One pipeline folder: configs checked when opened; the DiT(s) and VAE in JAX and the encoders of
    `encoders` (default: JAX), each loaded when first used."""

    def __init__(self, folder: str | os.PathLike, *, dtype=None, attention_backend: str = "auto",
                 load_encoders: bool | Collection[str] = True, vae_options=None,
                 encoders: EncoderSet = JAX_ENCODERS, precision: str | None = None,
                 loras: Sequence[str | tuple[str | os.PathLike, float]] = (),
                 loras_2: Sequence[str | tuple[str | os.PathLike, float]] = (),
                 lora_ignore_missing: bool = False, timesteps: Sequence[float] | None = None, log=print):
        """`load_encoders`: True checks every encoder the checkpoint needs, False none, or a collection of
        "text" / "image" (what precomputed embeddings do not replace). `encoders`: which implementation
        encodes prompts and images. `precision="fp8"` runs the DiT's block linears in FP8
        (jax_impl.fp8_loading.load_dit_fp8; needs dtype bfloat16); None: every weight in `dtype`.

        `loras`: LoRA files merged into the high-noise expert (`transformer/`, or the only one) as it loads,
        each `"FILE[:SCALE]"` or `(file, scale)`; `loras_2`: the same for the low-noise expert (`transformer_2/`,
        two-expert checkpoints only). They are read against the DiT config here, so a LoRA that does not
        fit is refused before any stage runs. `timesteps`: explicit unshifted timesteps for step-distilled
        models (`jax_impl.schedulers.schedule_from_timesteps`: Euler step, shift from the settings or config);
        the number of steps must then equal their count."""
        import jax.numpy as jnp

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
        self.expert_dirs = names
        self.boundary_ratio = index.get("boundary_ratio")
        if len(names) == 2 and self.boundary_ratio is None:
            self.boundary_ratio = 0.9  # Wan2.2 A14B default: t >= 900 on the high-noise expert
        for part in ("vae", "scheduler"):
            if not (self.folder / part).is_dir():
                raise PipelineError(f"{self.folder}: missing the {part}/ folder; copy it from the original pipeline")
        self.dtype = jnp.dtype(dtype or jnp.float32)
        if precision not in (None, "bf16", "fp8"):
            raise ValueError(f"precision must be bf16 or fp8, got {precision!r}")
        if precision == "fp8" and self.dtype != jnp.bfloat16:
            raise ValueError(f"precision fp8 runs the DiT in bfloat16 between its FP8 matmuls; dtype is {self.dtype}: "
                             "pass dtype=bfloat16 (--dtype bfloat16)")
        self.precision = precision
        if attention_backend == "cudnn_fp8":
            import jax

            if jax.default_backend() != "gpu" or self.dtype != jnp.bfloat16:
                raise PipelineError(
                    f"attention back-end cudnn_fp8 needs an NVIDIA Hopper GPU and a bfloat16 DiT; JAX runs on "
                    f"{jax.default_backend()!r} with dtype {self.dtype}: use --backend auto (or pass --dtype bfloat16)")
        self.attention_backend = attention_backend
        self.timesteps = None if timesteps is None else tuple(float(t) for t in timesteps)
        # Headers and configs only (every weight file's header and size validated); weights load on first use.
        configs = [Checkpoint(self.folder / n, DIT).config for n in names]
        self.dit_config = configs[0]
        self.vae_config: VaeConfig = Checkpoint(self.folder / "vae", VAE).config
        scheduler_json = self.folder / "scheduler" / "scheduler_config.json"
        self.scheduler_config = SchedulerConfig.from_json(scheduler_json)
        self._check_experts_agree(configs)
        self.conditioning = self._check_fit()
        if self.timesteps is not None:  # range and order checked now, against num_train_timesteps
            schedulers.schedule_from_timesteps(self.scheduler_config, self.timesteps)
        self.loras = self._open_loras(loras, loras_2, lora_ignore_missing, log)
        self._experts: list | None = None
        self._vae = None
        self.vae_options = vae_options or VaeOptions()  # VAE dtype and spatial tiling
        self.encoders = encoders
        self._text_encoder: TextEncoder | None = None
        self._image_encoder: ImageEncoder | None = None
        self._checked_encoders: set[str] = set()
        if load_encoders:
            self.check_encoders(self.encoders_needed(()) if load_encoders is True else set(load_encoders))

    # --- opening: do the parts fit? --------------------------------------------------------------------
    def _open_loras(self, loras, loras_2, ignore_missing: bool, log) -> dict[str, list[tuple[Path, float]]]:
        """{expert folder: [(LoRA file, strength), ...]}, every LoRA read against that expert's config (all
        refusals here); the merged checkpoints wait in `self._lora_checkpoints` for the experts' first load."""
        specs = {self.expert_dirs[0]: [_lora_spec(x) for x in loras]}
        if loras_2:
            if len(self.expert_dirs) == 1:
                raise PipelineError(f"{self.folder}: --lora-2 goes to the low-noise expert (transformer_2/) of two-expert "
                                    "checkpoints (Wan2.2 A14B); this checkpoint has one transformer: use --lora")
            specs[self.expert_dirs[1]] = [_lora_spec(x) for x in loras_2]
        specs = {d: s for d, s in specs.items() if s}
        if specs and self.precision == "fp8":
            raise PipelineError("--precision fp8 with LoRAs is not supported: merge them into a checkpoint first "
                                "(`wanport convert SRC MERGED --to diffusers --lora FILE[:SCALE]`), then run "
                                "--precision fp8 on MERGED")
        for d, s in specs.items():
            for path, _ in s:
                if not path.exists():
                    flag = "--lora" if d == self.expert_dirs[0] else "--lora-2"
                    raise FileNotFoundError(f"{flag}: LoRA file {path} does not exist")
        self._lora_checkpoints = {d: apply_loras(open_dit(self.folder / d), [(str(p), w) for p, w in s],
                                                 ignore_missing=ignore_missing, log=log)
                                  for d, s in specs.items()}
        return specs

    def _check_experts_agree(self, configs) -> None:
        for name, cfg in zip(self.expert_dirs[1:], configs[1:]):
            if cfg != configs[0]:
                diff = [f"{f.name} {getattr(configs[0], f.name)} vs {getattr(cfg, f.name)}"
                        for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(configs[0], f.name)]
                raise PipelineError(f"{self.folder}: {name}/ does not fit {self.expert_dirs[0]}/ (both experts must "
                                    f"have the same configuration): {'; '.join(diff)}")

    def _check_fit(self) -> str:
        """The conditioning kind ("concat", "first_frame" or "none"), after checking the DiT against the VAE."""
        dit, z = self.dit_config, self.vae_config.z_dim
        where = f"{self.folder / self.expert_dirs[0]}/config.json"
        expand = bool(self.index.get("expand_timesteps"))
        if dit.pos_embed_seq_len:
            raise PipelineError(f"{where}: a first-last-frame (FLF2V) transformer (pos_embed_seq_len="
                                f"{dit.pos_embed_seq_len}); FLF2V checkpoints are not supported yet")
        if dit.in_channels not in (z, 2 * z + 4):
            raise PipelineError(
                f"{where}: in_channels={dit.in_channels} does not fit vae/ (z_dim={z}): with this VAE a DiT takes {z} "
                f"(text-to-video, TI2V) or {2 * z + 4} (image-to-video: {z} latents + 4 mask + {z} image condition) "
                "channels; the transformer and the VAE come from different models"
            )
        if dit.out_channels != z:
            raise PipelineError(f"{where}: out_channels={dit.out_channels} does not fit vae/ (z_dim={z}): the DiT must "
                                "predict the VAE's latent channels; the transformer and the VAE come from different "
                                "models")
        if dit.in_channels == z:
            return "first_frame" if expand else "none"
        if expand:
            raise PipelineError(f"{self.folder / 'model_index.json'}: expand_timesteps (TI2V first-frame "
                                f"conditioning) is set, but {where} takes in_channels={dit.in_channels} = latents + "
                                "4 mask + image condition (I2V concat conditioning); remove expand_timesteps")
        return "concat"

    def encoders_needed(self, embedding_names: Collection[str]) -> set[str]:
        """The encoder groups ("text", "image") that precomputed `embedding_names` do not replace."""
        need = set() if "prompt_embeds" in embedding_names else {"text"}
        if self.dit_config.has_image_tokens and "image_embeds" not in embedding_names:
            need.add("image")
        return need

    def check_encoders(self, groups: Collection[str]) -> None:
        """The encoder folders of `groups` exist, their files are intact (weights headers, JSON) and their
        widths fit the DiT; named up front instead of failing inside transformers."""
        groups = set(groups) - self._checked_encoders
        parts = [p for g in sorted(groups) for p in ENCODER_PARTS[g]]
        missing = [p for p in parts if not (self.folder / p).is_dir()]
        if missing:
            raise PipelineError(
                f"{self.folder}: missing {', '.join(n + '/' for n in missing)}; copy them from the original pipeline, "
                "or pass precomputed embeddings (--embeddings FILE with prompt_embeds[, negative_prompt_embeds, "
                "image_embeds])"
            )
        for p in parts:
            validate_tree(self.folder / p)
        widths = {"text": ("text_encoder", "d_model", self.dit_config.text_dim, "text_dim"),
                  "image": ("image_encoder", "hidden_size", self.dit_config.image_dim, "image_dim")}
        for g in sorted(groups):
            part, key, want, dit_key = widths[g]
            got = _read_config(self.folder / part / "config.json", {key: int})[key]
            if got != want:
                raise PipelineError(f"{self.folder / part}/config.json: {key}={got} does not fit the transformer's "
                                    f"{dit_key}={want}; the encoder comes from another model")
        self._checked_encoders |= groups

    # --- components ------------------------------------------------------------------------------------
    @property
    def experts(self) -> list:
        """The DiT expert(s), loaded on first use."""
        if self._experts is None:
            if self.precision == "fp8":
                self._experts = [load_dit_fp8(self.folder / n, attention_backend=self.attention_backend)
                                 for n in self.expert_dirs]
            else:
                self._experts = [load_dit(self._lora_checkpoints.get(n, self.folder / n), dtype=self.dtype,
                                          attention_backend=self.attention_backend) for n in self.expert_dirs]
        return self._experts

    @property
    def vae(self):
        """The VAE (float32), loaded on first use."""
        if self._vae is None:
            import jax.numpy as jnp

            self._vae = load_vae(self.folder / "vae", dtype=jnp.dtype(self.vae_options.dtype))
        return self._vae

    @property
    def text_encoder(self) -> TextEncoder:
        """The prompt encoder of `self.encoders`, built on first use (its folders checked first)."""
        if self._text_encoder is None:
            self.check_encoders({"text"})
            self._text_encoder = self.encoders.text(self.folder)
        return self._text_encoder

    @property
    def image_encoder(self) -> ImageEncoder:
        """The image encoder of `self.encoders`, built on first use (its folders checked first)."""
        if self._image_encoder is None:
            self.check_encoders({"image"})
            self._image_encoder = self.encoders.image(self.folder)
        return self._image_encoder

    @property
    def expert_labels(self) -> list[str]:
        if len(self.expert_dirs) == 2:
            return [f"{self.expert_dirs[0]}/, high-noise", f"{self.expert_dirs[1]}/, low-noise"]
        return [f"{self.expert_dirs[0]}/"]

    def scheduler_for(self, settings: GenerateSettings) -> SchedulerConfig:
        """The checkpoint's scheduler config with `settings`' scheduler kind and shift applied."""
        cfg = self.scheduler_config
        if settings.scheduler is not None and settings.scheduler != cfg.kind:
            cfg = SchedulerConfig(kind=settings.scheduler, shift=cfg.shift,
                                             num_train_timesteps=cfg.num_train_timesteps)
        if settings.shift is not None:
            cfg = cfg.replace(shift=settings.shift)
        return cfg

    def schedule(self, settings: GenerateSettings) -> schedulers.Schedule:
        """The schedule for `settings`: the shift is part of the config before the timesteps are made; with
        explicit `timesteps`, those (Euler step)."""
        if self.timesteps is not None:
            return schedulers.schedule_from_timesteps(self.scheduler_for(settings), self.timesteps)
        return schedulers.make_schedule(self.scheduler_for(settings), settings.steps)

    # --- checks before any stage -----------------------------------------------------------------------
    def check_settings(self, settings: GenerateSettings, has_image: bool, has_last_image: bool = False,
                       causal=None) -> None:
        """The settings against this checkpoint: video size, steps, guidance, which images it takes, causal layout."""
        settings.validate()
        cond.check_video_size(settings.frames, settings.height, settings.width, self.vae_config,
                              self.dit_config.patch_size)
        if settings.steps > self.scheduler_config.num_train_timesteps:
            raise ValueError(f"--steps {settings.steps} is more than the scheduler's "
                             f"{self.scheduler_config.num_train_timesteps} training timesteps")
        if settings.guidance_2 is not None and len(self.expert_dirs) == 1:
            raise ValueError("--guidance-2 sets the low-noise expert's guidance of two-expert checkpoints (Wan2.2 "
                             "A14B); this checkpoint has one transformer, drop --guidance-2")
        self._check_images(has_image, has_last_image)
        if self.timesteps is not None:
            if settings.steps != len(self.timesteps):
                raise ValueError(f"--steps {settings.steps} does not match the {len(self.timesteps)} --timesteps "
                                 f"{','.join(f'{t:g}' for t in self.timesteps)}; drop --steps (it follows --timesteps)")
            if settings.scheduler == "unipc":
                raise ValueError("--timesteps always takes flow-Euler steps (as distilled models were trained); drop "
                                 "--scheduler unipc")
            if causal is not None:
                raise ValueError("--timesteps sets the bidirectional sampler's steps; block-causal generation takes "
                                 "its per-block timesteps from --causal-steps")
        if causal is not None:
            if settings.cfg_reuse or settings.step_cache is not None:
                raise ValueError("--cfg-reuse, --step-cache and --skip-steps speed up the guided sampler; block-causal "
                                 "generation (--causal) has its own few-step, unguided sampler: drop them")
            self._check_causal(settings, causal, has_image)
        self.skip_plan(settings)  # a step-cache calibration or skip list that does not fit is refused now

    def _check_images(self, has_image: bool, has_last_image: bool) -> None:
        if has_last_image and not has_image:
            raise ValueError("--last-image needs --image (the first frame)")
        if self.conditioning == "concat" and not has_image:
            raise ValueError("this is an image-to-video checkpoint: give an image (--image)")
        if self.conditioning == "none" and has_image:
            raise ValueError("this is a text-to-video checkpoint: its DiT takes no image; drop --image "
                             "(and --last-image) or use an image-to-video checkpoint")
        if has_last_image and self.dit_config.has_image_tokens:
            raise ValueError(
                "--last-image: Wan2.1 image-to-video checkpoints cannot take a last frame (their DiT reads the CLIP "
                "tokens of one image; diffusers' WanImageToVideoPipeline fails on it too). First-last-frame (FLF2V) "
                "checkpoints are not supported yet; drop --last-image"
            )
        if has_last_image and self.conditioning == "first_frame":
            raise ValueError("--last-image: TI2V checkpoints condition on the first frame only (diffusers ignores a "
                             "last image there); drop --last-image")

    def _check_causal(self, settings: GenerateSettings, causal, has_image: bool) -> None:
        if len(self.expert_dirs) != 1:
            raise ValueError("block-causal generation takes a single-expert checkpoint (Wan2.1 T2V/I2V style)")
        if self.conditioning == "first_frame" and has_image:
            raise ValueError("block-causal generation does not support TI2V's first-frame conditioning")
        b, f, h, w, z = self.latent_shape(settings)
        cfg = self.dit_config
        check_causal_inputs(
            cfg, causal, (b, f, h, w, z), (b, 1, cfg.text_dim),
            (b, 1, cfg.image_dim) if cfg.has_image_tokens else None,
            (b, f, h, w, cfg.in_channels - cfg.out_channels) if self.conditioning == "concat" else None,
        )

    def check_inputs(self, *, prompt: str | None, negative_prompt: str = DEFAULT_NEGATIVE,
                     embeddings: dict[str, np.ndarray] | None = None, batch: int = 1,
                     source: str = "--embeddings") -> None:
        """The prompt and precomputed embeddings (names, shapes, widths, finite values), and the encoders
        they do not replace."""
        emb = embeddings or {}
        unknown = sorted(set(emb) - set(EMBEDDING_NAMES))
        if unknown:
            raise ValueError(f"{source}: unknown arrays {unknown}; the file may hold {', '.join(EMBEDDING_NAMES)}")
        widths = {"prompt_embeds": self.dit_config.text_dim, "negative_prompt_embeds": self.dit_config.text_dim,
                  "image_embeds": self.dit_config.image_dim}
        for name, a in emb.items():
            a = np.asarray(a)
            if name == "image_embeds" and not self.dit_config.has_image_tokens:
                raise ValueError(f"{source}: image_embeds given, but this checkpoint's DiT takes no CLIP image tokens")
            if a.dtype.kind != "f" or a.ndim != 3 or a.shape[0] not in (1, batch) or a.shape[2] != widths[name]:
                raise ValueError(f"{source}: {name} is {a.dtype}{list(a.shape)}; expected floats [1 or batch={batch}, "
                                 f"tokens, {widths[name]}]")
            if not np.isfinite(a).all():
                raise ValueError(f"{source}: {name} holds NaN or inf values")
        if "negative_prompt_embeds" in emb and "prompt_embeds" not in emb:
            raise ValueError(f"{source}: negative_prompt_embeds without prompt_embeds; give both, or neither")
        if "prompt_embeds" in emb:
            if prompt is not None or negative_prompt:
                raise ValueError(f"{source} supplies prompt_embeds: drop --prompt and --negative-prompt, which would "
                                 "be ignored (put negative_prompt_embeds in the file instead)")
        elif prompt is None:
            raise ValueError("give a prompt (--prompt) or precomputed prompt_embeds (--embeddings)")
        self.check_encoders(self.encoders_needed(emb))

    def check_request(self, settings: GenerateSettings, *, prompt: str | None, negative_prompt: str = DEFAULT_NEGATIVE,
                      has_image: bool = False, has_last_image: bool = False,
                      embeddings: dict[str, np.ndarray] | None = None, causal=None,
                      source: str = "--embeddings") -> None:
        """Everything about one generation that can be checked before a stage runs."""
        self.check_settings(settings, has_image, has_last_image, causal)
        self.check_inputs(prompt=prompt, negative_prompt=negative_prompt, embeddings=embeddings,
                          batch=settings.batch, source=source)

    # --- stage keys ------------------------------------------------------------------------------------
    def weights_identity(self, *parts: str) -> dict[str, str | None]:
        return {p: folder_identity(self.folder / p) for p in parts}

    def encode_inputs(self, settings: GenerateSettings, *, prompt: str | None, negative_prompt: str,
                      files: dict[str, str | None], embedding_names: Collection[str]) -> dict[str, Any]:
        """What the encode stage's arrays depend on. `files`: sha256 of the image, last_image and embeddings
        files (None when not given)."""
        groups = self.encoders_needed(embedding_names)
        uses_vae = self.conditioning != "none" and files.get("image") is not None
        parts = [p for g in sorted(groups) for p in ENCODER_PARTS[g]] + (["vae"] if uses_vae else [])
        inputs: dict[str, Any] = {
            "prompt": prompt if "text" in groups else None,
            "negative_prompt": negative_prompt if "text" in groups else None,
            "image": files.get("image"), "last_image": files.get("last_image"), "embeddings": files.get("embeddings"),
            "batch": settings.batch, "conditioning": self.conditioning,
            "image_tokens": self.dit_config.has_image_tokens, "weights": self.weights_identity(*parts),
            "encoders": self.encoders.name if groups else None,
        }
        if uses_vae:  # the condition is encoded at the video's size, with these VAE settings
            inputs.update(frames=settings.frames, height=settings.height, width=settings.width,
                          vae_dtype=str(self.vae_options.dtype), vae_tile=self.vae_options.tile)
        return inputs

    def denoise_inputs(self, settings: GenerateSettings, encoded_key: str, causal=None) -> dict[str, Any]:
        """What the denoise stage's latents depend on, the encode stage's key included."""
        return {
            "encoded_stage": encoded_key,
            "frames": settings.frames, "height": settings.height, "width": settings.width, "batch": settings.batch,
            "seed": settings.seed, "steps": settings.steps, "guidance": settings.guidance,
            "guidance_2": settings.guidance_2, "guidance_steps": settings.guidance_steps,
            "cfg_batch": settings.cfg_batch, "scheduler": dataclasses.asdict(self.scheduler_for(settings)),
            "boundary_ratio": self.boundary_ratio if len(self.expert_dirs) == 2 else None,
            "causal": None if causal is None else dataclasses.asdict(causal),
            "dtype": self.dtype.name, "attention": resolve_backend(self.attention_backend, self.dtype),
            "weights": self.weights_identity(*self.expert_dirs),
            **({"precision": "fp8"} if self.precision == "fp8" else {}),  # absent for bf16: old cache keys still match
            **({"loras": self.loras_identity()} if self.loras else {}),
            **({"timesteps": list(self.timesteps)} if self.timesteps is not None else {}),
            **self._fast_mode_inputs(settings),  # absent when off: old cache keys still match
        }

    def _fast_mode_inputs(self, settings: GenerateSettings) -> dict[str, Any]:
        """The fast modes' part of the denoise stage key: CFG reuse, and the step cache's options with the
        calibration file's sha256 (its content decides the skipped steps, not its path)."""
        out: dict[str, Any] = {"cfg_reuse": True} if settings.cfg_reuse else {}
        sc = settings.step_cache
        if sc is not None:
            key = dataclasses.asdict(sc)
            if sc.calibration is not None:
                key["calibration"] = file_digest(Path(sc.calibration))
            out["step_cache"] = key
        return out

    def loras_identity(self) -> dict[str, list[dict[str, Any]]]:
        """{expert folder: [{"sha256": of the LoRA file, "scale": strength}, ...]}, in merge order (JSON types, as
        the stage file stores them)."""
        return {d: [{"sha256": _lora_identity(p), "scale": w} for p, w in specs] for d, specs in self.loras.items()}

    # --- stage 1: encode -------------------------------------------------------------------------------
    def encode(self, settings: GenerateSettings, *, prompt: str | None = None, image=None, last_image=None,
               negative_prompt: str = DEFAULT_NEGATIVE, embeddings: dict[str, np.ndarray] | None = None
               ) -> Encoded:
        """Prompt/negative/image embeddings (float32 numpy arrays) and the typed image condition.

        `image` and `last_image` are PIL images; `embeddings` may supply prompt_embeds,
        negative_prompt_embeds and image_embeds instead of running the encoders.
        """
        emb = dict(embeddings or {})
        negative_prompt = negative_prompt or DEFAULT_NEGATIVE
        self.check_request(settings, prompt=prompt, negative_prompt=negative_prompt, has_image=image is not None,
                           has_last_image=last_image is not None, embeddings=emb)
        out: dict[str, np.ndarray] = {}
        b = settings.batch
        if "prompt_embeds" in emb:
            text = np.asarray(emb["prompt_embeds"], np.float32)
            neg = emb.get("negative_prompt_embeds")
            neg = None if neg is None else np.asarray(neg, np.float32)
        else:
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
        condition: cond.Conditioning = cond.NoCondition()
        if self.conditioning != "none" and image is not None:
            pixels = image_to_array(image, settings.height, settings.width)
            last = None if last_image is None else image_to_array(last_image, settings.height, settings.width)
            condition = cond.encode_condition(self.vae_options.bind(self.vae), self.conditioning, pixels,
                                              settings.frames, batch=b, last_image=last,
                                              patch=self.dit_config.patch_size)
        return Encoded(out, condition)

    # --- stage 2: denoise ------------------------------------------------------------------------------
    def latent_shape(self, settings: GenerateSettings) -> tuple[int, ...]:
        f, h, w, z = self.vae_config.latent_shape(settings.frames, settings.height, settings.width)
        return (settings.batch, f, h, w, z)

    def denoise(self, encoded: Encoded, settings: GenerateSettings, *, noise: np.ndarray | None = None,
                on_step: sampling.StepCallback | None = None, progress: bool = True) -> np.ndarray:
        """Final latents [B, F, h, w, z] (float32) from the encode stage's arrays."""
        shape = self.latent_shape(settings)
        if noise is None:
            noise = initial_noise(settings.seed, shape)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, these settings need {shape}")
        inputs = sampling.DenoiseInputs(
            text=encoded["prompt_embeds"],
            negative_text=encoded.get("negative_prompt_embeds"),
            image=encoded.get("image_embeds"),
            condition=self._condition_of(encoded),
        )
        guidance = sampling.Guidance.from_settings(settings)
        skip = self.skip_plan(settings, has_negative=inputs.negative_text is not None)
        latents = sampling.sample(self.experts, self.schedule(settings), noise, inputs, guidance,
                                  boundary_ratio=self.boundary_ratio, on_step=on_step, progress=progress,
                                  expert_names=self.expert_labels, skip=skip)
        return np.asarray(latents, np.float32)

    # --- fast modes ------------------------------------------------------------------------------------
    def step_kinds(self, settings: GenerateSettings, has_negative: bool = True) -> list[sampling.StepKind]:
        """What each step of a run with `settings` computes (expert, guidance, CFG reuse, skipped), as
        `sampling.sample` will do it."""
        return sampling.step_kinds(self.schedule(settings), sampling.Guidance.from_settings(settings),
                                   boundary_ratio=self.boundary_ratio, num_experts=len(self.expert_dirs),
                                   has_negative=has_negative, skip=self.skip_plan(settings, has_negative))

    def step_cache_key(self, settings: GenerateSettings) -> dict[str, Any]:
        """What a step-cache calibration made with `settings` is valid for (`jax_impl.step_cache.calibration_key`)."""
        return step_cache.calibration_key(self.dit_config, len(self.expert_dirs), self.schedule(settings), self.boundary_ratio)

    def skip_plan(self, settings: GenerateSettings, has_negative: bool = True):
        """The step-cache `SkipPlan` of `settings` (None without step caching): its calibration read and checked
        against this model and schedule, or its fixed list checked against the steps that must be computed."""
        sc = settings.step_cache
        if sc is None:
            return None
        kinds = sampling.step_kinds(self.schedule(settings), sampling.Guidance.from_settings(settings),
                                    boundary_ratio=self.boundary_ratio, num_experts=len(self.expert_dirs),
                                    has_negative=has_negative)
        if sc.skip_steps is not None:
            return step_cache.plan_from_list(sc.skip_steps, kinds)
        calibration = step_cache.Calibration.load(sc.calibration)
        calibration.check_key(self.step_cache_key(settings), f"--step-cache-calibration {sc.calibration}")
        return step_cache.plan_from_calibration(calibration, sc.threshold, kinds, max_skips=sc.max_skips,
                                                keep_first=sc.keep_first, metric=sc.metric)

    def _condition_of(self, encoded: Encoded) -> cond.Conditioning:
        """The encode stage's condition, checked against this checkpoint (a missing I2V condition would give a
        wrong video without an error)."""
        condition = getattr(encoded, "condition", None)
        if condition is None:
            raise TypeError("pass the encode stage's result (a jax_impl.stages.Encoded, from `encode`), not a dict")
        text_only_ti2v = condition.KIND == "none" and self.conditioning == "first_frame"
        if condition.KIND != self.conditioning and not text_only_ti2v:
            raise ValueError(f"the encode stage holds a {condition.KIND!r} condition, this checkpoint takes "
                             f"{self.conditioning!r} conditioning; re-run the encode stage for this checkpoint")
        return condition

    def denoise_causal(self, encoded: Encoded, settings: GenerateSettings, causal,
                       progress: bool = True) -> np.ndarray:
        """Block-causal generation (`jax_impl.causal`): a few steps per block of latent frames, each block
        attending to a KV cache of the ones before (within `causal.window`). No guidance: causal Wan models
        are distilled to run without it. Returns the latents [B, F, h, w, z] (float32)."""
        condition = self._condition_of(encoded)
        self._check_causal(settings, causal, condition.KIND != "none")
        f, h, w = self.latent_shape(settings)[1:4]
        blocks = causal_mod.sample_blocks(
            self.experts[0], encoded["prompt_embeds"], config=causal, shape=(f, h, w),
            image=encoded.get("image_embeds"), condition=condition, seed=settings.seed,
        )
        n = causal.num_blocks(f)
        if progress:
            from tqdm import tqdm

            blocks = tqdm(blocks, total=n, desc="blocks", unit="block", dynamic_ncols=True)
        out = []
        for k, block in enumerate(blocks):
            block = np.asarray(block, np.float32)  # the block boundary: one host copy per block anyway
            if not np.isfinite(block).all():
                fpb = causal.frames_per_block
                raise sampling.NonFiniteLatents(
                    f"block-causal sampling produced non-finite latents (NaN or inf) in block {k} of {n} (latent "
                    f"frames {k * fpb}..{(k + 1) * fpb - 1}); check the weights (`wanport convert --verify`)"
                )
            out.append(block)
        return np.concatenate(out, axis=1)

    # --- stage 3: decode -------------------------------------------------------------------------------
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Video [B, frames, H, W, 3] in [-1, 1] (float32) from normalised latents."""
        import jax.numpy as jnp

        video = np.asarray(decode_latents(self.vae_options.bind(self.vae), jnp.asarray(latents, jnp.float32)), np.float32)
        if not np.isfinite(video).all():
            raise ValueError("the VAE decoded the latents to non-finite pixels (NaN or inf); check the VAE weights "
                             "(`wanport convert --verify`) and the latents")
        return video


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
    vae_options=None,
    encoders: EncoderSet = JAX_ENCODERS,
    precision: str | None = None,
    loras: Sequence = (),
    loras_2: Sequence = (),
    lora_ignore_missing: bool = False,
    timesteps: Sequence[float] | None = None,
    step_cache_calibration_out: str | os.PathLike | None = None,
    log=print,
) -> dict[str, Any]:
    """Run encode -> denoise -> decode, writing each stage's file under `work_dir` and the mp4 at `out`.

    Every output path, input file, option and the checkpoint are checked before the first stage runs, so
    bad input fails fast and writes nothing. With `resume`, a stage whose file was computed from exactly
    these inputs is reused; a stale or damaged one is recomputed with a line saying why, and so is every
    later stage. The mp4 is always decoded afresh. `causal` (a `jax_impl.causal.CausalConfig`) switches the
    denoise stage to block-causal generation; `encoders` chooses the text/image encoder implementation;
    `precision`, `loras`, `loras_2`, `lora_ignore_missing` and `timesteps` go to `Pipeline` (see there).
    `step_cache_calibration_out`: also write the step-cache calibration of this (full) run there
    (`jax_impl.step_cache`); the denoise stage then always runs, since a reused stage records nothing.
    """
    settings.validate()
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.stem + ".stages")
    encoded_path, latents_path = work / "encoded.safetensors", work / "latents.safetensors"
    extra_videos = [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(1, settings.batch)]
    for path in (out, *extra_videos):
        check_output_path(path, flag="--out", suffix=".mp4")
    check_output_path(work, flag="--work-dir", folder=True)
    if step_cache_calibration_out is not None:
        check_output_path(Path(step_cache_calibration_out), flag="--write-step-cache-calibration", suffix=".json")
        if settings.step_cache is not None:
            raise ValueError("--write-step-cache-calibration records a full run: drop --step-cache/--skip-steps")
        if causal is not None:
            raise ValueError("--write-step-cache-calibration records the guided sampler; block-causal generation "
                             "(--causal) has no step cache")
    image = load_image(image_path) if image_path is not None else None
    last_image = load_image(last_image_path) if last_image_path is not None else None
    embeddings = load_embeddings(embeddings_path) if embeddings_path is not None else None
    files = {name: None if path is None else file_digest(path) for name, path in
             (("image", image_path), ("last_image", last_image_path), ("embeddings", embeddings_path))}
    t0 = time.perf_counter()
    pipe = Pipeline(checkpoint, dtype=dtype, attention_backend=attention_backend, load_encoders=False,
                    vae_options=vae_options, encoders=encoders, precision=precision, loras=loras, loras_2=loras_2,
                    lora_ignore_missing=lora_ignore_missing, timesteps=timesteps, log=log)
    pipe.check_request(settings, prompt=prompt, negative_prompt=negative_prompt, has_image=image is not None,
                       has_last_image=last_image is not None, embeddings=embeddings, causal=causal,
                       source=str(embeddings_path))
    if embeddings and "prompt_embeds" in embeddings and "negative_prompt_embeds" not in embeddings \
            and settings.guidance > 1 and causal is None:
        log(f"note: {embeddings_path} has no negative_prompt_embeds, so classifier-free guidance is off")
    meta = {"checkpoint": str(Path(checkpoint).resolve()), "settings": dataclasses.asdict(settings)}
    timings: dict[str, float] = {"load": time.perf_counter() - t0}

    t = time.perf_counter()
    encode_inputs = pipe.encode_inputs(settings, prompt=prompt, negative_prompt=negative_prompt, files=files,
                                       embedding_names=set(embeddings or ()))
    found = reuse_stage(encoded_path, "encoded", encode_inputs, log) if resume else None
    encoded = Encoded.from_stage(*found) if found is not None else None
    if encoded is None:
        encoded = pipe.encode(settings, prompt=prompt, image=image, last_image=last_image,
                              negative_prompt=negative_prompt, embeddings=embeddings)
        save_stage(encoded_path, "encoded", encoded.arrays(), encode_inputs, meta | encoded.meta())
    timings["encode"] = time.perf_counter() - t
    log(f"[1/3] encoded: {encoded_path} ({timings['encode']:.1f} s)")

    t = time.perf_counter()
    denoise_inputs = pipe.denoise_inputs(settings, stage_key(encode_inputs), causal)
    calibrate = step_cache_calibration_out is not None
    found = reuse_stage(latents_path, "latents", denoise_inputs, log) if resume and not calibrate else None
    latents = found[0] if found is not None else None
    if latents is None:
        if causal is None:
            plan = pipe.skip_plan(settings, has_negative="negative_prompt_embeds" in encoded)
            if plan is not None:
                log(plan.describe())
            recorder = step_cache.CalibrationRecorder() if calibrate else None
            latents = {"latents": pipe.denoise(encoded, settings, on_step=recorder)}
            if recorder is not None:
                source = {"checkpoint": meta["checkpoint"], "prompt": prompt, "seed": settings.seed,
                          "guidance": settings.guidance, "guidance_2": settings.guidance_2,
                          "frames": settings.frames, "height": settings.height, "width": settings.width}
                recorder.calibration(pipe.step_cache_key(settings), source).save(step_cache_calibration_out)
                log(f"wrote the step-cache calibration {step_cache_calibration_out}")
        else:
            latents = {"latents": pipe.denoise_causal(encoded, settings, causal)}
        save_stage(latents_path, "latents", latents, denoise_inputs, meta)
    timings["denoise"] = time.perf_counter() - t
    log(f"[2/3] denoised: {latents_path} ({timings['denoise']:.1f} s)")

    t = time.perf_counter()
    video = pipe.decode(latents["latents"])
    frames = to_uint8(video[0])
    write_mp4(out, frames, fps=settings.fps)
    for k, path in enumerate(extra_videos, start=1):
        write_mp4(path, to_uint8(video[k]), fps=settings.fps)
    timings["decode"] = time.perf_counter() - t
    log(f"[3/3] decoded {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}: {out} "
        f"({timings['decode']:.1f} s)")
    return {"video": out, "encoded": encoded_path, "latents": latents_path, "frames": int(frames.shape[0]),
            "timings": timings}
