"""`wanport generate`: image (+ prompt) -> video with the JAX pipeline, in three resumable stages.

  1. encode   prompt and negative prompt (UMT5), image tokens (CLIP, Wan2.1 I2V), image condition (VAE);
              the encoders run in JAX by default (no torch needed), or torch's with --encoders torch
  2. denoise  the sampling loop (UniPC or Euler with shift, classifier-free guidance, A14B expert switch)
  3. decode   VAE decode, mp4 at --fps

Each stage writes a safetensors file under --work-dir (default: OUT's name + ".stages/"); with --resume a
stage whose file was computed from exactly the same inputs is reused, so a crashed or interrupted run
continues where it stopped, and a different --steps or --guidance re-runs only the denoise and decode.
A stage is keyed by everything that determines it: the encode stage by the prompts, the bytes of --image,
--last-image and --embeddings, the size and batch, the encoder/VAE weights and --encoders; the denoise stage by the
encode stage's key, every sampling option, --dtype, --precision, the attention back-end, the transformer weights,
each LoRA file's sha256 and strength, and --timesteps.
What changed is printed ("[resume] encoded stage is stale: image changed"). Every option, input file and
output path is checked before the first stage runs; a run that produces NaN or inf latents stops with an
error naming the step and writes no video. Exit codes: 0 done, 2 bad input or failed run, 130 Ctrl-C.

examples:
  wanport generate --checkpoint ckpt --image cat.png --prompt "a cat walks on the beach" --out cat.mp4
  wanport generate --checkpoint ckpt --image cat.png --prompt "..." --frames 17 --height 256 --width 256 \\
      --steps 20 --shift 3 --guidance 5 --seed 1 --out short.mp4
  wanport generate --checkpoint a14b --image img.png --prompt "..." --guidance 3.5 --guidance-2 2.0 \\
      --guidance-steps 30 --out out.mp4             # CFG only for the first 30 of 40 steps
  wanport generate --checkpoint a14b --image img.png --prompt "..." --lora high.safetensors:0.8 \\
      --lora-2 low.safetensors --timesteps 1000,750,500,250 --shift 5 --guidance 1 --out fast.mp4  # 4 steps
  wanport generate --checkpoint ckpt --image img.png --prompt "..." --precision fp8 --out fp8.mp4
  wanport generate --checkpoint ckpt --prompt "..." --causal --frames-per-block 3 --window 9 \\
      --frames 321 --out long.mp4                   # streaming: 81 latent frames in blocks of 3, KV cache

FantasyWorld (--fantasyworld --camera trajectory.json) generates the video along a camera path and
predicts its geometry: besides OUT.mp4 it writes OUT_depth.npy and OUT_depth_conf.npy (float32
[frames, H, W]), OUT.ply (coloured point cloud from the predicted depth and cameras) and OUT_cameras.json
(per frame camera-to-world 4x4 and intrinsics). --checkpoint is a Wan2.1-I2V pipeline folder with a
fantasyworld/ model folder (`wanport make-tiny --fantasyworld` writes a tiny one). The trajectory is the
public code's format: {"focal_length": F, "cameras_interp": [one 4x4 camera-to-world per frame]}; two
examples are bundled (wanport/assets/fantasyworld_dolly_81.json and _9.json). Sizes, steps, shift and
guidance default to the checkpoint's fantasyworld/config.json (released: 336x592, 50 steps, shift 5,
guidance 5), --frames to the trajectory's camera count. Runs are not staged (no --resume).
  wanport generate --fantasyworld --checkpoint fw --camera path.json --image room.png \
      --prompt "a sunny loft" --out loft.mp4

Fast modes (off by default; `wanport analyze fast-modes` measures each against the full run):
  --guidance-steps 20 --cfg-reuse      after step 20, guide with the last cond - uncond difference (1 evaluation
                                       per step, as truncation, but the guidance stays)
  --write-step-cache-calibration c.json   a full run that also records the per-step prediction norms; then
  --step-cache 0.1 --step-cache-calibration c.json   skips the DiT where the predicted change is small
  --skip-steps 12,15,18                skip exactly these steps (reusing the last prediction)
The steps a step cache skips are fixed before the run (from the calibration) and printed.

Block-causal mode (--causal) generates a few latent frames at a time (Self-Forcing / CausVid style):
each block is denoised in a few steps (--causal-steps) while attending to a key/value cache of the blocks
already made; --window keeps only the last F latent frames (plus the first block) so memory stays flat
for any length. It needs a causal (distilled) checkpoint to make sense; on a bidirectional checkpoint it
runs but the video shows what the model was not trained for.
"""

