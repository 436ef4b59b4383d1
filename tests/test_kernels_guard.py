"""The top-level `kernels` name: a Hugging Face `kernels` install is detected with a clear message."""

import importlib
import importlib.metadata as md
import sys

import pytest


def test_hf_kernels_distribution_is_refused(monkeypatch):
    real = md.distribution

    class FakeDist:
        version = "0.4.0"

    def fake(name):
        return FakeDist() if name == "kernels" else real(name)

    monkeypatch.setattr(md, "distribution", fake)
    saved = {k: v for k, v in sys.modules.items() if k == "kernels" or k.startswith("kernels.")}
    for k in saved:
        monkeypatch.delitem(sys.modules, k)
    try:
        with pytest.raises(ImportError, match="pip uninstall kernels"):
            importlib.import_module("kernels")
    finally:
        for k in [k for k in sys.modules if k == "kernels" or k.startswith("kernels.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_our_kernels_package_is_marked():
    import kernels

    assert kernels.WANPORT_KERNELS is True
    assert "xla" in kernels.available_backends()
