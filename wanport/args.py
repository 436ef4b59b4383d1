"""Argument groups shared by several subcommands, defined once, and their translation into settings objects.

`add_generate_arguments` is what `generate` and the `analyze` commands (which generate) both take; the
analyses run without a checkpoint on a tiny default, so they ask for the group with `tiny` sizes, and
then --checkpoint is optional and the sizes default to "not given" (filled in once it is known whether a
checkpoint was given). Light imports only: this module is loaded by `wanport --help`.
"""

from __future__ import annotations

import argparse
import math

from jax_impl.settings import GenerateSettings
from weights.configs.causal import DEFAULT_TIMESTEPS, CausalConfig
from weights.configs.scheduler import parse_timesteps

# generate's defaults for the size options, and how each one's help starts
GENERATE_SIZES = {"frames": 81, "height": 480, "width": 832, "steps": 40}
DEFAULT_GUIDANCE = 3.5
_SIZE_HELP = {
    "frames": ("video length, 4k+1", " (default 81: 5 s at 16 fps)"),
    "height": ("multiple of 16 (32 for TI2V-5B)", "; default 480"),
    "width": ("multiple of 16 (32 for TI2V-5B)", "; default 832"),
    "steps": ("denoising steps", " (default 40; with --timesteps, their count)"),
}


