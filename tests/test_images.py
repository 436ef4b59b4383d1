"""Conditioning images in every mode PIL opens become the right 8-bit RGB pixels (issue 15, case 6).

Each test makes an image of one mode with PIL, with known values, and checks the RGB the pipeline gets:
16-bit and float data scaled by their real range (not clipped at 255, which made a white image),
transparency composited on white, EXIF rotation applied, out-of-range data refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jax_impl.media import BACKGROUND, load_image, to_rgb


def _rgb(img: Image.Image) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out).astype(int)



def test_16_bit_grayscale_png_keeps_its_range(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_image(path)).astype(int)
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])
    assert (rgb == rgb[..., :1]).all()  # gray


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_modes(mode):
    img = Image.frombytes(mode, (3, 1), np.array([0, 13107, 65535], ">u2" if mode == "I;16B" else "<u2").tobytes())
    np.testing.assert_array_equal(_rgb(img)[0, :, 1], [0, 51, 255])


def test_32_bit_integer_holds_16_bit_data_and_larger_values_are_refused():
    img = Image.fromarray(np.array([[0, 65535, 32768]], np.int32), "I")
    np.testing.assert_array_equal(_rgb(img)[0, :, 2], [0, 255, 128])
    for bad in (70000, -1):
        with pytest.raises(ValueError, match=r"I image values span .* expected 0\.\.65535"):
            to_rgb(Image.fromarray(np.array([[0, bad]], np.int32), "I"))


def test_float_image_is_0_to_1_and_out_of_range_is_refused(tmp_path):
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    path = tmp_path / "f.tif"
    img.save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path)).astype(int)[0, :, 0], [0, 128, 255])
    for bad in (2.0, np.nan, -0.5):
        with pytest.raises(ValueError, match=r"F image values span .*expected 0\.\.1"):
            to_rgb(Image.fromarray(np.array([[0.0, bad]], np.float32), "F"))


def test_bilevel_gray_and_rgb():
    np.testing.assert_array_equal(_rgb(Image.fromarray(np.array([[True, False]])).convert("1"))[0, :, 0], [255, 0])
    np.testing.assert_array_equal(_rgb(Image.fromarray(np.array([[7, 200]], np.uint8), "L"))[0], [[7] * 3, [200] * 3])
    rgb = np.array([[[1, 2, 3], [250, 128, 0]]], np.uint8)
    np.testing.assert_array_equal(_rgb(Image.fromarray(rgb, "RGB")), rgb)


def test_alpha_is_composited_on_white():
    assert BACKGROUND == (255, 255, 255)
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 128], [0, 0, 255, 0]]], np.uint8)
    want = [[255, 0, 0], [255, 127, 127], [255, 255, 255]]
    np.testing.assert_array_equal(_rgb(Image.fromarray(rgba, "RGBA"))[0], want)
    la = np.array([[[0, 255], [0, 128], [100, 0]]], np.uint8)
    np.testing.assert_array_equal(_rgb(Image.fromarray(la, "LA"))[0, :, 0], [0, 127, 255])
    premultiplied = Image.fromarray(rgba, "RGBA").convert("RGBa")
    np.testing.assert_allclose(_rgb(premultiplied)[0], want, atol=1)


def test_palette_with_transparency_and_palette_alpha(tmp_path):
    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    p.putpixel((1, 0), 1)
    np.testing.assert_array_equal(_rgb(p)[0], [[255, 0, 0], [0, 255, 0], [255, 0, 0]])
    p.info["transparency"] = 1  # index 1 is transparent
    path = tmp_path / "p.png"
    p.save(path, transparency=1)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(np.asarray(load_image(path))[0], [[255, 0, 0], [255, 255, 255], [255, 0, 0]])
    pa = Image.fromarray(np.array([[[255, 0, 0, 255], [255, 0, 0, 0]]], np.uint8), "RGBA").convert("PA")
    assert pa.mode == "PA"
    np.testing.assert_array_equal(_rgb(pa)[0], [[255, 0, 0], [255, 255, 255]])


def test_cmyk_and_ycbcr(tmp_path):
    cmyk = Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255]))
    np.testing.assert_array_equal(_rgb(cmyk)[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0]])
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(path, quality=100)  # magenta
    px = np.asarray(load_image(path)).astype(int)[8, 8]
    assert px[0] > 240 and px[1] < 15 and px[2] > 240, px
    ycc = Image.new("YCbCr", (1, 1), (255, 128, 128))
    np.testing.assert_allclose(_rgb(ycc)[0, 0], [255, 255, 255], atol=1)


def test_exif_rotation_is_applied(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise) comes out upright."""
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = (255, 0, 0)  # left half red
    a[:, 10:] = (0, 0, 255)  # right half blue
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == (20, 10, 3)  # upright: 10 wide, 20 tall
    top, bottom = out[2, 5], out[17, 5]
    assert top[0] > 200 and top[2] < 60, top  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
