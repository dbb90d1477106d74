"""A procedural world of coloured shapes, with concepts that no word of it can reach.

Every image is a 32 px picture of one shape in one colour and one rendering style, at a
random position and size, on a random light background tint. Only named colours and shapes
have words. Held out from the generator's training data:

1. **combinations**: a named colour with a named shape, never drawn together;
2. **unnamed colours**: drawn in training, but only under captions that never name a colour
   (every named colour gets such shape-only captions too, equally often, so the bare shape
   word draws an even mix rather than the concept);
3. **styles**: renderings (outline, stripes, dots, checkered background) that training images
   carry under captions that never name them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

SIZE = 32
SCALE = 4  # drawn at 4x, then box-filtered down: soft edges the VAE can reproduce

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
NAMED_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
}
UNNAMED_COLOURS = {"pink": (255, 120, 200), "teal": (0, 170, 170), "brown": (120, 70, 30), "black": (25, 25, 25)}
COLOURS = {**NAMED_COLOURS, **UNNAMED_COLOURS}
STYLES = ("plain", "outline", "stripes", "dots", "checker")
HELD_OUT_STYLES = STYLES[1:]

COMBINATIONS = (("red", "star"), ("blue", "circle"), ("green", "triangle"), ("yellow", "diamond"))
UNNAMED_CONCEPTS = (("pink", "square"), ("teal", "cross"), ("brown", "circle"), ("black", "triangle"))

TEMPLATES = ("{}", "a {}", "the {}", "a photo of a {}", "a picture of the {}", "an image of a {}")
"""Caption wrappers of the world; Textual Inversion on the toy model uses the same ones."""
STYLE_TEMPLATES = ("{}", "a {}", "a picture of a {}", "an image of a {}")
"""Style templates for Textual Inversion on the toy model: the token alone, any shape."""
EVAL_PROMPTS = {"object": ("a {}", "a photo of a {}"), "style": tuple(f"a {s} {{}}" for s in SHAPES)}
"""Default evaluation prompts on the toy model: objects alone; a style on every shape word."""
WORDS = tuple(sorted({*SHAPES, *NAMED_COLOURS, *" ".join(TEMPLATES).replace("{}", "").split()}))

# how often a training image gets each kind of caption
P_EMPTY = 0.1  # empty caption, for classifier-free guidance
P_SHAPE_ONLY = 0.25  # a named colour captioned by its shape alone
P_STYLED = 0.06  # each held-out style's share of training images
UNNAMED_WEIGHT = P_SHAPE_ONLY  # unnamed colours are drawn this much less often than named ones


@dataclass(frozen=True)
class Item:
    """The exact labels of one picture."""

    shape: str
    colour: str
    style: str = "plain"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "diamond":
        pts = [(k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else r * 0.45) for k in range(10)]
    elif shape == "cross":
        w = r * 0.38
        corners = [
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
        ]
        return [(cx + x, cy + y) for x, y in corners]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    return [(cx + d * math.cos(a + angle), cy + d * math.sin(a + angle)) for a, d in pts]


def render(item: Item, rng: np.random.Generator) -> Image.Image:
    """Draw one 32 px RGB picture of ``item`` at a random place, size and background tint."""
    big = SIZE * SCALE
    tint = tuple(int(v) for v in rng.integers(200, 256, size=3))
    img = Image.new("RGB", (big, big), tint)
    draw = ImageDraw.Draw(img)
    colour = COLOURS[item.colour]
    if item.style == "checker":
        cell = big // 4
        for i in range(4):
            for j in range(4):
                if (i + j) % 2:
                    draw.rectangle([i * cell, j * cell, (i + 1) * cell, (j + 1) * cell], fill=(150, 150, 150))
    r = rng.uniform(0.26, 0.4) * big
    cx, cy = (rng.uniform(r + 2, big - r - 2) for _ in range(2))
    mask = Image.new("L", (big, big), 0)
    mdraw = ImageDraw.Draw(mask)
    if item.shape == "circle":
        mdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        mdraw.polygon(_polygon(item.shape, cx, cy, r, 0.0), fill=255)
    fill = Image.new("RGB", (big, big), colour)
    if item.style == "outline":  # a 3 px rim: the mask minus its erosion
        eroded = mask.filter(ImageFilter.MinFilter(6 * SCALE + 1))
        mask = ImageChops.subtract(mask, eroded)
    elif item.style in ("stripes", "dots"):
        light = tuple(int(0.35 * c + 0.65 * 255) for c in colour)  # keeps the silhouette visible
        pattern = Image.new("RGB", (big, big), light)
        pdraw = ImageDraw.Draw(pattern)
        step = 6 * SCALE
        for k in range(0, big, step):
            if item.style == "stripes":
                pdraw.rectangle([0, k, big, k + step // 2], fill=colour)
            else:
                for m in range(0, big, step):
                    pdraw.ellipse([m, k, m + step * 0.6, k + step * 0.6], fill=colour)
        fill = pattern
    img.paste(fill, (0, 0), mask)
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)


def caption(item: Item, rng: np.random.Generator) -> str:
    """A training caption: never names an unnamed colour or a style (they have no words)."""
    if rng.random() < P_EMPTY:
        return ""
    named = item.colour in NAMED_COLOURS
    phrase = f"{item.colour} {item.shape}" if named and rng.random() >= P_SHAPE_ONLY else item.shape
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(phrase)


def training_item(rng: np.random.Generator) -> Item:
    """One labelled picture of the generator's training distribution (held-out pairs never)."""
    colours = list(COLOURS)
    weights = np.array([1.0 if c in NAMED_COLOURS else UNNAMED_WEIGHT for c in colours])
    while True:
        colour = colours[rng.choice(len(colours), p=weights / weights.sum())]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if (colour, shape) not in COMBINATIONS:
            break
    u = rng.random()
    style = "plain" if u >= P_STYLED * len(HELD_OUT_STYLES) else HELD_OUT_STYLES[int(u // P_STYLED)]
    return Item(shape, colour, style)


def training_set(n: int, seed: int) -> tuple[np.ndarray, list[str], list[Item]]:
    """``n`` training pictures ``(n, 32, 32, 3)`` uint8 with captions and labels."""
    rng = np.random.default_rng(seed)
    items = [training_item(rng) for _ in range(n)]
    images = np.stack([np.asarray(render(it, rng)) for it in items])
    return images, [caption(it, rng) for it in items], items
