"""Fidelity against image-samples seen, on the toy world's held-out concepts.

Every concept of a schedule trains in one packed trainer, by one method (``ti``, ``lora`` or ``pivotal``);
what it has learned (its vectors, its LoRA) is copied at each checkpoint (and, with DVAR watching, at the
step where early stopping would have emitted it), then every copy is drawn and scored in one batched run
with fixed seeds. A concept's target is
0.9 of the words' score where words reach it (combinations), 0.9 where none does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lab.toyworld.concepts import CONCEPTS, Concept
from lab.toyworld.fidelity import Draw, concept_data, score, word_prompts
from lab.toyworld.scorer import Scorer
from tinv.families.model import BaseModel
from tinv.settings import TrainConfig
from tinv.training.starts import Start
from tinv.training.trainer import PackedTrainer


@dataclass
class Curve:
    """One concept under one schedule."""

    concept: str
    kind: str
    schedule: str
    target: float
    steps: list[int] = field(default_factory=list)
    fidelity: list[float] = field(default_factory=list)
    fidelity_loose: list[float] = field(default_factory=list)
    """The same samples judged without the rendering (the earlier fidelity)."""
    stopped_at: int | None = None
    """DVAR's stop step (None: it never fired within the schedule)."""
    fidelity_at_stop: float | None = None
    samples_per_step: int = 4
    start: dict | None = None
    """Where its vectors started (:func:`tinv.training.starts.choose`'s record)."""

    @property
    def samples_to_target(self) -> int | None:
        """Image-samples seen at the first checkpoint at or over the target (None: never)."""
        hit = next((s for s, f in zip(self.steps, self.fidelity) if f >= self.target), None)
        return None if hit is None else hit * self.samples_per_step


def snapshots(
    model: BaseModel, concepts: tuple[Concept, ...], cfg: TrainConfig, checkpoints: list[int], dvar: bool,
    n_images: int = 6, seed: int = 0, method: str = "ti", start: Start | None = None,
) -> tuple[dict[tuple[int, int], Draw], dict[int, tuple[int, Draw]], list[int], list[dict | None]]:
    """What concept i has learned by ``method`` from ``start`` as a :class:`Draw`, ``(i, step) → draw`` at
    each checkpoint (step 0: the start itself) and ``i → (stop step, draw)`` for DVAR; each concept's samples
    per step and its start's record (:func:`tinv.training.starts.choose`)."""
    cfg = replace(cfg, concepts_per_actor=len(concepts), early_stop=dvar)
    trainer = PackedTrainer(model, cfg, start)
    for i, c in enumerate(concepts):
        trainer.admit(i, concept_data(c, n_images, model.resolution, seed + i, method))
    sizes = [slot.settings.batch_size for slot in trainer.slots]
    begun = [slot.start for slot in trainer.slots]

    def learned(s: int) -> Draw:
        slot = trainer.slots[s]
        vec = trainer.vectors[s][0][: slot.spec.num_vectors].detach().clone()
        return Draw(s, vec if slot.settings.trains_vectors else None, slot.spec.placeholder_token,
                    *trainer.lora_states(s))

    copies = {(s, 0): learned(s) for s in range(len(concepts))} if 0 in checkpoints else {}
    stops = {}
    for step in range(1, max(checkpoints) + 1):
        for s, loss in trainer.step()[0].items():
            trainer.slots[s].losses.append(loss)
        for s in range(len(concepts)):
            stopping = dvar and s not in stops and trainer.flattened(s)  # once a step: it records a fixed loss
            if step not in checkpoints and not stopping:
                continue
            draw = learned(s)
            if step in checkpoints:
                copies[s, step] = draw
            if stopping:
                stops[s] = (step, draw)
    return copies, stops, sizes, begun


def schedule_curves(
    model: BaseModel, scorer: Scorer, schedules: dict[str, tuple[TrainConfig, list[int], bool]],
    concepts: tuple[Concept, ...] = CONCEPTS, samples: int = 32, seed: int = 0, method: str = "ti",
    start: Start | None = None, **gen,
) -> list[Curve]:
    """Fidelity at each checkpoint of each schedule ``name → (config, checkpoints, watch with DVAR)``, every
    concept learned by ``method`` from ``start`` (None: the initializer word)."""
    words = [Draw(i, word=word_prompts(c)[0]) for i, c in enumerate(concepts) if c.kind == "combination"]
    targets = [0.9] * len(concepts)
    for w, (s, _) in zip(words, score(model, scorer, concepts, words, samples, seed, **gen)):
        targets[w.concept] = 0.9 * s
    curves = []
    for name, (cfg, checkpoints, dvar) in schedules.items():
        copies, stops, sizes, begun = snapshots(model, concepts, cfg, checkpoints, dvar, seed=seed, method=method,
                                                start=start)
        keys = sorted(copies) + [(i, "stop") for i in sorted(stops)]
        todo = [copies[i, s] if s != "stop" else stops[i][1] for i, s in keys]
        found = dict(zip(keys, score(model, scorer, concepts, todo, samples, seed, **gen)))
        for i, c in enumerate(concepts):
            curve = Curve(c.name, c.kind, name, targets[i], samples_per_step=sizes[i], start=begun[i])
            curve.steps = sorted(s for j, s in copies if j == i)
            curve.fidelity = [found[i, s][0] for s in curve.steps]
            curve.fidelity_loose = [found[i, s][1] for s in curve.steps]
            if i in stops:
                curve.stopped_at, curve.fidelity_at_stop = stops[i][0], found[i, "stop"][0]
            curves.append(curve)
    return curves

