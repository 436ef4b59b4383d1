"""Installed versions of the packages a bench result depends on (recorded in every bench JSON)."""

from __future__ import annotations

import importlib.metadata as md


def versions(*packages: str) -> dict[str, str]:
    """{package: version} for those of `packages` that are installed."""
    out = {}
    for p in packages:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out
