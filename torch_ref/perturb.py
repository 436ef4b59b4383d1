"""Seeded noise on the parameters that random init leaves constant, so no weight of a tiny checkpoint is trivial.

diffusers and transformers start every norm gain at 1 and many biases at 0 (q/k norms, the cross-attention
and image-embedder LayerNorms, CLIP and UMT5 norms, CLIP's linear biases, the VAE's RMS gains). With those
left at identity, a test cannot tell `norm_q` from `norm_k`, a dropped gain from a kept one, or a bias read
into the wrong slot: the parity suite would pass on a wrong weight map. Every writer of tiny checkpoints
(`torch_ref.models.build_transformer`, `torch_ref.vae.build_vae`, `torch_ref.encoders.write_tiny_encoders`)
calls `perturb_constant_parameters` right after building its model, and
`tests/test_tiny_checkpoints.py` checks that no written tensor is constant.
"""

from __future__ import annotations

import torch

GAIN_NOISE = 0.1  # a constant c != 0 (a gain) becomes c * (1 + 0.1 N(0, 1)): about +-10 %, stable
BIAS_NOISE = 0.1  # a constant 0 (a bias, a zero-initialised table) becomes 0.1 N(0, 1)


def is_constant(t: torch.Tensor) -> bool:
    """True when every element equals the first (a one-element tensor counts as constant)."""
    flat = t.detach().reshape(-1)
    return bool((flat == flat[0]).all()) if flat.numel() else False


@torch.no_grad()
def perturb_constant_parameters(model: torch.nn.Module, generator: torch.Generator | None = None) -> list[str]:
    """Give every constant parameter of `model` seeded noise (see GAIN_NOISE, BIAS_NOISE); return their names.

    Parameters that init already drew at random are left as they are. Draws come from `generator`, or from
    torch's global generator (callers seed it inside `torch.random.fork_rng`), in parameter order, so the
    result is deterministic in the caller's seed.
    """
    changed = []
    for name, p in model.named_parameters():
        if not is_constant(p):
            continue
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        c = float(p.reshape(-1)[0])
        value = c * (1 + GAIN_NOISE * noise) if c != 0 else BIAS_NOISE * noise
        p.copy_(value.to(p.dtype))
        changed.append(name)
    return changed
