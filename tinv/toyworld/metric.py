"""The toy world's ``fidelity`` metric: does a sample show what the concept's training pictures show?

Registered as the ``toyworld`` entry point of ``tinv.metrics``; the toy-world model's folder names it in
its ``tinv_metrics.json``, so every evaluation of that model carries it. The scorer
(:mod:`tinv.toyworld.scorer`) reads shape, colour, rendering and backdrop off a picture; the target is
everything the training pictures share, their most common shape, colour and rendering (objects) or
rendering and backdrop (styles), and a style sample must also show the shape its prompt names.
``fidelity_loose`` is the earlier judgement, which ignored an object's rendering.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tinv.models import BaseModel
from tinv.toyworld import SCORER_FILE
from tinv.toyworld.scorer import Scorer, load_scorer, pixels
from tinv.toyworld.world import SHAPES, Item


def prompt_shape(prompt: str) -> str | None:
    """The shape word a prompt names, if any."""
    return next((w for w in prompt.replace("{}", " ").split() if w in SHAPES), None)


def fidelity_hits(
    scorer: Scorer, training: torch.Tensor, samples: np.ndarray, prompts: list[str], learnable_property: str,
    loose: bool = False,
) -> list[bool]:
    """Whether each of ``samples`` shows what the concept's training pictures show, as the scorer reads both.

    ``training`` is ``(N, 3, H, W)`` in [-1, 1]; ``samples`` is ``(M, H, W, 3)`` uint8 drawn from ``prompts``.
    ``loose`` leaves an object's rendering out of the target.
    """
    obj = learnable_property == "object"

    def key(it: Item) -> tuple[str, ...]:
        if obj:
            return (it.shape, it.colour) if loose else (it.shape, it.colour, it.style)
        return (it.style, it.backdrop)

    goal = Counter(map(key, scorer.predict(training.float()))).most_common(1)[0][0]
    samples_seen = scorer.predict(pixels(samples))
    return [
        key(item) == goal and (obj or item.shape == (prompt_shape(prompt) or item.shape))
        for item, prompt in zip(samples_seen, prompts)
    ]


class ToyFidelity:
    """``fidelity`` and ``fidelity_loose`` per sample (1.0 a hit, 0.0 a miss); no value without training
    pictures to aim at."""

    needs_training_pictures = True  # the target is what they show

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    def score(
        self, training: torch.Tensor | None, samples: np.ndarray, prompts: list[str], learnable_property: str
    ) -> list[dict[str, float]]:
        if training is None or not len(samples):
            return [{} for _ in samples]
        hits = fidelity_hits(self.scorer, training, samples, prompts, learnable_property)
        loose = fidelity_hits(self.scorer, training, samples, prompts, learnable_property, loose=True)
        return [{"fidelity": float(hit), "fidelity_loose": float(lh)} for hit, lh in zip(hits, loose)]


def toy_fidelity(model: BaseModel, argument: str | None) -> ToyFidelity:
    """The ``toyworld`` entry point: the scorer beside the model (or at the path ``argument``)."""
    path = Path(argument) if argument else Path(model.local_dir) / SCORER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the toyworld metric needs its scorer: no {path}")
    return ToyFidelity(load_scorer(path))
