"""The trainer actor: loads the base model once, trains concepts K at a time, draws their samples, writes outputs.

Calls to :meth:`TrainerWorker.train` (a list of :class:`~jobs.dispatch.Request`) only enqueue work and wait for
it. One background thread runs :func:`tinv.training.loop.train_concepts` over the queue, so slots freed by a
finished concept are refilled from any pending call (continuous batching across calls); finished concepts are
drawn from their live vectors and adapters, several in one batched generation (no round trip through files); a
second thread encodes and writes the files (``result.json`` last), through a bounded queue, so a slow bucket
never stalls a training step. Every result is a :class:`~jobs.dispatch.ConceptResult`; the driver never sees
tensors. A concept's failure is a result with its typed error, never an exception of the call: a call raises only
when the actor itself cannot work (its model did not load: :meth:`info` raises that error's type).
"""

from __future__ import annotations

import math
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from jobs.dispatch import ConceptResult, Request
from tinv import EMBEDDED_MODEL, storage
from tinv.errors import ConceptCrashedError, ConceptDataError, StorageUnavailableError, TinvError
from tinv.evaluation.evaluate import ConceptEval, EvalConcept, Evaluator
from tinv.evaluation.metrics import load_metrics
from tinv.evaluation.sampling import SampleConfig
from tinv.families.model import BaseModel, load_base_model
from tinv.files import outputs, webui
from tinv.plan import Resolved
from tinv.settings import TrainConfig
from tinv.training import classes
from tinv.training.concept import ConceptData, TrainedConcept
from tinv.training.loop import train_concepts
from tinv.training.pictures import load_pictures
from tinv.training.starts import load_start
from tinv.training.trainer import PackedTrainer

WRITE_QUEUE = 8
"""Finished concepts waiting for their files to be written; training waits when this many are pending."""
SAMPLE_WAIT = 8
"""Steps a finished concept may wait in its slot for others to finish, to be drawn with them. A concept's default
samples (8 images at 25 steps with guidance: 400 image passes) cost about as much as 8 training steps of a packed
batch of 16 (forward and backward: ~48 image passes each); drawing two at once saves about half of one's (the
batched generation's 2.17×, benchmarks/README.md), while a waiting slot idles one K-th of each step: 8 steps of
waiting cost 2 steps at K = 4. A reasoned bound, not a tuned one."""


@dataclass(frozen=True)
class WorkerSetup:
    """What every trainer actor needs: the model, the run config, and where outputs go."""

    model: str | None
    """Base model URI; None: the embedded toy-world model."""
    train: TrainConfig
    output: str
    storage_options: dict[str, Any] | None = None
    precision: str = "auto"
    base_precision: str = "auto"
    attention: str = "sdpa"
    gradient_checkpointing: bool = False
    threads: int = 1
    """torch intra-op threads (the actor's CPU share)."""
    samples: SampleConfig = field(default_factory=SampleConfig)
    """How each concept's evaluation samples are drawn and scored."""
    export: tuple[str, ...] = ()
    """:attr:`tinv.files.catalog.PublishConfig.export`: extra layouts each concept's folder gets."""
    storage_retry_s: float = storage.RETRY_WINDOW_S
    """How long storage may fail transiently before a write counts as an outage (``--storage-retry-s``)."""


def load_model(setup: Any, gradient_checkpointing: bool = False) -> BaseModel:
    """The actor's base model (the embedded toy model when none is named), with the setup's threads."""
    torch.set_num_threads(max(1, setup.threads))
    return load_base_model(
        setup.model or str(EMBEDDED_MODEL), precision=setup.precision, base_precision=setup.base_precision,
        attention=setup.attention, gradient_checkpointing=gradient_checkpointing,
        storage_options=setup.storage_options,
    )


def worker_info(model: BaseModel, resolution: int, name: str) -> dict[str, Any]:
    """Identity of a loaded model and of the worker holding it (what ``info()`` returns)."""
    return {**model.info, "resolution": resolution, "dtype": str(model.dtype),
            "base_precision": model.base_precision, "device": str(model.device),
            "templates": model.templates_digest, "worker": name, "pid": os.getpid()}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Pending:
    """A concept in the actor: its request, the call waiting on it, and its pictures while a metric needs them."""

    request: Request
    future: Future
    images: torch.Tensor | None = None

    @property
    def settings(self) -> Resolved:
        return self.request.spec


