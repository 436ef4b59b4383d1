"""The whole FantasyWorld forward in Flax NNX: the project's Wan DiT run through its hooks, plus the geometry
stream, the bidirectional cross-attention, camera conditioning and the heads (docs/fantasyworld.md, section 3).

One DiT call: Wan embeddings (`WanTransformer.embed`); Wan blocks 0..S-1 under `scan_blocks(layers=...)`,
the camera adapter inside the cross-attention (`Attention.cross_attend`, before the output projection) of
blocks < adapter_blocks; the hidden state after block S-1 seeds the geometry tokens; then one `lax.scan`
over the joint layers j (Wan block S+j from `block_stack`, frame block j, global block j, bidirectional
attention j, adapter j where it exists): frame block (whole), Wan attention half, global attention half,
bidirectional attention, Wan feed-forward half, global feed-forward half; tap j = concat(frame output,
joint geometry output). Wan head -> velocity; the heads (on request) -> poses, depth, points.

Layout is channels-last like `jax_impl.dit`: latents `[B, F, H, W, 36]`, velocity `[B, F, H, W, 16]`.
Taps (`capture=True`) are named as `torch_ref.fantasyworld.model` names them.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.dit import Attention, Taps, WanTransformer, token_grid
from jax_impl.fantasyworld.bicross import BiCrossAttention, rope3d_tables
from jax_impl.fantasyworld.camera import CameraAdapter, CameraPoseEncoder
from jax_impl.fantasyworld.geometry import GeometryBlock, GeometryEmbed, frame_positions, rope2d_tables
from jax_impl.fantasyworld.heads import CameraHead, DPTHead
from jax_impl.loading import Progress, load_checkpoint
from jax_impl.layers import F32
from jax_impl.rope import rope_tables
from weights.checkpoint import Checkpoint
from weights.configs.fantasyworld import FantasyWorldConfig
from weights.fantasyworld_map import FANTASYWORLD

# Modules stored with a leading layer axis (scanned); the loader gathers them from per-layer tensors.
STACKED = ("wan.blocks", "adapters", "frame_blocks", "global_blocks", "bicross")


def _stack(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n copies of `make(rngs)` with their parameters stacked on a leading layer axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0)
    def build(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    return build(rngs)


def _segments(start: int, stop: int, adapted: int) -> list[tuple[int, int, bool]]:
    """[start, stop) cut where the camera adapter ends (blocks < `adapted` carry one): (lo, hi, has adapter)."""
    cut = min(max(adapted, start), stop)
    return [(lo, hi, a) for lo, hi, a in ((start, cut, True), (cut, stop, False)) if hi > lo]


def _slice(state, lo: int, hi: int):
    return jax.tree.map(lambda a: a[lo:hi], state)


class FantasyWorld(nnx.Module):
    """Wan2.1 I2V DiT + geometry branch. Only the Wan half follows `dtype`; the added modules are float32."""

    def __init__(self, cfg: FantasyWorldConfig, *, dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(attention_backend=attention_backend)
        self.wan = WanTransformer(cfg.wan, dtype=dtype, rngs=rngs, **kw)
        self.adapters = _stack(lambda r: CameraAdapter(cfg, rngs=r), len(cfg.adapter_layers()), rngs)
        self.pose_encoder = CameraPoseEncoder(cfg, rngs=rngs)
        self.geometry = GeometryEmbed(cfg, rngs=rngs)
        geo = lambda r: GeometryBlock(cfg.geo_dim, cfg.geo_heads, cfg.geo_mlp_ratio, True, rngs=r, **kw)  # noqa: E731
        self.frame_blocks = _stack(geo, cfg.joint_layers, rngs)
        self.global_blocks = _stack(geo, cfg.joint_layers, rngs)
        self.bicross = _stack(lambda r: BiCrossAttention(cfg.wan_dim, cfg.geo_dim, cfg.bicross_dim, cfg.bicross_heads,
                                                         rngs=r, **kw), cfg.joint_layers, rngs)
        self.camera_head = CameraHead(cfg, rngs=rngs, **kw)
        self.depth_head = DPTHead(cfg, 2, "exp", rngs=rngs)
        self.point_head = DPTHead(cfg, 4, "inv_log", rngs=rngs)

    def __call__(self, latents: jax.Array, timestep: jax.Array, text: jax.Array, image: jax.Array,
                 rays: jax.Array | None = None, *, heads: bool = False, capture: bool = False):
        """latents [B, F, H, W, 36] (noise + mask + condition); timestep [B]; text [B, S, text_dim]; image
        [B, 257, image_dim]; rays [B, frames, 8H, 8W, 6] Plucker rays (None: no camera conditioning).

        Returns (velocity [B, F, H, W, 16], predictions dict or None, taps dict (empty unless `capture`))."""
        out, layer_taps, taps = self.forward(latents, timestep, text, image, rays, capture=capture)
        pred = None
        if heads:
            pred = self.predict(layer_taps, token_grid(self.cfg.wan, *latents.shape[1:4])[1:])
            taps.update({f"pred.{k}": v for k, v in pred.items()})
        return out, pred, (taps if capture else {})

    def predict(self, layer_taps: list[jax.Array], grid_hw: tuple[int, int]) -> dict[str, jax.Array]:
        """The heads on the joint layers' taps (each [B, f, P, 2 geo_dim]; grid_hw: tokens per frame side):
        pose_enc [B, frames, 9], depth [B, frames, H, W, 1], depth_conf, world_points [.., 3], world_points_conf."""
        poses = self.camera_head(layer_taps[-1])
        depth, depth_conf = self.depth_head(layer_taps, grid_hw)
        points, points_conf = self.point_head(layer_taps, grid_hw)
        return {"pose_enc": poses[-1], "depth": depth, "depth_conf": depth_conf,
                "world_points": points, "world_points_conf": points_conf}

    def forward(self, latents: jax.Array, timestep: jax.Array, text: jax.Array, image: jax.Array,
                rays: jax.Array | None = None, *, capture: bool = False):
        """The joint forward without the heads: (velocity, every joint layer's tap [B, f, P, 2 geo_dim] (the
        heads' input), taps dict). Arguments as `__call__`."""
        cfg, wan = self.cfg, self.wan
        b = latents.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timestep, F32), (b,))
        grid = f, h, w = token_grid(cfg.wan, *latents.shape[1:4])
        x, temb, mod, context, context_img, _ = wan.embed(latents, t, text, image)
        rope = rope_tables(grid, cfg.wan.rope_split, cfg.wan.rope_max_seq_len)
        taps: Taps = {}
        camera = self.pose_encoder(rays) if rays is not None else None
        if camera is not None:
            taps["camera_features"] = camera
        adapted = len(cfg.adapter_layers()) if camera is not None else 0
        ad_graph, ad_state = nnx.split(self.adapters)

        def cross_hook(ad_layer) -> Callable[[Attention, jax.Array], jax.Array] | None:
            """The cross-attention with the camera adapter shifting its result before the output projection."""
            if ad_layer is None:
                return None
            adapter = nnx.merge(ad_graph, ad_layer)

            def cross(attn: Attention, hid: jax.Array) -> jax.Array:
                out = attn.cross_attend(hid, attn.context_kv(context, context_img))
                shifted = adapter(out.reshape(*out.shape[:2], -1), camera)
                return attn.output(shifted.reshape(out.shape))

            return cross

        # Wan blocks 0..S-1
        outs = []
        for lo, hi, has_ad in _segments(0, cfg.branch_start, adapted):
            def wan_step(block, x, ad_layer):
                x, _ = block(x, context, context_img, mod, rope, cross_attention=cross_hook(ad_layer))
                return x, x

            x, ys = wan.scan_blocks(x, wan_step, _slice(ad_state, lo, hi) if has_ad else None, layers=slice(lo, hi))
            outs.append(ys)
        if capture:
            taps.update({f"wan.blocks.{i}": y for i, y in enumerate(jnp.concatenate(outs, axis=0))})

        # geometry stream
        geo = self.geometry(x.astype(F32), grid)  # [B*f, P, D]; the geometry stream stays float32 (its weights are)
        e0 = self.geometry.time(t)  # [B, 6, D]
        p = geo.shape[1]
        rope_frame = rope2d_tables(frame_positions(h, w, cfg.patch_start), cfg.geo_dim // cfg.geo_heads,
                                   cfg.geo_rope_base)
        rope_global = tuple(jnp.tile(r, (f, 1)) for r in rope_frame)
        split = cfg.bicross_rope_split()
        rope_video, rope_geo = rope3d_tables(grid, split), rope3d_tables(grid, split, special=cfg.patch_start)
        e0_frames = jnp.repeat(e0, f, axis=0)
        taps["geo.tokens"] = geo

        # joint layers: Wan block S+j with frame block j, global block j, bidirectional attention j
        wan_graph, wan_state = wan.block_stack(slice(cfg.branch_start, cfg.wan.num_layers))
        graphs, states = zip(*(nnx.split(m) for m in (self.frame_blocks, self.global_blocks, self.bicross)))

        def joint_step(carry, layer):
            x, geo = carry
            w_layer, layers, ad_layer = layer
            block = nnx.merge(wan_graph, w_layer)
            fb, gb, bc = (nnx.merge(g, s) for g, s in zip(graphs, layers))
            geo = fb(geo, rope_frame, e0_frames)
            frame_out = geo.reshape(b, f, p, -1)
            x, ffn_mod = block.attention_half(x, context, context_img, mod, rope, cross_attention=cross_hook(ad_layer))
            gmod = gb.mod(e0)
            g = gb.attention_half(geo.reshape(b, f * p, -1), rope_global, gmod)
            x, g = bc(x, g, rope_video, rope_geo)
            x = block.ffn_half(x, ffn_mod)
            g = gb.ffn_half(g, gmod)
            return (x, g.reshape(b * f, p, -1)), (frame_out, x, g)

        frames, videos, geos = [], [], []
        carry = (x, geo)
        for lo, hi, has_ad in _segments(cfg.branch_start, cfg.wan.num_layers, adapted):
            j0, j1 = lo - cfg.branch_start, hi - cfg.branch_start
            xs = (_slice(wan_state, j0, j1), tuple(_slice(s, j0, j1) for s in states),
                  _slice(ad_state, lo, hi) if has_ad else None)
            carry, (fr, vi, ge) = jax.lax.scan(joint_step, carry, xs)
            frames.append(fr), videos.append(vi), geos.append(ge)
        x = carry[0]
        frames, videos, geos = (jnp.concatenate(a, axis=0) for a in (frames, videos, geos))
        layer_taps = [jnp.concatenate([frames[j], geos[j].reshape(b, f, p, -1)], axis=-1)
                      for j in range(cfg.joint_layers)]
        if capture:
            for j in range(cfg.joint_layers):
                taps.update({f"layers.{j}.frame": frames[j], f"layers.{j}.video": videos[j],
                             f"layers.{j}.geo": geos[j]})

        _, out = wan.apply_head(x, temb, latents.shape)
        taps["output"] = out
        return out, layer_taps, taps


def load_fantasyworld(folder: str | os.PathLike, *, dtype=None, attention_backend: str = "auto",
                      allow_pickle: bool = False, progress: Progress | None = None) -> FantasyWorld:
    """`FantasyWorld` from a checkpoint folder (config.json + weights in the released, torch-reference or Flax
    layout) through the one checkpoint engine; a pickled `model.pth` only with `allow_pickle` (weights-only)."""
    ckpt = Checkpoint(folder, FANTASYWORLD, allow_pickle=allow_pickle)
    dtype = jnp.dtype(dtype or jnp.float32)
    build = lambda: FantasyWorld(ckpt.config, dtype=dtype, attention_backend=attention_backend, rngs=nnx.Rngs(0))  # noqa: E731
    return load_checkpoint(ckpt, build, stacked=STACKED, progress=progress)
