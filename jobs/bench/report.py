"""The benchmark's markdown tables, from a run's result or from a recorded ``benchmarks/<device>.json``.

A recorded file keeps each section with the command that measured it (``save``), so one file per device
holds several runs side by side; :func:`markdown` renders it with the same tables the runs printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TRAIN_TABLES = ("toy_train", "methods_toy", "methods_sd15", "preservation_toy", "preservation_sd15")
"""The sections rendered as training tables after ``train``'s (one per resolution)."""
SECTION_KEYS = ("matmul", "train", *TRAIN_TABLES, "generate", "schedule", "schedule_methods", "driver", "writes",
                "fingerprint", "projection")
STAMP = ("command", "started", "threads")
"""What :func:`save` adds to each section it records."""


def matmul_line(m: dict[str, Any]) -> list[str]:
    rates = {k: v for k, v in m.items() if k.endswith("_flops") or k.endswith("_flops_1_thread")}
    return ["Dense matmul: " + ", ".join(f"{k.removesuffix('_flops').replace('_flops', '')} {v / 1e9:.0f} GFLOP/s"
                                         for k, v in rates.items()), ""]


def train_table(t: dict[str, Any]) -> list[str]:
    lines = [f"Training, {t['model']}, {t['resolution']} px:", "",
             "| variant | s/step | samples/s | × recipe per sample | MFU | peak GB | concepts/h (own schedule) |",
             "|---|---|---|---|---|---|---|"]
    for r in t["variants"]:
        mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "–"
        speed = f"{r['speedup_per_sample_vs_recipe']:.2f}" if r["speedup_per_sample_vs_recipe"] else "–"
        lines.append(f"| {r['variant']} | {r['seconds_per_step']:.3f} | {r['samples_per_s']:.3g} | {speed} | {mfu} "
                     f"| {r['peak_mem_gb']:.2f} | {r['concepts_per_hour']:.3g} |")
    return [*lines, ""]


def generate_line(g: dict[str, Any]) -> list[str]:
    return [f"Generation (toy model, {g['setup']}): batched {g['batched']['images_per_s']:.1f} images/s, "
            f"per-concept {g['per_concept']['images_per_s']:.1f} images/s: {g['speedup']:.2f}×", ""]


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


def driver_lines(runs: list[dict[str, Any]]) -> list[str]:
    return [f"Driver, {d['concepts']} concepts: {d['ms_per_concept']:.2f} ms/concept, RSS +"
            f"{d['rss_growth_mb']:.0f} MB, results.parquet {d['results_parquet_mb']:.2f} MB" for d in runs]


def sections(result: dict[str, Any]) -> list[str]:
    """Every table of ``result`` (a run's result, or a recorded file's sections), in the report's order."""
    lines: list[str] = []
    if "matmul" in result:
        lines += matmul_line(result["matmul"])
    trains = [k for k in result if k == "train" or k.startswith("train_")]
    trains += TRAIN_TABLES
    for key in trains:
        if key in result:
            lines += train_table(result[key])
    if "generate" in result:
        lines += generate_line(result["generate"])
    if "schedule" in result:
        lines += [*schedule_table(result["schedule"]), ""]
    if "schedule_methods" in result:
        lines += [*method_schedule_table(result["schedule_methods"]), ""]
    driver = result.get("driver")
    lines += driver_lines(driver["runs"] if isinstance(driver, dict) else driver or [])
    if "writes" in result:
        w = result["writes"]
        delay = max(r["delay_s_per_write"] for r in w["runs"])
        ratio = w["ratio_slow_to_fast"]
        lines.append(f"Writes sleeping {delay} s each: the training thread's step rate is {ratio:.2f}× "
                     "its rate with normal writes")
    if "fingerprint" in result:
        f = result["fingerprint"]
        lines.append(f"Fingerprint of a {f['folder_gb']:.2f} GB model folder: {f['cold_s']:.1f} s the first time "
                     f"({f['cold_gb_per_s']:.2f} GB/s), {f['cached_s']:.3f} s from the node's cache")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The report a run prints; for a recorded file, the same tables (each section as its command measured it)."""
    return "\n".join([f"Device: {result['device']}; `{result['command']}`", "", *sections(result)])


def save(result: dict[str, Any], out: Path) -> None:
    """Write ``result`` into ``out``, keeping sections an earlier run (another command) measured.

    Each section records the command and time that measured it, so one file per device holds the
    default run, the 512 px run and the long toy-world schedule run side by side.
    """
    stamp = {k: result[k] for k in STAMP}
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged |= {k: v for k, v in result.items() if k not in SECTION_KEYS}
    for key in SECTION_KEYS:
        if key in result:
            name = f"{key}_{result['train']['resolution']}px" if key == "train" and not result["smoke"] else key
            value = result[key]
            merged[name] = {**value, **stamp} if isinstance(value, dict) else {"runs": value, **stamp}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    print(f"[benchmark] wrote {out}", file=sys.stderr)
