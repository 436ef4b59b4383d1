"""The one home of the parity tolerances: how close our JAX models must come to the references.

Every comparison in `parity` and every test that checks a parity number imports its bound from here, so a
tolerance is changed (and argued for) in one place.

- Layers in float32: relative L2 per layer against the reference in float32 (`FP32_TOL`).
- Layers in bfloat16: our error against the float32 reference must be at most `BF16_FACTOR` x the
  reference's own bfloat16 error, plus `BF16_FLOOR` (layers exact in both, such as float32 islands, still get
  a sliver of slack).
- Sampling loops accumulate float32 rounding over their steps: `SAMPLER_TOL` per block or step of latents.
- Whole pipelines: `SAMPLER_TOL` per denoising step, and the decoded frames at least `FRAME_PSNR_MIN` dB.
"""

FP32_TOL = 1e-5
BF16_FACTOR = 2.0
BF16_FLOOR = 1e-6
SAMPLER_TOL = 1e-4  # relative L2 of the latents after each causal block or pipeline step, float32
FRAME_PSNR_MIN = 40.0  # dB, final frames in [0, 1]
