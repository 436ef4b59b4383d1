"""FantasyWorld's geometry stream in PyTorch: the VGGT-style token stream that runs beside the Wan DiT.

Written from the paper and the public code's behaviour (docs/fantasyworld.md), not copied. Pieces:
2D RoPE (base 100) over (row, column) patch positions, attention with per-head LayerNorm on q/k,
`GeometryBlock` (pre-norm attention and MLP with LayerScale and FantasyWorld's time modulation, split
into an attention half and a feed-forward half so the joint layer can interleave them with Wan), and
`GeometryEmbed` which turns Wan's hidden state after the branch-start block into per-frame token
sequences [camera, registers, patches] with their time modulation.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights.configs.fantasyworld import FantasyWorldConfig

Mod = tuple[torch.Tensor, ...]  # six [B, 1, D] modulation vectors


# ------------------------------------------------------------------------------------------ 2D RoPE
def frame_positions(h: int, w: int, special: int) -> torch.Tensor:
    """(row, column) of each token of one frame [special + h*w, 2]: special tokens at (0, 0), patches at
    (y+1, x+1) in row-major order."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    patches = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1) + 1
    return torch.cat([torch.zeros(special, 2, dtype=patches.dtype), patches], dim=0)


def rope2d_tables(pos: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim]: the first half of the channels rotates with the row, the second with the
    column; within each half, channel i pairs with i + quarter (rotate-half layout)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (base ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float32) / (2 * quarter)))
    parts_cos, parts_sin = [], []
    for axis in range(2):
        ang = pos[:, axis].to(torch.float32)[:, None] * inv_freq[None]
        ang = torch.cat([ang, ang], dim=-1)
        parts_cos.append(ang.cos())
        parts_sin.append(ang.sin())
    return torch.cat(parts_cos, dim=-1), torch.cat(parts_sin, dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, N, head_dim]; each half of the channels is rotated on its own."""
    rows, cols = x.chunk(2, dim=-1)
    rot = torch.cat([_rotate_half(rows), _rotate_half(cols)], dim=-1)
    return x * cos + rot * sin


# ------------------------------------------------------------------------------------------ blocks
class GeoAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, optional per-head LayerNorm on q and k and
    optional 2D RoPE."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        hd = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(hd) if qk_norm else None
        self.k_norm = nn.LayerNorm(hd) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope2d(q, *rope), apply_rope2d(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class GeometryBlock(nn.Module):
    """Pre-norm transformer block with LayerScale. With a time modulation (six vectors, as `modulation`
    plus the stream's time projection): the attention input is shifted/scaled (vectors 0, 1; vector 2 is
    unused), and the MLP *output* is scaled/shifted (4, 3), then LayerScale, then gated (5). Without one
    (the camera head's trunk) it is a plain pre-norm block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GeoAttention(dim, heads, qk_norm)
        self.ls1 = nn.Parameter(torch.full((dim,), 0.01))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.ls2 = nn.Parameter(torch.full((dim,), 0.01))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / math.sqrt(dim))

    def mod(self, e0: torch.Tensor) -> Mod:
        """The six modulation vectors [rows, 1, D] for time projection e0 [rows, 6, D]."""
        return tuple(m.unsqueeze(1) for m in (self.modulation + e0).unbind(1))

    def attention_half(self, x: torch.Tensor, rope=None, mod: Mod | None = None) -> torch.Tensor:
        h = self.norm1(x)
        if mod is not None:
            h = h * (1 + mod[1]) + mod[0]
        return x + self.ls1 * self.attn(h, rope)

    def ffn_half(self, x: torch.Tensor, mod: Mod | None = None) -> torch.Tensor:
        h = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        if mod is None:
            return x + self.ls2 * h
        return x + self.ls2 * (h * (1 + mod[4]) + mod[3]) * mod[5]

    def forward(self, x: torch.Tensor, rope=None, e0: torch.Tensor | None = None) -> torch.Tensor:
        mod = self.mod(e0) if e0 is not None else None
        return self.ffn_half(self.attention_half(x, rope, mod), mod)


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep embedding [B, dim], cosines first, computed in float64 as the public code does."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    ang = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).to(torch.float32)


class GeometryEmbed(nn.Module):
    """Wan hidden state -> geometry tokens, and the stream's own time modulation.

    Tokens per latent frame: [camera, registers..., patches...]; the first frame uses the first learned
    camera/register variant, all later frames the second. `cam_projector` (pose values -> camera token)
    exists in the released weights but is not used at inference (no camera tokens are passed in).
    """

    def __init__(self, cfg: FantasyWorldConfig):
        super().__init__()
        d = cfg.geo_dim
        self.freq_dim = cfg.geo_freq_dim
        self.proj_in = nn.Conv3d(cfg.wan_dim, d, kernel_size=1)
        self.time_fc1 = nn.Linear(cfg.geo_freq_dim, d)
        self.time_fc2 = nn.Linear(d, d)
        self.time_proj = nn.Linear(d, 6 * d)
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, d) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, cfg.register_tokens, d) * 1e-6)
        self.cam_fc1 = nn.Linear(cfg.cam_token_in, cfg.cam_token_hidden)
        self.cam_fc2 = nn.Linear(cfg.cam_token_hidden, d)

    def time(self, t: torch.Tensor) -> torch.Tensor:
        """e0 [B, 6, D] for timesteps [B]."""
        e = self.time_fc2(F.silu(self.time_fc1(sinusoid(t, self.freq_dim))))
        return self.time_proj(F.silu(e)).unflatten(1, (6, -1))

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """x [B, f*h*w, Dwan] -> tokens [B*f, special + h*w, D] (frame-major rows)."""
        b = x.shape[0]
        f, h, w = grid
        vol = x.reshape(b, f, h, w, -1).permute(0, 4, 1, 2, 3)
        patches = self.proj_in(vol).permute(0, 2, 3, 4, 1).reshape(b * f, h * w, -1)
        idx = torch.tensor([0] + [1] * (f - 1))
        special = torch.cat([self.camera_token, self.register_token], dim=2)[0, idx]  # [f, 1+R, D]
        special = special.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * f, -1, special.shape[-1])
        return torch.cat([special, patches], dim=1)
