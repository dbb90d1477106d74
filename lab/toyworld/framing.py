"""Framing on the toy world: photos are not square, and their subject shares the picture with other things.

The 12 held-out concepts learned with Textual Inversion at the lab's settings (:data:`lab.toyworld.CONFIG`) from
pictures that go through the user's path (PNG files, :func:`tinv.training.pictures.load_pictures`), judged on square
samples as the fidelity table is:

- **square**: the concept's own 32 px pictures (the fidelity table's TI column, for reference);
- **tall**: each picture at the top or the bottom of a 32 x 48 canvas of its own backdrop, the way a portrait
  frames its subject off-centre; learned from centre squares (which cut 8 rows off each end, so off the
  subject) and with aspect-ratio buckets (the 24 x 40 bucket: the whole canvas, a little smaller);
- **busy** (objects): each picture with small shapes of other colours scattered on its backdrop around the
  subject; learned as it is and with the renderer's subject silhouettes as masks.

:func:`step_cost` times what buckets cost a packed step whose concepts have different sizes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from lab.toyworld import CONFIG
from lab.toyworld.concepts import CONCEPTS, Concept
from lab.toyworld.fidelity import Draw, judge, share, token
from lab.toyworld.scorer import Scorer
from lab.toyworld.world import NAMED_COLOURS, SIZE, render_with_mask
from tinv import storage
from tinv.evaluation.sampling import png_bytes
from tinv.families.model import BaseModel, load_base_model
from tinv.manifest import ConceptSpec
from tinv.settings import TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.loop import train_concepts
from tinv.training.pictures import load_pictures
from tinv.training.trainer import PackedTrainer

TALL = (SIZE, SIZE * 3 // 2)
"""The portrait canvas (width, height)."""
CLUTTER = (3, 5)
"""How many small shapes a busy picture gets around its subject (at least, at most)."""
VARIANTS = ("square", "tall_cropped", "tall_bucketed", "busy", "busy_masked")


@dataclass
class Row:
    concept: str
    kind: str
    square: float
    tall_cropped: float
    tall_bucketed: float
    busy: float | None = None
    busy_masked: float | None = None


def tall(picture: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``picture`` at the top or the bottom of a :data:`TALL` canvas of its backdrop (its corner's colour)."""
    canvas = Image.new("RGB", TALL, picture.getpixel((0, 0)))
    canvas.paste(picture, (0, 0 if rng.random() < 0.5 else TALL[1] - SIZE))
    return canvas


def busy(picture: Image.Image, mask: Image.Image, colour: str | None, rng: np.random.Generator) -> Image.Image:
    """``picture`` with :data:`CLUTTER` small squares and discs of other named colours on its backdrop, never
    over the subject (``mask``)."""
    clutter = picture.copy()
    draw = ImageDraw.Draw(clutter)
    others = [c for c in NAMED_COLOURS if c != colour]
    for _ in range(int(rng.integers(CLUTTER[0], CLUTTER[1] + 1))):
        r, (x, y) = rng.uniform(2, 3.5), rng.uniform(3, SIZE - 3, size=2)
        fill = NAMED_COLOURS[others[int(rng.integers(len(others)))]]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=fill)
    return Image.composite(picture, clutter, mask.point(lambda v: 255 if v > 16 else 0))


def variant_data(concept: Concept, variant: str, n: int, seed: int, model: BaseModel) -> ConceptData:
    """The concept's pictures for ``variant`` written as PNGs (``memory://``) and read back as a job reads a
    manifest's, with buckets or masks as the variant says."""
    rng = np.random.default_rng(seed)
    drawn = [render_with_mask(item, rng) for item in concept.items(n, rng)]
    place = np.random.default_rng(seed + 10_000)  # the canvas and the clutter: a stream of their own
    root = f"memory://toyworld-framing/{variant}/{concept.name}"
    images, masks = [], []
    for i, (picture, mask) in enumerate(drawn):
        if variant.startswith("tall"):
            picture = tall(picture, place)
        elif variant.startswith("busy"):
            picture = busy(picture, mask, concept.colour, place)
        images.append(f"{root}/{i}.png")
        storage.write_bytes(images[-1], png_bytes(picture))
        if variant == "busy_masked":
            masks.append(f"{root}/{i}.mask.png")
            storage.write_bytes(masks[-1], png_bytes(mask))
    spec = ConceptSpec(concept.name, tuple(images), placeholder_token=token(concept),
                       learnable_property=concept.learnable_property, initializer_token=concept.initializer,
                       captions=concept.captions(n, seed), masks=tuple(masks))
    step = model.family.pixel_multiple(model) if variant == "tall_bucketed" else None
    squares, framed = load_pictures(spec, model.resolution, step)
    return ConceptData(spec, squares, framed=framed)


