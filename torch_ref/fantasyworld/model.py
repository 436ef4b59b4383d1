"""The whole FantasyWorld forward in PyTorch: diffusers' Wan DiT driven block-half by block-half, plus the
geometry stream, the bidirectional cross-attention, camera conditioning and heads.

Forward (docs/fantasyworld.md has shapes): Wan embeddings; blocks 0..S-1 as usual (camera adapter in
the cross-attention of blocks < adapter_blocks); the hidden state after block S-1 seeds the geometry
tokens; then for each joint layer j: the frame block j (whole), Wan block S+j's attention half, the
global block j's attention half, the bidirectional cross-attention j, Wan block S+j's feed-forward half,
the global block j's feed-forward half; tap j = concat(frame output, joint output). Wan head -> velocity;
heads (on request) -> poses, depth, points.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel

from torch_ref.fantasyworld.bicross import BiCrossAttention, rope3d_tables
from torch_ref.fantasyworld.camera import AdaptedCrossAttention, CameraAdapter, CameraPoseEncoder
from torch_ref.fantasyworld.geometry import GeometryBlock, GeometryEmbed, frame_positions, rope2d_tables
from torch_ref.fantasyworld.heads import CameraHead, DPTHead
from weights.configs.fantasyworld import FantasyWorldConfig

Taps = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ Wan halves
def wan_attention_half(block, x, context, temb6, rotary, camera=None):
    """Self-attention and cross-attention of a diffusers WanTransformerBlock (the cross-attention passes
    `camera` to an adapted processor). Returns (x, the feed-forward modulation (shift, scale, gate))."""
    shift, scale, gate, ff_shift, ff_scale, ff_gate = (block.scale_shift_table + temb6.float()).chunk(6, dim=1)
    h = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
    x = (x.float() + block.attn1(h, None, None, rotary) * gate).type_as(x)
    h = block.norm2(x.float()).type_as(x)
    kw = {"camera": camera} if isinstance(block.attn2.processor, AdaptedCrossAttention) else {}
    x = x + block.attn2(h, context, None, None, **kw)
    return x, (ff_shift, ff_scale, ff_gate)


def wan_ffn_half(block, x, mod):
    shift, scale, gate = mod
    h = (block.norm3(x.float()) * (1 + scale) + shift).type_as(x)
    return (x.float() + block.ffn(h).float() * gate).type_as(x)


class FantasyWorld(nn.Module):
    def __init__(self, cfg: FantasyWorldConfig):
        super().__init__()
        self.cfg = cfg
        kw = {k: v for k, v in cfg.wan.to_dict().items() if not k.startswith("_")}
        kw["patch_size"] = tuple(kw["patch_size"])
        self.wan = WanTransformer3DModel(**kw)
        self.adapters = nn.ModuleList(CameraAdapter(cfg) for _ in cfg.adapter_layers())
        for i, adapter in enumerate(self.adapters):
            self.wan.blocks[i].attn2.set_processor(AdaptedCrossAttention(adapter))
        self.pose_encoder = CameraPoseEncoder(cfg)
        self.geometry = GeometryEmbed(cfg)
        block = lambda: GeometryBlock(cfg.geo_dim, cfg.geo_heads, cfg.geo_mlp_ratio, qk_norm=True)  # noqa: E731
        self.frame_blocks = nn.ModuleList(block() for _ in range(cfg.joint_layers))
        self.global_blocks = nn.ModuleList(block() for _ in range(cfg.joint_layers))
        self.bicross = nn.ModuleList(
            BiCrossAttention(cfg.wan_dim, cfg.geo_dim, cfg.bicross_dim, cfg.bicross_heads) for _ in range(cfg.joint_layers)
        )
        self.camera_head = CameraHead(cfg)
        self.depth_head = DPTHead(cfg, 2, "exp")
        self.point_head = DPTHead(cfg, 4, "inv_log")

    def forward(self, latents, timestep, text, image, rays=None, *, heads: bool = False, capture: bool = False):
        """latents [B, 36, F, H, W] (noise + mask + condition); timestep [B]; text [B, 512, text_dim];
        image [B, 257, image_dim]; rays [B, frames, H*8, W*8, 6] Plucker rays (None: no camera).

        Returns (velocity [B, 16, F, H, W], predictions dict or None, taps dict or None)."""
        cfg, wan = self.cfg, self.wan
        taps: Taps = {}
        b = latents.shape[0]
        pt, ph, pw = cfg.wan.patch_size
        grid = (latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
        rotary = wan.rope(latents)
        x = wan.patch_embedding(latents).flatten(2).transpose(1, 2)
        temb, tproj, context, context_img = wan.condition_embedder(timestep, text, image)
        temb6 = tproj.unflatten(1, (6, -1))
        context = torch.cat([context_img, context], dim=1)
        camera = self.pose_encoder(rays) if rays is not None else None
        if camera is not None:
            taps["camera_features"] = camera

        def cam(i: int):
            return camera if i < len(self.adapters) else None

        for i in range(cfg.branch_start):
            block = wan.blocks[i]
            x, mod = wan_attention_half(block, x, context, temb6, rotary, cam(i))
            x = wan_ffn_half(block, x, mod)
            taps[f"wan.blocks.{i}"] = x

        # geometry tokens
        f, h, w = grid
        geo = self.geometry(x, grid)  # [B*f, P, D]
        e0 = self.geometry.time(timestep)  # [B, 6, D]
        p = geo.shape[1]
        rope_frame = rope2d_tables(frame_positions(h, w, cfg.patch_start), cfg.geo_dim // cfg.geo_heads, cfg.geo_rope_base)
        rope_global = tuple(t.repeat(f, 1) for t in rope_frame)
        split = cfg.bicross_rope_split()
        rope_video = rope3d_tables(grid, split)
        rope_geo = rope3d_tables(grid, split, special=cfg.patch_start)
        e0_frames = e0.repeat_interleave(f, dim=0)
        taps["geo.tokens"] = geo
        layer_taps = []
        for j in range(cfg.joint_layers):
            fb, gb, block = self.frame_blocks[j], self.global_blocks[j], wan.blocks[cfg.branch_start + j]
            geo = fb(geo, rope_frame, e0_frames)
            frame_out = geo.reshape(b, f, p, -1)
            x, mod = wan_attention_half(block, x, context, temb6, rotary, cam(cfg.branch_start + j))
            gmod = gb.mod(e0)
            g = gb.attention_half(geo.reshape(b, f * p, -1), rope_global, gmod)
            x, g = self.bicross[j](x, g, rope_video, rope_geo)
            x = wan_ffn_half(block, x, mod)
            g = gb.ffn_half(g, gmod)
            geo = g.reshape(b * f, p, -1)
            layer_taps.append(torch.cat([frame_out, g.reshape(b, f, p, -1)], dim=-1))
            if capture:
                taps.update({f"layers.{j}.frame": frame_out, f"layers.{j}.video": x, f"layers.{j}.geo": g})

        # Wan head (diffusers' forward tail)
        shift, scale = (wan.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        out = wan.proj_out((wan.norm_out(x.float()) * (1 + scale) + shift).type_as(x))
        out = out.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        taps["output"] = out

        pred = None
        if heads:
            poses = self.camera_head(layer_taps[-1])
            depth, depth_conf = self.depth_head(layer_taps, (h, w))
            points, points_conf = self.point_head(layer_taps, (h, w))
            pred = {"pose_enc": poses[-1], "depth": depth, "depth_conf": depth_conf,
                    "world_points": points, "world_points_conf": points_conf}
            taps.update({f"pred.{k}": v for k, v in pred.items()})
        return out, pred, (taps if capture else None)
