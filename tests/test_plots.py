"""parity.plots: valid PNGs, contact sheet geometry, atomic writes (no temp files, no partial files)."""

import csv
import json
import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from parity import plots as P  # noqa: E402


def only(folder, name):
    """The folder holds exactly `name` (no temporary files left)."""
    assert sorted(p.name for p in folder.iterdir()) == [name]


def check_png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert im.width > 0 and im.height > 0
        assert im.mode in ("RGB", "RGBA")
        return im.size, im.mode


def test_plot_series(tmp_path):
    out = tmp_path / "sub" / "psnr.png"
    P.plot_series(out, [1, 2, 3], {"cfg 5": [30.0, 32.0, 33.0], "cfg 3": [29.0, math.inf, 35.0]},
                  "step", "PSNR (dB)", "PSNR per step")
    check_png(out)
    only(out.parent, "psnr.png")
    P.plot_series(tmp_path / "log.png", np.arange(4), {"err": np.array([1e-1, 1e-2, 1e-3, 1e-4])}, "x", "y", "t",
                  logy=True)
    check_png(tmp_path / "log.png")


def test_plot_series_errors_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="'a' has"):
        P.plot_series(tmp_path / "x.png", [1, 2], {"a": [1.0]}, "x", "y", "t")
    with pytest.raises(ValueError, match="log"):
        P.plot_series(tmp_path / "x.png", [1, 2], {"a": [1.0, 0.0]}, "x", "y", "t", logy=True)
    assert list(tmp_path.iterdir()) == []


def test_plot_tradeoff(tmp_path):
    pts = [
        {"label": "baseline", "time_saved": 0.0, "quality": 1.0},
        {"label": "skip 2", "time_saved": 20.0, "quality": 0.97, "extra": "ignored"},
        {"label": "skip 4", "time_saved": 40.0, "quality": 0.90},
        {"label": "bad", "time_saved": 10.0, "quality": 0.8},
    ]
    out = P.plot_tradeoff(tmp_path / "tradeoff.png", pts, ylabel="SSIM")
    check_png(out)
    only(tmp_path, "tradeoff.png")
    assert P.pareto_front(pts) == [0, 1, 2]
    with pytest.raises(ValueError, match="quality"):
        P.plot_tradeoff(tmp_path / "t2.png", [{"label": "x", "time_saved": 1}])


def test_contact_sheet_grid(tmp_path):
    rng = np.random.default_rng(0)
    videos = {
        "reference": rng.uniform(-1, 1, (9, 16, 24, 3)).astype(np.float32),
        "cfg-skip": rng.uniform(-1, 1, (9, 16, 24, 3)).astype(np.float32),
        "gray": rng.uniform(-1, 1, (9, 16, 24, 1)),
    }
    out = tmp_path / "sheet.png"
    P.contact_sheet(out, videos, frames=4, value_range=(-1, 1), scale=2, label_width=100)
    size, mode = check_png(out)
    cell_w, cell_h = 24 * 2, 16 * 2
    assert size == (100 + 4 * (cell_w + P.SHEET_PAD) + P.SHEET_PAD,
                    3 * (P.SHEET_HEADER + cell_h + P.SHEET_PAD) + P.SHEET_PAD)
    assert mode == "RGB"
    only(tmp_path, "sheet.png")
    # the first sampled frame of the first row is where the geometry says
    with Image.open(out) as im:
        a = np.asarray(im)
    top, left = P.SHEET_PAD + P.SHEET_HEADER, 100 + P.SHEET_PAD
    expect = P._to_uint8(videos["reference"][0], (-1, 1), "r").repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(a[top: top + cell_h, left: left + cell_w], expect)


def test_contact_sheet_uint8_explicit_frames_and_errors(tmp_path):
    v = np.zeros((5, 12, 12, 3), np.uint8)
    out = P.contact_sheet(tmp_path / "s.png", {"a": v, "b": v[:3]}, frames=[0, -1], label_width=50)
    size, _ = check_png(out)
    assert size == (50 + 2 * (12 + P.SHEET_PAD) + P.SHEET_PAD, 2 * (P.SHEET_HEADER + 12 + P.SHEET_PAD) + P.SHEET_PAD)
    assert P.frame_indices(9, 3) == [0, 4, 8] and P.frame_indices(2, 5) == [0, 1]
    with pytest.raises(ValueError, match="value_range"):
        P.contact_sheet(tmp_path / "f.png", {"a": v.astype(np.float32)})
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        P.contact_sheet(tmp_path / "f.png", {"a": v[0]})
    with pytest.raises(ValueError, match="invalid"):
        P.contact_sheet(tmp_path / "f.png", {"a": v}, frames=[7])
    only(tmp_path, "s.png")


def test_write_json_and_csv(tmp_path):
    data = {"psnr": math.inf, "ssim": np.float32(0.5), "per_frame": np.arange(3), "path": tmp_path}
    P.write_json(tmp_path / "r.json", data)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["psnr"] == math.inf and back["ssim"] == 0.5 and back["per_frame"] == [0, 1, 2]
    rows = [{"label": "a", "psnr": 30.5}, {"label": "b", "ssim": np.float64(0.9), "frames": [1, 2]}]
    P.write_csv(tmp_path / "r.csv", rows)
    with open(tmp_path / "r.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert got == [{"label": "a", "psnr": "30.5", "ssim": "", "frames": ""},
                   {"label": "b", "psnr": "", "ssim": "0.9", "frames": "[1, 2]"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]
    assert ((tmp_path / "r.csv").stat().st_mode & 0o777) == 0o644


def test_failure_mid_write_leaves_no_file(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with P.atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")  # an existing file survives a failed rewrite
    with pytest.raises(RuntimeError):
        with P.atomic_write(target) as f:
            f.write(b"new")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    only(tmp_path, "out.bin")
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        P.write_json(tmp_path / "bad.json", {"x": object()})
    with pytest.raises(ValueError):
        P.write_csv(tmp_path / "bad.csv", [{"a": 1}, {"b": 2}], fieldnames=["a"])
    only(tmp_path, "out.bin")


def test_png_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def boom(self, f, **kw):
        f.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(OSError, match="disk full"):
        P.plot_series(tmp_path / "p.png", [0, 1], {"a": [1, 2]}, "x", "y", "t")
    assert list(tmp_path.iterdir()) == []


def test_importing_plots_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, parity.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
