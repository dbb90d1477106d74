"""Metrics of drawn samples, as plug-ins: the evaluator scores every concept with the metrics it is given.

A metric is any object with a ``score`` method (:class:`Metric`). Metrics are found by name among the
``tinv.evaluation.metrics`` entry points of the installed packages; each entry point is a factory
``(model, argument) -> Metric``. A model folder names the metrics that fit it in ``tinv_metrics.json``
(``["toyworld"]`` for the toy-world model, whose scorer only reads its own pictures); a job adds more
with ``--metrics NAME[=ARGUMENT]`` (``clip=openai/clip-vit-large-patch14``). tinv itself provides
``clip``: the Textual Inversion paper's CLIP image and text similarities (Gal et al. 2022, arXiv
2208.01618, section 5). Without a metric's model there is no value: nothing is ever guessed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tinv.errors import InvalidInputError
from tinv.families.model import BaseModel

METRICS_FILE = "tinv_metrics.json"
GROUP = "tinv.metrics"
log = logging.getLogger("tinv.metrics")


class Metric(Protocol):
    """Scores a concept's samples; returns one ``{name: value}`` per sample (names are the metric's own)."""

    needs_training_pictures: bool
    """Whether ``score`` reads ``training`` (the actor keeps a concept's pictures only for such metrics)."""

    def score(
        self, training: torch.Tensor | None, samples: np.ndarray, prompts: list[str], learnable_property: str
    ) -> list[dict[str, float]]:
        """``training``: the concept's pictures ``(N, 3, H, W)`` in [-1, 1] (None when not known);
        ``samples``: ``(M, H, W, 3)`` uint8 drawn from ``prompts`` (``{}`` for the token)."""
        ...


MetricFactory = Callable[[BaseModel, "str | None"], Metric]
"""What a ``tinv.evaluation.metrics`` entry point names: ``(model, argument) -> Metric``."""


class UnknownMetricError(InvalidInputError):
    """A metric was asked for by a name no installed package provides."""


def available() -> dict[str, EntryPoint]:
    """Metric name → entry point, over every installed package."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def parse_requests(requests: Sequence[str]) -> list[tuple[str, str | None]]:
    """``["clip=path", "toyworld"]`` → ``[("clip", "path"), ("toyworld", None)]``; unknown names refused."""
    known = available()
    out = []
    for request in requests:
        name, _, argument = request.partition("=")
        if name not in known:
            raise UnknownMetricError(f"unknown metric {name!r}; installed: {', '.join(sorted(known)) or 'none'}")
        out.append((name, argument or None))
    return out


def folder_metrics(model_dir: Path) -> list[str]:
    """The metric names a model folder's ``tinv_metrics.json`` lists (none when it has no such file)."""
    file = Path(model_dir) / METRICS_FILE
    return list(json.loads(file.read_text())) if file.is_file() else []


def load_metrics(model: BaseModel, requests: Sequence[str] = ()) -> list[Metric]:
    """The model folder's metrics plus ``requests`` (``NAME[=ARGUMENT]``), each built once.

    A name the folder lists but no installed package provides is skipped with a warning (the folder may
    come from elsewhere); a requested one raises :class:`UnknownMetricError`.
    """
    known = available()
    wanted: dict[str, str | None] = {}
    for name in folder_metrics(model.local_dir):
        if name in known:
            wanted[name] = None
        else:
            log.warning("%s names metric %r, which no installed package provides; skipped", model.uri, name)
    wanted |= dict(parse_requests(requests))
    factories: dict[str, MetricFactory] = {name: known[name].load() for name in wanted}
    return [factories[name](model, argument) for name, argument in wanted.items()]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in [-1, 1] → ``(N, H, W, 3)`` uint8."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def without_token(prompt: str) -> str:
    """The prompt with the concept's token left out: ``"a {} on a table"`` → ``"a on a table"``."""
    return " ".join(prompt.replace("{}", " ").split())


class ClipMetrics:
    """The Textual Inversion paper's CLIP image and text similarity, with a CLIP model from a path or hub id.

    ``clip_image``: mean cosine similarity of a sample to the training images; ``clip_text``: to its
    prompt with the token left out.
    """

    needs_training_pictures = True  # for clip_image

    def __init__(self, name_or_path: str, device: torch.device | str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(name_or_path)
        self.device = torch.device(device)

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 → unit ``(N, D)``."""
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        return torch.nn.functional.normalize(_features(self.model.get_image_features(**inputs)), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        return torch.nn.functional.normalize(_features(self.model.get_text_features(**inputs)), dim=-1)

    def score(
        self, training: torch.Tensor | None, samples: np.ndarray, prompts: list[str], learnable_property: str
    ) -> list[dict[str, float]]:
        """Per sample: ``clip_image`` (absent without training pictures) and ``clip_text``."""
        s = self.image_features(samples)
        text = self.text_features([without_token(p) for p in prompts])
        rows = [{"clip_text": float(v)} for v in (s * text).sum(-1)]
        if training is not None and len(training):
            for row, v in zip(rows, (s @ self.image_features(to_uint8(training)).T).mean(-1)):
                row["clip_image"] = float(v)
        return rows


def clip_metric(model: BaseModel, argument: str | None) -> ClipMetrics:
    """The ``clip`` entry point: ``clip=HUB_ID_OR_PATH``."""
    if not argument:
        raise UnknownMetricError("the clip metric needs a CLIP model: --metrics clip=HUB_ID_OR_PATH")
    return ClipMetrics(argument, model.device)


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object where 4.x returned the projected tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