def add_generate_arguments(p: argparse.ArgumentParser, *, tiny: dict[str, int] | None = None) -> None:
    """The options of one generation. `tiny` ({size option: value}): the command runs a tiny default pipeline
    when --checkpoint is omitted; --checkpoint is then optional and the size options default to None."""
    if tiny is None:
        p.add_argument("--checkpoint", required=True, metavar="DIR",
                       help="pipeline folder (model_index.json, transformer/[transformer_2/], vae/, scheduler/, "
                            "encoders)")
    else:
        p.add_argument("--checkpoint", metavar="DIR",
                       help="pipeline folder as for `wanport generate`; default: write the tiny --preset into "
                            "OUT/tiny/")
    no_ckpt = "" if tiny is None else "; without --checkpoint: the bundled demo {}"
    p.add_argument("--image", metavar="IMG",
                   help="first frame; required for image-to-video checkpoints. Any image PIL reads: EXIF rotation "
                        "is applied, 16-bit and float images are scaled by their range, transparent pixels are "
                        "composited on white" + no_ckpt.format("image"))
    p.add_argument("--last-image", metavar="IMG",
                   help="optional last frame; Wan2.2 I2V-A14B only (Wan2.1 I2V and TI2V cannot take one)")
    p.add_argument("--prompt", help="what the video shows" + no_ckpt.format("prompt"))
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: empty)")
    p.add_argument("--embeddings", metavar="FILE",
                   help="precomputed prompt_embeds[, negative_prompt_embeds, image_embeds] (.safetensors) instead of "
                        "running the text/image encoders")
    for name in ("frames", "height", "width"):
        _add_size(p, name, tiny)
    _add_size(p, "steps", tiny)
    p.add_argument("--shift", type=float, default=None,
                   help="flow shift of the sampler; default: the checkpoint's scheduler config (Wan: 3 for 480p "
                        "Wan2.1 I2V, 5 for 720p and Wan2.2). Applied before the timesteps are made.")
    p.add_argument("--scheduler", choices=["unipc", "euler"], default=None,
                   help="sampler (default: the checkpoint's, UniPC multistep for Wan)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale, a finite number >= 0; <= 1 turns guidance off "
                        f"(default {DEFAULT_GUIDANCE:g})")
    p.add_argument("--guidance-2", type=float, default=None,
                   help="guidance for the low-noise expert of Wan2.2 A14B (default: same as --guidance)")
    p.add_argument("--guidance-steps", type=int, default=None,
                   help="guidance truncation: use CFG only for the first N steps (default: all)")
    p.add_argument("--no-cfg-batch", dest="cfg_batch", action="store_false",
                   help="run conditional and unconditional predictions as two calls instead of one batch of 2")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed in 0..2^32-1; the same seed gives the same video (default 0)")
    p.add_argument("--batch", type=int, default=1, help="videos per run (default 1)")
    p.add_argument("--fps", type=int, default=16, help="frames per second of the mp4 (default 16)")
    p.add_argument("--backend", default="auto", choices=["auto", "xla", "cudnn", "splash", "cudnn_fp8"],
                   help="attention back-end (default auto: cuDNN on GPU, Splash on TPU, XLA on CPU). cudnn_fp8: "
                        "cuDNN's FP8 flash attention for the self-attention (Hopper GPUs, bfloat16; cross-attention "
                        "stays cuDNN bf16); with --precision fp8 the A14B forward was 1.40x bf16 at 480p on an H100, "
                        "at about twice FP8-linears' error (README, FP8)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="DiT dtype (default: bfloat16 on GPU/TPU, float32 on CPU; bfloat16 with --precision fp8)")
    p.add_argument("--encoders", default="jax", choices=["jax", "torch"],
                   help="text and image encoders: jax (default: Flax UMT5 and CLIP, needs no torch) or torch "
                        "(transformers' models, the reference); both float32. Part of the encode stage's resume key")
    m = p.add_argument_group("model variants: FP8, LoRAs, few-step (distilled) sampling")
    m.add_argument("--precision", choices=["bf16", "fp8"], default=None,
                   help="fp8: the DiT's block linears as FP8 (e4m3, one scale per output channel) with bf16 "
                        "activations; implies --dtype bfloat16 (--dtype float32 is refused). A bf16/float32 "
                        "checkpoint is quantised while loading; an FP8 one (`wanport convert --dtype float8_e4m3fn`) "
                        "is read as stored. Default bf16: every weight in --dtype")
    m.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA into the DiT as it loads, at strength SCALE (default 1); repeat for several. "
                        "Goes to the only transformer, or the high-noise expert (transformer/) of Wan2.2 A14B. "
                        "Layouts: diffusers/PEFT, original Wan/LightX2V, ComfyUI, kohya/musubi (docs/loras.md)")
    m.add_argument("--lora-2", action="append", default=[], metavar="FILE[:SCALE]",
                   help="as --lora, for the low-noise expert (transformer_2/) of two-expert checkpoints (Wan2.2 A14B)")
    m.add_argument("--lora-ignore-missing", action="store_true",
                   help="skip (and list) LoRA keys for modules this model lacks, e.g. Wan2.1 I2V image-branch keys "
                        "on Wan2.2; without it such a LoRA is refused")
    m.add_argument("--timesteps", metavar="T,T,..",
                   help="explicit timesteps for step-distilled LoRAs (LightX2V, Lightning), noisiest first, in "
                        "unshifted units of the 1000 training timesteps, e.g. 1000,750,500,250; each step is a "
                        "flow-Euler step at the shifted level, --steps follows their count. Use with --guidance 1 "
                        "(distilled models run without CFG) and the distill LoRA's --shift (LightX2V Wan2.2: 5)")


def _add_size(p: argparse.ArgumentParser, name: str, tiny: dict[str, int] | None) -> None:
    start, tail = _SIZE_HELP[name]
    if tiny is not None:
        tail = f"; default {GENERATE_SIZES[name]} with --checkpoint, {tiny[name]} without"
    # --steps defaults to None: settings_from_args fills it in, from --timesteps when given
    default = GENERATE_SIZES[name] if tiny is None and name != "steps" else None
    p.add_argument(f"--{name}", type=int, default=default, help=start + tail)


def causal_from_args(args: argparse.Namespace) -> CausalConfig | None:
    """A CausalConfig from --causal/--frames-per-block/--window/--causal-steps, or None."""
    if not getattr(args, "causal", False):
        for flag in ("frames_per_block", "window", "causal_steps"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} only applies with --causal")
        return None
    if args.frames_per_block is None:
        raise ValueError("--causal needs --frames-per-block N (latent frames per block, e.g. 3)")
    steps = DEFAULT_TIMESTEPS
    if args.causal_steps:
        try:
            steps = tuple(float(t) for t in args.causal_steps.split(","))
        except ValueError:
            raise ValueError(f"--causal-steps wants comma-separated timesteps, e.g. 1000,750,500,250; got "
                             f"{args.causal_steps!r}") from None
    return CausalConfig(frames_per_block=args.frames_per_block, window=args.window, timesteps=steps,
                        shift=args.causal_shift)


