"""The trainer actor: loads the base model once, trains concepts K at a time, writes their outputs.

Calls to :meth:`TrainerWorker.train` (a list of concept requests) only enqueue work and wait for
it; one background thread runs :func:`tinv.train.train_concepts` over the queue, so slots freed
by a finished concept are refilled from any pending call (continuous batching across calls).
Every result is a small dict; the driver never sees tensors.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import traceback
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from tinv import outputs, storage
from tinv.config import ConceptSpec, TrainConfig
from tinv.embedded import EMBEDDED_MODEL
from tinv.evaluate import EvalConcept, Evaluator, read_embedding, training_files
from tinv.images import ConceptDataError, load_images
from tinv.metrics import load_metrics
from tinv.models import BaseModel, load_base_model
from tinv.samples import SampleConfig
from tinv.train import ConceptData, PackedTrainer, TrainedConcept, train_concepts


@dataclass(frozen=True)
class WorkerSetup:
    """What every trainer actor needs: the model, the run config, and where outputs go."""

    model: str | None
    """Base model URI; None builds the embedded default model on the actor's machine."""
    train: dict[str, Any]
    """:class:`TrainConfig` fields."""
    output: str
    storage_options: dict[str, Any] | None = None
    precision: str = "auto"
    attention: str = "sdpa"
    threads: int = 1
    """torch intra-op threads (the actor's CPU share)."""
    samples: dict[str, Any] | None = None
    """:class:`tinv.samples.SampleConfig` fields for each concept's evaluation samples and metrics."""


def load_model(setup: WorkerSetup | EvalSetup) -> BaseModel:
    """The actor's base model (the embedded toy model when none is named), with the setup's threads."""
    torch.set_num_threads(max(1, setup.threads))
    return load_base_model(
        setup.model or str(EMBEDDED_MODEL), precision=setup.precision, attention=setup.attention,
        storage_options=setup.storage_options,
    )


def worker_info(model: BaseModel, resolution: int, name: str) -> dict[str, Any]:
    """Identity of a loaded model and of the worker holding it (what ``info()`` returns)."""
    return {**model.info, "resolution": resolution, "dtype": str(model.dtype), "device": str(model.device),
            "worker": name, "pid": os.getpid()}


def spec_from_dict(d: dict[str, Any]) -> ConceptSpec:
    lists = ("images", "eval_prompts", "captions")
    return ConceptSpec(**{**d, **{k: tuple(d.get(k, ())) for k in lists}})


class TrainerWorker:
    """Ray actor body (wrapped with ``ray.remote`` by the driver)."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup, self.cfg = setup, TrainConfig(**setup.train)
        self.model = load_model(setup)
        self.resolution = PackedTrainer(self.model, self.cfg).resolution
        samples = SampleConfig(**(setup.samples or {}))
        self.evaluator = Evaluator(self.model, samples, load_metrics(self.model, samples.metrics))
        self.images: dict[str, torch.Tensor] = {}  # training pictures of concepts in flight (for metrics)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.inbox: queue.Queue[tuple[dict, Future]] = queue.Queue()
        self.waiting: dict[str, tuple[dict, Future]] = {}
        threading.Thread(target=self._loop, name="tinv-trainer", daemon=True).start()

    def info(self) -> dict[str, Any]:
        """Identity of the loaded model and of this worker."""
        return worker_info(self.model, self.resolution, self.name)

    def train(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Train concepts ``{"spec", "fingerprint", "attempt"}``; one result dict per request, same order."""
        futures = []
        for request in requests:
            future: Future = Future()
            self.inbox.put((request, future))
            futures.append(future)
        return [f.result() for f in futures]

    # -- the training thread -------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_num_threads(max(1, self.setup.threads))  # per thread under OpenMP: set it where we compute
        while True:
            first = self.inbox.get()  # block until there is work, then train until the queue runs dry
            try:
                for trained in train_concepts(self.model, self._feed(first), self.cfg):
                    request, future = self.waiting.pop(trained.spec.concept_id)
                    future.set_result(self._finish(request, trained))
            except BaseException as e:  # a broken trainer fails every waiting call; the driver replaces us
                message = f"trainer crashed: {e!r}\n{traceback.format_exc()}"
                for _, future in self.waiting.values():
                    future.set_exception(RuntimeError(message))
                self.waiting.clear()

    def _feed(self, first: tuple[dict, Future]) -> Iterator[ConceptData | TrainedConcept]:
        """Decode each queued concept when a slot asks for it; a bad one comes out as an error."""
        entry: tuple[dict, Future] | None = first
        while entry is not None:
            spec = spec_from_dict(entry[0]["spec"])
            self.waiting[spec.concept_id] = entry
            try:
                outputs.clear_result(self.setup.output, spec.concept_id, self.setup.storage_options)
                images = load_images(spec.concept_id, spec.images, self.resolution, self.setup.storage_options)
                self.images[spec.concept_id] = images
                yield ConceptData(spec, images)
            except ConceptDataError as e:
                yield TrainedConcept(spec, None, error=str(e))
            except OSError as e:  # storage still failing after retries: worth another attempt
                yield TrainedConcept(spec, None, error=f"transient: storage error: {e!r}")
            try:
                entry = self.inbox.get_nowait()
            except queue.Empty:
                entry = None

    def _finish(self, request: dict[str, Any], trained: TrainedConcept) -> dict[str, Any]:
        spec = trained.spec
        images = self.images.pop(spec.concept_id, None)
        base = {"concept_id": spec.concept_id, "token": spec.placeholder_token, "worker": self.name,
                "attempts": request["attempt"], "seconds": round(trained.seconds, 3)}
        if trained.error is not None:
            return {**base, "status": "failed", "error": trained.error,
                    "retryable": trained.error.startswith("transient:")}
        concept = EvalConcept(spec.concept_id, spec.placeholder_token, trained.vectors, spec.learnable_property,
                              spec.eval_prompts, images)
        drawn = self.evaluator.run([concept])[0]
        try:
            record = outputs.write_concept(
                self.setup.output, trained, fingerprint=request["fingerprint"], model_info=self.model.info,
                worker=self.name, attempts=request["attempt"], extra_files=drawn.files, metrics=drawn.summary,
                eval_prompts=self.evaluator.prompts(concept),
                storage_options=self.setup.storage_options,
            )
        except OSError as e:  # storage failing after retries: the driver may try again
            return {**base, "status": "failed", "error": f"transient: could not write outputs: {e!r}",
                    "retryable": True}
        return {**record, "error": None, "retryable": False}


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


