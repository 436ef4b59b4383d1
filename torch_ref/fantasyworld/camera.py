"""FantasyWorld's camera conditioning in PyTorch: Plucker rays, the pose encoder, the cross-attention adapter.

Path: per-pixel Plucker rays (o x d, d) of the trajectory's cameras -> pixel-unshuffle by the VAE factor
-> 1x1 convolutions with GroupNorm -> two temporal poolings (first frame kept, later frames averaged in
pairs: 81 -> 41 -> 21 latent frames) -> a (1, 2, 2) Conv3d patchify (one feature per Wan token) -> an
MLP with LayerNorms to the camera context width. Inside the cross-attention of the first Wan blocks an
adapter turns (attention output, camera feature) into an additive shift applied before the output
projection. `AdaptedCrossAttention` is that cross-attention as a diffusers attention processor.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights.configs.fantasyworld import FantasyWorldConfig

TEXT_TOKENS = 512  # diffusers' Wan cross-attention takes every token before the last 512 as image tokens


def plucker_rays(c2w: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rays [F, H, W, 6] = (o x d, d) through pixel centres, d a unit vector in world space.

    c2w [F, 4, 4] camera-to-world; intrinsics [F, 4] = (fx, fy, cx, cy) in the units the pixel grid is
    measured in (see weights.trajectory for the released model's convention)."""
    j, i = torch.meshgrid(torch.arange(height, dtype=c2w.dtype), torch.arange(width, dtype=c2w.dtype), indexing="ij")
    fx, fy, cx, cy = (intrinsics[:, k, None, None] for k in range(4))
    d = torch.stack([(i + 0.5 - cx) / fx, (j + 0.5 - cy) / fy, torch.ones_like(fx * i)], dim=-1)
    d = d / d.norm(dim=-1, keepdim=True)
    d = torch.einsum("fhwc,frc->fhwr", d, c2w[:, :3, :3])
    o = c2w[:, None, None, :3, 3].expand_as(d)
    return torch.cat([torch.linalg.cross(o, d, dim=-1), d], dim=-1)


def pool_time(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[(B F), C, H, W] -> [(B F'), C, H, W]: odd F keeps frame 0 and averages the rest in pairs
    (F' = 1 + (F-1)/2); even F averages all frames in pairs."""
    x = x.unflatten(0, (batch, -1))
    if x.shape[1] % 2:
        rest = x[:, 1:]
        rest = rest.unflatten(1, (-1, 2)).mean(2)
        x = torch.cat([x[:, :1], rest], dim=1)
    else:
        x = x.unflatten(1, (-1, 2)).mean(2)
    return x.flatten(0, 1)


class CameraPoseEncoder(nn.Module):
    """Plucker rays [B, F, H, W, 6] -> per-token camera features [B, L, camera_context_dim]."""

    def __init__(self, cfg: FantasyWorldConfig):
        super().__init__()
        c, g, d = cfg.camera_unshuffled, cfg.camera_groups, cfg.camera_dim
        self.down = cfg.camera_downscale
        self.conv1, self.norm1 = nn.Conv2d(c, c, 1), nn.GroupNorm(g, c)
        self.conv2, self.norm2 = nn.Conv2d(c, c, 1), nn.GroupNorm(g, c)
        self.conv3, self.norm3 = nn.Conv2d(c, 2 * c, 1), nn.GroupNorm(g, 2 * c)
        self.patch_embed = nn.Conv3d(2 * c, d, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.fc1, self.fc_norm1 = nn.Linear(d, d // 2), nn.LayerNorm(d // 2)
        self.fc2, self.fc_norm2 = nn.Linear(d // 2, cfg.camera_context_dim), nn.LayerNorm(cfg.camera_context_dim)

    def forward(self, rays: torch.Tensor) -> torch.Tensor:
        b = rays.shape[0]
        x = F.pixel_unshuffle(rays.permute(0, 1, 4, 2, 3).flatten(0, 1), self.down)
        x = F.relu(self.norm2(self.conv2(self.norm1(self.conv1(x)))))
        x = pool_time(x, b)
        x = F.relu(self.norm3(self.conv3(x)))
        x = pool_time(x, b)
        x = self.patch_embed(x.unflatten(0, (b, -1)).transpose(1, 2))
        x = x.flatten(2).transpose(1, 2)
        return self.fc_norm2(self.fc2(F.gelu(self.fc_norm1(self.fc1(x)))))


class CameraAdapter(nn.Module):
    """shift = MLP_s(MLP_a(attention output) + Linear(camera feature)); output = attention output + shift.
    (The public code also computes a scale, hard-wired to zero; all-zero camera features skip the adapter.)"""

    def __init__(self, cfg: FantasyWorldConfig):
        super().__init__()
        ctx, d = cfg.camera_context_dim, cfg.wan_dim
        self.context_proj = nn.Linear(ctx, ctx)
        self.attn_down = nn.Linear(d, cfg.adapter_hidden)
        self.attn_up = nn.Linear(cfg.adapter_hidden, ctx)
        self.shift_down = nn.Linear(ctx, cfg.adapter_shift_hidden)
        self.shift_up = nn.Linear(cfg.adapter_shift_hidden, d)

    def forward(self, attn_out: torch.Tensor, camera: torch.Tensor | None) -> torch.Tensor:
        if camera is None or not bool(torch.any(camera != 0)):
            return attn_out
        mix = self.attn_up(F.relu(self.attn_down(attn_out))) + self.context_proj(camera)
        return attn_out + self.shift_up(F.relu(self.shift_down(mix)))


class AdaptedCrossAttention:
    """A diffusers `WanAttention` processor for a Wan block's cross-attention (attn2): text attention plus
    image attention (I2V), then the camera adapter, then the output projection. Called as
    `block.attn2(h, context, None, None, camera=features)`; without `camera` it equals diffusers' own."""

    def __init__(self, adapter: CameraAdapter):
        self.adapter = adapter

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, camera=None):
        ctx = encoder_hidden_states
        n_img = ctx.shape[1] - TEXT_TOKENS if attn.add_k_proj is not None else 0
        img, text = ctx[:, :n_img], ctx[:, n_img:]
        heads = lambda t: t.unflatten(2, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
        q = heads(attn.norm_q(attn.to_q(hidden_states)))
        out = F.scaled_dot_product_attention(q, heads(attn.norm_k(attn.to_k(text))), heads(attn.to_v(text)))
        if n_img:
            k_img = heads(attn.norm_added_k(attn.add_k_proj(img)))
            out = out + F.scaled_dot_product_attention(q, k_img, heads(attn.add_v_proj(img)))
        out = self.adapter(out.transpose(1, 2).flatten(2), camera)
        return attn.to_out[1](attn.to_out[0](out))
