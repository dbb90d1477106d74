"""Aspect-ratio buckets: training pictures keep their framing instead of losing it to a centre square.

NovelAI's aspect ratio bucketing, as kohya's ``sd-scripts`` (``--enable_bucket``), OneTrainer, ai-toolkit
and invoke-training do it: a set of resolutions (buckets) with at most the model's pixel count, each side a
multiple of what the VAE and the UNet downsample by (64 for Stable Diffusion: 8 × 8), between half and twice
the model's resolution. Each picture goes to the bucket nearest its aspect ratio (in log ratio), is scaled
to cover it and centre-cropped to it, which cuts off at most a sliver. A square picture goes to the square
bucket, which is exactly the centre crop tinv otherwise takes. The trainer caches latents per bucket and
draws each step's samples of a concept from one bucket (:mod:`tinv.trainer`).
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

Size = tuple[int, int]
"""(width, height) in pixels."""


def step_of(model: Any) -> int:
    """The pixel multiple every side of ``model``'s (:class:`tinv.models.BaseModel`) pictures must be: the
    VAE's and the UNet's downsampling together (SD: 8 × 8 = 64)."""
    return model.pixels_per_latent * 2 ** (len(model.unet.config.block_out_channels) - 1)


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
