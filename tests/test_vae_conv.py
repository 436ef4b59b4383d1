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


@pytest.mark.parametrize("frames_per_group", [1, 2])
@pytest.mark.parametrize("kernel,stride,pad", KERNELS[:3])
def test_folding_in_groups_of_frames_equals_torch(frames_per_group, kernel, stride, pad):
    """`fold_bytes` small enough that the folded input is built 1 or 2 output frames at a time (a loop)."""
    conv = Conv(6, 5, kernel, stride=stride, pad=pad, rngs=nnx.Rngs(1))
    x = np.random.default_rng(0).standard_normal((1, 6, 5, 7, 6)).astype(np.float32)
    per_frame = 5 * 7 * 6 * 3 * 4  # one output frame's folded input, bytes
    conv.settings = ConvSettings(fold_bytes=frames_per_group * per_frame)
    hlo = _hlo(conv, jnp.asarray(x))
    tout = (6 - kernel[0]) // stride[0] + 1
    assert ("stablehlo.while" in hlo) == (frames_per_group < tout)  # in groups when they are fewer frames
    ours = np.asarray(conv(jnp.asarray(x)))
    ref = _torch_conv(x, np.array(conv.kernel.get_value()), np.array(conv.bias.get_value()), stride, pad)
    assert ours.shape == ref.shape and rel_l2(ours, ref) < 1e-6


def test_folding_in_groups_lowers_the_compiled_memory():
    """The purpose of `fold_bytes`: the kt-times folded copy of a 4-frame input is the largest temporary of a
    full-resolution conv; building it one frame at a time must shrink XLA's temporaries by at least 2 frames'
    worth of it."""
    conv = Conv(32, 32, (3, 3, 3), pad=(1, 1), rngs=nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((1, 6, 64, 64, 32), jnp.float32)
    temps = {}
    for fold in (0, 1):
        conv.settings = ConvSettings(fold_bytes=fold)
        temps[fold] = jax.jit(lambda x: conv(x)).lower(x).compile().memory_analysis().temp_size_in_bytes
    frame_fold = 64 * 64 * 32 * 3 * 4
    assert temps[1] <= temps[0] - 2 * frame_fold, temps


@pytest.mark.slow
def test_model_with_per_frame_folding_matches_the_default():
    """The whole tiny VAE with every time conv folded one output frame at a time (a loop inside every conv)
    decodes and encodes what the default (all frames at once at these sizes) does."""
    m = WanVAE(TINY_WAN21_VAE, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((1, 3, 4, 6, 16)), jnp.float32)
    video = jnp.asarray(np.tanh(rng.standard_normal((1, 9, 32, 48, 3))), jnp.float32)
    ref_dec, ref_enc = np.asarray(m.decode(z, tile="off")), np.asarray(m.encode(video, tile="off"))
    m.set_conv_settings(ConvSettings(fold_bytes=1))
    assert rel_l2(np.asarray(m.decode(z, tile="off")), ref_dec) < 1e-6
    assert rel_l2(np.asarray(m.encode(video, tile="off")), ref_enc) < 1e-6
