"""Fidelity of Textual Inversion on the toy world: floor, best words and TI, per concept.

For each held-out concept, samples are drawn with fixed seeds and read by the scorer:
- **floor**: a new token with a random vector (what an untrained word gives);
- **best words**: the real words where they exist ("a red star"), otherwise the best prompt
  the vocabulary can build (the shape word alone, or with each colour word or "colour");
- **TI**: the token tinv learned from the concept's pictures at the given settings.
Object concepts score a sample when shape, colour and rendering match; style concepts are prompted
with every shape word and score a sample when backdrop, rendering and that shape match
(:meth:`Concept.hit`). TI's loose score (rendering ignored, the earlier judgement) is kept beside it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from lab.toyworld.concepts import CONCEPTS, Concept
from lab.toyworld.scorer import Scorer, pixels
from lab.toyworld.world import (
    BACKDROP_WORD,
    DESCRIPTOR_WORD,
    NAMED_COLOURS,
    NAMED_STYLES,
    OBJECT_PROMPT,
    SHAPES,
    STYLE_PROMPT,
    Item,
)
from tinv.evaluation.sampling import SampleRequest, sample
from tinv.families.model import BaseModel, load_base_model
from tinv.manifest import ConceptSpec
from tinv.settings import TrainConfig
from tinv.training.concept import ConceptData, TrainedConcept
from tinv.training.loop import train_concepts
from tinv.training.pictures import decode_image


@dataclass
class Row:
    concept: str
    kind: str
    floor: float
    best_words: float
    best_prompt: str
    ti: float
    ti_loose: float
    """TI judged without the rendering (the earlier, loose fidelity)."""
    ti_worst_shape: tuple[str, float] | None = None
    """Styles: the shape word their TI samples matched least often, and how often."""


def token(concept: Concept) -> str:
    return f"<{concept.name}>"


LORA_WORD = "sks"
"""DreamBooth's rare identifier: the toy tokenizer reads it as three characters no caption of the world holds."""


def lora_token(concept: Concept) -> str:
    """A ``lora`` concept's token, plain text as DreamBooth's "sks dog": the identifier and the class noun
    (``sks square``) for an object; the identifier alone for a style, whose prompts name the shape."""
    return f"{LORA_WORD} {concept.shape}" if concept.shape else LORA_WORD


def concept_data(
    concept: Concept, n_images: int, size: int, seed: int, method: str = "ti",
    class_prompt: str | tuple[str, ...] = "", class_images: torch.Tensor | None = None,
    class_captions: tuple[str, ...] = (),
) -> ConceptData:
    """The concept's pictures, through the same PNG decode path users' files take, to learn by ``method``
    (``lora``: under the plain text :func:`lora_token`), with ``class_images`` of ``class_prompt`` (each
    under its ``class_captions``) for prior preservation when given."""
    tensors = []
    for i, pic in enumerate(concept.pictures(n_images, seed)):
        buf = io.BytesIO()
        pic.save(buf, format="PNG")
        tensors.append(decode_image(buf.getvalue(), size, concept_id=concept.name, uri=f"toyworld:{i}"))
    spec = ConceptSpec(
        concept.name,
        tuple(f"toyworld:{i}" for i in range(n_images)),
        placeholder_token=lora_token(concept) if method == "lora" else token(concept),
        learnable_property=concept.learnable_property,
        initializer_token=concept.initializer,
        captions=concept.captions(n_images, seed),
        method=method,
        class_prompt=class_prompt,
    )
    return ConceptData(spec, torch.stack(tensors), class_images, class_captions)


def learn(
    model: BaseModel, concepts: tuple[Concept, ...], cfg: TrainConfig, n_images: int = 6, seed: int = 0,
    method: str = "ti", classes: dict[str, tuple] | None = None,
) -> dict[str, TrainedConcept]:
    """Train every concept by ``method`` (packed); ``classes``: concept name → (class prompt(s), their
    pictures, each picture's prompt) for prior preservation. Concept i's pictures are drawn from
    ``seed + i`` whatever the method."""
    classes = classes or {}
    data = [concept_data(c, n_images, model.resolution, seed + i, method, *classes.get(c.name, ()))
            for i, c in enumerate(concepts)]
    learned = {}
    for t in train_concepts(model, data, cfg):
        if t.error:
            raise RuntimeError(t.error)
        learned[t.spec.concept_id] = t
    return learned


def prompts_for(concept: Concept, word: str, samples: int) -> list[tuple[str, str | None]]:
    """(prompt, shape the prompt named) pairs: ``samples`` of them, over shape words for styles."""
    if concept.kind != "style":
        return [(OBJECT_PROMPT.format(word), None)] * samples
    per = math.ceil(samples / len(SHAPES))
    return [(" ".join(STYLE_PROMPT.format(word, shape=s).split()), s) for s in SHAPES for _ in range(per)]


def word_prompts(concept: Concept) -> list[str]:
    """Candidate prompts built from the vocabulary alone (best of them is 'best words')."""
    if concept.kind == "combination":
        return [f"{concept.colour} {concept.shape}"]
    if concept.kind == "unnamed":
        return [concept.shape, *(f"{c} {concept.shape}" for c in (*NAMED_COLOURS, DESCRIPTOR_WORD))]
    return ["", *NAMED_STYLES.values(), BACKDROP_WORD]  # no word: the shape alone, a rendering's, "toned"


@dataclass(frozen=True)
class Draw:
    """Samples of one concept: with its learned token (``vectors``, ``(n, D)``) or the plain text ``word``
    in the token's place, through its UNet ``lora`` (peft naming) when it has one. ``word`` without vectors
    builds the words-only prompts; the shape word (objects) or ``""`` (styles) gives the bare class prompt."""

    concept: int
    vectors: torch.Tensor | None = None
    word: str = ""
    lora: dict[str, torch.Tensor] | None = None
    text_lora: list[dict[str, torch.Tensor]] | None = None
    """Its LoRA on each text encoder, if it has one."""