class TrainerWorker:
    """Ray actor body (wrapped with ``ray.remote`` by the driver)."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup, self.name, self.load_error = setup, worker_name(), None
        storage.set_retry_window(setup.storage_retry_s)
        began = time.monotonic()
        try:
            self.cfg = setup.train
            self.start, _ = load_start(self.cfg.init, setup.storage_options)  # the driver checked its base model
            self.model = load_model(setup, setup.gradient_checkpointing)
        except Exception as e:  # noqa: BLE001 — kept for info(): Ray drops a constructor's exception type
            self.load_error = e
            return
        print(f"[tinv] {self.name}: model loaded in {time.monotonic() - began:.1f} s ({self.model.dtype}, "
              f"{self.model.device})", file=sys.stderr, flush=True)  # a log line: stdout is a command's output
        self.resolution = PackedTrainer(self.model, self.cfg).resolution
        self.evaluator = Evaluator(self.model, setup.samples, load_metrics(self.model, setup.samples.metrics))
        self.steps_taken = 0
        self.inbox: queue.Queue[Pending] = queue.Queue()
        self.outbox: queue.Queue[tuple[Pending, TrainedConcept]] = queue.Queue(WRITE_QUEUE)
        self.waiting: dict[str, Pending] = {}
        self.unwritten: dict[tuple[str, str], TrainedConcept] = {}
        """Trained concepts whose files storage would not take (an outage): (concept id, fingerprint) → the result,
        kept to be written when the driver hands them back, never trained again."""
        self.model_lock = threading.Lock()
        """Held while the model is in use (training, drawing class pictures): Ray runs an actor's calls in
        threads at once, and a spliced text encoder or a routed denoiser is one caller's at a time."""
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

    def train(self, requests: list[Request]) -> list[ConceptResult]:
        """Train concepts (each request's spec a :class:`tinv.plan.Resolved`); one result per request, in order."""
        pending = [Pending(r, Future()) for r in requests]
        for p in pending:
            trained = self.unwritten.pop((p.settings.concept_id, p.request.fingerprint), None)
            if trained is not None:  # trained already: only its files are still to write
                self.outbox.put((p, trained))
            else:
                self.inbox.put(p)
        return [p.future.result() for p in pending]

    # -- the training thread -------------------------------------------------------------
    @property
    def sample_group(self) -> int:
        """Finished concepts drawn together: as many as fill one generation batch."""
        per_concept = max(1, self.evaluator.images_per_concept())
        return max(1, math.ceil(self.setup.samples.sample_batch_size / per_concept))

    def _loop(self) -> None:
        torch.set_num_threads(max(1, self.setup.threads))  # per thread under OpenMP: set it where we compute
        while True:
            first = self.inbox.get()  # block until there is work, then train until the queue runs dry
            try:
                with self.model_lock:
                    for trained in train_concepts(self.model, self._feed(first), self.cfg, self._stepped, self.start,
                                                  self._draw, self.sample_group, SAMPLE_WAIT):
                        self._finish(self.waiting.pop(trained.spec.concept_id), trained)
            except Exception as e:  # noqa: BLE001 — the trainer itself broke: each waiting concept may retry
                for p in self.waiting.values():
                    cid = p.settings.concept_id
                    p.future.set_result(self._failed(p, ConceptCrashedError(cid, f"the trainer crashed: {e!r}")))
                self.waiting.clear()

    def _stepped(self, info: Any) -> None:
        self.steps_taken += 1

    def _feed(self, first: Pending) -> Iterator[ConceptData | TrainedConcept]:
        """Decode each queued concept when a slot asks for it; a bad one comes out as its error."""
        entry: Pending | None = first
        while entry is not None:
            settings = entry.settings
            spec = settings.spec
            self.waiting[spec.concept_id] = entry
            try:
                outputs.clear_result(self.setup.output, spec.concept_id, self.setup.storage_options)
                step = self.model.family.pixel_multiple(self.model) if self.cfg.aspect_buckets else None
                images, framed = load_pictures(spec, self.resolution, step, self.setup.storage_options)
                if self.evaluator.needs_training_pictures:
                    entry.images = images
                yield ConceptData(spec, images, *self._class_pictures(settings), framed=framed, settings=settings)
            except ConceptDataError as e:
                yield TrainedConcept(spec, None, failure=e)
            except StorageUnavailableError as e:  # an outage, not the concept's fault
                yield TrainedConcept(spec, None, failure=e)
            except OSError as e:  # a permanent storage error on its data (what is not its pictures'): it fails
                yield TrainedConcept(spec, None, failure=ConceptDataError(spec.concept_id, f"storage error: {e!r}"))
            try:
                entry = self.inbox.get_nowait()
            except queue.Empty:
                entry = None

    def _class_pictures(self, settings: Resolved) -> tuple[torch.Tensor | None, tuple[str, ...]]:
        """Prior preservation: the class pictures the driver had drawn before training began, of every class
        prompt, and each one's prompt."""
        prompts, spec = settings.drawn_class_prompts, settings.spec
        if not prompts:
            return None, ()
        info = worker_info(self.model, self.resolution, self.name)
        sets = [classes.class_set(p, self.cfg, info) for p in prompts]
        for cls in sets:
            if not classes.is_done(self.setup.output, cls, self.setup.storage_options):
                raise ConceptDataError(spec.concept_id, f"no class pictures of {cls.prompt!r} were drawn")
        pictures = [classes.load(self.setup.output, cls, self.resolution, self.setup.storage_options) for cls in sets]
        return torch.cat(pictures), tuple(cls.prompt for cls, p in zip(sets, pictures) for _ in range(len(p)))

    def _draw(self, trainer: PackedTrainer, slots: list[int]) -> list[ConceptEval]:
        """The finished concepts in ``slots``: their samples from the live vectors and adapters, batched across
        them, and their metrics."""
        concepts = []
        for s in slots:
            spec = trainer.slots[s].spec
            images = self.waiting[spec.concept_id].images
            concepts.append(EvalConcept(spec.concept_id, spec.placeholder_token, None, spec.learnable_property,
                                        spec.eval_prompts, images))
        return self.evaluator.run(concepts, live=lambda requests, **how: trainer.draw(slots, requests, **how))

    def draw_classes(self, requests: list[Request]) -> list[ConceptResult]:
        """Draw class sets (each request's spec a :class:`tinv.training.classes.ClassSet`) with the base model, in
        batches across classes, before any training; one result per request (a failure is that class's alone)."""
        torch.set_num_threads(max(1, self.setup.threads))
        sets = [r.spec for r in requests]
        try:
            with self.model_lock:  # two calls at once would splice the one text encoder twice
                classes.generate(self.model, sets, self.setup.output, self.setup.samples.sample_batch_size,
                                 self.setup.storage_options)
        except StorageUnavailableError as e:  # an outage: the driver stops or hands them out again
            error: Exception = e
        except Exception as e:  # noqa: BLE001 — these classes fail; their concepts are told why
            error = e
        else:
            return [ConceptResult(c.key, "succeeded", c.prompt, attempts=r.attempt, worker=self.name)
                    for c, r in zip(sets, requests)]
        return [ConceptResult.failed(c.key, c.prompt, error, r.attempt, self.name) for c, r in zip(sets, requests)]

    def _finish(self, pending: Pending, trained: TrainedConcept) -> None:
        """A failed concept's result now; a trained one (with its samples) handed to the writer."""
        if trained.failure is not None:
            pending.future.set_result(self._failed(pending, trained.failure, trained.seconds))
            return
        self.outbox.put((pending, trained))  # waits while WRITE_QUEUE are pending

    def _failed(self, pending: Pending, failure: TinvError, seconds: float = 0.0) -> ConceptResult:
        spec = pending.settings.spec
        return ConceptResult.failed(spec.concept_id, spec.placeholder_token, failure, pending.request.attempt,
                                    self.name, round(seconds, 3))

    # -- the writer thread ---------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            pending, trained = self.outbox.get()
            drawn: ConceptEval = trained.samples
            try:
                record = outputs.write_concept(
                    self.setup.output, trained, self.model.family, fingerprint=pending.request.fingerprint,
                    model_info=self.model.info, worker=self.name, attempts=pending.request.attempt,
                    extra_files=drawn.files(), metrics=drawn.summary, eval_prompts=drawn.eval_prompts,
                    export=tuple(self.setup.export), storage_options=self.setup.storage_options,
                )
            except StorageUnavailableError as e:  # an outage: kept to be written again, not trained again
                self.unwritten[(trained.spec.concept_id, pending.request.fingerprint)] = trained
                pending.future.set_result(self._failed(pending, e, trained.seconds))
            except OSError as e:  # a permanent storage error writing this concept: it alone fails
                failure: TinvError = ConceptCrashedError(trained.spec.concept_id, f"writing outputs: {e!r}")
                pending.future.set_result(self._failed(pending, failure, trained.seconds))
            except Exception as e:  # noqa: BLE001 — encoding or writing this concept raised: it alone fails
                failure = ConceptCrashedError(trained.spec.concept_id, f"writing outputs: {e!r}")
                pending.future.set_result(self._failed(pending, failure, trained.seconds))
            else:
                pending.future.set_result(ConceptResult(record["concept_id"], "succeeded", record["token"],
                                                        attempts=pending.request.attempt, worker=self.name,
                                                        seconds=record["seconds"], record=record))
