"""The benchmark's markdown tables, from a run's result or from a recorded ``benchmarks/<device>.json``.

A recorded file keeps each section with the command that measured it (``save``), so one file per device
holds several runs side by side; :func:`markdown` renders it with the same tables the runs printed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

TRAIN_TABLES = ("toy_train", "methods_toy", "methods_sd15", "preservation_toy", "preservation_sd15", "flux")
"""The sections rendered as training tables after ``train``'s (one per resolution)."""
SECTION_KEYS = ("matmul", "train", *TRAIN_TABLES, "generate", "train_sampling", "driver", "writes", "fingerprint",
                "projection")
STAMP = ("command", "started", "threads")
"""What :func:`save` adds to each section it records."""


def matmul_line(m: dict[str, Any]) -> list[str]:
    """The dense rates; a run that measured the 3×3 convolution too (MFU is then taken against the larger of the
    two per precision) shows it after the matmul's."""
    def rates(kind: str) -> str:
        found = {k.replace(kind, ""): v for k, v in m.items() if re.fullmatch(rf"[a-z0-9]+{kind}(_1_thread)?", k)}
        return ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in found.items())

    line = "Dense matmul: " + rates("_flops")
    if any("_conv_flops" in k for k in m):
        line += "; 3×3 convolution: " + rates("_conv_flops") + " (MFU against the larger of each pair)"
    return [line, ""]


def train_table(t: dict[str, Any]) -> list[str]:
    tokens = f", {t['t5_tokens']} T5 tokens" if "t5_tokens" in t else ""
    lines = [f"Training, {t['model']}, {t['resolution']} px{tokens}:", "",
             "| variant | s/step | samples/s | × recipe per sample | MFU | peak GB | concepts/h (own schedule) |",
             "|---|---|---|---|---|---|---|"]
    for r in t["variants"]:
        mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "–"
        speed = f"{r['speedup_per_sample_vs_recipe']:.2f}" if r["speedup_per_sample_vs_recipe"] else "–"
        lines.append(f"| {r['variant']} | {r['seconds_per_step']:.3f} | {r['samples_per_s']:.3g} | {speed} | {mfu} "
                     f"| {r['peak_mem_gb']:.2f} | {r['concepts_per_hour']:.3g} |")
    return [*lines, ""]


def flux_projection_lines(p: dict[str, Any]) -> list[str]:
    """Full-size FLUX.1 [dev] on paper (labelled as such)."""
    per = ", ".join(f"{m} {p[m]['flops_per_sample'] / 1e12:.0f} TFLOP/sample → {p[m]['concepts_per_gpu_hour']:.2f} "
                    "concepts/h" for m in ("lora", "pivotal", "pivotal-t5"))
    weights = ", ".join(f"{k} {v:.1f}" for k, v in p["weights_gb"].items())
    return [f"FLUX.1 [dev] at {p['resolution']} px, {p['t5_tokens']} T5 tokens, {p['samples_per_concept']} samples "
            f"per concept on one {p['gpu']} at {p['assumed_utilisation']:.0%} ({p['label']}): {per}. "
            f"Frozen weights, GB: {weights}", ""]


def generate_line(g: dict[str, Any]) -> list[str]:
    return [f"Generation (toy model, {g['setup']}): batched {g['batched']['images_per_s']:.1f} images/s, "
            f"per-concept {g['per_concept']['images_per_s']:.1f} images/s: {g['speedup']:.2f}×", ""]


def sampling_table(t: dict[str, Any]) -> list[str]:
    """The train job's sampling, before (a call per concept, from copies) and after (the live slots together)."""
    lines = ["The train job's samples: each concept alone from its copied vectors and LoRA (before), the finished "
             "concepts together from the trainer's live slots (after):", "",
             "| model | px | concepts (methods) | images each | denoising steps | concepts per call after "
             "| before: images/s | after: images/s | after ÷ before |", "|---|---|---|---|---|---|---|---|---|"]
    for r in t["runs"]:
        methods = ", ".join(f"{n} {m}" for m, n in r["methods"].items())
        lines.append(f"| {r['model']} | {r['resolution']} | {r['concepts']} ({methods}) | {r['images_per_concept']} "
                     f"| {r['sample_steps']} | {r['concepts_per_call']} | {r['before']['images_per_s']:.3g} "
                     f"| {r['after']['images_per_s']:.3g} | {r['speedup']:.2f} |")
    return [*lines, ""]


def driver_lines(runs: list[dict[str, Any]]) -> list[str]:
    return [f"Driver, {d['concepts']} concepts: {d['ms_per_concept']:.2f} ms/concept, RSS +"
            f"{d['rss_growth_mb']:.0f} MB, results.parquet {d['results_parquet_mb']:.2f} MB" for d in runs]


def sections(result: dict[str, Any]) -> list[str]:
    """Every table of ``result`` (a run's result, or a recorded file's sections), in the report's order."""
    lines: list[str] = []
    if "matmul" in result:
        lines += matmul_line(result["matmul"])
    trains = [k for k in result if (k == "train" or k.startswith("train_")) and "variants" in result[k]]
    trains += TRAIN_TABLES
    for key in trains:
        if key in result:
            lines += train_table(result[key])
    if "projection" in result.get("flux", {}):
        lines += flux_projection_lines(result["flux"]["projection"])
    if "generate" in result:
        lines += generate_line(result["generate"])
    if "train_sampling" in result:
        lines += sampling_table(result["train_sampling"])
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


def save(result: dict[str, Any], out: Path, keys: tuple[str, ...] = SECTION_KEYS) -> None:
    """Write ``result`` into ``out``, keeping sections an earlier run (another command) measured.

    Each section records the command and time that measured it, so one file per device holds the
    default run, the 512 px run and the long toy-world schedule run side by side. ``keys``: the sections a
    command measures (``lab.bench.schedule`` passes its own).
    """
    stamp = {k: result[k] for k in STAMP}
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged |= {k: v for k, v in result.items() if k not in keys}
    for key in keys:
        if key in result:
            name = f"{key}_{result['train']['resolution']}px" if key == "train" and not result["smoke"] else key
            value = result[key]
            merged[name] = {**value, **stamp} if isinstance(value, dict) else {"runs": value, **stamp}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    print(f"[benchmark] wrote {out}", file=sys.stderr)
