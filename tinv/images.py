"""Decode training images into tensors, naming the concept and URI in every error."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tinv import storage
from tinv.errors import ConceptDataError

__all__ = ["ConceptDataError", "decode_image", "load_images", "resize_center_crop", "to_rgb"]

MAX_PIXELS = 64 * 1024 * 1024
"""Images with more pixels than this are refused before decoding (decompression bombs)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (palette, alpha, CMYK, 16-bit, grayscale) as 8-bit RGB; alpha over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        top = 65535 if arr.max(initial=0) > 255 else 255
        img = Image.fromarray((arr * 255 // top).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the short side to ``size`` (bicubic), then crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(data: bytes, size: int, *, concept_id: str, uri: str, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Bytes → ``(3, size, size)`` float tensor in [-1, 1], EXIF-upright, RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ConceptDataError(concept_id, f"image is {w}x{h}, over the {max_pixels}-pixel limit", uri)
            img.load()
            img = ImageOps.exif_transpose(img)
    except ConceptDataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ConceptDataError(concept_id, f"image refused as a decompression bomb: {e}", uri) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConceptDataError(concept_id, f"cannot decode image: {e}", uri) from e
    arr = np.asarray(resize_center_crop(to_rgb(img), size), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W)


def load_images(
    concept_id: str,
    uris: tuple[str, ...] | list[str],
    size: int,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> torch.Tensor:
    """Read and decode every image of a concept: ``(N, 3, size, size)``."""
    if not uris:
        raise ConceptDataError(concept_id, "the concept has no images")
    out = []
    for uri in uris:
        try:
            data = storage.read_bytes(uri, storage_options)
        except FileNotFoundError as e:
            raise ConceptDataError(concept_id, "image not found", uri) from e
        out.append(decode_image(data, size, concept_id=concept_id, uri=uri, max_pixels=max_pixels))
    return torch.stack(out)
