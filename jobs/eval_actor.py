"""The evaluation actor of ``jobs/evaluate.py``: one model and pipeline, concepts drawn in mixed batches.

As the trainer actor: a concept's failure is a result with its typed error, the call raises only when
the model did not load (:meth:`EvalWorker.info` raises that error's type).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from jobs.actor import load_model, worker_info, worker_name
from jobs.dispatch import ConceptResult, Request
from tinv import storage
from tinv.errors import ConceptDataError, InvalidInputError, TinvError, TransientError
from tinv.evaluation.evaluate import EvalConcept, Evaluator, read_embedding, training_files
from tinv.evaluation.metrics import load_metrics
from tinv.evaluation.sampling import SampleConfig
from tinv.families.model import BaseModel
from tinv.files import outputs
from tinv.files.formats import read_lora
from tinv.training.pictures import load_images


@dataclass(frozen=True)
class EvalSpec:
    """One concept to evaluate (the dispatcher's task spec for ``EvalWorker``)."""

    concept_id: str
    placeholder_token: str | None = None
    """The token; None: the embedding file's own."""
    learnable_property: str = "object"
    eval_prompts: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    """Training image URIs, for the metrics and the gallery (may be empty)."""
    embedding_uri: str = ""
    """The concept's embedding file ("" for a ``lora`` concept, which has none)."""
    lora_uri: str = ""
    """Its LoRA file (either layout; a bundled embedding serves as its embedding), "" for ``ti``."""


@dataclass(frozen=True)
class EvalResult(ConceptResult):
    """A concept's evaluation: its status (with the typed error of a failure, :meth:`ConceptResult.failed`), each
    image's row (prompt, seed, image path, metrics), the concept's metric means, and its training pictures' paths
    (the gallery's)."""

    rows: tuple[dict[str, Any], ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    learnable_property: str = "object"
    train_images: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalSetup:
    """What every evaluation actor needs: the model, how to draw, where outputs go."""

    model: str | None
    output: str
    samples: SampleConfig
    """How to draw, which metrics to add."""
    storage_options: dict[str, Any] | None = None
    precision: str = "auto"
    base_precision: str = "auto"
    attention: str = "sdpa"
    threads: int = 1
    storage_retry_s: float = storage.RETRY_WINDOW_S
    """How long storage may fail transiently before a read or write counts as an outage."""


class EmbeddingMisfitError(InvalidInputError):
    """An embedding made for another model shape (SDXL on SD 1.5, 768 on 1024)."""


class EvalWorker:
    """Ray actor body for ``jobs/evaluate.py``."""

    def __init__(self, setup: EvalSetup) -> None:
        self.setup, self.name, self.load_error = setup, worker_name(), None
        storage.set_retry_window(setup.storage_retry_s)
        try:
            self.model = load_model(setup)
            self.evaluator = Evaluator(self.model, setup.samples, load_metrics(self.model, setup.samples.metrics))
        except Exception as e:  # noqa: BLE001 — kept for info(): Ray drops a constructor's exception type
            self.load_error = e

    def info(self) -> dict[str, Any]:
        if self.load_error is not None:
            raise self.load_error
        return worker_info(self.model, self.model.resolution, self.name)

    def evaluate(self, requests: list[Request]) -> list[EvalResult]:
        """Draw and score concepts (each request's spec an :class:`EvalSpec`); write their files. One result per
        request, same order."""
        torch.set_num_threads(max(1, self.setup.threads))
        storage_options, results, concepts = self.setup.storage_options, {}, []
        for request in requests:
            spec: EvalSpec = request.spec
            try:
                concepts.append(self._concept(spec))
            except TinvError as e:
                results[spec.concept_id] = EvalResult.failed(spec.concept_id, spec.placeholder_token, e,
                                                             request.attempt, self.name)
        attempts = {r.spec.concept_id: r.attempt for r in requests}
        for concept, drawn in zip(concepts, self.evaluator.run(concepts)):
            cid = concept.concept_id
            folder = outputs.concept_dir(self.setup.output, cid)
            files = {**drawn.files(), **(training_files(concept.training) if concept.training is not None else {})}
            try:
                for name, data in files.items():
                    storage.write_bytes(storage.join(folder, name), data, storage_options)
            except OSError as e:
                results[cid] = EvalResult.failed(cid, concept.token, TransientError(repr(e)), attempts[cid], self.name)
                continue
            rows = tuple({"prompt": p, "seed": s, "image": f"concepts/{cid}/{name}", "metrics": metrics}
                         for p, s, name, metrics in zip(drawn.prompts, drawn.seeds, drawn.names, drawn.per_image))
            train = tuple(f"concepts/{cid}/{n}" for n in sorted(files) if n.startswith("train/"))
            results[cid] = EvalResult(cid, "succeeded", concept.token, attempts=attempts[cid], worker=self.name,
                                      rows=rows, metrics=drawn.summary, learnable_property=concept.learnable_property,
                                      train_images=train)
        return [results[request.spec.concept_id] for request in requests]

    def _concept(self, spec: EvalSpec) -> EvalConcept:
        """The embedding and pictures of ``spec``; a typed error when they cannot be had."""
        storage_options = self.setup.storage_options
        try:
            token, vectors, lora, text = spec.placeholder_token, None, None, None
            if spec.lora_uri:
                read = read_lora(storage.read_bytes(spec.lora_uri, storage_options), self.model)
                lora, token, vectors, text = read.state, token or read.token, read.vectors, read.text
                if token is None:
                    raise ConceptDataError(spec.concept_id, "a LoRA without a bundled embedding needs its --token",
                                           spec.lora_uri)
            if spec.embedding_uri:
                token, vectors = read_embedding(spec.embedding_uri, token, storage_options)
            if vectors is not None:
                check_fits(self.model, vectors, spec.embedding_uri or spec.lora_uri)
            training = None  # read for the gallery (train/*.png) as well as for the metrics
            if spec.images:
                training = load_images(spec.concept_id, spec.images, self.model.resolution, storage_options)
        except (ConceptDataError, EmbeddingMisfitError):
            raise
        except (ValueError, KeyError, FileNotFoundError) as e:
            uri = spec.lora_uri or spec.embedding_uri
            raise ConceptDataError(spec.concept_id, f"unreadable {'LoRA' if spec.lora_uri else 'embedding'}: {e}",
                                   uri) from e
        except OSError as e:  # storage still failing after its own retries: worth another attempt
            raise TransientError(f"storage error: {e!r}") from e
        return EvalConcept(spec.concept_id, token, vectors, spec.learnable_property, spec.eval_prompts, training,
                           lora=lora, text_lora=text)


def check_fits(model: BaseModel, vectors: list[torch.Tensor], uri: str) -> None:
    """A clear error when an embedding was made for another model shape (SDXL on SD 1.5, 768 on 1024); the first
    encoders' vectors alone fit (FLUX's CLIP-L without T5's)."""
    dims = [v.shape[-1] for v in vectors]
    if dims != model.embedding_dims[: len(dims)]:
        raise EmbeddingMisfitError(f"{uri}: embedding dims {dims} do not fit this model's text encoders "
                                   f"{model.embedding_dims}")
