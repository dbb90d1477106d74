"""Dynamic dispatch of concepts to trainer actors, surviving dead and hung actors.

The driver keeps up to ``calls_in_flight`` calls queued on every actor, each of at most K
concepts, so an actor's slots are refilled as soon as a concept finishes and a slow concept
never holds the others back. When an actor dies (``RayActorError``: node lost, preempted,
OOM-killed) or returns nothing for ``concept_timeout_s`` (hung), it is killed and replaced, and
the concepts it held are re-queued, each charged at most ``max_attempts`` attempts in all.

A loss shared by several concepts (an actor that held more than one, a call of several that
raised) cannot be blamed on any one of them, so it is charged to none: each is re-queued as a
*suspect* that runs alone on an otherwise idle actor, where the next loss is its own. One bad
concept therefore never uses up its neighbours' attempts, and a concept is let off at most once.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from tinv.errors import AttemptsExhaustedError, StorageUnavailableError, TinvError, TransientError

log = logging.getLogger("tinv.dispatch")


class InfrastructureError(TinvError, RuntimeError):
    """The cluster cannot run the job (actors keep dying, the model never loads)."""


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


@dataclass(frozen=True)
class Request:
    """What an actor receives for a task: its spec (a concept's resolved settings, a class set, or an evaluation
    spec), the config fingerprint, and the attempt number (1 on the first)."""

    spec: Any
    fingerprint: str
    attempt: int


@dataclass(frozen=True)
class ConceptResult:
    """What an actor's call gives back for a concept (or a class set), and what the driver accounts: its status
    (``succeeded``, ``failed``, ``skipped``), the typed error of a failure (:mod:`tinv.errors`), and for a concept
    with files its ``result.json`` record."""

    concept_id: str
    status: str
    token: str | None = None
    error: str | None = None
    error_type: str | None = None
    retryable: bool = False
    """Another attempt may succeed: the dispatcher re-queues it (charged one attempt) instead of reporting it."""
    attempts: int = 0
    worker: str | None = None
    seconds: float | None = None
    record: dict[str, Any] | None = None
    """The concept's ``result.json`` (succeeded, skipped): files, hashes, metrics, base model."""
    outage: bool = False
    """Storage was down for the whole retry window: not the concept's failure. The dispatcher hands it back to
    the actor that holds its trained result (to upload, not retrain) without charging an attempt."""

    @classmethod
    def failed(cls, concept_id: str, token: str | None, error: BaseException, attempts: int = 0,
               worker: str | None = None, seconds: float | None = None) -> ConceptResult:
        """A failure with ``error``'s message, type and whether it is worth another attempt."""
        return cls(concept_id, "failed", token, str(error), type(error).__name__,
                   bool(getattr(error, "retryable", False)), attempts, worker, seconds,
                   outage=isinstance(error, StorageUnavailableError))


@dataclass(frozen=True)
class DispatchConfig:
    """How the driver hands concepts to actors and when it gives up on an actor or a concept."""

    num_actors: int
    """Actors kept alive (one per GPU on a GPU cluster)."""
    concepts_per_actor: int
    """K: most concepts in one call to an actor (a trainer's slot count)."""
    calls_in_flight: int = 2
    """Calls queued per actor, so its slots refill without waiting for the driver."""
    max_attempts: int = 3
    """Times a concept may be handed to an actor before it fails (dead actors, transient errors)."""
    concept_timeout_s: float = 3600.0
    """An actor that has work but returns nothing for this long is hung: it is killed and replaced."""
    load_timeout_s: float = 1800.0
    """Longest time an actor may take to start and load the model."""
    max_replacements: int | None = None
    """Actors replaced before giving up with :class:`InfrastructureError`; default 2 × num_actors × max_attempts."""


@dataclass
class Task:
    spec: Any
    """What the actor works on, with ``concept_id`` and ``placeholder_token``: a concept's resolved settings
    (:class:`tinv.plan.Resolved`), a class set, or the evaluator's spec."""
    fingerprint: str = ""
    attempts: int = 0
    """Times handed to an actor (the ``attempt`` the actor sees and reports)."""
    charged: int = 0
    """Failed attempts counted against ``max_attempts``: those that were this task's own."""
    suspect: bool = False
    """Lost with others: from now on it runs alone, so its next loss is its own."""
    last_error: str = ""

    def request(self) -> Request:
        """What the actor receives for this task."""
        return Request(self.spec, self.fingerprint, self.attempts)


