"""The evaluation actor of ``jobs/evaluate.py``: one model and pipeline, concepts drawn in mixed batches.

As the trainer actor: a concept's failure is a result with its typed error, the call raises only when
the model did not load (:meth:`EvalWorker.info` raises that error's type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from jobs.actor import load_model, worker_info, worker_name
from tinv import outputs, storage
from tinv.errors import ConceptDataError, InvalidInputError, TinvError, TransientError, describe
from tinv.evaluate import EvalConcept, Evaluator, read_embedding, training_files
from tinv.images import load_images
from tinv.lora_files import read_lora
from tinv.metrics import load_metrics
from tinv.models import BaseModel
from tinv.samples import SampleConfig


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
class EvalSetup:
    """What every evaluation actor needs: the model, how to draw, where outputs go."""

    model: str | None
    output: str
    samples: dict[str, Any]
    """:class:`tinv.samples.SampleConfig` fields (how to draw, which metrics to add)."""
    storage_options: dict[str, Any] | None = None
    precision: str = "auto"
    attention: str = "sdpa"
    threads: int = 1


class EmbeddingMisfitError(InvalidInputError):
    """An embedding made for another model shape (SDXL on SD 1.5, 768 on 1024)."""


class EvalWorker:
    """Ray actor body for ``jobs/evaluate.py``."""

    def __init__(self, setup: EvalSetup) -> None:
        self.setup, self.name, self.load_error = setup, worker_name(), None
        try:
            self.model = load_model(setup)
            samples = SampleConfig(**setup.samples)
            self.evaluator = Evaluator(self.model, samples, load_metrics(self.model, samples.metrics))
        except Exception as e:  # noqa: BLE001 — kept for info(): Ray drops a constructor's exception type
            self.load_error = e

    def info(self) -> dict[str, Any]:
        if self.load_error is not None:
            raise self.load_error
        return worker_info(self.model, self.model.resolution, self.name)

    def evaluate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Draw and score concepts ``{"spec": EvalSpec fields, "attempt"}``; write their files.

        One result per request, same order: status, error, ``rows`` (one per image, with its ``metrics``),
        ``metrics`` (the concept's means).
        """
        torch.set_num_threads(max(1, self.setup.threads))
        storage_options, results, concepts = self.setup.storage_options, {}, []
        for request in requests:
            spec = EvalSpec(**request["spec"])
            base = {"concept_id": spec.concept_id, "token": spec.placeholder_token, "worker": self.name,
                    "attempts": request["attempt"], "retryable": False, "rows": [], "metrics": {}}
            try:
                concepts.append(self._concept(spec))
                results[spec.concept_id] = {**base, "token": concepts[-1].token}
            except TinvError as e:
                results[spec.concept_id] = {**base, "status": "failed", **describe(e)}
        for concept, drawn in zip(concepts, self.evaluator.run(concepts)):
            folder = outputs.concept_dir(self.setup.output, concept.concept_id)
            files = {**drawn.files(), **(training_files(concept.training) if concept.training is not None else {})}
            try:
                for name, data in files.items():
                    storage.write_bytes(storage.join(folder, name), data, storage_options)
            except OSError as e:
                results[concept.concept_id] |= {"status": "failed", **describe(TransientError(repr(e)))}
                continue
            rows = [{"prompt": p, "seed": s, "image": f"concepts/{concept.concept_id}/{name}", "metrics": metrics}
                    for p, s, name, metrics in zip(drawn.prompts, drawn.seeds, drawn.names, drawn.per_image)]
            train = sorted(n for n in files if n.startswith("train/"))
            results[concept.concept_id] |= {"status": "succeeded", "error": None, "rows": rows,
                                            "metrics": drawn.summary, "property": concept.learnable_property,
                                            "train_images": [f"concepts/{concept.concept_id}/{n}" for n in train]}
        return [results[request["spec"]["concept_id"]] for request in requests]

    def _concept(self, spec: EvalSpec) -> EvalConcept:
        """The embedding and pictures of ``spec``; a typed error when they cannot be had."""
        storage_options = self.setup.storage_options
        try:
            token, vectors, lora, text = spec.placeholder_token, None, None, None
            if spec.lora_uri:
                read = read_lora(storage.read_bytes(spec.lora_uri, storage_options))
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
    """A clear error when an embedding was made for another model shape (SDXL on SD 1.5, 768 on 1024)."""
    dims = [v.shape[-1] for v in vectors]
    if dims != model.embedding_dims:
        raise EmbeddingMisfitError(f"{uri}: embedding dims {dims} do not fit this model's text encoders "
                                   f"{model.embedding_dims}")