class EvalWorker:
    """Ray actor body for ``jobs/evaluate.py``: one model and pipeline, concepts drawn in mixed batches."""

    def __init__(self, setup: EvalSetup) -> None:
        self.setup = setup
        self.model = load_model(setup)
        samples = SampleConfig(**setup.samples)
        self.evaluator = Evaluator(self.model, samples, load_metrics(self.model, samples.metrics))
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def info(self) -> dict[str, Any]:
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
                token, vectors = read_embedding(spec.embedding_uri, spec.placeholder_token, storage_options)
                check_fits(self.model, vectors, spec.embedding_uri)
                training = (load_images(spec.concept_id, spec.images, self.model.resolution, storage_options)
                            if spec.images else None)
            except (ConceptDataError, ValueError, KeyError, FileNotFoundError) as e:
                results[spec.concept_id] = {**base, "status": "failed", "error": str(e)}
                continue
            except OSError as e:  # storage still failing after retries: worth another attempt
                results[spec.concept_id] = {**base, "status": "failed", "error": f"transient: {e!r}", "retryable": True}
                continue
            concepts.append(EvalConcept(spec.concept_id, token, vectors, spec.learnable_property,
                                        spec.eval_prompts, training))
            results[spec.concept_id] = {**base, "token": token}
        for concept, drawn in zip(concepts, self.evaluator.run(concepts)):
            folder = outputs.concept_dir(self.setup.output, concept.concept_id)
            files = {**drawn.files, **(training_files(concept.training) if concept.training is not None else {})}
            try:
                for name, data in files.items():
                    storage.write_bytes(storage.join(folder, name), data, storage_options)
            except OSError as e:
                results[concept.concept_id] |= {"status": "failed", "error": f"transient: {e!r}", "retryable": True}
                continue
            rows = [{"prompt": p, "seed": s, "image": f"concepts/{concept.concept_id}/{name}", "metrics": metrics}
                    for p, s, name, metrics in zip(drawn.prompts, drawn.seeds, drawn.names, drawn.per_image)]
            train = sorted(n for n in files if n.startswith("train/"))
            results[concept.concept_id] |= {"status": "succeeded", "error": None, "rows": rows,
                                            "metrics": drawn.summary, "property": concept.learnable_property,
                                            "train_images": [f"concepts/{concept.concept_id}/{n}" for n in train]}
        return [results[request["spec"]["concept_id"]] for request in requests]


def check_fits(model: BaseModel, vectors: list[torch.Tensor], uri: str) -> None:
    """A clear error when an embedding was made for another model shape (SDXL on SD 1.5, 768 on 1024)."""
    dims = [v.shape[-1] for v in vectors]
    if dims != model.embedding_dims:
        raise ValueError(f"{uri}: embedding dims {dims} do not fit this model's text encoders {model.embedding_dims}")