@dataclass
class _Actor:
    handle: Any
    info_ref: Any
    started: float
    info: dict[str, Any] | None = None
    calls: dict[Any, list[Task]] = field(default_factory=dict)
    last_progress: float = 0.0


class Dispatcher:
    """Owns the actors; ``run`` hands out tasks and reports each concept's result once."""

    def __init__(
        self, make_actor: Callable[[], Any], cfg: DispatchConfig, on_result: Callable[[Any], None],
        method: str = "train", failure: Callable[..., Any] = ConceptResult.failed,
        probe: Callable[[], None] | None = None, stop: Callable[[], str | None] | None = None,
    ) -> None:
        """``method``: the actor method that takes a list of :class:`Request` and returns one result per request
        (with ``concept_id``, ``retryable``, ``error``, ``worker``); ``failure``: makes the result of a concept
        whose attempts ran out, as :meth:`ConceptResult.failed` does; ``probe``: checks that storage answers
        (raising :class:`~tinv.errors.TransientError` when it does not), asked when an actor reports an outage;
        ``stop``: why the run must stop now (its lease was taken), or None."""
        self.make_actor, self.cfg, self.on_result, self.method = make_actor, cfg, on_result, method
        self.failure, self.probe, self.stop = failure, probe, stop
        self.outages = 0
        self.max_replacements = cfg.max_replacements or 2 * cfg.num_actors * cfg.max_attempts
        self.replaced = 0
        self.actors = [self._spawn() for _ in range(cfg.num_actors)]
        self.queue: deque[Task] = deque()

    def _spawn(self) -> _Actor:
        handle = self.make_actor()
        return _Actor(handle, handle.info.remote(), time.monotonic())

    def wait_ready(self) -> list[dict[str, Any]]:
        """Block until every actor has loaded the model; return their infos (raises on failure)."""
        try:
            infos = ray.get([a.info_ref for a in self.actors], timeout=self.cfg.load_timeout_s)
        except GetTimeoutError as e:
            raise InfrastructureError(f"actors did not load the model within {self.cfg.load_timeout_s} s") from e
        now = time.monotonic()
        for actor, info in zip(self.actors, infos):
            actor.info, actor.info_ref, actor.last_progress = info, None, now
        return infos

    def ask(self, method: str, *args: Any) -> Any:
        """One actor's answer to ``method(*args)``: a question about the model every actor holds."""
        try:
            return ray.get(getattr(self.actors[0].handle, method).remote(*args), timeout=self.cfg.load_timeout_s)
        except (RayActorError, GetTimeoutError) as e:
            raise InfrastructureError(f"an actor did not answer {method}: {_first_line(e)}") from e

    # -- the loop ------------------------------------------------------------------------
    def run(self, tasks: list[Task], method: str | None = None, on_result: Callable[[Any], None] | None = None
            ) -> None:
        """Run ``tasks`` to their results; ``method`` and ``on_result`` replace the dispatcher's own for this
        run (the train job draws its class pictures, then trains, on the same actors)."""
        default = self.method, self.on_result
        self.method, self.on_result = method or self.method, on_result or self.on_result
        try:
            self._loop(tasks)
        finally:
            self.method, self.on_result = default

    def _loop(self, tasks: list[Task]) -> None:
        self.queue.extend(tasks)
        while self.queue or any(a.calls for a in self.actors):
            if self.stop is not None and (why := self.stop()):
                raise InfrastructureError(f"stopped: {why}")
            for actor in list(self.actors):
                self._feed(actor)
            refs = [r for a in self.actors for r in [*a.calls, a.info_ref] if r is not None]
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                self._collect(ref)
            self._check_deadlines()

    def _chunk(self) -> int:
        share = math.ceil(len(self.queue) / (len(self.actors) * self.cfg.calls_in_flight))
        return max(1, min(self.cfg.concepts_per_actor, share))

    def _next_chunk(self, actor: _Actor) -> list[Task]:
        """What ``actor`` takes next: a suspect alone when it is idle; otherwise, unless it runs a
        suspect or one waits at the queue's head (busy actors drain so it finds an idle one), a chunk."""
        if not self.queue or len(actor.calls) >= self.cfg.calls_in_flight:
            return []
        if self.queue[0].suspect:
            return [self.queue.popleft()] if not actor.calls else []
        if any(t.suspect for chunk in actor.calls.values() for t in chunk):
            return []
        take = self._chunk()
        chunk = []
        while self.queue and len(chunk) < take and not self.queue[0].suspect:
            chunk.append(self.queue.popleft())
        return chunk

    def _feed(self, actor: _Actor) -> None:
        while chunk := self._next_chunk(actor):
            for task in chunk:
                task.attempts += 1
            if not actor.calls:
                actor.last_progress = time.monotonic()
            call = getattr(actor.handle, self.method).remote([t.request() for t in chunk])
            actor.calls[call] = chunk

    def _owner(self, ref: Any) -> _Actor | None:
        return next((a for a in self.actors if ref in a.calls or ref == a.info_ref), None)

    def _collect(self, ref: Any) -> None:
        actor = self._owner(ref)
        if actor is None:  # its actor was already replaced in this round
            return
        try:
            value = ray.get(ref)
        except RayTaskError as e:  # the call raised, the actor lives: its concepts go round again
            if ref == actor.info_ref:
                self._replace(actor, f"the replacement could not load the model: {_first_line(e.cause or e)}")
                return
            self._lost(actor.calls.pop(ref), f"the call raised {_first_line(e.cause or e)}",
                       (actor.info or {}).get("worker"))
            return
        except RayActorError as e:  # the actor (or its node) is gone
            self._replace(actor, _first_line(e))
            return
        if ref == actor.info_ref:
            actor.info, actor.info_ref, actor.last_progress = value, None, time.monotonic()
            return
        tasks = actor.calls.pop(ref)
        actor.last_progress = time.monotonic()
        for task, result in zip(tasks, value):
            if getattr(result, "outage", False):
                self._outage(actor, task, result)
            elif result.retryable:
                self._retry(task, result.error or "transient error", result.worker)
            else:
                self.on_result(result)

    def _outage(self, actor: _Actor, task: Task, result: Any) -> None:
        """Storage was down for an actor's whole retry window: if it still is, the run stops
        (:class:`InfrastructureError`); else the task goes back to that actor, which holds the concept's trained
        result, to be written again, without charging an attempt."""
        self.outages += 1
        log.warning("storage outage while %s wrote %s: %s", result.worker, task.spec.concept_id, result.error)
        if self.probe is not None:
            try:
                self.probe()
            except TransientError as e:
                raise InfrastructureError(f"storage stayed unavailable past its retry window: {e}") from e
        task.last_error = result.error or "storage outage"
        call = getattr(actor.handle, self.method).remote([task.request()])
        actor.calls[call] = [task]

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for actor in list(self.actors):
            if actor.info is None and now - actor.started > self.cfg.load_timeout_s:
                self._replace(actor, f"actor did not load the model within {self.cfg.load_timeout_s} s")
            elif actor.info is not None and actor.calls and now - actor.last_progress > self.cfg.concept_timeout_s:
                self._replace(actor, f"actor hung: nothing finished within {self.cfg.concept_timeout_s} s")

    def _replace(self, actor: _Actor, reason: str) -> None:
        worker = (actor.info or {}).get("worker", "?")
        log.warning("replacing trainer actor %s: %s", worker, reason)
        ray.kill(actor.handle, no_restart=True)
        self.replaced += 1
        held = [t for chunk in actor.calls.values() for t in chunk]
        if self.replaced > self.max_replacements:
            raise InfrastructureError(f"{self.replaced} actors lost (last: {reason}); giving up")
        self.actors[self.actors.index(actor)] = self._spawn()
        self._lost(held, f"worker {worker} lost: {reason}", worker)

    def _lost(self, tasks: list[Task], reason: str, worker: str | None) -> None:
        """Re-queue tasks lost together: a lone task is charged; several are let off, as suspects."""
        shared = len(tasks) > 1
        for task in reversed(tasks):
            if shared and not task.suspect:
                task.suspect, task.last_error = True, reason
                log.warning("re-queueing %s to run alone (lost with %d others: %s)",
                            task.spec.concept_id, len(tasks) - 1, reason)
                self.queue.appendleft(task)
            else:
                self._retry(task, reason, worker)

    def _retry(self, task: Task, reason: str, worker: str | None) -> None:
        """Charge ``task`` one attempt; re-queue it, or report it failed once its attempts are spent."""
        task.last_error, task.charged = reason, task.charged + 1
        if task.charged < self.cfg.max_attempts:
            log.warning("re-queueing %s (attempt %d failed: %s)", task.spec.concept_id, task.attempts, reason)
            self.queue.appendleft(task)
            return
        error = AttemptsExhaustedError(f"gave up after {task.charged} failed attempts; last: {reason}")
        self.on_result(self.failure(task.spec.concept_id, task.spec.placeholder_token, error, task.attempts, worker))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor.handle, no_restart=True)
