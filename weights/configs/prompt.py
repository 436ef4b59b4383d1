"""Prompt cleaning as the Wan pipelines do it, shared by the torch and the JAX text encoders (no torch, no jax)."""

from __future__ import annotations

import html
import re

MAX_TEXT_TOKENS = 512  # Wan pads (and truncates) every prompt to 512 UMT5 tokens


def clean_prompt(text: str) -> str:
    """Fix mojibake (ftfy), undo HTML escaping twice, collapse whitespace: what the Wan pipelines feed UMT5."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is a dependency; without it only mojibake repair is skipped
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()
