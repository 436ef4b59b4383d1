"""FantasyWorld's bidirectional cross-attention between the Wan stream and the geometry stream (PyTorch).

Both streams are LayerNorm-ed (no affine), queries come from the video tokens and keys from the
geometry tokens; the same two projected tensors serve both directions (video attends to geometry with
q x k, geometry attends to video with k x q), each direction with its own values and output projection,
and each result enters its stream through a per-channel gate. Positions: Wan's 3D RoPE over
(latent frame, row, column), with the identity rotation for the camera and register tokens of each
frame.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def axis_angles(dim: int, n: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles [n, dim/2] of one RoPE axis (float64)."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.arange(n, dtype=torch.float64)[:, None] * inv[None]


def rope3d_tables(grid: tuple[int, int, int], split: tuple[int, int, int], special: int = 0):
    """cos, sin [f*(special + h*w), head_dim/2] (one entry per channel pair), frame-major; the `special`
    tokens at the start of every frame get angle 0 (identity rotation)."""
    f, h, w = grid
    parts = []
    for axis, (n, d) in enumerate(zip(grid, split)):
        a = axis_angles(d, n)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        parts.append(a.reshape(shape).expand(f, h, w, d // 2))
    ang = torch.cat(parts, dim=-1).reshape(f, h * w, -1)
    ang = torch.cat([torch.zeros(f, special, ang.shape[-1], dtype=ang.dtype), ang], dim=1).reshape(-1, ang.shape[-1])
    return ang.cos().to(torch.float32), ang.sin().to(torch.float32)


def apply_rope3d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, head_dim]: channels (2i, 2i+1) rotated as one complex number."""
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None], sin[None, :, None]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)


class BiCrossAttention(nn.Module):
    def __init__(self, video_dim: int, geo_dim: int, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(video_dim, dim)
        self.k_proj = nn.Linear(geo_dim, dim)
        self.v_video = nn.Linear(video_dim, dim)
        self.v_geo = nn.Linear(geo_dim, dim)
        self.out_video = nn.Linear(dim, video_dim)
        self.out_geo = nn.Linear(dim, geo_dim)
        self.gate_video = nn.Parameter(torch.zeros(video_dim))
        self.gate_geo = nn.Parameter(torch.zeros(geo_dim))

    def forward(self, video: torch.Tensor, geo: torch.Tensor, rope_video, rope_geo):
        """video [B, L, Dv], geo [B, M, Dg]; rope_* = (cos, sin) tables for the two token sequences."""
        hv = F.layer_norm(video, video.shape[-1:], eps=1e-6)
        hg = F.layer_norm(geo, geo.shape[-1:], eps=1e-6)
        heads = lambda t: t.unflatten(-1, (self.heads, -1))  # noqa: E731
        q = apply_rope3d(heads(self.q_proj(hv)), *rope_video).transpose(1, 2)
        k = apply_rope3d(heads(self.k_proj(hg)), *rope_geo).transpose(1, 2)
        vv = heads(self.v_video(hv)).transpose(1, 2)
        vg = heads(self.v_geo(hg)).transpose(1, 2)
        to_video = F.scaled_dot_product_attention(q, k, vg).transpose(1, 2).flatten(2)
        to_geo = F.scaled_dot_product_attention(k, q, vv).transpose(1, 2).flatten(2)
        return video + self.gate_video * self.out_video(to_video), geo + self.gate_geo * self.out_geo(to_geo)
