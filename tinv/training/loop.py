"""Packed training with continuous batching (Textual Inversion, Gal et al. 2022, arXiv 2208.01618; its LoRA and
pivotal forms, Ruiz et al. 2022, arXiv 2208.12242).

K concept slots of a :class:`~tinv.training.trainer.PackedTrainer` train at once; a concept that reaches its
step count (or whose loss flattens, DVAR) is emitted, with its samples drawn from its live vectors and adapter
together with the others that finished about then, and its slot is refilled with the next. Failures
stay with their concept: a concept whose data is bad, whose loss or vectors become non-finite, whose own
computation raises, or that does not fit in memory even alone comes out with its typed error
(:mod:`tinv.errors`), and every other concept ends with the vectors it would have had without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tinv.errors import ConceptCrashedError, ConceptError, ConceptOutOfMemoryError
from tinv.families.model import BaseModel
from tinv.settings import TrainConfig
from tinv.training.concept import ConceptData, TrainedConcept
from tinv.training.starts import Start
from tinv.training.trainer import PackedTrainer


@dataclass
class StepInfo:
    """Passed to the progress callback after every step."""

    step: int
    losses: dict[str, float]
    """concept_id → this step's loss, for the concepts in the batch."""


class GuardedStep:
    """A trainer step that keeps each concept's failure its own.

    The active slots step together, in groups of at most ``group_size``. When a group's step raises,
    every slot's random stream is rewound and the group is taken again in parts: on out-of-memory in
    halves (and ``group_size`` stays halved, so later steps take smaller batches), on any other error one
    slot at a time, so the slot that raises alone is the one that fails. A slot that runs out of memory
    alone fails with :class:`ConceptOutOfMemoryError`. Packed equals solo, so the split gives the other
    slots exactly the step they would have taken.
    """

    def __init__(self, trainer: PackedTrainer) -> None:
        self.trainer = trainer
        self.group_size = len(trainer.slots)

    def __call__(self) -> tuple[dict[int, float], dict[int, ConceptError]]:
        active = self.trainer.active
        pending = [active[i : i + self.group_size] for i in range(0, len(active), self.group_size)]
        losses: dict[int, float] = {}
        failed: dict[int, ConceptError] = {}
        while pending:
            group = pending.pop(0)
            states = [self.trainer.slots[s].generator.get_state() for s in group]
            try:
                stepped, diverged = self.trainer.step(group)
                losses |= stepped
                failed |= diverged
            except torch.OutOfMemoryError as e:
                self._rewind(group, states)
                if len(group) == 1:
                    failed[group[0]] = ConceptOutOfMemoryError(self._id(group[0]), f"out of memory alone: {e}")
                else:
                    self.group_size = max(1, len(group) // 2)
                    pending[:0] = [group[i : i + self.group_size] for i in range(0, len(group), self.group_size)]
            except Exception as e:  # noqa: BLE001 — whichever concept raises, it must fail alone
                self._rewind(group, states)
                if len(group) == 1:
                    failed[group[0]] = ConceptCrashedError(self._id(group[0]), f"{type(e).__name__}: {e}")
                else:
                    pending[:0] = [[s] for s in group]
        self.trainer.step_count += 1
        return losses, failed

    def _id(self, s: int) -> str:
        return self.trainer.slots[s].spec.concept_id

    def _rewind(self, group: list[int], states: list[torch.Tensor]) -> None:
        """Undo a failed step: the slots' random streams as before it, no gradient left behind."""
        for s, state in zip(group, states):
            self.trainer.slots[s].generator.set_state(state)
            for p in self.trainer.slot_parameters(s):
                p.grad = None
        if self.trainer.model.device.type == "cuda":
            torch.cuda.empty_cache()


Sampler = Callable[[PackedTrainer, list[int]], list[Any]]
"""Draws the finished concepts in some of a trainer's slots from their live vectors and adapters, in one call
batched across them (:meth:`PackedTrainer.draw`); one result per slot, kept as its :attr:`TrainedConcept.samples`."""


def train_concepts(
    model: BaseModel,
    concepts: Iterable[ConceptData | TrainedConcept],
    cfg: TrainConfig,
    callback: Callable[[StepInfo], None] | None = None,
    start: Start | None = None,
    sampler: Sampler | None = None,
    sample_group: int = 1,
    sample_wait: int = 0,
) -> Iterator[TrainedConcept]:
    """Train every concept, K at a time, yielding each as it finishes (or fails).

    A concept finishes after its steps, or earlier when ``cfg.early_stop`` and DVAR says its
    loss has flattened (:meth:`PackedTrainer.flattened`). With a ``sampler``, a finished concept waits in its slot,
    its vectors and adapter live, until ``sample_group`` have finished, for at most ``sample_wait`` steps (a waiting
    slot does not train: the wait is bounded so that it costs less than drawing alone would), or until none is
    left training; then they are drawn together. A batch that raises is drawn again one concept at a time, so a
    concept whose drawing raises fails alone.

    ``concepts`` is pulled lazily, only when a slot frees up. An item that is already a
    :class:`TrainedConcept` (a concept whose data failed upstream) is passed through. A
    concept that fails (see the module's docstring) is yielded with its error and the others go on.
    ``start``: where new vectors start (:mod:`tinv.training.starts`; None: the initializer word).
    """
    trainer = PackedTrainer(model, cfg, start)
    step = GuardedStep(trainer)
    pending = iter(concepts)
    exhausted = False
    waiting: list[int] = []  # finished slots whose samples are not drawn yet
    since = 0  # steps the oldest of them has waited
    while True:
        for s in range(len(trainer.slots)):
            while trainer.slots[s] is None and not exhausted:
                incoming = next(pending, None)
                if incoming is None:
                    exhausted = True
                elif isinstance(incoming, TrainedConcept):
                    yield incoming
                else:
                    failure = _admit(trainer, s, incoming)
                    if failure is not None:
                        yield TrainedConcept(incoming.spec, None, failure=failure)
        if not trainer.active and not waiting:
            return
        if trainer.active:
            since += bool(waiting)
            yield from _step(trainer, step, cfg, callback, waiting if sampler else None)
        if waiting and (len(waiting) >= sample_group or since >= sample_wait or not trainer.active):
            yield from _drawn(trainer, waiting, sampler)
            waiting, since = [], 0


def _step(trainer: PackedTrainer, step: GuardedStep, cfg: TrainConfig, callback: Callable[[StepInfo], None] | None,
          waiting: list[int] | None) -> Iterator[TrainedConcept]:
    """One guarded step of the active slots; yields the concepts that failed or finished (a finished one is put
    in ``waiting`` instead, when there is a sampler)."""
    losses, failed = step()
    for s, loss in losses.items():
        trainer.slots[s].losses.append(loss)
    for s, failure in failed.items():
        yield trainer.fail(s, failure)
    if callback:
        callback(StepInfo(trainer.step_count, {trainer.slots[s].spec.concept_id: v for s, v in losses.items()}))
    for s in trainer.active:
        slot = trainer.slots[s]
        try:
            done = len(slot.losses) >= slot.settings.steps or (cfg.early_stop and trainer.flattened(s))
        except Exception as e:  # noqa: BLE001 — its fixed-batch check raised: this concept alone fails
            yield trainer.fail(s, ConceptCrashedError(slot.spec.concept_id, f"{type(e).__name__}: {e}"))
            continue
        if done and waiting is not None:
            slot.finished = True
            waiting.append(s)
        elif done:
            yield trainer.emit(s)


def _drawn(trainer: PackedTrainer, slots: list[int], sampler: Sampler) -> Iterator[TrainedConcept]:
    """The finished concepts of ``slots``, each with its samples (drawn together, else alone when that raises)."""
    try:
        drawn = dict(zip(slots, sampler(trainer, slots)))
    except Exception:  # noqa: BLE001 — whichever concept raises, it must fail alone: draw each by itself
        drawn = {}
        for s in slots:
            try:
                drawn[s] = sampler(trainer, [s])[0]
            except Exception as e:  # noqa: BLE001
                yield trainer.fail(s, ConceptCrashedError(trainer.slots[s].spec.concept_id, f"drawing samples: {e!r}"))
    for s, samples in drawn.items():
        trained = trainer.emit(s)
        trained.samples = samples
        yield trained


def _admit(trainer: PackedTrainer, s: int, data: ConceptData) -> ConceptError | None:
    """Put ``data`` into slot ``s``; its error if it cannot train (bad data, or encoding it failed), and then
    the slot stays free."""
    try:
        trainer.admit(s, data)
    except ConceptError as e:
        failure: ConceptError = e
    except torch.OutOfMemoryError as e:
        failure = ConceptOutOfMemoryError(data.spec.concept_id, f"out of memory encoding its images: {e}")
    except Exception as e:  # noqa: BLE001 — a concept whose admission raises fails alone
        failure = ConceptCrashedError(data.spec.concept_id, f"{type(e).__name__}: {e}")
    else:
        return None
    trainer.slots[s] = None
    return failure
