"""The trainer actor: loads the base model once, trains concepts K at a time, writes their outputs.

Calls to :meth:`TrainerWorker.train` (a list of concept items) only enqueue work and wait for
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

from tinv import outputs
from tinv.config import ConceptSpec, TrainConfig
from tinv.images import ConceptDataError, load_images
from tinv.models import load_base_model
from tinv.samples import SampleConfig, concept_sample_files
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
    """:class:`tinv.samples.SampleConfig` fields for each concept's evaluation samples."""


def spec_to_dict(spec: ConceptSpec) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in ConceptSpec.__dataclass_fields__}


def spec_from_dict(d: dict[str, Any]) -> ConceptSpec:
    return ConceptSpec(**{**d, "images": tuple(d["images"]), "eval_prompts": tuple(d["eval_prompts"])})


class TrainerWorker:
    """Ray actor body (wrapped with ``ray.remote`` by the driver)."""

    def __init__(self, setup: WorkerSetup) -> None:
        torch.set_num_threads(max(1, setup.threads))
        self.setup, self.cfg = setup, TrainConfig(**setup.train)
        uri = setup.model
        if uri is None:
            from tinv.demo import default_model

            uri = str(default_model())
        self.model = load_base_model(
            uri, precision=setup.precision, attention=setup.attention, storage_options=setup.storage_options
        )
        self.resolution = PackedTrainer(self.model, self.cfg).resolution
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.inbox: queue.Queue[tuple[dict, Future]] = queue.Queue()
        self.waiting: dict[str, tuple[dict, Future]] = {}
        threading.Thread(target=self._loop, name="tinv-trainer", daemon=True).start()

    def info(self) -> dict[str, Any]:
        """Identity of the loaded model and of this worker."""
        return {
            **self.model.info,
            "resolution": self.resolution,
            "dtype": str(self.model.dtype),
            "device": str(self.model.device),
            "worker": self.name,
            "pid": os.getpid(),
        }

    def train(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Train concepts ``{"spec", "fingerprint", "attempt"}``; one result dict per item, same order."""
        futures = []
        for item in items:
            future: Future = Future()
            self.inbox.put((item, future))
            futures.append(future)
        return [f.result() for f in futures]

    # -- the training thread -------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_num_threads(max(1, self.setup.threads))  # per thread under OpenMP: set it where we compute
        while True:
            first = self.inbox.get()  # block until there is work, then train until the queue runs dry
            try:
                for trained in train_concepts(self.model, self._feed(first), self.cfg):
                    item, future = self.waiting.pop(trained.spec.concept_id)
                    future.set_result(self._finish(item, trained))
            except BaseException as e:  # a broken trainer fails every waiting call; the driver replaces us
                message = f"trainer crashed: {e!r}\n{traceback.format_exc()}"
                for _, future in self.waiting.values():
                    future.set_exception(RuntimeError(message))
                self.waiting.clear()

    def _feed(self, first: tuple[dict, Future]) -> Iterator[ConceptData | TrainedConcept]:
        """Decode each queued concept when a slot asks for it; a bad one comes out as an error."""
        entry: tuple[dict, Future] | None = first
        while entry is not None:
            item = entry[0]
            spec = spec_from_dict(item["spec"])
            self.waiting[spec.concept_id] = entry
            try:
                outputs.clear_result(self.setup.output, spec.concept_id, self.setup.storage_options)
                images = load_images(spec.concept_id, spec.images, self.resolution, self.setup.storage_options)
                yield ConceptData(spec, images)
            except ConceptDataError as e:
                yield TrainedConcept(spec, None, error=str(e))
            except OSError as e:  # storage still failing after retries: worth another attempt
                yield TrainedConcept(spec, None, error=f"transient: storage error: {e!r}")
            try:
                entry = self.inbox.get_nowait()
            except queue.Empty:
                entry = None

    def _finish(self, item: dict[str, Any], trained: TrainedConcept) -> dict[str, Any]:
        spec = trained.spec
        base = {"concept_id": spec.concept_id, "token": spec.placeholder_token, "worker": self.name,
                "attempts": item["attempt"], "seconds": round(trained.seconds, 3)}
        if trained.error is not None:
            return {**base, "status": "failed", "error": trained.error,
                    "retryable": trained.error.startswith("transient:")}
        prompts = spec.eval_prompts or self.model.eval_prompts[spec.learnable_property]
        samples = concept_sample_files(self.model, prompts, trained.vectors, SampleConfig(**(self.setup.samples or {})))
        try:
            record = outputs.write_concept(
                self.setup.output, trained, fingerprint=item["fingerprint"], model_info=self.model.info,
                worker=self.name, attempts=item["attempt"], extra_files=samples,
                storage_options=self.setup.storage_options,
            )
        except OSError as e:  # storage failing after retries: the driver may try again
            return {**base, "status": "failed", "error": f"transient: could not write outputs: {e!r}",
                    "retryable": True}
        return {**record, "error": None, "retryable": False}
