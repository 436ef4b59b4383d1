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

from wanport.args import (add_fast_mode_arguments, add_generate_arguments, causal_from_args, encoders_from_args,
                          model_options, settings_from_args)


def run(args: argparse.Namespace) -> int:
    # lazy: `wanport --help` must not start jax (measured: 10.7 s -> 0.2 s)
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
    p.set_defaults(func=run)