def timesteps_from_args(args: argparse.Namespace) -> tuple[float, ...] | None:
    """--timesteps parsed, and --steps set to their count (an explicit --steps must agree); None without it."""
    if not getattr(args, "timesteps", None):
        return None
    ts = parse_timesteps(args.timesteps)
    if args.steps is None:
        args.steps = len(ts)
    elif args.steps != len(ts):
        raise ValueError(f"--steps {args.steps} does not match the {len(ts)} --timesteps {args.timesteps}; drop --steps "
                         "(it follows --timesteps)")
    return ts


def check_precision(args: argparse.Namespace) -> None:
    """--precision fp8 needs bfloat16 activations: implied when --dtype is omitted, a float32 --dtype refused."""
    if getattr(args, "precision", None) == "fp8":
        if args.dtype == "float32":
            raise ValueError("--precision fp8 runs the DiT in bfloat16 between its FP8 matmuls: drop --dtype float32 "
                             "(fp8 implies --dtype bfloat16), or drop --precision fp8 for a float32 run")
        args.dtype = "bfloat16"


def model_options(args: argparse.Namespace) -> dict:
    """`jax_impl.pipeline.Pipeline`'s model options from the command line: dtype, precision, LoRAs per expert,
    explicit timesteps. Checks what can be checked without the checkpoint (fp8 and --dtype, --timesteps
    against --steps) first; the LoRA files are read against the checkpoint when the Pipeline opens."""
    check_precision(args)
    timesteps = timesteps_from_args(args)
    return {"dtype": default_dtype(args.dtype), "precision": args.precision, "loras": list(args.lora),
            "loras_2": list(args.lora_2), "lora_ignore_missing": args.lora_ignore_missing, "timesteps": timesteps}


def settings_from_args(args: argparse.Namespace) -> GenerateSettings:
    timesteps_from_args(args)
    if args.steps is None:
        args.steps = GENERATE_SIZES["steps"]
    return GenerateSettings(
        frames=args.frames, height=args.height, width=args.width, steps=args.steps, shift=args.shift,
        scheduler=args.scheduler, guidance=args.guidance, guidance_2=args.guidance_2,
        guidance_steps=args.guidance_steps, cfg_batch=args.cfg_batch, seed=args.seed, batch=args.batch, fps=args.fps,
        cfg_reuse=getattr(args, "cfg_reuse", False), step_cache=step_cache_from_args(args),
    )


def encoders_from_args(args: argparse.Namespace):
    """The `jax_impl.pipeline.EncoderSet` that --encoders names: the one place the command line picks an encoder
    implementation and hands it to the pipeline, which imports neither torch nor torch_ref itself."""
    # lazy: jax only once a command runs, torch only for --encoders torch (the default run never imports it)
    if args.encoders == "torch":
        try:
            from parity.encoders import TORCH_ENCODERS
        except ImportError as e:
            raise ValueError(f"--encoders torch needs torch, which cannot be imported here ({e}); install it, or use "
                             "--encoders jax (the default), which needs no torch") from None
        return TORCH_ENCODERS
    from jax_impl.pipeline import JAX_ENCODERS

    return JAX_ENCODERS


