"""The trainer actor: loads the base model once, trains concepts K at a time, writes their outputs.

Calls to :meth:`TrainerWorker.train` (a list of concept requests) only enqueue work and wait for
it. One background thread runs :func:`tinv.train.train_concepts` over the queue, so slots freed by
a finished concept are refilled from any pending call (continuous batching across calls), and draws
each finished concept's samples with the model it holds; a second thread encodes and writes the
files (``result.json`` last), through a bounded queue, so a slow bucket never stalls a training step.
Every result is a small dict; the driver never sees tensors. A concept's failure is a result with
its typed error (:func:`tinv.errors.describe`), never an exception of the call: a call raises only
when the actor itself cannot work (its model did not load: :meth:`info` raises that error's type).
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from tinv import buckets, classes, outputs, webui
from tinv.config import ConceptSpec, TrainConfig
from tinv.embedded import EMBEDDED_MODEL
from tinv.errors import ConceptCrashedError, TinvError, TransientError, describe
from tinv.evaluate import ConceptEval, EvalConcept, Evaluator
from tinv.images import ConceptDataError, load_pictures
from tinv.metrics import load_metrics
from tinv.models import BaseModel, load_base_model
from tinv.resolved import resolve
from tinv.samples import SampleConfig
from tinv.starts import load_start
from tinv.train import ConceptData, PackedTrainer, StepInfo, TrainedConcept, train_concepts

WRITE_QUEUE = 8
"""Finished concepts waiting for their files to be written; training waits when this many are pending."""


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
    gradient_checkpointing: bool = False
    threads: int = 1
    """torch intra-op threads (the actor's CPU share)."""
    samples: dict[str, Any] | None = None
    """:class:`tinv.samples.SampleConfig` fields for each concept's evaluation samples and metrics."""
    export: tuple[str, ...] = ()
    """:attr:`tinv.catalog.PublishConfig.export`: extra layouts each concept's folder gets."""


def load_model(setup: Any, gradient_checkpointing: bool = False) -> BaseModel:
    """The actor's base model (the embedded toy model when none is named), with the setup's threads."""
    torch.set_num_threads(max(1, setup.threads))
    return load_base_model(
        setup.model or str(EMBEDDED_MODEL), precision=setup.precision, attention=setup.attention,
        gradient_checkpointing=gradient_checkpointing, storage_options=setup.storage_options,
    )


def worker_info(model: BaseModel, resolution: int, name: str) -> dict[str, Any]:
    """Identity of a loaded model and of the worker holding it (what ``info()`` returns)."""
    return {**model.info, "resolution": resolution, "dtype": str(model.dtype), "device": str(model.device),
            "templates": model.templates_digest, "worker": name, "pid": os.getpid()}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def spec_from_dict(d: dict[str, Any]) -> ConceptSpec:
    lists = ("images", "eval_prompts", "captions")
    return ConceptSpec(**{**d, **{k: tuple(d.get(k, ())) for k in lists}})


class TrainerWorker:
    """Ray actor body (wrapped with ``ray.remote`` by the driver)."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup, self.name, self.load_error = setup, worker_name(), None
        began = time.monotonic()
        try:
            self.cfg = TrainConfig(**setup.train)
            self.start, _ = load_start(self.cfg.init, setup.storage_options)  # the driver checked its base model
            self.model = load_model(setup, setup.gradient_checkpointing)
        except Exception as e:  # noqa: BLE001 — kept for info(): Ray drops a constructor's exception type
            self.load_error = e
            return
        print(f"[tinv] {self.name}: model loaded in {time.monotonic() - began:.1f} s ({self.model.dtype}, "
              f"{self.model.device})", file=sys.stderr, flush=True)  # a log line: stdout is a command's output
        self.resolution = PackedTrainer(self.model, self.cfg).resolution
        samples = SampleConfig(**(setup.samples or {}))
        self.evaluator = Evaluator(self.model, samples, load_metrics(self.model, samples.metrics))
        self.images: dict[str, torch.Tensor] = {}  # training pictures of concepts in flight, when a metric reads them
        self.steps_taken = 0
        self.inbox: queue.Queue[tuple[dict, Future]] = queue.Queue()
        self.outbox: queue.Queue[tuple[dict, Future, TrainedConcept, ConceptEval, list[str]]] = queue.Queue(WRITE_QUEUE)
        self.waiting: dict[str, tuple[dict, Future]] = {}
        self.model_lock = threading.Lock()
        """Held while the model is in use (training, drawing class pictures): Ray runs an actor's calls in
        threads at once, and a spliced text encoder or a routed UNet is one caller's at a time."""
        threading.Thread(target=self._loop, name="tinv-trainer", daemon=True).start()
        threading.Thread(target=self._write_loop, name="tinv-writer", daemon=True).start()

    def info(self) -> dict[str, Any]:
        """Identity of the loaded model and of this worker; raises the load's own error if it failed."""
        if self.load_error is not None:
            raise self.load_error
        return worker_info(self.model, self.resolution, self.name)

    def one_token_words(self, words: list[str]) -> list[str]:
        """The ``words`` (lowercased) that one of the model's tokenizers reads as a single token."""
        with self.model_lock:
            return sorted(webui.one_token_words(self.model.tokenizers, words))

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
                with self.model_lock:
                    for trained in train_concepts(self.model, self._feed(first), self.cfg, self._stepped, self.start):
                        request, future = self.waiting.pop(trained.spec.concept_id)
                        self._finish(request, future, trained)
            except Exception as e:  # noqa: BLE001 — the trainer itself broke: each waiting concept may retry
                for request, future in self.waiting.values():
                    spec = spec_from_dict(request["spec"])
                    future.set_result(self._failed(request, spec, ConceptCrashedError(spec.concept_id,
                                                                                      f"the trainer crashed: {e!r}")))
                self.waiting.clear()

    def _stepped(self, info: StepInfo) -> None:
        self.steps_taken += 1

    def _feed(self, first: tuple[dict, Future]) -> Iterator[ConceptData | TrainedConcept]:
        """Decode each queued concept when a slot asks for it; a bad one comes out as its error."""
        entry: tuple[dict, Future] | None = first
        while entry is not None:
            spec = spec_from_dict(entry[0]["spec"])
            self.waiting[spec.concept_id] = entry
            try:
                outputs.clear_result(self.setup.output, spec.concept_id, self.setup.storage_options)
                step = buckets.step_of(self.model) if self.cfg.aspect_buckets else None
                images, framed = load_pictures(spec, self.resolution, step, self.setup.storage_options)
                if self.evaluator.needs_training_pictures:
                    self.images[spec.concept_id] = images
                yield ConceptData(spec, images, *self._class_pictures(spec), framed=framed)
            except ConceptDataError as e:
                yield TrainedConcept(spec, None, failure=e)
            except OSError as e:  # storage still failing after its own retries: worth another attempt
                yield TrainedConcept(spec, None, failure=TransientError(f"storage error: {e!r}"))
            try:
                entry = self.inbox.get_nowait()
            except queue.Empty:
                entry = None

    def _class_pictures(self, spec: ConceptSpec) -> tuple[torch.Tensor | None, tuple[str, ...]]:
        """Prior preservation: the class pictures the driver had drawn before training began, of every class
        prompt, and each one's prompt."""
        prompts = resolve(spec, self.cfg).drawn_class_prompts
        if not prompts:
            return None, ()
        info = worker_info(self.model, self.resolution, self.name)
        sets = [classes.class_set(p, self.cfg, info) for p in prompts]
        for cls in sets:
            if not classes.is_done(self.setup.output, cls, self.setup.storage_options):
                raise ConceptDataError(spec.concept_id, f"no class pictures of {cls.prompt!r} were drawn")
        pictures = [classes.load(self.setup.output, cls, self.resolution, self.setup.storage_options) for cls in sets]
        return torch.cat(pictures), tuple(cls.prompt for cls, p in zip(sets, pictures) for _ in range(len(p)))

    def draw_classes(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Draw class sets ``{"spec": ClassSet fields, "attempt"}`` with the base model, in batches across
        classes, before any training; one result per request (a failure is that class's alone)."""
        torch.set_num_threads(max(1, self.setup.threads))
        sets = [classes.ClassSet(**r["spec"]) for r in requests]
        base = [{"concept_id": c.key, "token": c.prompt, "worker": self.name, "attempts": r["attempt"]}
                for c, r in zip(sets, requests)]
        try:
            with self.model_lock:  # two calls at once would splice the one text encoder twice
                classes.generate(self.model, sets, self.setup.output, self.evaluator.cfg.sample_batch_size,
                                 self.setup.storage_options)
        except OSError as e:  # storage still failing after its own retries: worth another attempt
            return [{**b, "status": "failed", **describe(TransientError(f"could not write class pictures: {e!r}"))}
                    for b in base]
        except Exception as e:  # noqa: BLE001 — these classes fail; their concepts are told why
            return [{**b, "status": "failed", "error": f"drawing class pictures: {e!r}", "error_type": type(e).__name__,
                     "retryable": False} for b in base]
        return [{**b, "status": "succeeded", "error": None, "retryable": False} for b in base]

    def _finish(self, request: dict[str, Any], future: Future, trained: TrainedConcept) -> None:
        """A failed concept's result now; a trained one's samples drawn here, its files handed to the writer."""
        spec = trained.spec
        images = self.images.pop(spec.concept_id, None)
        if trained.failure is not None:
            future.set_result(self._failed(request, spec, trained.failure, trained.seconds))
            return
        concept = EvalConcept(spec.concept_id, spec.placeholder_token, trained.vectors, spec.learnable_property,
                              spec.eval_prompts, images, lora=trained.lora,
                              text_lora=trained.text_lora)
        try:
            drawn = self.evaluator.run([concept])[0]
        except Exception as e:  # noqa: BLE001 — drawing this concept's samples raised: it alone fails
            future.set_result(self._failed(request, spec, ConceptCrashedError(spec.concept_id,
                                                                              f"drawing samples: {e!r}")))
            return
        prompts = self.evaluator.prompts(concept)
        self.outbox.put((request, future, trained, drawn, prompts))  # waits while WRITE_QUEUE are pending

    def _failed(self, request: dict, spec: ConceptSpec, failure: TinvError, seconds: float = 0.0) -> dict[str, Any]:
        return {"concept_id": spec.concept_id, "token": spec.placeholder_token, "worker": self.name,
                "attempts": request["attempt"], "seconds": round(seconds, 3), "status": "failed", **describe(failure)}

    # -- the writer thread ---------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            request, future, trained, drawn, prompts = self.outbox.get()
            try:
                record = outputs.write_concept(
                    self.setup.output, trained, fingerprint=request["fingerprint"], model_info=self.model.info,
                    worker=self.name, attempts=request["attempt"], extra_files=drawn.files(), metrics=drawn.summary,
                    eval_prompts=prompts, export=tuple(self.setup.export), storage_options=self.setup.storage_options,
                )
            except OSError as e:  # storage failing after its own retries: the driver may try again
                failure: TinvError = TransientError(f"could not write outputs: {e!r}")
                future.set_result(self._failed(request, trained.spec, failure, trained.seconds))
            except Exception as e:  # noqa: BLE001 — encoding or writing this concept raised: it alone fails
                failure = ConceptCrashedError(trained.spec.concept_id, f"writing outputs: {e!r}")
                future.set_result(self._failed(request, trained.spec, failure, trained.seconds))
            else:
                future.set_result({**record, "error": None, "error_type": None, "retryable": False})