def compare(model_dir: str, scorer: Scorer, cfg: TrainConfig, samples: int = 96, seed: int = 0,
            n_images: int = 6, **gen) -> list[Row]:
    """Every variant's fidelity per held-out concept (objects only for ``busy``): trained packed, drawn in one
    batched run with fixed seeds. Concept i's pictures come from ``seed + i`` in every variant."""
    model = load_base_model(model_dir)
    draws, keys = [], []
    for variant in VARIANTS:
        concepts = [(i, c) for i, c in enumerate(CONCEPTS) if not variant.startswith("busy") or c.kind != "style"]
        data = [variant_data(c, variant, n_images, seed + i, model) for i, c in concepts]
        learned = {t.spec.concept_id: t for t in train_concepts(model, data, cfg)}
        for i, c in concepts:
            if learned[c.name].error:
                raise RuntimeError(learned[c.name].error)
            draws.append(Draw(i, learned[c.name].vectors[0]))
            keys.append((variant, c.name))
    fidelity = {k: share(h) for k, h in zip(keys, judge(model, scorer, CONCEPTS, draws, samples, seed, **gen))}
    return [Row(c.name, c.kind, *(fidelity.get((v, c.name)) for v in VARIANTS)) for c in CONCEPTS]


def markdown(rows: list[Row]) -> str:
    def cell(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}"

    lines = ["| concept | kind | square | tall, centre crop | tall, buckets | busy | busy, masks |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.concept} | {r.kind} | " + " | ".join(cell(getattr(r, v)) for v in VARIANTS) + " |" for r in rows]
    for kind in ("combination", "unnamed", "style"):
        sel = [r for r in rows if r.kind == kind]
        means = [None if getattr(sel[0], v) is None else float(np.mean([getattr(r, v) for r in sel]))
                 for v in VARIANTS]
        lines.append(f"| **{kind} mean** | | " + " | ".join(cell(m) for m in means) + " |")
    return "\n".join(lines)


def step_cost(model_dir: str, steps: int = 40, repeats: int = 3) -> dict[str, float]:
    """Seconds per packed step (K = 4, the lab's settings) of the held-out combinations and unnamed colours: all
    square, two of them tall (two latent sizes: two UNet passes a step), all tall (one size); the median of
    ``repeats`` interleaved runs of ``steps`` steps, and each mix's ratio to the all-square step."""
    model = load_base_model(model_dir)
    objects = [c for c in CONCEPTS if c.kind != "style"][:4]
    mixes = {"square": ("square",) * 4, "two_tall": ("square", "square", "tall_bucketed", "tall_bucketed"),
             "all_tall": ("tall_bucketed",) * 4}
    data = {name: [variant_data(c, v, 6, i, model) for i, (c, v) in enumerate(zip(objects, mix))]
            for name, mix in mixes.items()}
    seconds: dict[str, list[float]] = {name: [] for name in mixes}
    for _ in range(repeats):
        for name, concepts in data.items():
            trainer = PackedTrainer(model, replace(CONFIG, concepts_per_actor=4))
            for s, d in enumerate(concepts):
                trainer.admit(s, d)
            trainer.step()  # warm-up
            began = time.perf_counter()
            for _ in range(steps):
                trainer.step()
            seconds[name].append((time.perf_counter() - began) / steps)
    median = {name: float(np.median(v)) for name, v in seconds.items()}
    return {**{f"{n}_s_per_step": round(v, 4) for n, v in median.items()},
            **{f"{n}_vs_square": round(v / median["square"], 3) for n, v in median.items() if n != "square"}}
