"""Few-step generation with step-distillation LoRAs, end to end against diffusers (tiny Wan2.2 I2V A14B).

What `wanport generate --lora a.safetensors:0.8 --lora-2 b.safetensors --steps 4 --guidance 1
--timesteps 1000,750,500,250 --shift 5` is to compute, assembled from the library calls the CLI wires:
`Pipeline(folder, loras=[...], loras_2=[...], timesteps=...)`: each expert loaded with its LoRAs merged
(`apply_loras`), the explicit schedule (`schedule_from_timesteps`), guidance 1 (one DiT call per step). diffusers runs its own
WanImageToVideoPipeline with the same LoRAs loaded and fused and its Euler scheduler given the same
levels (`set_timesteps(sigmas=...)`: the pipeline itself passes only a step count, so the reference
scheduler fixes the levels). The latents after every step must agree, and so must the expert used.
`diffusers_distilled_steps` is that reference, shared with tests/test_cli_lora.py (the command line).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jax_impl.pipeline import GenerateSettings, Pipeline
from jax_impl.schedulers import parse_timesteps
from parity.pipeline import STEP_TOL, diffusers_pipeline
from weights.lora_convert import write_lora
from tests.lora_helpers import random_lora
from tests.test_lora import diffusers_readable_wan_lora

A14B = "tiny-wan2.2-i2v-a14b"
TIMESTEPS = "1000,750,500,250"


def fixed_sigma_scheduler(shift: float, levels: list[float]):
    """diffusers' FlowMatchEulerDiscreteScheduler whose `set_timesteps(n)` applies the given levels."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class Fixed(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            assert num_inference_steps in (None, len(levels))
            super().set_timesteps(sigmas=levels, device=device)

    return Fixed(shift=shift)


def write_distill_loras(folder_preset: str, root) -> tuple:
    """Two seeded LoRAs for the tiny A14B: one in the Wan layout (for the high-noise expert), one in the
    diffusers layout with PEFT biases (for the low-noise expert); both readable by diffusers."""
    from weights.configs.presets import get_preset

    cfg = get_preset(folder_preset).transformer
    high = write_lora(root / "high.safetensors", diffusers_readable_wan_lora(cfg, 11), "wan")
    low = write_lora(root / "low.safetensors", random_lora(cfg, 12, bias=lambda e: "peft"), "diffusers")
    return high, low


def diffusers_distilled_steps(folder, loras: list[tuple[str, float]], loras_2: list[tuple[str, float]], image,
                              prompt: str, settings: GenerateSettings, timesteps, noise: np.ndarray):
    """diffusers' WanImageToVideoPipeline with the LoRAs loaded and fused into transformer / transformer_2 at
    their strengths and its Euler scheduler fixed to `timesteps` (shift `settings.shift`), guidance 1:
    (latents after every step, channels last; the model timestep of every step)."""
    import torch

    ref_pipe = diffusers_pipeline(folder)
    ref_pipe.set_progress_bar_config(disable=True)
    for target, specs in (("transformer", loras), ("transformer_2", loras_2)):
        names = []
        for k, (path, _) in enumerate(specs):
            name = f"{target}_{k}"
            ref_pipe.load_lora_weights(str(path), adapter_name=name, load_into_transformer_2=target == "transformer_2")
            names.append(name)
        if names:
            module = getattr(ref_pipe, target)
            module.set_adapters(names, weights=[w for _, w in specs])
            module.fuse_lora(adapter_names=names)
    ref_pipe.unload_lora_weights()
    T = 1000
    ref_pipe.scheduler = fixed_sigma_scheduler(settings.shift, [t / T for t in timesteps])
    ref, ref_t = [], []

    def on_step(p, i, t, kw):
        ref.append(np.moveaxis(kw["latents"].detach().float().numpy(), 1, -1).copy())
        ref_t.append(float(t))
        return {}

    with torch.no_grad():
        ref_pipe(prompt=prompt, image=image, height=settings.height, width=settings.width, num_frames=settings.frames,
                 num_inference_steps=len(timesteps), guidance_scale=1.0, guidance_scale_2=1.0,
                 latents=torch.from_numpy(np.ascontiguousarray(np.moveaxis(noise, -1, 1))),
                 output_type="latent", callback_on_step_end=on_step)
    return ref, ref_t


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_distilled_lora_generation_equals_diffusers(tiny_ckpt, tmp_path):
    folder = tiny_ckpt(A14B)
    high, low = write_distill_loras(A14B, tmp_path)
    ts = parse_timesteps(TIMESTEPS)
    settings = GenerateSettings(frames=5, height=32, width=32, steps=len(ts), guidance=1.0, guidance_2=1.0, seed=4, shift=5.0)
    image = Image.fromarray((np.random.default_rng(1).random((40, 48, 3)) * 255).astype(np.uint8))

    # ours: what `generate --lora high:0.8 --lora-2 low --timesteps ...` builds
    pipe = Pipeline(folder, loras=[f"{high}:0.8"], loras_2=[str(low)], timesteps=ts)
    noise = np.asarray(np.random.default_rng(settings.seed).standard_normal(pipe.latent_shape(settings)), np.float32)
    ours, ours_experts = [], []

    def record(info):
        ours.append(np.asarray(info["latents"]))
        ours_experts.append(info["expert"])

    encoded = pipe.encode(settings, prompt="a cat", image=image)
    pipe.denoise(encoded, settings, noise=noise, on_step=record, progress=False)

    ref, ref_t = diffusers_distilled_steps(folder, [(high, 0.8)], [(low, 1.0)], image, "a cat", settings, ts, noise)

    np.testing.assert_allclose(ref_t, [1000, 937.5, 2500 / 3, 625], rtol=1e-6)
    assert ours_experts == [0, 0, 1, 1]  # t >= 900 on the high-noise expert, as boundary_ratio 0.9 in diffusers
    assert len(ours) == len(ref) == 4
    for i, (a, b) in enumerate(zip(ours, ref)):
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert err < STEP_TOL, f"step {i}: rel L2 {err:.2e}"
    # and the LoRAs mattered: without them the trajectory is clearly different
    plain = Pipeline(folder, timesteps=ts)
    base = []
    plain.denoise(plain.encode(settings, prompt="a cat", image=image), settings, noise=noise,
                  on_step=lambda info: base.append(np.asarray(info["latents"])), progress=False)
    assert np.linalg.norm(base[-1] - ours[-1]) / np.linalg.norm(ours[-1]) > 1e-2
