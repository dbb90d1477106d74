"""Accounting for a training run: progress lines, Ray metrics, results.parquet and run.json."""

from __future__ import annotations

import io
import json
import sys
import time
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import EXIT_INVALID, JobExit
from jobs.dispatch import ConceptResult
from tinv import storage
from tinv.manifest import ConceptSpec

METRICS_TYPE = pa.map_(pa.string(), pa.float64())
"""Metric name → value (the concept's mean over its samples); which names appear depends on the metric
plug-ins of the run (the toy world's ``fidelity``, CLIP's ``clip_image``/``clip_text``…)."""
RESULT_COLUMNS = pa.schema([
    ("concept_id", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("error_type", pa.string()),
    ("token", pa.string()),
    ("trigger", pa.string()),
    ("method", pa.string()),
    ("embedding_uri", pa.string()),
    ("lora_uri", pa.string()),
    ("steps", pa.int64()),
    ("seconds", pa.float64()),
    ("final_loss", pa.float64()),
    ("metrics", METRICS_TYPE),
    ("published", pa.bool_()),
    ("held_back", pa.string()),
    ("attempts", pa.int64()),
    ("worker", pa.string()),
])
PACKAGES = ("tinv", "torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec", "s3fs", "gcsfs", "xformers")


def _fmt_s(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Counts finished concepts; prints a plain progress line per result (readable in ``ray job logs``)."""

    def __init__(self, total: int, counters: dict[str, Any] | None = None, stream=sys.stderr) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.started, self.stream = time.monotonic(), stream
        self.counters = counters or {}

    def update(self, result: Any) -> None:
        """Count ``result`` (anything with ``concept_id``, ``status`` and ``error``) and print the line."""
        self.done += 1
        failed = result.status != "succeeded"
        self.failed += failed
        counter = self.counters.get("failed" if failed else "succeeded")
        if counter is not None:
            counter.inc()
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 24
        bar = "#" * (width * self.done // max(1, self.total))
        note = f"FAILED {result.concept_id}: {result.error}" if failed else f"ok {result.concept_id}"
        print(
            f"[tinv] [{bar:<{width}}] {self.done}/{self.total} done, {self.failed} failed | "
            f"{rate * 60:.1f} concepts/min | elapsed {_fmt_s(elapsed)} | ETA "
            f"{_fmt_s(eta) if eta != float('inf') else '?'} | {note}",
            file=self.stream,
            flush=True,
        )


def result_rows(
    specs: list[ConceptSpec], results: dict[str, ConceptResult], held_back: dict[str, str | None] | None = None,
) -> list[dict[str, Any]]:
    """One row per manifest row, in manifest order; a concept with no result is failed ("not run").
    ``held_back``: per succeeded or skipped concept, None when it is in the catalog, else why not."""
    rows, held_back = [], held_back or {}
    missing = ConceptResult("", "failed", error="not run: the job stopped before it")
    for spec in specs:
        r = results.get(spec.concept_id, missing)
        record = r.record or {}
        rows.append({
            "concept_id": spec.concept_id, "status": r.status, "error": r.error, "error_type": r.error_type,
            "token": r.token or spec.placeholder_token, "trigger": record.get("trigger"), "method": spec.method,
            "embedding_uri": record.get("embedding_uri"), "lora_uri": record.get("lora_uri"),
            "steps": record.get("steps"), "seconds": r.seconds, "final_loss": record.get("final_loss"),
            "metrics": record.get("metrics") if r.record else None,
            "published": spec.concept_id in held_back and held_back[spec.concept_id] is None,
            "held_back": held_back.get(spec.concept_id), "attempts": r.attempts, "worker": r.worker,
        })
    return rows


def write_results(output: str, rows: list[dict[str, Any]], storage_options: dict | None = None) -> str:
    """``{output}/results.parquet``; returns its URI."""
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_COLUMNS), sink)
    uri = storage.join(output, "results.parquet")
    storage.write_bytes(uri, sink.getvalue(), storage_options)
    return uri


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_run(run: str, storage_options: dict | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A training run's ``run.json`` and its ``results.parquet`` rows; :class:`JobExit` (invalid input) when
    ``run`` is not a run's output."""
    try:
        record = json.loads(storage.read_bytes(storage.join(run, "run.json"), storage_options))
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(run, "results.parquet"), storage_options)))
    except FileNotFoundError as e:
        raise JobExit(EXIT_INVALID, f"invalid input: {run} is not a training run's output ({e})") from e
    return record, table.to_pylist()


def write_run(output: str, run: dict[str, Any], storage_options: dict | None = None) -> str:
    """``{output}/run.json``; returns its URI."""
    uri = storage.join(output, "run.json")
    run = {**run, "versions": versions()}
    storage.write_bytes(uri, json.dumps(run, indent=2, sort_keys=True, default=str).encode(), storage_options)
    return uri


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    out = {"total": len(rows), "succeeded": 0, "failed": 0, "skipped": 0}
    for row in rows:
        out[row["status"]] += 1
    return out
