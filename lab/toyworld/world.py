"""A procedural world of coloured shapes, with concepts that no word of it can reach.

Every image is a 32 px picture of one shape in one colour and one rendering style, at a
random position and size, on a random light background tint. Only named colours and shapes
have words. Held out from the generator's training data:

1. **combinations**: a named colour with a named shape, never drawn together;
2. **unnamed colours**: drawn in training, but only under captions that never name a colour
   (every named colour gets such shape-only captions too, equally often, so the bare shape
   word draws an even mix rather than the concept);
3. **unnamed styles**: backdrops in four dark tones (navy, plum, olive, slate) that training
   pictures carry under captions that never name them. The renderings (outlined, striped,
   framed, dotted, checkered, shadowed, two-toned) do have words, as styles have in a real
   model's captions: they teach the model that a word before the noun sets the look of the
   whole picture, which is the slot a learned style token takes ("a <navy> star").

A generic noun, "shape", stands for any shape in some captions ("a striped shape"), the way
"painting" does in Textual Inversion's style templates ("a painting in the style of {}").

**Described colours**: a real text encoder has words for countless shades, so a new shade lies
*between* things it can already say. The toy world's stand-in: a share (:data:`P_DESCRIBED`) of the
training pictures are drawn in a random colour from the RGB cube and captioned "a colour square", where the
generator's training adds a learned linear function of that RGB value to the word "colour"'s
embedding (``lab.toyworld.fit``). No described colour lies within :data:`HOLE` of any of the ten
canonical colours, and the scorer reads such colours as ``other``, so no description reaches an
unnamed colour (or a held-out combination's colour): an unnamed colour sits in a hole of the
described continuum, where Textual Inversion must find it.

**Described backdrops** do the same for the backdrop: a share (:data:`P_BACKDROP`) of the pictures
stand on a random dark backdrop, captioned with "toned" ("a toned red star"), whose embedding
gets a learned linear function of the backdrop's RGB. No described backdrop lies within
:data:`HOLE` of an unnamed one (the scorer reads them as ``other``), so each unnamed backdrop is
a hole of that continuum, reached only by a learned style token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
CANONICAL_RGB = np.array(list(COLOURS.values()), float)
"""``(10, 3)``: every canonical colour, in :data:`COLOURS` order."""
DESCRIBED = "other"
"""The colour label of a picture in a described colour (not one of :data:`COLOURS`)."""
DESCRIPTOR_WORD = "colour"
"""The caption word whose embedding carries a described colour."""
HOLE = 45.0
"""No described colour (backdrop) lies within this RGB distance of a canonical colour (unnamed backdrop)."""
NAMED_STYLES = {
    "outline": "outlined",
    "stripes": "striped",
    "frame": "framed",
    "dots": "dotted",
    "checker": "checkered",
    "shadow": "shadowed",
    "twotone": "twotoned",
}
"""Renderings, each with a word (style → word)."""
STYLES = ("plain", *NAMED_STYLES)
LIGHT = "light"
"""The ordinary backdrop: a random light tint."""
BACKDROPS = {"navy": (25, 35, 90), "plum": (130, 20, 80), "olive": (150, 150, 60), "slate": (80, 100, 120)}
"""Unnamed backdrop tones, the held-out styles: no caption names them."""
HELD_OUT_STYLES = tuple(BACKDROPS)
BACKDROP_RGB = np.array(list(BACKDROPS.values()), float)
BACKDROP_WORD = "toned"
"""The caption word whose embedding carries a described backdrop."""
CONTRAST = 80.0
"""A dark backdrop is at least this RGB distance from the shape's colour."""
GENERIC_NOUN = "shape"

COMBINATIONS = (("red", "star"), ("blue", "circle"), ("green", "triangle"), ("yellow", "diamond"))
UNNAMED_CONCEPTS = (("pink", "square"), ("teal", "cross"), ("brown", "circle"), ("black", "triangle"))

TEMPLATES = ("{}", "a {}", "the {}", "a photo of a {}", "a picture of the {}", "an image of a {}")
"""Caption wrappers of the world; Textual Inversion on the toy model uses the same ones."""
STYLE_TEMPLATES = ("a {} shape", "the {} shape", "a picture of a {} shape", "an image of a {} shape")
"""Style templates for Textual Inversion on the toy model: the token where a style word goes."""
OBJECT_PROMPT = "a {}"
STYLE_PROMPT = "a {} {shape}"
"""A style token where a style word goes, before the shape it is applied to."""
EVAL_PROMPTS = {
    "object": (OBJECT_PROMPT, "a photo of a {}"),
    "style": tuple(STYLE_PROMPT.format("{}", shape=s) for s in SHAPES),
}
"""Default evaluation prompts on the toy model: objects alone; a style on every shape word."""
WORDS = tuple(
    sorted(
        {*SHAPES, *NAMED_COLOURS, *NAMED_STYLES.values(), GENERIC_NOUN, DESCRIPTOR_WORD, BACKDROP_WORD}
        | set(" ".join(TEMPLATES).replace("{}", "").split())
    )
)

