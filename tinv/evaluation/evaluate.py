"""Evaluation of learned concepts: embeddings in, samples, grids and metrics out.

Used by the train job's actors (each concept's samples right after training) and by
``jobs/evaluate.py`` (regenerating a run, or any embedding files). All concepts of a call sit
in slots of one spliced text encoder, their LoRAs in adapters of the UNet that only their own samples
pass through, so a generation batch mixes concepts freely; an image depends only on its concept,
prompt and seed.

Metrics, per image and per concept (the mean), come from the metric plug-ins the evaluator is given
(:mod:`tinv.evaluation.metrics`: the model folder's own, e.g. the toy world's ``fidelity``, and any asked for,
e.g. CLIP's ``clip_image`` / ``clip_text``). None is reported without its plug-in.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin, load_textual_inversion_state_dicts

from tinv import storage
from tinv.evaluation.metrics import Metric, to_uint8
from tinv.evaluation.sampling import SampleConfig, SampleRequest, grid, pipeline, png_bytes, sample
from tinv.families import families
from tinv.families.model import BaseModel


@dataclass
class EvalConcept:
    """One learned concept to draw."""

    concept_id: str
    token: str
    vectors: list[torch.Tensor] | None
    """Per text encoder, ``(num_vectors, dim)``; None for a ``lora`` concept, whose token is plain text."""
    learnable_property: str = "object"
    prompts: tuple[str, ...] = ()
    """Prompts with ``{}`` for the token; empty: the model's defaults for the property."""
    training: torch.Tensor | None = None
    """``(N, 3, H, W)`` training pictures in [-1, 1] at the model's size, for metrics."""
    lora: dict[str, torch.Tensor] | None = None
    """``lora`` / ``pivotal``: its UNet LoRA in peft's naming, which its samples go through."""
    text_lora: list[dict[str, torch.Tensor]] | None = None
    """Its LoRA per text encoder, if it has one (:attr:`tinv.training.concept.TrainedConcept.text_lora`)."""


@dataclass
class ConceptEval:
    """A concept's images and metrics; :meth:`files` encodes them (off the training thread, in the actor)."""

    concept_id: str
    prompts: list[str]
    seeds: list[int]
    images: np.ndarray
    """``(N, H, W, 3)`` uint8, prompt-major."""
    per_prompt: int
    per_image: list[dict[str, float]] = field(default_factory=list)
    """Metrics of each image (same order as ``images``)."""
    eval_prompts: list[str] = field(default_factory=list)
    """The concept's evaluation prompts, each drawn ``per_prompt`` times (what a later evaluation redraws)."""

    @property
    def names(self) -> list[str]:
        """``samples/{prompt:02d}_{seed:02d}.png`` of each image."""
        return [f"samples/{i // self.per_prompt:02d}_{s:02d}.png" for i, s in enumerate(self.seeds)]

    def files(self) -> dict[str, bytes]:
        """Each sample as a PNG, and ``grid.png`` (a row per prompt)."""
        files = {name: png_bytes(img) for name, img in zip(self.names, self.images)}
        if len(self.images):
            files["grid.png"] = png_bytes(grid(self.images, self.per_prompt))
        return files

    @property
    def summary(self) -> dict[str, float]:
        """Mean of each metric over the concept's images."""
        keys = {k for row in self.per_image for k in row}
        return {k: float(np.mean([row[k] for row in self.per_image])) for k in sorted(keys)}


