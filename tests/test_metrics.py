"""parity.metrics: SSIM against scikit-image, PSNR by hand, temporal continuity, compare_videos, errors."""

import json
import math

import numpy as np
import pytest

skm = pytest.importorskip("skimage.metrics")

from parity import metrics as M  # noqa: E402


def sk_ssim(a, b, data_range):
    return skm.structural_similarity(
        np.asarray(a, np.float64) if np.asarray(a).dtype != np.uint8 else a,
        np.asarray(b, np.float64) if np.asarray(b).dtype != np.uint8 else b,
        data_range=data_range, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )


def structured(h, w, c, phase=0.0):
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    chans = [np.sin(6 * xx + phase + k) * np.cos(4 * yy) for k in range(c)]
    img = np.stack(chans, -1)
    img[h // 3: h // 2, w // 4: w // 2] = 0.8  # a flat block with edges
    return np.clip(img, -1, 1)


@pytest.mark.parametrize("shape", [(11, 11, 1), (32, 40, 3), (23, 17, 4), (64, 48, 16)])
def test_ssim_matches_skimage_random(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.uniform(-1, 1, shape)
    b = np.clip(a + 0.3 * rng.standard_normal(shape), -1, 1)
    assert abs(M.ssim(a, b, 2.0) - sk_ssim(a, b, 2.0)) < 1e-6
    c = rng.uniform(-1, 1, shape)  # unrelated image: SSIM near 0, possibly negative
    assert abs(M.ssim(a, c, 2.0) - sk_ssim(a, c, 2.0)) < 1e-6


def test_ssim_matches_skimage_structured():
    a = structured(48, 64, 3)
    for b in (structured(48, 64, 3, phase=0.3), a * 0.7 + 0.1, np.roll(a, 3, axis=1), np.zeros_like(a)):
        assert abs(M.ssim(a, b, M.RANGE_SIGNED) - sk_ssim(a, b, 2.0)) < 1e-6
    u = (a + 1) / 2  # [0, 1]
    assert abs(M.ssim(u, u**2, M.RANGE_UNIT) - sk_ssim(u, u**2, 1.0)) < 1e-6


def test_ssim_uint8_and_jax_inputs():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    assert abs(M.ssim(a, b, M.RANGE_UINT8) - sk_ssim(a, b, 255)) < 1e-6
    jnp = pytest.importorskip("jax.numpy")
    af, bf = a.astype(np.float32) / 255, b.astype(np.float32) / 255
    assert abs(M.ssim(jnp.asarray(af), jnp.asarray(bf), 1.0) - sk_ssim(af, bf, 1.0)) < 1e-6


def test_ssim_identical_is_one():
    a = structured(20, 20, 3)
    assert M.ssim(a, a, 2.0) == pytest.approx(1.0, abs=1e-12)


def test_psnr_by_hand():
    a = np.zeros((2, 4, 4, 3))
    b = a.copy()
    b[0, 0, 0, 0] = 0.5  # mse = 0.25 / 96
    expect = 10 * math.log10(2.0**2 / (0.25 / 96))
    assert M.psnr(b, a, 2.0) == pytest.approx(expect, abs=1e-12)
    assert M.psnr(a, a, 2.0) == math.inf
    x = np.full((3, 3, 1), 100, np.uint8)
    y = np.full((3, 3, 1), 90, np.uint8)  # uint8 must not wrap: mse = 100
    assert M.psnr(y, x, 255) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    assert M.mse(y, x) == 100.0


def test_video_psnr_per_frame_and_batch():
    a = np.zeros((3, 4, 4, 1))
    b = a.copy()
    b[1] += 0.1  # frame 1: mse 0.01
    b[2] += 0.2  # frame 2: mse 0.04
    p = M.video_psnr(b, a, 1.0)
    assert p.values.shape == (3,)
    assert p.values[0] == math.inf
    assert p.values[1] == pytest.approx(20.0) and p.values[2] == pytest.approx(10 * math.log10(25))
    assert p.mean == math.inf
    pb = M.video_psnr(np.stack([b[1:], b[1:]]), np.stack([a[1:], a[1:]]), 1.0)
    assert pb.values.shape == (2, 2)
    assert pb.mean == pytest.approx((20 + 10 * math.log10(25)) / 2)


def test_video_ssim_per_frame():
    rng = np.random.default_rng(2)
    a = rng.uniform(-1, 1, (4, 16, 20, 3))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), -1, 1)
    s = M.video_ssim(a, b, 2.0)
    expect = [sk_ssim(x, y, 2.0) for x, y in zip(a, b)]
    np.testing.assert_allclose(s.values, expect, atol=1e-6)
    assert s.mean == pytest.approx(np.mean(expect), abs=1e-6)
    sb = M.video_ssim(a[None].repeat(2, 0), b[None].repeat(2, 0), 2.0)
    assert sb.values.shape == (2, 4)


