"""Fewer samples per concept, on the toy world: fidelity against samples seen, per schedule and per method.

``python -m lab.bench.schedule [--sections schedule,schedule_methods] [--smoke] [--threads N] [--out JSON]``
measures the two toy-world sections that were ``python -m jobs.bench``'s (the product's benchmark must not import
the lab): ``schedule`` (the diffusers recipe's schedule against tinv's, with DVAR early stopping watching) and
``schedule_methods`` (``ti``, ``lora`` and ``pivotal`` over the same concepts and checkpoints). tinv's schedule is
the one these were recorded under: 500 steps and the ``toyworld`` recipe (the noisier half of the schedule, styles
leaning further to the noisy end at 8 samples a step), no longer the product's defaults. Each section is saved into
``benchmarks/<device>.json`` (with the matmul rates and the command, as ``jobs.bench`` saves its own) and its table
printed; ``--render JSON`` prints every table of a recorded file, the product benchmark's and these.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from jobs.bench import report
from jobs.bench.measure import dense_rates, device_name, slug
from jobs.bench.recipe import RECIPE
from lab.toyworld import CONFIG
from lab.toyworld.concepts import CONCEPTS
from lab.toyworld.methods import TOY_LORA_LEARNING_RATES
from lab.toyworld.schedule import schedule_curves
from lab.toyworld.scorer import find_scorer
from tinv import EMBEDDED_MODEL
from tinv.families.model import load_base_model
from tinv.manifest import METHODS
from tinv.settings import TrainConfig

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("schedule", "schedule_methods")
TOYWORLD = CONFIG
"""tinv's schedule as these sections measure it (the product's defaults when they were recorded)."""
METHOD_CHECKPOINTS = [25, 50, 100, 150, 200, 300, 400, 500]


def recipe_config(base: TrainConfig) -> TrainConfig:
    """tinv's trainer run on the diffusers recipe's schedule: its steps, learning rate, batch and weight decay,
    every timestep drawn uniformly, styles like objects (the schedule section's "recipe" curve)."""
    recipe = replace(base.recipe, weight_decay=RECIPE["weight_decay"], min_timestep_fraction=0.0,
                     style_batch_size=RECIPE["batch_size"], style_timestep_power=1.0)
    return replace(base, steps=RECIPE["steps"], learning_rate=RECIPE["learning_rate"],
                   batch_size=RECIPE["batch_size"], recipe=recipe)


def schedules(smoke: bool) -> dict[str, Any]:
    """Fidelity against samples seen: the recipe's schedule, tinv's (toy-world) one, and DVAR early stopping."""
    model = load_base_model(str(EMBEDDED_MODEL), precision="fp32")
    default = TOYWORLD
    recipe = recipe_config(default)
    plans = {"recipe": (recipe, [100, 200, 500, 1000, 2000, 3000], False),
             "tinv": (default, [25, 50, 100, 150, 200, 300, 400, 500], True)}
    concepts, samples, gen = CONCEPTS, 32, {"steps": 25, "batch_size": 64}
    if smoke:
        quick = replace(default.recipe, dvar_window=2, dvar_every=1)
        plans = {"recipe": (replace(recipe, steps=4), [2, 4], False),
                 "tinv": (replace(default, steps=6, recipe=quick), [3, 6], True)}
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


def method_schedules(smoke: bool) -> dict[str, Any]:
    """Fidelity against samples seen for each method (ti, lora, pivotal) under tinv's (toy-world) schedule, no
    early stopping, the LoRA at each method's toy-world learning rate: the same concepts, pictures, checkpoints
    and sample seeds for every method."""
    model = load_base_model(str(EMBEDDED_MODEL), precision="fp32")
    cfg, checkpoints, concepts, samples = TOYWORLD, METHOD_CHECKPOINTS, CONCEPTS, 32
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


def schedule_table(schedule: dict[str, Any]) -> list[str]:
    """The samples-to-target table: one row per concept, the recipe's curve beside tinv's."""
    curves = {(c["concept"], c["schedule"]): c for c in schedule["curves"]}
    recipe, tinv = schedule["recipe"], schedule["tinv"]

    def reach(c: dict[str, Any]) -> str:
        return f"{c['samples_to_target']:,}" if c["samples_to_target"] is not None else "not reached"

    def stop(c: dict[str, Any]) -> tuple[str, float]:
        if c["stopped_at"] is None:
            return f"— (ran {c['steps'][-1] * c['samples_per_step']:,})", c["fidelity"][-1]
        return f"{c['stopped_at'] * c['samples_per_step']:,}", c["fidelity_at_stop"]

    lines = [f"| concept | kind | target | recipe: samples to target | recipe @ step {recipe['checkpoints'][-1]:,} "
             f"| tinv: samples to target | tinv @ step {tinv['checkpoints'][-1]:,} | DVAR stop (samples) "
             "| fidelity at stop |", "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(c["concept"] for c in schedule["curves"]):
        r, t = curves[name, "recipe"], curves[name, "tinv"]
        at, fid = stop(t)
        lines.append(f"| {name} | {t['kind']} | {t['target']:.2f} | {reach(r)} | {r['fidelity'][-1]:.2f} "
                     f"| {reach(t)} | {t['fidelity'][-1]:.2f} | {at} | {fid:.2f} |")
    dvar = tinv.get("dvar", {})
    lines.append(f"| **mean** | | | | {recipe['mean_fidelity'][-1]:.3f} | | {tinv['mean_fidelity'][-1]:.3f} "
                 f"| {dvar.get('mean_samples', 0):,.0f} | {dvar.get('mean_fidelity_at_stop', 0):.3f} |")
    for name, plan in (("tinv", tinv), ("recipe", recipe)):
        pairs = ", ".join(f"{k}: {m:.2f}" for k, m in zip(plan["checkpoints"], plan["mean_fidelity"]))
        lines += ["", f"Mean fidelity by step, {name}: {pairs}."]
        if "mean_fidelity_loose" in plan:  # recorded since the fidelity asks for the rendering too
            pairs = ", ".join(f"{k}: {m:.2f}" for k, m in zip(plan["checkpoints"], plan["mean_fidelity_loose"]))
            lines += ["", f"Loose fidelity (rendering ignored, the earlier judgement) by step, {name}: {pairs}."]
    return lines


def method_schedule_table(schedule: dict[str, Any]) -> list[str]:
    """Samples to target per concept and method, and each method's mean fidelity by step."""
    curves = {(c["concept"], c["schedule"]): c for c in schedule["curves"]}
    methods = list(dict.fromkeys(c["schedule"] for c in schedule["curves"]))
    last = schedule["checkpoints"][-1]
    head = ["concept", "kind", "target", *(f"{m}: samples to target" for m in methods),
            *(f"{m} @ {last}" for m in methods)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(c["concept"] for c in schedule["curves"]):
        row = [curves[name, m] for m in methods]
        reach = [f"{c['samples_to_target']:,}" if c["samples_to_target"] is not None else "not reached" for c in row]
        lines.append(f"| {name} | {row[0]['kind']} | {row[0]['target']:.2f} | " + " | ".join(reach) + " | "
                     + " | ".join(f"{c['fidelity'][-1]:.2f}" for c in row) + " |")
    for m in methods:
        pairs = ", ".join(f"{k}: {f:.2f}" for k, f in zip(schedule["checkpoints"], schedule[m]["mean_fidelity"]))
        reached = f"{schedule[m]['reached']} of {schedule[m]['concepts']} reached"
        lines += ["", f"Mean fidelity by step, {m} ({reached}): {pairs}."]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """:func:`jobs.bench.report.markdown`'s tables, then the schedule sections' (a run's, or a recorded file's)."""
    lines = [report.markdown(result).rstrip("\n")]
    if "schedule" in result:
        lines += ["", *schedule_table(result["schedule"])]
    if "schedule_methods" in result:
        lines += ["", *method_schedule_table(result["schedule_methods"])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lab.bench.schedule", description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: schedule, schedule_methods")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--smoke", action="store_true", help="2 concepts, a few steps (seconds); nothing written")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/<device>.json; smoke: not written)")
    p.add_argument("--render", default=None, metavar="JSON", help="print the tables of a recorded file and exit")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    asked = [s for s in args.sections.split(",") if s]
    unknown = set(asked) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; these are {', '.join(SECTIONS)}")
    result: dict[str, Any] = {"device": device_name(device), "device_type": device.type,
                              "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "command": "python -m lab.bench.schedule " + " ".join(sys.argv[1:]),
                              "smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    out = args.out or (None if args.smoke else str(REPO / "benchmarks" / f"{slug(result['device'])}.json"))

    def log(section: str, *what: Any) -> None:  # each section is saved as soon as it is measured
        print("[benchmark]", section, *what, file=sys.stderr, flush=True)
        if out:
            report.save(result, Path(out), keys=("matmul", *SECTIONS))

    result["matmul"], _ = dense_rates(device, args.smoke)
    log("matmul", result["matmul"])
    if "schedule" in asked:
        result["schedule"] = schedules(args.smoke)
        log("schedule", {k: v for k, v in result["schedule"].items() if k != "curves"})
    if "schedule_methods" in asked:
        result["schedule_methods"] = method_schedules(args.smoke)
        log("schedule_methods", {m: result["schedule_methods"][m] for m in METHODS})
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(markdown(json.loads(Path(args.render).read_text()) if args.render else run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