from __future__ import annotations

import argparse

from pathlib import Path

from wanport.args import (DEFAULT_GUIDANCE, GENERATE_SIZES, add_fast_mode_arguments, add_generate_arguments,
                          causal_from_args, default_dtype, encoders_from_args, model_options, settings_from_args)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EXAMPLE_TRAJECTORIES = {n: ASSETS / f"fantasyworld_dolly_{n}.json" for n in (81, 9)}


# options whose defaults depend on the model: None means "not given" (filled in by `run`)
MODEL_DEFAULTS = {**{k: v for k, v in GENERATE_SIZES.items() if k != "steps"}, "guidance": DEFAULT_GUIDANCE}
FANTASYWORLD_OPTIONS = ("camera", "camera_scale", "point_stride", "point_confidence", "allow_pickle")
# generate options FantasyWorld runs do not take, with why
FANTASYWORLD_REFUSED = {
    "causal": "block-causal generation is for distilled Wan models",
    "resume": "FantasyWorld runs are not staged", "work_dir": "FantasyWorld runs are not staged",
    "lora": "LoRAs are not supported with FantasyWorld yet", "lora_2": "LoRAs are not supported with FantasyWorld yet",
    "precision": "FP8 is not supported with FantasyWorld yet",
    "timesteps": "FantasyWorld samples DiffSynth's levels (--steps, --shift)",
    **{k: "fast modes are not wired into FantasyWorld's sampler" for k in (
        "cfg_reuse", "step_cache", "step_cache_calibration", "skip_steps", "step_cache_max_skips",
        "step_cache_keep_first", "step_cache_metric", "write_step_cache_calibration")},
}


def run(args: argparse.Namespace) -> int:
    # lazy: `wanport --help` must not start jax (measured: 10.7 s -> 0.2 s)
    if args.fantasyworld:
        return run_fantasyworld(args)
    given = [k for k in FANTASYWORLD_OPTIONS if getattr(args, k) not in (None, False)]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} only applies with --fantasyworld")
    for k, v in MODEL_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    options = model_options(args)  # before any jax work: fp8 against --dtype, --timesteps against --steps
    from jax_impl.latents import VaeOptions
    from jax_impl.pipeline import generate

    result = generate(
        args.checkpoint, args.out, prompt=args.prompt, image_path=args.image, settings=settings_from_args(args),
        negative_prompt=args.negative_prompt, last_image_path=args.last_image, embeddings_path=args.embeddings,
        work_dir=args.work_dir, resume=args.resume, attention_backend=args.backend, causal=causal_from_args(args),
        vae_options=VaeOptions(tile=args.vae_tile), encoders=encoders_from_args(args),
        step_cache_calibration_out=args.write_step_cache_calibration, **options,
    )
    t = result["timings"]
    print(f"wrote {result['video']} ({result['frames']} frames); load {t['load']:.1f} s, encode {t['encode']:.1f} s, "
          f"denoise {t['denoise']:.1f} s, decode {t['decode']:.1f} s")
    return 0