def read_embedding(
    uri: str, token: str | None = None, storage_options: dict[str, Any] | None = None
) -> tuple[str, list[torch.Tensor]]:
    """Token and per-encoder vectors from any file diffusers' ``load_textual_inversion`` reads.

    diffusers ``learned_embeds.safetensors``/``.bin`` ``{token: (n, D)}`` (sd-concepts-library), A1111
    ``.pt`` (``string_to_param``), and any family's keyed layouts (:func:`layouts`: the web UIs' ``emb_params``,
    SDXL's ``clip_l`` / ``clip_g``).
    Without ``token`` the file's own name for it is used (A1111: ``name``; else the file's stem).
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        local.write_bytes(storage.read_bytes(uri, storage_options))
        (state,) = load_textual_inversion_state_dicts([str(local)])
    for keys in layouts():  # a family's keys (SDXL clip_l / clip_g; A1111 emb_params): the token is the file's name
        held = keys[: len(state)]  # the first encoders' (FLUX: clip_l, and t5xxl where T5's vectors trained)
        if set(state) == set(held):
            return token or f"<{name.split('.')[0]}>", [state[k].float() for k in held]
    (found,), (vectors,) = TextualInversionLoaderMixin._retrieve_tokens_and_embeddings([token], [state], _NoVocab())
    vectors = vectors if vectors.ndim == 2 else vectors[None]
    return found, [vectors.float()]


def layouts() -> list[tuple[str, ...]]:
    """Every embedding-file layout with a key per text encoder, over the known families."""
    keys = {k for f in families().values() for k in (f.embedding_keys, f.webui_embedding_keys) if k}
    return sorted(keys)


class _NoVocab:
    """A tokenizer stand-in for diffusers' token check: tinv never adds the token to a vocabulary."""

    @staticmethod
    def get_vocab() -> dict[str, int]:
        return {}


@dataclass
class Evaluator:
    """Draws concepts with one loaded model and pipeline, and scores them with ``metrics``."""

    model: BaseModel
    cfg: SampleConfig = SampleConfig()
    metrics: list[Metric] = field(default_factory=list)
    pipe: Any = None

    def __post_init__(self) -> None:
        self.pipe = self.pipe or pipeline(self.model, self.cfg.scheduler)

    def prompts(self, concept: EvalConcept) -> list[str]:
        return list(concept.prompts or self.model.eval_prompts[concept.learnable_property])

    def run(self, concepts: list[EvalConcept], live: Callable[..., np.ndarray] | None = None) -> list[ConceptEval]:
        """Every concept's prompts × seeds ``0 … samples_per_prompt-1``, in batches that mix concepts: drawn from
        their vectors and LoRAs (:func:`tinv.evaluation.sampling.sample`), or by ``live`` (the trainer's
        :meth:`~tinv.training.trainer.PackedTrainer.draw` of the concepts in its slots, in that order), which takes
        the requests and :func:`tinv.evaluation.sampling.draw`'s keywords."""
        plan = [[(p, seed) for p in self.prompts(c) for seed in range(self.cfg.samples_per_prompt)] for c in concepts]
        requests = [SampleRequest(i, p, seed) for i, pairs in enumerate(plan) for p, seed in pairs]
        images = np.zeros((0, self.model.resolution, self.model.resolution, 3), np.uint8)
        how = self.cfg.drawing(self.model)
        if requests and live is not None:
            images = live(requests, pipe=self.pipe, **how)
        elif requests:
            images = sample(self.model, [c.vectors for c in concepts], requests, pipe=self.pipe,
                            words=[c.token for c in concepts], loras=[c.lora for c in concepts],
                            text_loras=[c.text_lora for c in concepts], **how)
        out, start = [], 0
        for concept, pairs in zip(concepts, plan):
            mine = images[start : start + len(pairs)]
            start += len(pairs)
            out.append(self._finish(concept, [p for p, _ in pairs], [s for _, s in pairs], mine))
        return out

    def images_per_concept(self) -> int:
        """Images a concept with the model's default object prompts gets."""
        return self.cfg.samples_per_prompt * len(self.model.eval_prompts["object"])

    @property
    def needs_training_pictures(self) -> bool:
        """Whether any metric reads a concept's training pictures (else nobody need keep them)."""
        return any(getattr(m, "needs_training_pictures", True) for m in self.metrics)

    def _finish(self, concept: EvalConcept, prompts: list[str], seeds: list[int], images: np.ndarray) -> ConceptEval:
        per_image: list[dict[str, float]] = [{} for _ in images]
        for metric in self.metrics if len(images) else []:
            scores = metric.score(concept.training, images, prompts, concept.learnable_property)
            for row, values in zip(per_image, scores):
                row.update(values)
        return ConceptEval(concept.concept_id, prompts, seeds, images, self.cfg.samples_per_prompt, per_image,
                           self.prompts(concept))


def training_files(training: torch.Tensor) -> dict[str, bytes]:
    """``train/{i}.png``: the training pictures as the model saw them (for a gallery beside the samples)."""
    return {f"train/{i:02d}.png": png_bytes(img) for i, img in enumerate(to_uint8(training))}