def test_temporal_continuity_hand_made():
    v = np.zeros((4, 2, 2, 1))
    v[1] = 1.0  # 0->1: 1, 1->1: 0, 1->3: 4
    v[2] = 1.0
    v[3] = 3.0
    t = M.temporal_continuity(v)
    np.testing.assert_array_equal(t.values, [1.0, 0.0, 4.0])
    assert t.mean == pytest.approx(5 / 3)
    tb = M.temporal_continuity(np.stack([v, np.zeros_like(v)]))
    assert tb.values.shape == (2, 3) and tb.mean == pytest.approx(5 / 6)
    u8 = np.array([0, 255], np.uint8).reshape(2, 1, 1, 1)
    assert M.temporal_continuity(u8).mean == 255.0**2  # no uint8 wrap-around


def test_compare_videos_identical():
    rng = np.random.default_rng(3)
    v = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    r = M.compare_videos(v, v, M.RANGE_SIGNED)
    assert r["psnr_mean"] == math.inf and r["psnr_min"] == math.inf
    assert r["ssim_mean"] == pytest.approx(1.0) and r["ssim_min"] == pytest.approx(1.0)
    assert r["mse"] == 0.0 and r["max_abs"] == 0.0 and r["rel_l2"] == 0.0
    assert r["temporal_mse_a"] == r["temporal_mse_b"] == pytest.approx(M.temporal_continuity(v).mean)
    assert r["shape"] == [3, 16, 16, 3] and r["data_range"] == 2.0 and r["notes"] == []
    back = json.loads(json.dumps(r))
    assert back["psnr_mean"] == math.inf


def test_compare_videos_values_and_small_frames():
    rng = np.random.default_rng(4)
    a = rng.uniform(0, 1, (1, 2, 12, 12, 3))
    b = np.clip(a + 0.05, 0, 1)
    r = M.compare_videos(a, b, 1.0)
    assert r["psnr_min"] == min(r["psnr_per_frame"][0])
    assert r["mse"] == pytest.approx(np.mean((a - b) ** 2))
    assert r["rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b))
    json.dumps(r)
    lat = rng.standard_normal((5, 4, 6, 16))  # latents of a tiny preset: smaller than the SSIM window
    r = M.compare_videos(lat, lat * 0.9, 8.0)
    assert r["ssim_mean"] is None and "11x11" in r["notes"][0]
    assert math.isfinite(r["psnr_mean"])
    one = M.compare_videos(a[:, :1], b[:, :1], 1.0)
    assert one["temporal_mse_a"] is None


def test_errors_name_the_layout():
    v = np.zeros((2, 16, 16, 3))
    with pytest.raises(ValueError, match=r"\[F, H, W, C\].*\[B, F, H, W, C\]"):
        M.video_psnr(v[0], v[0], 1.0)
    with pytest.raises(ValueError, match="video shape mismatch"):
        M.video_ssim(v, v[:, :8], 1.0)
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        M.ssim(v, v, 1.0)
    with pytest.raises(ValueError, match=r"frame shape mismatch"):
        M.ssim(v[0], v[0, :12], 1.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(v[0, :8], v[0, :8], 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        M.psnr(v, v[:1], 1.0)
    with pytest.raises(ValueError, match="at least 2 frame"):
        M.temporal_continuity(v[:1])
    with pytest.raises(ValueError, match=r"\[F, H, W, C\]"):
        M.temporal_continuity(v[0, 0])
    with pytest.raises(TypeError, match="data_range"):
        M.psnr(v, v, None)
    for bad in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match="positive and finite"):
            M.compare_videos(v, v, bad)
