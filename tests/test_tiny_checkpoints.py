"""Every tensor of every tiny checkpoint is non-trivial, read back from the written safetensors files.

A norm gain left at 1 or a bias left at 0 makes the parity tests blind to that weight (a swapped
norm_q/norm_k passes); `torch_ref.perturb` gives such parameters seeded noise in every writer.
"""

import hashlib

import numpy as np
import pytest
from safetensors.numpy import load_file

from weights.configs.presets import PRESETS
from torch_ref.checkpoints import write_tiny_checkpoint

TINY = [name for name in PRESETS if name.startswith("tiny-")]


def _components(preset: str) -> set[str]:
    p = PRESETS[preset]
    names = {"transformer", "vae", "text_encoder"} | ({"transformer_2"} if p.num_experts == 2 else set())
    return names | ({"image_encoder"} if p.transformer.has_image_tokens else set())


@pytest.mark.parametrize("preset", TINY)
def test_no_tensor_is_constant(tiny_ckpt, preset):
    root = tiny_ckpt(preset)
    files = sorted(root.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == _components(preset)
    constant = []
    for f in files:
        for name, x in load_file(f).items():
            x = x.astype(np.float64).reshape(-1)
            if x.size < 2 or not x.std() > 0 or np.all(x == x[0]):
                constant.append(f"{f.parent.name}/{name} {x.size} x {x[0]}")
    assert not constant, "constant tensors: " + ", ".join(constant)


def test_perturbation_is_seeded(tmp_path):
    def digests(folder):
        return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.rglob("*.safetensors")}

    a = digests(write_tiny_checkpoint("tiny-wan2.1-i2v-14b", tmp_path / "a", seed=7))
    b = digests(write_tiny_checkpoint("tiny-wan2.1-i2v-14b", tmp_path / "b", seed=7))
    c = digests(write_tiny_checkpoint("tiny-wan2.1-i2v-14b", tmp_path / "c", seed=8))
    assert a == b and len(a) == 4
    assert all(a[k] != c[k] for k in a)


def test_gains_stay_near_one_and_biases_small():
    """The noise keeps tiny models numerically tame: gains 1 +- ~10 %, former zero biases ~0.1."""
    import torch

    from torch_ref.perturb import perturb_constant_parameters

    torch.manual_seed(0)
    layer = torch.nn.LayerNorm(4096)
    changed = perturb_constant_parameters(layer)
    assert changed == ["weight", "bias"]
    assert abs(layer.weight.mean().item() - 1) < 0.01 and 0.08 < layer.weight.std().item() < 0.12
    assert abs(layer.bias.mean().item()) < 0.01 and 0.08 < layer.bias.std().item() < 0.12
    assert perturb_constant_parameters(layer) == []  # random tensors are left alone
