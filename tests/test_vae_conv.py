"""The VAE's convolutions: both formulations (3D conv, time taps folded into channels) equal torch's Conv3d,
half precision stays half precision, and strict float32 is where ConvSettings says (one place)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jax_impl.vae import Conv, ConvSettings, WanVAE
from weights.configs.vae import TINY_WAN21_VAE
from parity.metrics import rel_l2

# (kernel, stride, spatial pad): the causal 3x3x3 conv, the upsampler's 3x1x1 time conv, the downsampler's
# stride-2 time conv, a 1x1x1 shortcut
KERNELS = [((3, 3, 3), (1, 1, 1), (1, 1)), ((3, 1, 1), (1, 1, 1), (0, 0)), ((3, 1, 1), (2, 1, 1), (0, 0)),
           ((1, 1, 1), (1, 1, 1), (0, 0))]


def _torch_conv(x: np.ndarray, k: np.ndarray, b: np.ndarray, stride, pad) -> np.ndarray:
    """torch Conv3d on channels-last numpy: x [B, T, H, W, C], k [kt, kh, kw, Cin, Cout]."""
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
    kt = torch.from_numpy(k.transpose(4, 3, 0, 1, 2).copy())
    y = torch.nn.functional.conv3d(xt, kt, torch.from_numpy(b), stride=stride, padding=(0, *pad))
    return y.numpy().transpose(0, 2, 3, 4, 1)


@pytest.mark.parametrize("time_taps", ["channels", "conv3d"])
@pytest.mark.parametrize("kernel,stride,pad", KERNELS)
def test_formulations_equal_torch_conv3d(time_taps, kernel, stride, pad):
    conv = Conv(6, 5, kernel, stride=stride, pad=pad, rngs=nnx.Rngs(1))
    conv.settings = ConvSettings(time_taps=time_taps)
    x = np.random.default_rng(0).standard_normal((2, 6, 5, 7, 6)).astype(np.float32)
    ours = np.asarray(conv(jnp.asarray(x)))
    ref = _torch_conv(x, np.array(conv.kernel.get_value()), np.array(conv.bias.get_value()), stride, pad)
    assert ours.shape == ref.shape
    assert rel_l2(ours, ref) < 1e-6


def _hlo(conv: Conv, x) -> str:
    return jax.jit(lambda x: conv(x)).lower(x).as_text()


def test_half_precision_convs_write_half_precision():
    """bf16 in, bf16 out: no float32 conv (which cuDNN would run without tensor cores) and no HIGHEST."""
    conv = Conv(8, 8, (3, 3, 3), pad=(1, 1), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    for settings in (ConvSettings(), ConvSettings(time_taps="conv3d"), ConvSettings(strict_fp32=True)):
        conv.settings = settings
        hlo = _hlo(conv, jnp.zeros((1, 4, 8, 8, 8), jnp.bfloat16))
        convs = re.findall(r"stablehlo.convolution.*", hlo)
        assert convs and all("-> tensor<" in c and "bf16>" in c.split("->")[-1] for c in convs), convs
        assert "HIGHEST" not in hlo
        assert conv(jnp.zeros((1, 4, 8, 8, 8), jnp.bfloat16)).dtype == jnp.bfloat16


def test_strict_fp32_is_the_one_switch():
    conv = Conv(8, 8, (3, 3, 3), pad=(1, 1), rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 4, 8, 8, 8))
    assert "HIGHEST" not in _hlo(conv, x)  # default: the platform's precision (TF32 on NVIDIA GPUs)
    conv.settings = ConvSettings(strict_fp32=True)
    assert "HIGHEST" in _hlo(conv, x)
    with pytest.raises(ValueError, match="time_taps must be one of"):
        ConvSettings(time_taps="im2col")


def test_set_conv_settings_reaches_every_conv_and_attention():
    m = nnx.eval_shape(lambda: WanVAE(TINY_WAN21_VAE, rngs=nnx.Rngs(0)))
    s = ConvSettings(time_taps="conv3d", strict_fp32=True)
    m.set_conv_settings(s)
    convs = [mod for _, mod in m.iter_modules() if isinstance(mod, Conv)]
    assert len(convs) > 40 and all(c.settings == s for c in convs)
    assert m.conv_settings == s and m.decoder.mid_block.attentions[0].proj.settings == s
