"""Shared fixtures: tiny checkpoints written once per session."""

from pathlib import Path

import pytest

from torch_ref.checkpoints import write_tiny_checkpoint

TINY_DIT_PRESETS = ["tiny-wan2.1-t2v-1.3b", "tiny-wan2.1-i2v-14b", "tiny-wan2.2-i2v-a14b", "tiny-wan2.2-ti2v-5b"]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(preset, **kw) -> pipeline folder, cached per (preset, kw)."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(preset: str, **kw) -> Path:
        key = (preset, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = write_tiny_checkpoint(preset, root / f"{preset}-{len(cache)}", **kw)
        return cache[key]

    return get
