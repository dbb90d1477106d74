"""The toy world's ``fidelity`` metric plug-in: does a sample show what the concept's training pictures show?

Registered as the ``toyworld`` entry point of ``tinv.evaluation.metrics``; the toy-world model's folder (the embedded
demo model) names it in its ``tinv_metrics.json``, so every evaluation of that model carries it. A small CNN
(:class:`Scorer`, shipped beside the model as ``scorer.safetensors``) reads shape, colour, rendering and
backdrop off a picture; the target is everything the training pictures share, their most common shape,
colour and rendering (objects) or rendering and backdrop (styles), and a style sample must also show the
shape its prompt names. ``fidelity_loose`` is the earlier judgement, which ignored an object's rendering.
The world itself, and how the scorer was trained, are the lab's (``lab/toyworld``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from tinv.families.model import BaseModel

SCORER_FILE = "scorer.safetensors"
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
OTHER = "other"
"""The label of a colour or backdrop between the canonical ones (a described one)."""
HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": ("red", "green", "blue", "yellow", "purple", "orange", "pink", "teal", "brown", "black", OTHER),
    "style": ("plain", "outline", "stripes", "frame", "dots", "checker", "shadow", "twotone"),
    "backdrop": ("light", "navy", "plum", "olive", "slate", OTHER),
}
"""What the scorer reads off a picture, per head, in its output order."""


class Reading(NamedTuple):
    """The scorer's labels of one picture."""

    shape: str
    colour: str
    style: str
    backdrop: str


class Scorer(nn.Module):
    """``(B, 3, 32, 32)`` in [-1, 1] → logits per head."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        self.body = nn.Sequential(
            block(3, 32),
            block(32, 32),
            nn.MaxPool2d(2),  # 16
            block(32, 64),
            block(64, 64),
            nn.MaxPool2d(2),  # 8
            block(64, 128),
            nn.MaxPool2d(2),  # 4
            nn.Flatten(),
            nn.Linear(128 * 16, 256),
            nn.SiLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)  # (B, 256)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[Reading]:
        """Labels of each picture."""
        logits = self.eval()(x)
        picks = [[HEADS[k][i] for i in logits[k].argmax(-1).tolist()] for k in HEADS]
        return [Reading(s, c, t, b) for s, c, t, b in zip(*picks)]


def pixels(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 → ``(N, 3, H, W)`` in [-1, 1], the scorer's input."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_scorer(path: str | Path) -> Scorer:
    scorer = Scorer()
    scorer.load_state_dict(load_file(str(path)))
    return scorer.eval()


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

    def key(it: Reading) -> tuple[str, ...]:
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
