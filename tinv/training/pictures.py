"""A concept's pictures in: decoded (and their masks) into tensors, framed at their aspect-ratio bucket, every error
naming the concept and URI.

Aspect-ratio buckets keep a picture's framing instead of losing it to a centre square: NovelAI's aspect ratio
bucketing, as kohya's ``sd-scripts`` (``--enable_bucket``), OneTrainer, ai-toolkit and invoke-training do it. A set
of resolutions with at most the model's pixel count, each side a multiple of what the model downsamples by (its
family's ``pixel_multiple``: 64 for Stable Diffusion), between half and twice the model's resolution. Each picture
goes to the bucket nearest its aspect ratio (in log ratio), is scaled to cover it and centre-cropped to it. A square
picture goes to the square bucket, which is exactly the centre crop. The trainer caches latents per bucket and
draws each step's samples of a concept from one bucket.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from tinv import storage
from tinv.errors import ConceptDataError, TransientError
from tinv.families.model import BaseModel, encode_latents
from tinv.manifest import ConceptSpec
from tinv.training.concept import Framed, Latents

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
    return fit(img, (size, size))


def open_image(data: bytes, *, concept_id: str, uri: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes → a decoded, EXIF-upright PIL image in its own mode."""
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
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB picture → ``(3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def decode_image(data: bytes, size: int, *, concept_id: str, uri: str, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Bytes → ``(3, size, size)`` float tensor in [-1, 1], EXIF-upright, RGB."""
    img = open_image(data, concept_id=concept_id, uri=uri, max_pixels=max_pixels)
    return to_tensor(resize_center_crop(to_rgb(img), size))


def _read(concept_id: str, uri: str, storage_options: dict[str, Any] | None) -> bytes:
    """An image's bytes; a permanent storage error (missing, a directory, a symlink loop, no permission) fails the
    concept at once, naming the URI; an outage (:class:`~tinv.errors.StorageUnavailableError`) passes on."""
    try:
        return storage.read_bytes(uri, storage_options)
    except FileNotFoundError as e:
        raise ConceptDataError(concept_id, "image not found", uri) from e
    except TransientError:
        raise
    except OSError as e:
        raise ConceptDataError(concept_id, f"image cannot be read: {e.strerror or e}", uri) from e


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
    return torch.stack([decode_image(_read(concept_id, uri, storage_options), size, concept_id=concept_id, uri=uri,
                                     max_pixels=max_pixels) for uri in uris])


def load_pictures(
    spec: ConceptSpec, size: int, step: int | None = None, storage_options: dict[str, Any] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> tuple[torch.Tensor, list[Framed] | None]:
    """A concept's pictures: their centre squares ``(N, 3, size, size)`` (what metrics and starts read), and,
    with aspect-ratio buckets (``step``: the pixel multiple of a side, the model family's ``pixel_multiple``) or masks,
    the pictures as they train, one :class:`~tinv.training.concept.Framed` per bucket (None when they train as the
    squares: no masks, and every picture square or no buckets).

    A mask (``spec.masks``, or the alpha channel with ``spec.mask_from_alpha``) is cropped as its picture is,
    white = 1 (subject), black = 0; one of another size than its picture, or with no white, is refused."""
    if not spec.images:
        raise ConceptDataError(spec.concept_id, "the concept has no images")
    sizes = bucket_sizes(size, step) if step else None
    squares, framed = [], {}
    for i, uri in enumerate(spec.images):
        img = open_image(_read(spec.concept_id, uri, storage_options), concept_id=spec.concept_id, uri=uri,
                         max_pixels=max_pixels)
        mask = _mask(spec, i, img, storage_options, max_pixels)
        rgb = to_rgb(img)
        squares.append(to_tensor(resize_center_crop(rgb, size)))
        box = nearest(rgb.size, sizes) if sizes else (size, size)
        if box == (size, size) and mask is None:
            framed.setdefault(box, []).append((i, squares[-1], None))
            continue
        weight = None
        if mask is not None:
            weight = torch.from_numpy(np.asarray(fit(mask, box, Image.Resampling.BILINEAR), np.float32))
            weight = weight[None] / 255.0  # (1, h, w)
        framed.setdefault(box, []).append((i, to_tensor(fit(rgb, box)), weight))
    if set(framed) == {(size, size)} and all(w is None for _, _, w in framed[(size, size)]):
        return torch.stack(squares), None  # every picture trains as its centre square
    groups = [Framed(torch.stack([p for _, p, _ in rows]), tuple(i for i, _, _ in rows),
                     None if rows[0][2] is None else torch.stack([w for _, _, w in rows]))
              for _, rows in sorted(framed.items())]
    return torch.stack(squares), groups


def _mask(spec: ConceptSpec, i: int, img: Image.Image, storage_options: dict[str, Any] | None,
          max_pixels: int) -> Image.Image | None:
    """Picture ``i``'s mask as an 8-bit ``L`` image of its size, or None when the concept has no masks."""
    uri = spec.images[i]
    if spec.mask_from_alpha:
        rgba = img.convert("RGBA") if img.mode == "P" else img
        if "A" not in rgba.getbands():
            raise ConceptDataError(spec.concept_id, "mask_from_alpha: the image has no alpha channel", uri)
        mask = rgba.getchannel("A")
    elif spec.masks:
        uri = spec.masks[i]
        mask = open_image(_read(spec.concept_id, uri, storage_options), concept_id=spec.concept_id, uri=uri,
                          max_pixels=max_pixels).convert("L")
        if mask.size != img.size:
            raise ConceptDataError(spec.concept_id, f"mask is {mask.size[0]}x{mask.size[1]}, its image "
                                   f"{img.size[0]}x{img.size[1]}", uri)
    else:
        return None
    if mask.getextrema()[1] == 0:
        raise ConceptDataError(spec.concept_id, "mask has no subject (all black)", uri)
    return mask


Size = tuple[int, int]
"""(width, height) in pixels."""


def bucket_sizes(resolution: int, step: int) -> list[Size]:
    """Every bucket for a model trained at ``resolution`` square: for each width from ``resolution / 2`` to
    ``2 × resolution`` in ``step``s, the tallest height (a multiple of ``step``, in the same range) whose area is
    at most ``resolution²``; sorted, the square included (kohya's ``make_bucket_resolutions``)."""
    area, low, high = resolution * resolution, max(step, resolution // 2), 2 * resolution
    sizes = {(resolution, resolution)}
    for width in range(low - low % step or step, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest(size: Size, sizes: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest ``size``'s (in log ratio; ties to the larger area)."""
    ratio = math.log(size[0] / size[1])
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))


def fit(image: Image.Image, size: Size, resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Scale ``image`` to cover ``size``, then crop its centre to ``size`` (for a square ``size``: the centre
    crop of the short side's square)."""
    w, h = image.size
    scale = max(size[0] / w, size[1] / h)
    nw, nh = max(size[0], round(w * scale)), max(size[1], round(h * scale))
    image = image.resize((nw, nh), resample)
    left, top = (nw - size[0]) // 2, (nh - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))


def latents_of(model: BaseModel, framed: Framed) -> Latents:
    """Latent mean and std of the pictures, then of their flips (``(2n, C, h, w)`` each), and their masks
    area-averaged to the latents' size, flipped alike."""
    images = framed.images
    mean, std = encode_latents(model, torch.cat([images, images.flip(-1)]))
    weights = None
    if framed.masks is not None:
        w = F.interpolate(framed.masks.to(mean.device, torch.float32), size=tuple(mean.shape[-2:]), mode="area")
        weights = torch.cat([w, w.flip(-1)])
    return Latents(mean, std, torch.tensor(framed.index, dtype=torch.long), weights)