def default_dtype(name: str | None) -> str:
    """--dtype, or float32 on a CPU and bfloat16 on an accelerator (asks JAX, so call it from `run`)."""
    if name:
        return name
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def add_fast_mode_arguments(p: argparse.ArgumentParser) -> None:
    """The fast modes of the guided sampler (off by default): CFG reuse after the cut and step caching."""
    f = p.add_argument_group(
        "fast modes (off by default; `wanport analyze fast-modes` measures what each costs in quality)")
    f.add_argument("--cfg-reuse", action="store_true",
                   help="with --guidance-steps N: the steps after N still get guidance, from the cond - uncond "
                        "difference of the last guided step (v = v_cond + (guidance - 1) * d_last), at the cost of "
                        "one model evaluation per step like plain truncation")
    f.add_argument("--step-cache", type=float, default=None, metavar="THRESHOLD",
                   help="skip the DiT on the steps whose predicted change, accumulated since the last computed step, "
                        "stays below THRESHOLD (MagCache-style; try 0.1 and check the quality with `wanport analyze "
                        "fast-modes`); a skipped step reuses the last prediction. The change is predicted from the "
                        "per-step norms in --step-cache-calibration, so the skipped steps are fixed before the run "
                        "(and printed)")
    f.add_argument("--step-cache-calibration", metavar="FILE",
                   help="calibration JSON for --step-cache: per-step prediction norms of one full run of the same "
                        "model and schedule (written by --write-step-cache-calibration or `wanport analyze "
                        "fast-modes`)")
    f.add_argument("--skip-steps", metavar="I,J,..",
                   help="skip the DiT on exactly these steps (0-based) instead of a threshold, reusing the last "
                        "prediction; step 0, an expert's first step and the first step after the guidance cut "
                        "must be computed")
    f.add_argument("--step-cache-max-skips", type=int, default=None, metavar="K",
                   help="with --step-cache: at most K skipped steps in a row (default 2)")
    f.add_argument("--step-cache-keep-first", type=int, default=None, metavar="N",
                   help="with --step-cache: never skip the first N steps (default 20%% of --steps)")
    f.add_argument("--step-cache-metric", choices=["magnitude", "change"], default=None,
                   help="with --step-cache: magnitude (default; MagCache: running |1 - product of norm ratios|, "
                        "reused prediction rescaled by that product) or change (TeaCache-like: running sum of "
                        "relative changes, reused as is)")
    f.add_argument("--write-step-cache-calibration", metavar="FILE",
                   help="also write the calibration for --step-cache from this (full) run to FILE (.json)")


def step_cache_from_args(args: argparse.Namespace):
    """A `StepCacheSettings` from the fast-mode flags, or None; options that only shape --step-cache are refused
    without it."""
    from jax_impl.settings import StepCacheSettings

    threshold = getattr(args, "step_cache", None)
    skip_list = getattr(args, "skip_steps", None)
    shaping = {"step_cache_max_skips": "--step-cache-max-skips", "step_cache_keep_first": "--step-cache-keep-first",
               "step_cache_metric": "--step-cache-metric", "step_cache_calibration": "--step-cache-calibration"}
    if threshold is None and skip_list is None:
        given = [flag for name, flag in shaping.items() if getattr(args, name, None) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only applies with --step-cache THRESHOLD")
        return None
    if skip_list is not None:
        given = [flag for name, flag in shaping.items() if getattr(args, name, None) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} shapes the --step-cache threshold's decision; --skip-steps names "
                             "the steps itself: drop one of them")
    steps = None
    if skip_list is not None:
        try:
            steps = tuple(int(x) for x in skip_list.replace(" ", "").split(",") if x != "")
        except ValueError:
            raise ValueError(f"--skip-steps wants comma-separated step numbers, e.g. 12,15,18; got {skip_list!r}") from None
    options = {k: getattr(args, f"step_cache_{k}") for k in ("max_skips", "keep_first", "metric")
               if getattr(args, f"step_cache_{k}", None) is not None}
    return StepCacheSettings(threshold=threshold, calibration=getattr(args, "step_cache_calibration", None),
                             skip_steps=steps, **options)


def parse_number_list(text: str, what: str, kind: type = int, *, positive: bool = False) -> list:
    """The comma-separated numbers of option `what` (ints, or floats with kind=float), checked before any work
    starts, with errors that name the option and show an example; `positive`: each must be finite and > 0."""
    noun, example = ("integers", "0,10,20") if kind is int else ("numbers", "0.05,0.1")
    if not text.strip():
        raise ValueError(f"{what} is empty; give comma-separated {noun}, e.g. {example}")
    try:
        values = [kind(x) for x in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated {noun}, e.g. {example}; got {text!r}") from None
    bad = [v for v in values if positive and not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"{what}: every value must be a finite number > 0, got {bad}")
    return values