@dataclass(frozen=True)
class Judged:
    """One sample: the shape its prompt named (styles; else None), whether it shows the concept, and what
    the scorer read."""

    shape: str | None
    hit: bool
    loose_hit: bool
    """Rendering ignored (:meth:`Concept.hit`'s ``loose``)."""
    item: Item | None = None


def judge(
    model: BaseModel, scorer: Scorer, concepts: tuple[Concept, ...], draws: list[Draw], samples: int, seed: int = 0,
    **gen,
) -> list[list[Judged]]:
    """Every draw's samples, in one batched run (fixed seeds, each draw's own LoRA), judged per sample."""
    requests, shapes = [], []
    for d, draw in enumerate(draws):
        pairs = prompts_for(concepts[draw.concept], "{}", samples)
        requests += [SampleRequest(d, p, seed + k) for k, (p, _) in enumerate(pairs)]
        shapes.append([shape for _, shape in pairs])
    vectors = [None if d.vectors is None else [d.vectors] for d in draws]
    images = sample(model, vectors, requests, words=[d.word for d in draws], loras=[d.lora for d in draws],
                    text_loras=[d.text_lora for d in draws], **gen)
    items = iter(scorer.predict(pixels(images)))
    out = []
    for draw, named in zip(draws, shapes):
        c = concepts[draw.concept]
        drawn = [(s, next(items)) for s in named]
        out.append([Judged(s, c.hit(it, s), c.hit(it, s, loose=True), it) for s, it in drawn])
    return out


def score(
    model: BaseModel, scorer: Scorer, concepts: tuple[Concept, ...], draws: list[Draw], samples: int, seed: int = 0,
    **gen,
) -> list[tuple[float, float]]:
    """Fidelity of each draw, in one batched run: ``(strict, loose)``."""
    return [(share(h), share(h, loose=True)) for h in judge(model, scorer, concepts, draws, samples, seed, **gen)]


def share(hits: list[Judged], loose: bool = False) -> float:
    """The fraction of judged samples that show the concept."""
    return float(np.mean([j.loose_hit if loose else j.hit for j in hits]))


def worst_shape(hits: list[Judged]) -> tuple[str, float] | None:
    """A style's lowest fidelity over the shape words it was prompted with (None for objects)."""
    by_shape: dict[str, list[bool]] = {}
    for shape, hit in ((j.shape, j.hit) for j in hits):
        if shape is not None:
            by_shape.setdefault(shape, []).append(hit)
    return min(((s, float(np.mean(h))) for s, h in by_shape.items()), key=lambda x: x[1], default=None)


def fidelity_table(
    model_dir: str,
    scorer: Scorer,
    cfg: TrainConfig,
    concepts: tuple[Concept, ...] = CONCEPTS,
    samples: int = 32,
    seed: int = 0,
    precision: str = "auto",
    text_encoder_dtype: torch.dtype = torch.float32,
    **gen,
) -> list[Row]:
    """Floor, best words and TI for each concept, all drawn in one batched run with fixed seeds; the model
    loaded in ``precision`` (text encoders in ``text_encoder_dtype``), as the train job would."""
    model = load_base_model(model_dir, precision=precision, text_encoder_dtype=text_encoder_dtype)
    learned = {name: t.vectors[0] for name, t in learn(model, concepts, cfg, seed=seed).items()}
    table = model.text_encoders[0].get_input_embeddings().weight.detach().float()
    noise = torch.randn(1, table.shape[1], generator=torch.Generator().manual_seed(seed))
    floor = noise * table.std() + table.mean(0)  # a random new token
    columns: list[tuple[int, str, str]] = []  # (concept, column, words)
    todo: list[Draw] = []
    for i, c in enumerate(concepts):
        columns += [(i, "ti", ""), (i, "floor", ""), *((i, "words", w) for w in word_prompts(c))]
        todo += [Draw(i, learned[c.name]), Draw(i, floor), *(Draw(i, word=w) for w in word_prompts(c))]
    hits = dict(zip(columns, judge(model, scorer, concepts, todo, samples, seed, **gen)))
    scores = {k: share(h) for k, h in hits.items()}
    rows = []
    for i, c in enumerate(concepts):
        best = max(word_prompts(c), key=lambda w: scores[i, "words", w])
        shown = OBJECT_PROMPT.format(best) if c.kind != "style" else STYLE_PROMPT.format(best, shape="<shape>")
        rows.append(
            Row(c.name, c.kind, scores[i, "floor", ""], scores[i, "words", best], " ".join(shown.split()),
                scores[i, "ti", ""], share(hits[i, "ti", ""], loose=True), worst_shape(hits[i, "ti", ""]))
        )
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| concept | kind | floor | best words (prompt) | TI | TI, worst shape | TI, loose (rendering ignored) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        worst = f"{r.ti_worst_shape[1]:.2f} ({r.ti_worst_shape[0]})" if r.ti_worst_shape else ""
        words = f"{r.best_words:.2f} ({r.best_prompt!r})"
        lines.append(f"| {r.concept} | {r.kind} | {r.floor:.2f} | {words} | {r.ti:.2f} | {worst} | {r.ti_loose:.2f} |")
    for kind in ("combination", "unnamed", "style"):
        sel = [r for r in rows if r.kind == kind]
        if sel:
            m = [np.mean([getattr(r, f) for r in sel]) for f in ("floor", "best_words", "ti", "ti_loose")]
            lines.append(f"| **{kind} mean** | | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} | | {m[3]:.2f} |")
    return "\n".join(lines)
