"""Our Flax DiT against diffusers on identical weights: every captured layer."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.tolerances import FP32_TOL
from parity.dit import compare_dit, dit_parity, load_models, make_inputs
from torch_ref.checkpoints import TRANSFORMER_DIRS
from tests.conftest import TINY_DIT_PRESETS


@pytest.mark.parametrize("preset", TINY_DIT_PRESETS)
def test_fp32_every_layer_within_1e5(tiny_ckpt, preset):
    root = tiny_ckpt(preset)
    experts = [d for d in TRANSFORMER_DIRS if (root / d).is_dir()]
    for expert in experts:
        report = dit_parity(root / expert, dtype="float32")
        assert report.passed, report.table()
        assert report.worst_rel_l2 < FP32_TOL
        names = [layer.name for layer in report.layers]
        assert names[0] == "patch_embedding" and names[-1] == "output"
        assert ("image_embedding" in names) == (preset == "tiny-wan2.1-i2v-14b")
        assert sum(n.endswith(".self_attn") for n in names) == 2
    assert len(experts) == (2 if "a14b" in preset else 1)


@pytest.mark.parametrize("preset", ["tiny-wan2.1-t2v-1.3b", "tiny-wan2.1-i2v-14b", "tiny-wan2.2-ti2v-5b"])
def test_bf16_error_at_most_twice_diffusers_bf16(tiny_ckpt, preset):
    report = dit_parity(tiny_ckpt(preset) / "transformer", dtype="bfloat16")
    assert report.passed, report.table()
    for layer in report.layers:
        assert layer.ref_rel_l2 is not None and layer.rel_l2 <= 2 * layer.ref_rel_l2 + 1e-6
        assert layer.rel_l2 > 1e-4, "bf16 run looks like float32: dtype not applied"


def test_experts_differ(tiny_ckpt):
    """Both A14B experts are real, distinct models (seed and seed+1), so testing both means something."""
    from weights.safetensors_io import CheckpointReader

    root = tiny_ckpt("tiny-wan2.2-i2v-a14b")
    a, b = CheckpointReader(root / "transformer"), CheckpointReader(root / "transformer_2")
    assert not np.array_equal(a.get("proj_out.weight"), b.get("proj_out.weight"))


@pytest.fixture(scope="module")
def t2v_models(tiny_ckpt):
    return load_models(tiny_ckpt("tiny-wan2.1-t2v-1.3b") / "transformer", "float32")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    frames=st.integers(1, 3),
    height=st.sampled_from([2, 4, 6, 10]),
    width=st.sampled_from([2, 4, 8]),
    batch=st.integers(1, 2),
    text_len=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_property_shapes(t2v_models, frames, height, width, batch, text_len, seed):
    inputs = make_inputs(
        t2v_models["jax"].cfg, batch=batch, frames=frames, height=height, width=width, text_len=text_len, seed=seed
    )
    report = compare_dit(t2v_models, inputs, "float32")
    assert report.passed, report.table()
    assert report.layers[-1].shape == (batch, frames, height, width, 16)


@pytest.fixture(scope="module")
def ti2v_models(tiny_ckpt):
    return load_models(tiny_ckpt("tiny-wan2.2-ti2v-5b") / "transformer", "float32")


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.integers(1, 3), batch=st.integers(1, 2), per_token=st.booleans(), seed=st.integers(0, 99))
def test_property_ti2v_timesteps(ti2v_models, frames, batch, per_token, seed):
    inputs = make_inputs(
        ti2v_models["jax"].cfg, batch=batch, frames=frames, height=4, width=4, per_token_timesteps=per_token, seed=seed
    )
    assert inputs.timestep.ndim == (2 if per_token else 1)
    report = compare_dit(ti2v_models, inputs, "float32")
    assert report.passed, report.table()
