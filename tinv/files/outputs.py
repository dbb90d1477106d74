"""Per-concept outputs: where they go, and ``result.json`` (written last).

``{output}/concepts/{concept_id}/`` holds the learned files (and ``webui/``, :mod:`tinv.files.webui`), the samples
and then ``result.json``; a concept
is complete exactly when its ``result.json`` exists, and it is skipped on a re-run only when that
file's fingerprint matches the concept's current config fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from tinv import storage
from tinv.families import Family
from tinv.files.formats import (
    CONCEPTS_LIBRARY,
    DIFFUSERS_NAME,
    LORA_NAME,
    concepts_library_files,
    embedding_files,
    lora_files,
    training_metadata,
)
from tinv.files.webui import default_trigger, preview_path
from tinv.manifest import CONCEPT_ID
from tinv.training.concept import TrainedConcept, final_loss

RESULT_NAME = "result.json"


def concept_dir(output: str, concept_id: str) -> str:
    """``{output}/concepts/{concept_id}``; refuses any id that could leave ``output``."""
    if not isinstance(concept_id, str) or not CONCEPT_ID.fullmatch(concept_id):
        raise ValueError(f"unsafe concept_id {concept_id!r}: must match {CONCEPT_ID.pattern}")
    return storage.join(output, "concepts", concept_id)


def loss_summary(losses: list[float]) -> dict[str, float | int]:
    """First, last, min and final (mean of the last tenth) loss."""
    if not losses:
        return {"n": 0}
    return {"n": len(losses), "first": losses[0], "last": losses[-1], "min": min(losses), "final": final_loss(losses)}


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def write_concept(
    output: str,
    trained: TrainedConcept,
    family: Family,
    *,
    fingerprint: str,
    model_info: dict[str, str],
    worker: str,
    attempts: int,
    extra_files: dict[str, bytes] | None = None,
    metrics: dict[str, float] | None = None,
    eval_prompts: list[str] | None = None,
    export: tuple[str, ...] = (),
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a succeeded concept's learned files, its web-UI files with their previews, the ``export``
    layouts and ``extra_files`` (samples), then ``result.json`` with every file's sha256.

    ``metrics`` (e.g. the toy world's ``fidelity``) go into ``result.json`` and the results table; the
    property, image URIs and ``eval_prompts`` drawn are kept too, so a later evaluation can redo them.
    """
    if trained.vectors is None and trained.lora is None:
        raise ValueError(f"concept {trained.spec.concept_id!r} has nothing learned: {trained.error}")
    spec, folder = trained.spec, concept_dir(output, trained.spec.concept_id)
    trigger = spec.trigger or default_trigger(spec.concept_id)
    files = learned_files(trained, family, {**model_info, "config_fingerprint": fingerprint}, trigger, export)
    files |= previews(files, extra_files or {}) | (extra_files or {})
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data, storage_options)
    record = {
        "concept_id": spec.concept_id,
        "token": spec.placeholder_token,
        "tokens": spec.tokens,
        "trigger": trigger,
        "status": "succeeded",
        "steps": len(trained.losses),
        "seconds": round(trained.seconds, 3),
        "final_loss": _finite(trained.final_loss),
        "losses": loss_summary(trained.losses),
        "metrics": metrics or {},
        "learnable_property": spec.learnable_property,
        "images": list(spec.images),
        "eval_prompts": list(eval_prompts if eval_prompts is not None else spec.eval_prompts),
        "config_fingerprint": fingerprint,
        **model_info,
        "worker": worker,
        "attempts": attempts,
        "files": sorted(files),
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
        "method": spec.method,
        "embedding_uri": relative_uri(spec.concept_id, DIFFUSERS_NAME) if trained.vectors is not None else None,
        "lora_uri": relative_uri(spec.concept_id, LORA_NAME) if trained.lora is not None else None,
        "lora_rank": trained.lora_rank,
        "start": trained.start,
        "sizes": trained.sizes,
        "training": trained.training,
    }
    data = json.dumps(record, indent=2, sort_keys=True).encode()
    storage.write_bytes(storage.join(folder, RESULT_NAME), data, storage_options)  # LAST: marks complete
    return record


def learned_files(
    trained: TrainedConcept, family: Family, metadata: dict[str, str], trigger: str | None = None,
    export: tuple[str, ...] = (),
) -> dict[str, bytes]:
    """File name → bytes of what a concept learned: its embedding files (a new token), its LoRA files, and the
    ``export`` layouts (``concepts-library`` for a new token); the web-UI ones are named for ``trigger``
    (default :func:`tinv.files.webui.default_trigger`)."""
    spec, files = trained.spec, {}
    trigger = trigger or default_trigger(spec.concept_id)
    if trained.vectors is not None:
        files |= embedding_files(family, spec.concept_id, spec.placeholder_token, trigger, trained.vectors, metadata)
        if CONCEPTS_LIBRARY in export:
            files |= concepts_library_files(family, spec.placeholder_token, trained.vectors, spec.learnable_property)
    if trained.lora is not None:
        prompts = {"class_prompt": json.dumps(list(spec.class_prompts))} if spec.class_prompts else {}
        metadata = metadata | prompts | training_metadata(family, trained.training)
        files |= lora_files(family, spec.concept_id, spec.placeholder_token, trigger, spec.method, trained.lora_rank,
                            trained.lora, trained.vectors, metadata, trained.text_lora)
    return files


def previews(files: dict[str, bytes], samples: dict[str, bytes]) -> dict[str, bytes]:
    """``{stem}.preview.png`` beside each web-UI model file: the concept's first sample (none without samples)."""
    drawn = sorted(k for k in samples if k.startswith("samples/") and k.endswith(".png"))
    if not drawn:
        return {}
    return {preview_path(name): samples[drawn[0]] for name in files if name.startswith("webui/")}


def relative_uri(concept_id: str, name: str) -> str:
    """A concept's file as the records name it: relative to the output root (``concepts/{id}/{name}``), so
    a run's folder can be copied or served from anywhere."""
    return f"concepts/{concept_id}/{name}"


def read_result(output: str, concept_id: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The concept's ``result.json``, or None when absent or unreadable (then it is redone)."""
    uri = storage.join(concept_dir(output, concept_id), RESULT_NAME)
    try:
        record = json.loads(storage.read_bytes(uri, storage_options))
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_complete(record: dict | None, fingerprint: str) -> bool:
    """True when a ``result.json`` record says succeeded under this exact config fingerprint."""
    return bool(record) and record.get("status") == "succeeded" and record.get("config_fingerprint") == fingerprint


def clear_result(output: str, concept_id: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove a stale ``result.json`` so the concept no longer looks complete while it is redone."""
    storage.remove(storage.join(concept_dir(output, concept_id), RESULT_NAME), storage_options)