# how often a training image gets each kind of caption
P_EMPTY = 0.1  # empty caption, for classifier-free guidance
P_SHAPE_ONLY = 0.25  # a named colour (or named style) left out of the caption
P_GENERIC = 0.2  # the noun is "shape" instead of the shape's name
P_STYLED = 0.08  # each rendering's share of light-backdrop images (the rest are plain)
P_DESCRIBED = 0.4  # pictures in a described colour
P_BACKDROP = 0.3  # pictures on a described backdrop
P_UNNAMED_BACKDROP = 0.04  # each unnamed backdrop's share
# An unnamed colour can only be captioned by its shape or not at all. Guidance samples from
# p(x|c)^w / p(x|"")^(w-1), so the bare shape word favours whichever colours are captioned that
# way most often *relative to the empty caption*. Giving unnamed-colour pictures more empty
# captions keeps that ratio equal for every colour, and drawing them less often keeps the shape
# word's conditional an even mix: the bare shape word then leans towards no colour.
P_BARE = (1 - P_EMPTY) * P_SHAPE_ONLY  # a named colour's chance of a colourless caption


def _wordless_empty(p_empty: float, p_left_out: float) -> float:
    """The empty-caption chance for pictures whose attribute has no word, so that their ratio of
    captions without the attribute's word to empty captions is that of pictures whose word is
    left out with ``p_left_out`` and which are captioned empty with ``p_empty``."""
    return p_empty / (p_empty + (1 - p_empty) * p_left_out)


P_EMPTY_UNNAMED = _wordless_empty(P_EMPTY, P_SHAPE_ONLY)  # so that bare / empty is the same for all colours
UNNAMED_WEIGHT = P_BARE / (1 - P_EMPTY_UNNAMED)  # so that each colour is as common under bare captions
# The same holds for backdrops. A caption without a style word (or "toned") can come from a light
# picture only when it has no named style or its style word was left out; an unnamed backdrop
# carries plain shapes only, so all its non-empty captions lack one. Left alone, the tones would be
# about twice as common under such captions as under the empty caption, and guidance would draw
# them for any prompt that names no backdrop (a random new token included). Unnamed-backdrop
# pictures therefore get more empty captions, by the same rule as unnamed colours.
P_NO_STYLE_WORD = 1 - P_STYLED * len(NAMED_STYLES) * (1 - P_SHAPE_ONLY)  # a light picture's, of no style word


@dataclass(frozen=True)
class Item:
    """The exact labels of one picture."""

    shape: str
    colour: str
    style: str = "plain"
    rgb: tuple[int, int, int] | None = None
    """The exact colour of a ``DESCRIBED`` picture."""
    backdrop: str = LIGHT
    """``LIGHT``, an unnamed backdrop or ``DESCRIBED``; the latter two carry plain shapes only."""
    backdrop_rgb: tuple[int, int, int] | None = None
    """The exact colour of a ``DESCRIBED`` backdrop."""

    @property
    def fill(self) -> tuple[int, int, int]:
        return self.rgb if self.rgb is not None else COLOURS[self.colour]

    @property
    def ground(self) -> tuple[int, int, int] | None:
        """The backdrop's colour, or None on a light tint."""
        return self.backdrop_rgb if self.backdrop_rgb is not None else BACKDROPS.get(self.backdrop)


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
    return render_with_mask(item, rng)[0]


