"""Prompt and image encoders of the Wan pipelines (UMT5 text encoder, CLIP ViT image encoder), run in torch.

These run through `transformers` on the CPU or GPU and return numpy arrays computed exactly as the diffusers
pipelines compute them: the same prompt cleaning, 512-token padding with the embeddings past each prompt's
length zeroed, and the CLIP penultimate hidden state as image tokens. `TextEncoder` and `ImageEncoder`
satisfy the Protocols of `jax_impl.pipeline` structurally (this package never imports jax_impl):
`wanport generate --encoders torch` hands them to the JAX pipeline, whose default is the Flax pair in
`jax_impl.encoders`. `write_tiny_encoders` writes small random-weight encoders, a tokenizer and an image
processor in the folder layout the diffusers pipelines load.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from weights.configs.prompt import MAX_TEXT_TOKENS, tokenize
from torch_ref.perturb import perturb_constant_parameters


class TextEncoder:
    """Tokenizer + UMT5 encoder from a pipeline folder (`tokenizer/`, `text_encoder/`)."""

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(os.fspath(folder / "tokenizer"))
        self.model = UMT5EncoderModel.from_pretrained(os.fspath(folder / "text_encoder"), torch_dtype=dtype)
        self.model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str], max_tokens: int = MAX_TEXT_TOKENS) -> np.ndarray:
        """[len(prompts), max_tokens, d_model] float32; rows past each prompt's token count are zero."""
        ids, mask = (torch.from_numpy(a).long().to(self.device) for a in tokenize(self.tokenizer, prompts, max_tokens))
        hidden = self.model(ids, mask).last_hidden_state.float()
        hidden = hidden * mask[..., None].to(hidden.dtype)  # zero past the prompt, as the pipelines do
        return hidden.cpu().numpy()


class ImageEncoder:
    """CLIP image processor + vision tower (`image_processor/`, `image_encoder/`): penultimate-layer tokens."""

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import CLIPImageProcessor, CLIPVisionModel

        folder = Path(folder)
        self.processor = CLIPImageProcessor.from_pretrained(os.fspath(folder / "image_processor"))
        self.model = CLIPVisionModel.from_pretrained(os.fspath(folder / "image_encoder"), torch_dtype=dtype)
        self.model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """[1, tokens * len(images), hidden] float32 (257 x 1280 per image for ViT-H/14 at 224 px)."""
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.model.dtype)
        hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        return hidden.float().reshape(1, -1, hidden.shape[-1]).cpu().numpy()


# --- tiny random-weight encoders for tests and the demo -----------------------------------------------
_WORDS = (
    "a the of in on and with cat dog man woman walks runs sits beach sea sunset city street camera video slowly "
    "low quality blurry static worst bright colors overexposed"
).split()


def _tiny_tokenizer():
    """A small SentencePiece-style (Unigram, metaspace) tokenizer: pad=0, eos=1, unk=2 as in T5/UMT5."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        pieces += [(c, -3.0), ("\u2581" + c, -3.5)]
    pieces += [("\u2581" + w, -1.0) for w in _WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def write_tiny_encoders(tmp: Path, *, text_dim: int, image_dim: int | None, seed: int = 0) -> list[str]:
    """Write tokenizer/, text_encoder/ (and image_processor/, image_encoder/ when `image_dim`) into `tmp`.

    Returns the component names written. Widths match the tiny DiT: UMT5 d_model = text_dim, CLIP hidden
    size = image_dim (a 32 px ViT with 16 px patches: 5 image tokens instead of 257). Norm gains and the
    biases transformers initialises to constants get seeded noise (`torch_ref.perturb`).
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    tokenizer = _tiny_tokenizer()
    tokenizer.save_pretrained(tmp / "tokenizer")
    written = ["tokenizer", "text_encoder"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            )
        )
        perturb_constant_parameters(t5)
        t5.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        if image_dim:
            clip = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=image_dim, intermediate_size=2 * image_dim, num_hidden_layers=2,
                    num_attention_heads=2, image_size=32, patch_size=16, projection_dim=image_dim,
                )
            )
            perturb_constant_parameters(clip)
            clip.save_pretrained(tmp / "image_encoder", safe_serialization=True)
            CLIPImageProcessor(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            ).save_pretrained(tmp / "image_processor")
            written += ["image_processor", "image_encoder"]
    return written
