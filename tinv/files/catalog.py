"""The serving catalog: which concepts of a run a serving system may load, their files and hashes.

After ``results.parquet`` the train job writes ``{output}/catalogs/{run_id}.jsonl`` (one JSON line per
concept that passes the run's quality gate, ``--publish-if``), a copy at ``{output}/catalog.jsonl``, and
then, last, ``{output}/latest``: a small JSON file naming the newest complete catalog and its sha256,
which a serving system polls. Every write is whole (``tinv.storage.write_bytes``), so a reader of
``latest`` always finds a complete catalog. A line is made only from the concept's ``result.json`` as it is on
storage when the run finishes, and only when every file it names is there with that sha256 (:func:`on_disk`), so
a concept skipped by a re-run keeps the same line and no line names a file another writer replaced. ``latest``
only ever moves forward.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinv import storage
from tinv.files.formats import CONCEPTS_LIBRARY
from tinv.files.outputs import relative_uri

EXPORTS = (CONCEPTS_LIBRARY,)
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt}
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
CONDITION = re.compile(rf"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(>=|<=|==|>|<)\s*({NUMBER})\s*")
RECORD_VALUES = ("final_loss", "steps")
"""Names a condition may use besides the concept's metrics: fields of its ``result.json``."""
CATALOG_NAME, LATEST_NAME = "catalog.jsonl", "latest"


@dataclass(frozen=True)
class Condition:
    """``name op value``: ``name`` a metric of the concept (``clip_image``, ``fidelity``…) or ``final_loss`` /
    ``steps``."""

    name: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Condition:
        match = CONDITION.fullmatch(text)
        if match is None:
            raise ValueError(f"--publish-if {text!r}: expected NAME OP NUMBER, OP one of {', '.join(OPERATORS)} "
                             "(e.g. 'clip_image>=0.7')")
        return cls(match[1], match[2], float(match[3]))

    def check(self, record: dict[str, Any]) -> str | None:
        """None when the concept meets it, else why not."""
        value = (record.get("metrics") or {}).get(self.name)
        if value is None and self.name in RECORD_VALUES:
            value = record.get(self.name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"no {self.name} to check {self}"
        return None if OPERATORS[self.op](value, self.value) else f"{self.name} {value:.4g} fails {self}"

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value:g}"


@dataclass(frozen=True)
class PublishConfig:
    """What a run publishes: the catalog's quality gate, and extra per-concept layouts."""

    publish_if: tuple[str, ...] = ()
    """Conditions a concept meets to enter catalog.jsonl, all of them: NAME OP NUMBER (>=, >, <=, <, ==), NAME a
    metric of the run (clip_image, fidelity...) or final_loss / steps, e.g. 'clip_image>=0.7'; none: every
    succeeded concept."""
    export: tuple[str, ...] = field(default=(), metadata={"choices": EXPORTS})
    """Extra layouts written per concept: concepts-library (the sd-concepts-library folder: learned_embeds.bin,
    token_identifier.txt, type_of_concept.txt) for concepts with a new token."""

    def __post_init__(self) -> None:
        self.conditions  # noqa: B018 — a malformed condition is refused when the config is built

    @property
    def conditions(self) -> list[Condition]:
        return [Condition.parse(c) for c in self.publish_if]

    def held_back(self, record: dict[str, Any]) -> str | None:
        """None when a succeeded concept's record passes the gate, else every reason it does not."""
        reasons = [r for r in (c.check(record) for c in self.conditions) if r]
        return "; ".join(reasons) or None


def served_files(record: dict[str, Any]) -> list[str]:
    """The files of a concept a serving system loads (its ``result.json``'s, samples and grid left out)."""
    return [n for n in record.get("files", []) if not n.startswith("samples/") and n != "grid.png"]


def on_disk(output: str, record: dict[str, Any], storage_options: dict[str, Any] | None = None) -> str | None:
    """None when every served file of ``record`` is on storage with the sha256 its ``result.json`` says (read
    again now, not remembered), else what differs."""
    folder, hashes = storage.join(output, "concepts", record["concept_id"]), record.get("sha256") or {}
    for name in served_files(record):
        try:
            digest = hashlib.sha256(storage.read_bytes(storage.join(folder, name), storage_options)).hexdigest()
        except FileNotFoundError:
            return f"{name} is not on storage"
        if digest != hashes.get(name):
            return f"{name} on storage is not the file its result.json names (sha256 {digest[:12]}…)"
    return None


def catalog_line(record: dict[str, Any]) -> dict[str, Any]:
    """A concept's catalog entry from its ``result.json``: what to load (paths relative to the output root,
    each with its sha256; samples left out), against which base model, and its metrics."""
    hashes = record.get("sha256") or {}
    files = {relative_uri(record["concept_id"], name): hashes.get(name) for name in served_files(record)}
    keys = ("concept_id", "token", "tokens", "trigger", "method", "lora_rank", "learnable_property", "metrics",
            "steps", "final_loss", "base_model", "base_model_fingerprint", "config_fingerprint")
    return {**{k: record.get(k) for k in keys}, "files": files}


def write_catalog(
    output: str, run_id: str, records: list[dict[str, Any]], storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the run's catalog (``records``: the published concepts' ``result.json``, as on storage), then, unless
    ``latest`` already names a newer run's catalog (it only ever moves forward: runs are named by their UTC start),
    its copy and ``latest`` naming it; returns what ``latest`` holds afterwards."""
    data = "".join(json.dumps(catalog_line(r), sort_keys=True) + "\n" for r in records).encode()
    name = f"catalogs/{run_id}.jsonl"
    storage.write_bytes(storage.join(output, name), data, storage_options)
    current = read_latest(output, storage_options)
    if current is not None and str(current.get("run", "")) > run_id:
        return current
    storage.write_bytes(storage.join(output, CATALOG_NAME), data, storage_options)
    latest = {"catalog": name, "sha256": hashlib.sha256(data).hexdigest(), "concepts": len(records), "run": run_id}
    storage.write_bytes(storage.join(output, LATEST_NAME), json.dumps(latest, sort_keys=True).encode() + b"\n",
                        storage_options)  # LAST: a poller sees a new catalog only once it is whole
    return latest


def read_latest(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What ``latest`` holds, or None when there is none (or it is unreadable)."""
    try:
        latest = json.loads(storage.read_bytes(storage.join(output, LATEST_NAME), storage_options))
    except (FileNotFoundError, ValueError):
        return None
    return latest if isinstance(latest, dict) else None
