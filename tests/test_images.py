"""Image decoding: every odd file becomes an upright RGB square, every bad one a clear error."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tinv.training.pictures import ConceptDataError, decode_image, load_images


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def decode(data: bytes, size: int = 8) -> torch.Tensor:
    return decode_image(data, size, concept_id="c", uri="mem://x.png")


def rgb_of(t: torch.Tensor) -> list[int]:
    """The (rounded) 0..255 colour of the centre pixel."""
    return [round(v) for v in ((t[:, t.shape[1] // 2, t.shape[2] // 2] + 1) * 127.5).tolist()]


def test_output_is_a_square_rgb_tensor_in_range_and_center_cropped():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # a blue band on the left, cropped away
    t = decode(png(img), size=16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert rgb_of(t) == [255, 0, 0]
    assert (t[2] < 0).all()  # no blue survives the centre crop


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (16, 8), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 8))  # white on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    t = decode(png(img, format="JPEG", exif=exif.tobytes(), quality=100), size=8)
    # upright, the image is 8x16 with white on top: the centre-cropped square sits across the edge
    assert t.shape == (3, 8, 8)
    top, bottom = t[:, :2].mean().item(), t[:, -2:].mean().item()
    assert top > 0.9 and bottom < -0.9


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda: Image.new("L", (8, 8), 128), [128, 128, 128]),
        (lambda: Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), [10, 200, 30]),
        (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), [255, 255, 255]),  # transparent over white
        (lambda: Image.new("LA", (8, 8), (0, 255)), [0, 0, 0]),
        (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), [255, 0, 0]),
        (lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), [255, 255, 255]),  # 16-bit grey
    ],
    ids=["grayscale", "palette", "rgba", "la", "cmyk", "16bit"],
)
def test_modes_become_rgb(make, expected):
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    data = png(img, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    assert Image.open(io.BytesIO(data)).mode == img.mode or img.mode in ("I;16",)
    assert [abs(a - b) <= 3 for a, b in zip(rgb_of(decode(data)), expected)] == [True] * 3


def test_palette_with_transparency_goes_over_white():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] * 256)
    data = png(img, transparency=0)
    assert rgb_of(decode(data)) == [255, 255, 255]


def test_undecodable_bytes_name_the_concept_and_uri():
    with pytest.raises(ConceptDataError, match=r"concept 'c': cannot decode image.*\(mem://x.png\)"):
        decode(b"definitely not an image")
    truncated = png(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]
    with pytest.raises(ConceptDataError, match="cannot decode image"):
        decode(truncated)


def _bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (never decoded)."""
    real = bytearray(png(Image.new("L", (8, 8))))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    real[16:29] = ihdr
    real[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(real)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ConceptDataError, match="decompression bomb|pixel limit"):
        decode(_bomb_png(30000, 30000))
    with pytest.raises(ConceptDataError, match=r"64x64, over the 1000-pixel limit"):
        decode_image(png(Image.new("RGB", (64, 64))), 8, concept_id="c", uri="u", max_pixels=1000)


def test_missing_uri_and_empty_list(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png(Image.new("RGB", (8, 8), (0, 255, 0))))
    assert load_images("c", [str(good), f"file://{good}"], 8).shape == (2, 3, 8, 8)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ConceptDataError, match=rf"concept 'c': image not found \({missing}\)"):
        load_images("c", [str(good), missing], 8)
    with pytest.raises(ConceptDataError, match="concept 'c': the concept has no images"):
        load_images("c", [], 8)
