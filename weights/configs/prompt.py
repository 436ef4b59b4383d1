"""Prompt cleaning and tokenisation as the Wan pipelines do them, shared by the torch and the JAX text encoders
(no torch, no jax)."""

from __future__ import annotations

import html
import re

import numpy as np

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


def tokenize(tokenizer, prompts: list[str], max_tokens: int = MAX_TEXT_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), int32 [len(prompts), max_tokens]: cleaned prompts, eos appended, truncated and padded."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string")
    batch = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=max_tokens,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="np",
    )
    return np.asarray(batch["input_ids"], np.int32), np.asarray(batch["attention_mask"], np.int32)