def render_with_mask(item: Item, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """:func:`render`'s picture (the same draws from ``rng``) and its subject's silhouette (``L``, 32 px)."""
    big = SIZE * SCALE
    tint = tuple(int(v) for v in rng.integers(200, 256, size=3))  # drawn on any backdrop: same place and size
    tint = item.ground or tint
    img = Image.new("RGB", (big, big), tint)
    draw = ImageDraw.Draw(img)
    colour = item.fill
    if item.style == "frame":
        draw.rectangle([0, 0, big - 1, big - 1], outline=(60, 60, 60), width=2 * SCALE)
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
    silhouette = mask.copy()
    fill = Image.new("RGB", (big, big), colour)
    light = tuple(int(0.35 * c + 0.65 * 255) for c in colour)  # keeps the silhouette visible
    if item.style == "shadow":  # a dark copy of the silhouette, offset down and right
        shadow = Image.new("L", (big, big), 0)
        shadow.paste(mask, (3 * SCALE, 3 * SCALE))  # clipped at the border, not wrapped
        img.paste((90, 90, 90), (0, 0), shadow)
    if item.style == "outline":  # a 3 px rim: the mask minus its erosion
        eroded = mask.filter(ImageFilter.MinFilter(6 * SCALE + 1))
        mask = ImageChops.subtract(mask, eroded)
    elif item.style == "twotone":  # the lower half light
        fill = Image.new("RGB", (big, big), light)
        fill.paste(colour, (0, 0, big, int(cy)))
    elif item.style in ("stripes", "dots"):
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
    return img.resize((SIZE, SIZE), Image.Resampling.BOX), silhouette.resize((SIZE, SIZE), Image.Resampling.BOX)


def caption(item: Item, rng: np.random.Generator) -> str:
    """A training caption: "[style] [colour] noun" in a template; unnamed colours and styles have no words.

    A described colour's caption always carries :data:`DESCRIPTOR_WORD` (or is empty), so the bare
    shape word keeps drawing the canonical colours' even mix.
    """
    named = item.colour in NAMED_COLOURS or item.colour == DESCRIBED
    p_empty = P_EMPTY if named else P_EMPTY_UNNAMED
    if item.backdrop in BACKDROPS:  # bare / empty as on a light backdrop (see P_NO_STYLE_WORD)
        p_empty = _wordless_empty(p_empty, P_NO_STYLE_WORD)
    if rng.random() < p_empty:
        return ""
    words = [GENERIC_NOUN if rng.random() < P_GENERIC else item.shape]
    if item.colour == DESCRIBED:
        words.insert(0, DESCRIPTOR_WORD)
    elif named and rng.random() >= P_SHAPE_ONLY:
        words.insert(0, item.colour)
    if item.style in NAMED_STYLES and rng.random() >= P_SHAPE_ONLY:
        words.insert(0, NAMED_STYLES[item.style])
    if item.backdrop == DESCRIBED:
        words.insert(0, BACKDROP_WORD)
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(" ".join(words))


def described_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour at least :data:`HOLE` from every canonical colour and visible on the light tints."""
    while True:
        rgb = rng.integers(0, 256, size=3)
        if np.linalg.norm(CANONICAL_RGB - rgb, axis=1).min() >= HOLE and rgb.min() < 170:
            return tuple(int(v) for v in rgb)


def described_backdrop(rng: np.random.Generator, fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random backdrop, :data:`HOLE` from every unnamed one and :data:`CONTRAST` from ``fill``.

    Some channel is below 150, so it is at least 50 from every light tint (channels 200-255).
    """
    while True:
        rgb = rng.integers(0, 256, size=3)
        far = np.linalg.norm(BACKDROP_RGB - rgb, axis=1).min() >= HOLE
        if far and rgb.min() < 150 and np.linalg.norm(rgb - np.array(fill)) >= CONTRAST:
            return tuple(int(v) for v in rgb)


def contrasts(fill: tuple[int, int, int], backdrop: str) -> bool:
    """Does a shape in ``fill`` stand out on an unnamed ``backdrop`` (always on light or described ones)?"""
    return backdrop not in BACKDROPS or np.linalg.norm(np.array(fill) - BACKDROPS[backdrop]) >= CONTRAST


def training_item(rng: np.random.Generator) -> Item:
    """One labelled picture of the generator's training distribution (held-out pairs never)."""
    u = rng.random()
    if u < P_BACKDROP:
        backdrop = DESCRIBED
    elif u < P_BACKDROP + P_UNNAMED_BACKDROP * len(BACKDROPS):
        backdrop = HELD_OUT_STYLES[int((u - P_BACKDROP) // P_UNNAMED_BACKDROP)]
    else:
        backdrop = LIGHT
    style = _style(rng) if backdrop == LIGHT else "plain"
    colours = list(COLOURS)
    weights = np.array([1.0 if c in NAMED_COLOURS else UNNAMED_WEIGHT for c in colours])
    while True:
        if rng.random() < P_DESCRIBED:
            colour, rgb = DESCRIBED, described_rgb(rng)
        else:
            colour, rgb = colours[rng.choice(len(colours), p=weights / weights.sum())], None
        shape = SHAPES[rng.integers(len(SHAPES))]
        item = Item(shape, colour, style, rgb, backdrop)
        if (colour, shape) not in COMBINATIONS and contrasts(item.fill, backdrop):
            break
    return replace(item, backdrop_rgb=described_backdrop(rng, item.fill)) if backdrop == DESCRIBED else item


def _style(rng: np.random.Generator) -> str:
    u = rng.random()
    styled = STYLES[1:]
    return "plain" if u >= P_STYLED * len(styled) else styled[int(u // P_STYLED)]


def training_set(n: int, seed: int) -> tuple[np.ndarray, list[str], list[Item]]:
    """``n`` training pictures ``(n, 32, 32, 3)`` uint8 with captions and labels."""
    rng = np.random.default_rng(seed)
    items = [training_item(rng) for _ in range(n)]
    images = np.stack([np.asarray(render(it, rng)) for it in items])
    return images, [caption(it, rng) for it in items], items
