"""Test-wide settings: CPU JAX with full float32 matmuls, quiet library logs, and GPU-test skipping."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


def _has_gpu() -> bool:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        try:
            import torch

            return torch.cuda.is_available()
        except Exception:
            return False
    import jax

    return jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
