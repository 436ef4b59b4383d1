"""Run diffusers' PyTorch WanTransformer3DModel on JAX through torchax, with our attention kernels.

This is the second way to get Wan onto TPUs/GPUs under JAX: instead of the Flax port, the unmodified
PyTorch reference is traced by torchax into JAX. Its attention goes through
`torch.nn.functional.scaled_dot_product_attention` (diffusers' "native" attention back-end), which we
override inside a torchax environment of our own, so `kernels.attention` (xla / splash / cudnn) does the
work. A private environment keeps the override from leaking into other torchax users in the process.

Models must be built or loaded (plain PyTorch, on CPU) before they are handed over here: torchax only
takes over inside this module's environment, so construction stays ordinary PyTorch.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

import kernels


class AttentionOverride:
    """torchax implementation of torch's SDPA that calls `kernels.attention`.

    Calls the kernels cannot express (masks, causal, dropout, a custom scale, GQA) fall back to
    torchax's own reference SDPA rather than being silently mishandled; `calls`/`fallbacks` count both
    so tests can prove the kernel path really ran.
    """

    def __init__(self, env, backend: str, options: dict[str, Any]):
        self.env = env
        self.backend = backend
        self.options = dict(options)
        self.calls = 0
        self.fallbacks = 0

    def __call__(
        self,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ):
        import torchax.tensor
        from torchax.interop import jax_view
        from torchax.ops.jtorch import _sdpa_reference

        head_dim = query.shape[-1]
        plain_scale = scale is None or math.isclose(scale, 1.0 / math.sqrt(head_dim), rel_tol=1e-6)
        if attn_mask is not None or dropout_p or is_causal or not plain_scale or query.shape[-3] != key.shape[-3]:
            self.fallbacks += 1
            return _sdpa_reference(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if query.ndim != 4:
            raise ValueError(f"SDPA override expects [batch, heads, seq, head_dim] tensors, got {tuple(query.shape)}")
        self.calls += 1
        q, k, v = (jnp.swapaxes(jax_view(t), 1, 2) for t in (query, key, value))  # -> [b, s, h, d]
        out = kernels.attention(q, k, v, backend=self.backend, **self.options)
        return torchax.tensor.Tensor(jnp.swapaxes(out, 1, 2), self.env)


def make_env(backend: str = "xla", **options):
    """A torchax environment whose SDPA is `kernels.attention(backend=backend, **options)`."""
    import torchax.tensor

    kernels.attention  # noqa: B018 - fail here, not mid-trace, if `kernels` is a namesake package
    env = torchax.tensor.Environment()
    override = AttentionOverride(env, backend, options)
    env.override_op_definition(torch.nn.functional.scaled_dot_product_attention, override)
    env.override_op_definition(torch.ops.aten.scaled_dot_product_attention, override)
    env.attention_override = override  # for inspection (call counts) by tests and callers
    return env


def _to_jax(a: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(np.ascontiguousarray(a)).astype(dtype)


def run_dit_torchax(
    model: torch.nn.Module,
    latents: np.ndarray,
    timestep: np.ndarray,
    text: np.ndarray,
    image: np.ndarray | None = None,
    backend: str = "xla",
    *,
    env=None,
    **options,
) -> np.ndarray:
    """diffusers' transformer on JAX via torchax; inputs/outputs channels-last numpy as `capture.run_dit`.

    latents [B, F, H, W, C]; timestep [B] (or [B, L]); text [B, S, text_dim]; image [B, N, image_dim]
    or None. Returns [B, F, H, W, C_out] float32. Pass `env` (from `make_env`) to reuse one environment.
    """
    import torchax

    if latents.ndim != 5:
        raise ValueError(f"latents must be [batch, frames, height, width, channels], got shape {latents.shape}")
    if text.ndim != 3 or text.shape[0] != latents.shape[0]:
        raise ValueError(f"text must be [batch, tokens, dim] with batch {latents.shape[0]}, got {text.shape}")
    if image is not None and (image.ndim != 3 or image.shape[0] != latents.shape[0]):
        raise ValueError(f"image must be [batch, tokens, dim] with batch {latents.shape[0]}, got {image.shape}")
    if env is None:
        env = make_env(backend, **options)
    param = model.patch_embedding.weight
    if param.device.type != "cpu":
        raise ValueError(f"hand the model over on CPU (torchax copies its weights to JAX); it is on {param.device}")
    dtype = {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}[param.dtype]

    states, jax_func = torchax.extract_jax(model.eval(), env)

    @jax.jit
    def forward(states, x, t, txt, img):
        kwargs = {"hidden_states": x, "timestep": t, "encoder_hidden_states": txt, "return_dict": False}
        if img is not None:
            kwargs["encoder_hidden_states_image"] = img
        return jax_func(states, (), kwargs)[0]

    x = _to_jax(latents.transpose(0, 4, 1, 2, 3), dtype)
    img = None if image is None else _to_jax(image, dtype)
    with torch.no_grad():
        out = forward(states, x, jnp.asarray(timestep, jnp.float32), _to_jax(text, dtype), img)
    return np.asarray(out.astype(jnp.float32)).transpose(0, 2, 3, 4, 1)


__all__ = ["run_dit_torchax", "make_env", "AttentionOverride"]
