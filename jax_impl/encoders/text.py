"""Wan's prompt encoder in JAX: prompt cleaning, UMT5 tokenization and the Flax UMT5 encoder, with no torch.

`JaxTextEncoder(folder)(prompts)` returns what `torch_ref.encoders.TextEncoder` returns: float32
[len(prompts), 512, d_model], each prompt cleaned as the diffusers pipelines do, padded (or truncated, the
eos token kept) to 512 tokens, and the rows past its tokens zeroed.

Tokenization goes through transformers' tokenizer class for the folder (`AutoTokenizer`), which imports
without torch: the ids are the torch path's by construction. Reading tokenizer.json with the `tokenizers`
library alone is not equivalent: transformers 5 rebuilds T5 tokenizers' pre-tokenizer and post-processor.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.frozen_jit import frozen_jit
from jax_impl.loading import load_umt5
from weights.configs.prompt import MAX_TEXT_TOKENS, tokenize
from weights.safetensors_io import CheckpointError


def load_tokenizer(folder: str | os.PathLike):
    """The pipeline's tokenizer (`folder/tokenizer`) as transformers loads it, without torch."""
    path = Path(folder) / "tokenizer"
    if not path.is_dir():
        raise CheckpointError(f"{folder}: no tokenizer/ folder; a Wan pipeline folder has tokenizer/ and text_encoder/")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(path))


@frozen_jit
def _encode(model, ids: jax.Array, mask: jax.Array) -> jax.Array:
    hidden = model(ids, mask).astype(jnp.float32)
    return hidden * mask[..., None].astype(jnp.float32)  # zero past the prompt, as the pipelines do


class JaxTextEncoder:
    """Tokenizer + Flax UMT5 encoder from a pipeline folder (`tokenizer/`, `text_encoder/`); float32 or bfloat16."""

    def __init__(self, folder: str | os.PathLike, dtype=jnp.float32):
        folder = Path(folder)
        self.tokenizer = load_tokenizer(folder)
        self.model = load_umt5(folder / "text_encoder", dtype=jnp.dtype(dtype))

    def __call__(self, prompts: list[str], max_tokens: int = MAX_TEXT_TOKENS) -> np.ndarray:
        """[len(prompts), max_tokens, d_model] float32; rows past each prompt's token count are zero."""
        ids, mask = tokenize(self.tokenizer, prompts, max_tokens)
        vocab = self.model.cfg.vocab_size
        if ids.size and int(ids.max()) >= vocab:
            raise ValueError(
                f"the tokenizer produced id {int(ids.max())} but the text encoder has {vocab} embeddings; "
                "tokenizer/ and text_encoder/ come from different models"
            )
        return np.asarray(_encode(self.model, jnp.asarray(ids), jnp.asarray(mask)))


__all__ = ["JaxTextEncoder", "load_tokenizer"]
