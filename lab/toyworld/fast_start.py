"""The word, cross and learned starts side by side on the toy world's held-out concepts.

Every start trains the 12 held-out concepts from the same pictures, captions, seeds and schedule (the lab's
settings, :data:`lab.toyworld.CONFIG`, DVAR watching, :mod:`lab.toyworld.schedule`): the initializer word's
embedding (Textual Inversion, Gal et al. 2022, arXiv 2208.01618), the text encoder's output for it (Cross
Initialization, Pang et al. 2023, arXiv 2312.15905), and an initializer ``jobs.fit_init`` fitted on a night's run of
concepts disjoint from these (:mod:`lab.toyworld.corpus`; HyperDreamBooth's idea, Ruiz et al. 2023,
arXiv 2307.06949), behind the guard that keeps a prediction only when its fixed-batch loss beats the word's.
Per concept and start: fidelity at step 0 (the start alone), samples seen until the target (0.9; a
combination's: 0.9 of its words' score), the DVAR stop step and fidelity there.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

from lab.toyworld import CONFIG
from lab.toyworld.concepts import CONCEPTS, Concept
from lab.toyworld.schedule import Curve, schedule_curves
from lab.toyworld.scorer import Scorer
from tinv.families.model import load_base_model
from tinv.settings import TrainConfig
from tinv.training.starts import CROSS, WORD, Start, load_start

CHECKPOINTS = [0, 10, 25, 50, 100, 150, 200, 300, 400, 500]
KINDS = ("combination", "unnamed", "style")


def start_curves(
    model_dir: str, scorer: Scorer, init: str, cfg: TrainConfig = CONFIG,
    concepts: tuple[Concept, ...] = CONCEPTS, checkpoints: list[int] = CHECKPOINTS, samples: int = 32,
    seed: int = 0, **gen,
) -> list[Curve]:
    """Each concept's curve from each start (``Curve.schedule``: ``word``, ``cross``, ``learned``), the
    learned one from the initializer at ``init``."""
    model = load_base_model(model_dir, precision="fp32")
    cfg = replace(cfg, steps=max(checkpoints))
    curves = []
    for name, start in ((WORD, Start(WORD)), (CROSS, Start(CROSS)), ("learned", load_start(init)[0])):
        if start.initializer is not None:
            start.initializer.check(model.info["base_model_fingerprint"])
        curves += schedule_curves(model, scorer, {name: (cfg, checkpoints, True)}, concepts, samples, seed,
                                  start=start, **gen)
    return curves


def censored_samples(curve: Curve) -> int:
    """Samples to the target; a concept that never reaches it counts its whole schedule's."""
    return curve.samples_to_target if curve.samples_to_target is not None else curve.steps[-1] * curve.samples_per_step


def at_stop(curve: Curve) -> float:
    """Fidelity where DVAR stopped it (the end of the schedule if it never fired)."""
    return curve.fidelity_at_stop if curve.stopped_at is not None else curve.fidelity[-1]


def summary(curves: list[Curve]) -> dict[str, Any]:
    """Per start: mean fidelity at 0 and at the DVAR stop (all, and per kind), mean samples to the target
    (censored), how many reached it, mean stop step, how often a learned start was kept."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(c.schedule for c in curves):
        mine = [c for c in curves if c.schedule == name]
        out[name] = {
            "fidelity_at_0": statistics.mean(c.fidelity[c.steps.index(0)] for c in mine),
            "mean_samples_to_target": statistics.mean(censored_samples(c) for c in mine),
            "reached": sum(c.samples_to_target is not None for c in mine), "concepts": len(mine),
            "fidelity_at_stop": statistics.mean(at_stop(c) for c in mine),
            "fidelity_at_stop_by_kind": {k: statistics.mean(at_stop(c) for c in mine if c.kind == k)
                                         for k in KINDS if any(c.kind == k for c in mine)},
            "mean_stop_step": statistics.mean(c.stopped_at or c.steps[-1] for c in mine),
            "kept": sum((c.start or {}).get("init") == name for c in mine),
        }
    return out


def markdown(curves: list[Curve]) -> str:
    """A row per concept (fidelity at 0 / samples to target / fidelity at stop, per start), then the means."""
    names = list(dict.fromkeys(c.schedule for c in curves))
    by = {(c.concept, c.schedule): c for c in curves}
    head = ["concept", "kind", *(f"{n}: at 0 / samples to target / at stop (step)" for n in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for concept in dict.fromkeys(c.concept for c in curves):
        cells = []
        for n in names:
            c = by[concept, n]
            reached = "never" if c.samples_to_target is None else f"{c.samples_to_target:,}"
            kept = "" if n == WORD or (c.start or {}).get("init") == n else " (word kept)"
            cells.append(f"{c.fidelity[0]:.2f} / {reached} / {at_stop(c):.2f} ({c.stopped_at or c.steps[-1]}){kept}")
        lines.append(f"| {concept} | {by[concept, names[0]].kind} | " + " | ".join(cells) + " |")
    stats = summary(curves)
    lines += ["", "| start | fidelity at 0 | mean samples to target | reached | fidelity at stop | "
              + " | ".join(f"at stop, {k}" for k in KINDS) + " | mean stop step | start kept |",
              "|" + "---|" * (7 + len(KINDS))]
    for n in names:
        s = stats[n]
        kinds = " | ".join(f"{s['fidelity_at_stop_by_kind'].get(k, float('nan')):.2f}" for k in KINDS)
        lines.append(f"| {n} | {s['fidelity_at_0']:.2f} | {s['mean_samples_to_target']:,.0f} | {s['reached']}/"
                     f"{s['concepts']} | {s['fidelity_at_stop']:.2f} | {kinds} | {s['mean_stop_step']:.0f} | "
                     f"{s['kept']}/{s['concepts']} |")
    return "\n".join(lines)


def cost(night: dict[str, Any], steps: list[int], fit: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """The cost side: what the night's run (``run.json`` ``night``, its concepts' ``steps``) and the fit
    (``fit.json``) took, the actor-seconds a concept-step costs there, what the learned start saves per
    concept where DVAR stops it (the steps a run really spends), and the concepts at which fitting pays."""
    per_step = night["timings"]["train_seconds"] * night["actors"] / sum(steps)
    saved_steps = stats[WORD]["mean_stop_step"] - stats["learned"]["mean_stop_step"]
    fit_seconds = fit["seconds"]["total"]
    return {
        "corpus_concepts": len(steps), "corpus_seconds": night["timings"]["seconds"], "corpus_actors": night["actors"],
        "actor_seconds_per_concept_step": per_step, "fit_seconds": fit_seconds,
        "fit_work_seconds": fit["seconds"]["features"] + fit["seconds"]["fit"],
        "steps_saved_per_concept": saved_steps, "actor_seconds_saved_per_concept": saved_steps * per_step,
        "break_even_concepts": fit_seconds / (saved_steps * per_step) if saved_steps > 0 else None,
    }