def run_fantasyworld(args: argparse.Namespace) -> int:
    """`generate --fantasyworld`: options checked here, the rest in `generate_fantasyworld` before any model runs."""
    for k, why in FANTASYWORLD_REFUSED.items():
        if getattr(args, k) not in (None, False, [], ""):
            raise ValueError(f"--{k.replace('_', '-')} does not go with --fantasyworld: {why}")
    causal_from_args(args)  # its options without --causal are refused there
    if args.camera is None:
        raise ValueError("--fantasyworld needs --camera TRAJECTORY.json (one camera-to-world 4x4 per frame, the public "
                         f"FantasyWorld format); bundled examples: {EXAMPLE_TRAJECTORIES[81]}, {EXAMPLE_TRAJECTORIES[9]}")
    from jax_impl.fantasyworld.pipeline import (PointCloudOptions, default_settings, generate_fantasyworld,
                                                read_fantasyworld_config)
    from jax_impl.latents import VaeOptions
    from weights.trajectory import read_trajectory

    defaults = default_settings(read_fantasyworld_config(args.checkpoint))
    defaults["frames"] = read_trajectory(args.camera).frames
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    settings = settings_from_args(args)
    points = PointCloudOptions(**{k: v for k, v in (("stride", args.point_stride),
                                                    ("min_confidence", args.point_confidence)) if v is not None})
    result = generate_fantasyworld(
        args.checkpoint, args.out, prompt=args.prompt, image_path=args.image, camera_path=args.camera,
        settings=settings, negative_prompt=args.negative_prompt, embeddings_path=args.embeddings,
        camera_scale=1.0 if args.camera_scale is None else args.camera_scale, points=points,
        dtype=default_dtype(args.dtype), attention_backend=args.backend, vae_options=VaeOptions(tile=args.vae_tile),
        encoders=encoders_from_args(args), allow_pickle=args.allow_pickle,
    )
    t = result["timings"]
    print(f"wrote {result['paths'].video} ({result['frames']} frames) and its depth, {result['points']} points and "
          f"cameras; load {t['load']:.1f} s, encode {t['encode']:.1f} s, denoise {t['denoise']:.1f} s, decode "
          f"{t['decode']:.1f} s")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a video from an image and a prompt (JAX pipeline)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_arguments(p)
    p.add_argument("--out", required=True, metavar="MP4", help="output video path, ending in .mp4 (batch > 1: also "
                                                             "OUT_1.mp4, OUT_2.mp4, ...)")
    p.add_argument("--work-dir", metavar="DIR", help="where stage files go (default: OUT without .mp4 + '.stages')")
    p.add_argument("--resume", action="store_true",
                   help="reuse stage files computed from the same inputs (settings, input files, weights)")
    p.add_argument("--vae-tile", choices=["auto", "on", "off"], default="auto",
                   help="VAE encode/decode in overlapping spatial tiles (diffusers' enable_tiling: 256-pixel tiles "
                        "every 192), so large frames fit a fixed memory budget; auto (default) tiles only when "
                        "the estimated memory of whole frames exceeds the free GPU memory")
    add_fast_mode_arguments(p)
    c = p.add_argument_group("block-causal (streaming) generation")
    c.add_argument("--causal", action="store_true", help="generate block by block with a KV cache")
    c.add_argument("--frames-per-block", type=int, default=None, metavar="N",
                   help="latent frames per block; must divide the latent frames (1 + (frames - 1) / 4)")
    c.add_argument("--window", type=int, default=None, metavar="F",
                   help="latent frames each block attends to (a multiple of N), plus the first block as a sink; "
                        "default: all earlier frames")
    c.add_argument("--causal-steps", default=None, metavar="T,T,..",
                   help="per-block timesteps, noisy to clean (default 1000,750,500,250)")
    c.add_argument("--causal-shift", type=float, default=1.0, help="flow shift of the per-block schedule (default 1)")
    f = p.add_argument_group("FantasyWorld: video + depth, point cloud and cameras along a camera path")
    f.add_argument("--fantasyworld", action="store_true",
                   help="run a FantasyWorld checkpoint (a Wan2.1-I2V pipeline folder with fantasyworld/); sizes, "
                        "--steps, --shift and --guidance default to its config, --frames to the trajectory's length")
    f.add_argument("--camera", metavar="JSON",
                   help="camera trajectory: {\"focal_length\": F, \"cameras_interp\": [4x4 camera-to-world per frame]} "
                        "(OpenCV axes); bundled examples in wanport/assets: fantasyworld_dolly_81.json (81 frames), "
                        "fantasyworld_dolly_9.json (9)")
    f.add_argument("--camera-scale", type=float, default=None, metavar="S",
                   help="scene scale the trajectory's translations are divided by (the public code estimates it with "
                        "MoGe-2, which is not here); default 1: as given")
    f.add_argument("--point-stride", type=int, default=None, metavar="N",
                   help="point cloud: every N-th pixel row and column of every frame (default 4, as the public code)")
    f.add_argument("--point-confidence", type=float, default=None, metavar="C",
                   help="point cloud: keep pixels whose depth confidence (1 + exp(.), > 1) is >= C (default 1.0, the "
                        "public code's: keeps every point)")
    f.add_argument("--allow-pickle", action="store_true",
                   help="read a released fantasyworld/model.pth (a pickle) weights-only; without it only safetensors")
    # None = not given: the model's defaults apply (plain Wan: GENERATE_SIZES and guidance 3.5; FantasyWorld: its config)
    p.set_defaults(func=run, frames=None, height=None, width=None, guidance=None)
