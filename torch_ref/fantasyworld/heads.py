"""FantasyWorld's prediction heads in PyTorch: camera head, causal temporal upsampler, DPT depth/point heads.

All heads read the per-layer taps of the joint layers: for each layer the frame-block output and the
joint-layer geometry output concatenated, [B, S latent frames, tokens per frame, 2 x geo_dim]. The
geometry stream has one token grid per *latent* frame (S = 21 for 81 frames); the heads bring it back
to every video frame: the camera head expands the camera tokens of frames 1.. by 4 with a 1x1 Conv1d,
the DPT heads run a small causal 3D-conv upsampler (frame 0 kept, each later latent frame -> 4 frames).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_ref.fantasyworld.geometry import GeometryBlock
from weights.configs.fantasyworld import FantasyWorldConfig


def activate_pose(pose: torch.Tensor) -> torch.Tensor:
    """Translation and quaternion as they are, the two fields of view through ReLU."""
    return torch.cat([pose[..., :7], F.relu(pose[..., 7:])], dim=-1)


class CameraHead(nn.Module):
    """Camera tokens of the last tap -> 9-value pose per video frame (translation, quaternion, fov_h, fov_w),
    refined over `head_iterations` passes of an adaLN-modulated trunk."""

    def __init__(self, cfg: FantasyWorldConfig):
        super().__init__()
        d = cfg.head_dim_in
        self.iterations = cfg.head_iterations
        self.trunk = nn.ModuleList(GeometryBlock(d, cfg.head_heads, 4, qk_norm=False) for _ in range(cfg.head_trunk_depth))
        self.token_norm = nn.LayerNorm(d)
        self.trunk_norm = nn.LayerNorm(d)
        self.empty_pose = nn.Parameter(torch.zeros(1, 1, 9))
        self.embed_pose = nn.Linear(9, d)
        self.pose_modulation = nn.Linear(d, 3 * d)
        self.time_upsample = nn.Conv1d(d, 4 * d, 1)
        self.pose_fc1 = nn.Linear(d, d // 2)
        self.pose_fc2 = nn.Linear(d // 2, 9)

    def camera_tokens(self, last_tap: torch.Tensor) -> torch.Tensor:
        """[B, S, P, D] -> [B, 1 + 4(S-1), D]. The 4(S-1) expanded tokens come out in blocks of S-1 (all
        frames' first copy, then all second copies, ...), as the released weights were trained; only the
        first frame's token goes through token_norm."""
        cam = last_tap[:, :, 0]
        b, n, d = cam[:, 1:].shape
        up = self.time_upsample(cam[:, 1:].transpose(1, 2)).reshape(b, d, 4 * n).transpose(1, 2)
        return torch.cat([self.token_norm(cam[:, :1]), up], dim=1)

    def forward(self, last_tap: torch.Tensor) -> list[torch.Tensor]:
        """Poses [B, frames, 9] after each refinement pass (the last one is the prediction)."""
        x = self.camera_tokens(last_tap)
        pose, out = None, []
        for _ in range(self.iterations):
            cond = self.embed_pose(self.empty_pose.expand(x.shape[0], x.shape[1], -1) if pose is None else pose)
            shift, scale, gate = self.pose_modulation(F.silu(cond)).chunk(3, dim=-1)
            h = gate * (F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift) + x
            for block in self.trunk:
                h = block(h)
            delta = self.pose_fc2(F.gelu(self.pose_fc1(self.trunk_norm(h))))
            pose = delta if pose is None else pose + delta
            out.append(activate_pose(pose))
        return out


class TemporalUpsampler(nn.Module):
    """Causal x4 temporal upsampling of a feature video [B, C, T, H, W] -> [B, C, 1 + 4(T-1), H, W].

    1x1x1 conv, then twice: a causal (3,1,1) conv to 2C channels that turns each frame after the first
    into two (frame 0 passes through untouched), and a residual unit (channel RMS norm, SiLU, causal 3x3x3
    conv). Running it on the whole sequence equals the public code's frame-by-frame decoding with caches.
    """

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.conv_in = nn.Conv3d(c, c, 1)
        self.time_conv1 = nn.Conv3d(c, 2 * c, (3, 1, 1))
        self.res1_gamma = nn.Parameter(torch.ones(c, 1, 1, 1))
        self.res1_conv = nn.Conv3d(c, c, 3)
        self.time_conv2 = nn.Conv3d(c, 2 * c, (3, 1, 1))
        self.res2_gamma = nn.Parameter(torch.ones(c, 1, 1, 1))
        self.res2_conv = nn.Conv3d(c, c, 3)

    @staticmethod
    def _double(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
        if x.shape[2] == 1:
            return x
        rest = conv(F.pad(x[:, :, 1:], (0, 0, 0, 0, 2, 0)))
        b, c2, t, h, w = rest.shape
        rest = rest.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return torch.cat([x[:, :, :1], rest], dim=2)

    @staticmethod
    def _residual(x: torch.Tensor, gamma: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
        h = F.silu(F.normalize(x, dim=1) * math.sqrt(x.shape[1]) * gamma)
        return x + conv(F.pad(h, (1, 1, 1, 1, 2, 0)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self._residual(self._double(x, self.time_conv1), self.res1_gamma, self.res1_conv)
        return self._residual(self._double(x, self.time_conv2), self.res2_gamma, self.res2_conv)


def uv_embedding(h: int, w: int, channels: int, aspect: float) -> torch.Tensor:
    """Sinusoidal embedding [channels, h, w] of a centred (u, v) grid spanning the image diagonal, times 0.1:
    channels = [sin(u w_k), cos(u w_k), sin(v w_k), cos(v w_k)], w_k = 100^(-k / (channels/4))."""
    diag = math.hypot(aspect, 1.0)
    sx, sy = aspect / diag, 1.0 / diag
    u = torch.linspace(-sx * (w - 1) / w, sx * (w - 1) / w, w, dtype=torch.float64)
    v = torch.linspace(-sy * (h - 1) / h, sy * (h - 1) / h, h, dtype=torch.float64)
    q = channels // 4
    omega = 1.0 / 100.0 ** (torch.arange(q, dtype=torch.float64) / q)
    uu, vv = u[None, :].expand(h, w), v[:, None].expand(h, w)
    parts = []
    for coord in (uu, vv):
        a = coord[..., None] * omega
        parts += [a.sin(), a.cos()]
    return (0.1 * torch.cat(parts, dim=-1)).permute(2, 0, 1).to(torch.float32)


def resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class ResidualConvUnit(nn.Module):
    """relu(x) + conv(relu(conv(relu(x)))): the public code's in-place ReLU makes the skip carry relu(x)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(x)
        return a + self.conv2(F.relu(self.conv1(a)))


class FusionBlock(nn.Module):
    """RefineNet fusion: (x + unit1(skip)) -> unit2 -> bilinear resize (align_corners) -> 1x1 conv."""

    def __init__(self, c: int, has_skip: bool):
        super().__init__()
        self.unit1 = ResidualConvUnit(c) if has_skip else None
        self.unit2 = ResidualConvUnit(c)
        self.out_conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if skip is not None:
            x = x + self.unit1(skip)
        x = self.unit2(x)
        x = resize(x, size if size is not None else (2 * x.shape[-2], 2 * x.shape[-1]))
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Four taps -> per-pixel values and confidence for every video frame.

    Level k reads tap `dpt_layers[k]`: LayerNorm, 1x1 projection, uv embedding, resize to 4x / 2x / 1x /
    0.5x the token grid, temporal upsampler; then RefineNet fusion from coarse to fine, a 3x3 conv, a
    bilinear resize to the full image, uv embedding, 3x3 conv + ReLU + 1x1 conv, and the activations
    (`exp` for depth, sign(y)(exp|y|-1) for points; confidence 1 + exp)."""

    def __init__(self, cfg: FantasyWorldConfig, out_dim: int, activation: str):
        super().__init__()
        d, ch, fe = cfg.head_dim_in, cfg.dpt_channels, cfg.dpt_features
        self.layers, self.start, self.patch, self.activation = cfg.dpt_layers, cfg.patch_start, cfg.dpt_patch, activation
        self.norm = nn.LayerNorm(d)
        self.projects = nn.ModuleList(nn.Conv2d(d, c, 1) for c in ch)
        self.resize0 = nn.ConvTranspose2d(ch[0], ch[0], 4, stride=4)
        self.resize1 = nn.ConvTranspose2d(ch[1], ch[1], 2, stride=2)
        self.resize3 = nn.Conv2d(ch[3], ch[3], 3, stride=2, padding=1)
        self.upsamplers = nn.ModuleList(TemporalUpsampler(c) for c in ch)
        self.layer_rn = nn.ModuleList(nn.Conv2d(c, fe, 3, padding=1, bias=False) for c in ch)
        self.refine = nn.ModuleList(FusionBlock(fe, has_skip=i < 3) for i in range(4))
        self.out_conv1 = nn.Conv2d(fe, fe // 2, 3, padding=1)
        self.out_conv2 = nn.Conv2d(fe // 2, cfg.dpt_hidden, 3, padding=1)
        self.out_conv3 = nn.Conv2d(cfg.dpt_hidden, out_dim, 1)

    def level(self, k: int, tap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Level-k features [(B T), C_k, h_k, w_k] of every video frame."""
        b, s = tap.shape[:2]
        h, w = grid
        x = self.norm(tap[:, :, self.start:]).reshape(b * s, h, w, -1).permute(0, 3, 1, 2)
        x = self.projects[k](x)
        x = x + uv_embedding(h, w, x.shape[1], w / h)
        x = [self.resize0, self.resize1, nn.Identity(), self.resize3][k](x)
        x = self.upsamplers[k](x.unflatten(0, (b, s)).transpose(1, 2))
        return x.transpose(1, 2).flatten(0, 1)

    def forward(self, taps: list[torch.Tensor], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """taps: every joint layer's [B, S, P, D]; grid (h, w) tokens. -> ([B, T, H, W, out-1], conf [B, T, H, W])."""
        b = taps[0].shape[0]
        f1, f2, f3, f4 = (self.layer_rn[k](self.level(k, taps[i], grid)) for k, i in enumerate(self.layers))
        x = self.refine[3](f4, size=f3.shape[-2:])
        x = self.refine[2](x, f3, size=f2.shape[-2:])
        x = self.refine[1](x, f2, size=f1.shape[-2:])
        x = self.out_conv1(self.refine[0](x, f1))
        h, w = grid
        x = resize(x, (h * self.patch, w * self.patch))
        x = x + uv_embedding(h * self.patch, w * self.patch, x.shape[1], w / h)
        x = self.out_conv3(F.relu(self.out_conv2(x)))
        x = x.permute(0, 2, 3, 1).unflatten(0, (b, -1))
        values, conf = x[..., :-1], 1 + x[..., -1].exp()
        if self.activation == "exp":
            values = values.exp()
        else:  # "inv_log"
            values = torch.sign(values) * torch.expm1(values.abs())
        return values, conf
