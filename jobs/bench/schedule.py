"""Fewer samples per concept, on the toy world: fidelity against samples seen, per schedule."""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace
from typing import Any

from jobs.bench.recipe import recipe_config
from tinv.config import METHODS, TrainConfig
from tinv.embedded import EMBEDDED_MODEL
from tinv.models import load_base_model
from tinv.toyworld.concepts import CONCEPTS
from tinv.toyworld.methods import TOY_LORA_LEARNING_RATES
from tinv.toyworld.schedule import schedule_curves
from tinv.toyworld.scorer import find_scorer


def schedules(smoke: bool) -> dict[str, Any]:
    """Fidelity against samples seen: the recipe's schedule, tinv's defaults, and DVAR early stopping."""
    model = load_base_model(str(EMBEDDED_MODEL), precision="fp32")
    default = TrainConfig()
    recipe = recipe_config(default)
    plans = {"recipe": (recipe, [100, 200, 500, 1000, 2000, 3000], False),
             "tinv": (default, [25, 50, 100, 150, 200, 300, 400, 500], True)}
    concepts, samples, gen = CONCEPTS, 32, {"steps": 25, "batch_size": 64}
    if smoke:
        plans = {"recipe": (replace(recipe, steps=4), [2, 4], False),
                 "tinv": (replace(default, steps=6, dvar_window=2, dvar_every=1), [3, 6], True)}
        concepts, samples, gen = CONCEPTS[:2], 2, {"steps": 2}
    curves = schedule_curves(model, find_scorer(EMBEDDED_MODEL), plans, concepts, samples, **gen)
    out: dict[str, Any] = {"samples_per_checkpoint": samples, "curves": [asdict(c) | {
        "samples_to_target": c.samples_to_target} for c in curves]}
    for name, (cfg, checkpoints, _) in plans.items():
        mine = [c for c in curves if c.schedule == name]
        mean = [float(statistics.mean(c.fidelity[k] for c in mine)) for k in range(len(checkpoints))]
        loose = [float(statistics.mean(c.fidelity_loose[k] for c in mine)) for k in range(len(checkpoints))]
        out[name] = {"config": asdict(cfg), "checkpoints": checkpoints, "mean_fidelity": mean,
                     "mean_fidelity_loose": loose,
                     "samples_per_concept": statistics.mean(cfg.steps * c.samples_per_step for c in mine),
                     "reached": sum(c.samples_to_target is not None for c in mine), "concepts": len(mine)}
        stopped = [c for c in mine if c.stopped_at is not None]
        if stopped:
            out[name]["dvar"] = {
                "stopped": len(stopped), "mean_stop_step": statistics.mean(c.stopped_at for c in stopped),
                "mean_fidelity_at_stop": statistics.mean(
                    c.fidelity_at_stop if c.stopped_at is not None else c.fidelity[-1] for c in mine),
                "mean_fidelity_fixed": mean[-1],
                "mean_samples": statistics.mean((c.stopped_at or cfg.steps) * c.samples_per_step for c in mine)}
    return out


METHOD_CHECKPOINTS = [25, 50, 100, 150, 200, 300, 400, 500]


def method_schedules(smoke: bool) -> dict[str, Any]:
    """Fidelity against samples seen for each method (ti, lora, pivotal) under tinv's defaults, no early
    stopping, the LoRA at each method's toy-world learning rate: the same concepts, pictures, checkpoints
    and sample seeds for every method."""
    model = load_base_model(str(EMBEDDED_MODEL), precision="fp32")
    cfg, checkpoints, concepts, samples = TrainConfig(), METHOD_CHECKPOINTS, CONCEPTS, 32
    gen: dict[str, Any] = {"steps": 25, "batch_size": 64}
    if smoke:
        cfg, checkpoints, concepts, samples, gen = replace(cfg, steps=4), [2, 4], CONCEPTS[:2], 2, {"steps": 2}
    out: dict[str, Any] = {"samples_per_checkpoint": samples, "checkpoints": checkpoints, "config": asdict(cfg),
                           "curves": []}
    scorer = find_scorer(EMBEDDED_MODEL)
    for method in METHODS:  # each at its toy-world LoRA learning rate, as the method table
        mine = replace(cfg, lora_learning_rate=TOY_LORA_LEARNING_RATES.get(method, cfg.lora_learning_rate))
        curves = schedule_curves(model, scorer, {method: (mine, checkpoints, False)}, concepts, samples,
                                 method=method, **gen)
        out["curves"] += [asdict(c) | {"samples_to_target": c.samples_to_target} for c in curves]
        out[method] = {
            "mean_fidelity": [float(statistics.mean(c.fidelity[k] for c in curves)) for k in range(len(checkpoints))],
            "reached": sum(c.samples_to_target is not None for c in curves), "concepts": len(curves)}
    return out
