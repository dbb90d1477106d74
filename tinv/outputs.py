"""Per-concept outputs: where they go, the config fingerprint, and ``result.json`` (written last).

``{output}/concepts/{concept_id}/`` holds the learned files (and ``webui/``, :mod:`tinv.webui`), the samples
and then ``result.json``; a concept
is complete exactly when its ``result.json`` exists, and it is skipped on a re-run only when that
file's fingerprint matches the concept's current config fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

from tinv import storage
from tinv.config import CONCEPT_ID, ConceptSpec, TrainConfig
from tinv.fingerprint import FINGERPRINT_VERSION
from tinv.formats import CONCEPTS_LIBRARY, DIFFUSERS_NAME, concepts_library_files, embedding_files
from tinv.lora_files import LORA_NAME, lora_files, training_metadata
from tinv.resolved import resolve
from tinv.train import TrainedConcept
from tinv.webui import default_trigger, preview_path

RESULT_NAME = "result.json"
TRAIN_FIELDS = ("weight_decay", "adam_betas", "adam_eps", "min_timestep_fraction")
"""Run-level fields that change a concept's result besides those :func:`tinv.resolved.resolve` fills in.

K (``concepts_per_actor``) and ``max_vectors`` do not: a packed concept equals a solo one.
"""
LORA_SPEC_FIELDS = ("method", "lora_rank", "class_prompt", "prior_loss_weight")
"""Spec fields that only count for a lora / pivotal concept."""
SET_ONLY_SPEC_FIELDS = ("trigger", "masks", "mask_from_alpha")
"""Spec fields hashed only when set: unset, a spec hashes as it did before they existed."""
LORA_FIELDS = ("lora_learning_rate", "lora_targets")
"""Run fields that only count for a lora / pivotal concept."""
CLASS_FIELDS = ("class_images", "class_sample_steps", "class_guidance")
"""Run fields that only count for a concept with prior preservation (they make its class pictures)."""
DVAR_FIELDS = ("early_stop", "dvar_window", "dvar_threshold", "dvar_every", "dvar_samples")


def concept_dir(output: str, concept_id: str) -> str:
    """``{output}/concepts/{concept_id}``; refuses any id that could leave ``output``."""
    if not isinstance(concept_id, str) or not CONCEPT_ID.fullmatch(concept_id):
        raise ValueError(f"unsafe concept_id {concept_id!r}: must match {CONCEPT_ID.pattern}")
    return storage.join(output, "concepts", concept_id)


def config_fingerprint(
    spec: ConceptSpec, cfg: TrainConfig, model: dict[str, Any], manifest_dir: str | None = None,
    start: str = "word",
) -> str:
    """sha256 of the format version, the resolved spec (minus eval prompts), the result-changing run fields
    and the model, so a result written under another version or setting is redone.

    The per-concept values come from :func:`tinv.resolved.resolve`, the function the trainer uses.
    ``model`` holds ``base_model_fingerprint``, ``resolution``, ``dtype`` and ``templates`` (the training
    prompt templates, a digest) of the loaded model. Image URIs (not their bytes) are part of the spec;
    those under ``manifest_dir`` count as written in the manifest (relative), so a manifest folder that
    moves (a job's working dir) keeps its results. Settings that only act in some runs count only there:
    the fp16 loss scale under fp16, the DVAR settings with early stopping on, caption dropout when not 0 and
    blank prompt preservation when on for a concept with an adapter (its weight too, when not the class loss's),
    ``output`` or ``both`` prior preservation and the class pictures' settings (``images``, ``both``) for one
    with a class prompt, and ``start`` (:func:`tinv.starts.start_id`: ``cross``, or a learned initializer's
    content hash) for a concept with new vectors, when it is not the word start.
    """
    settings = resolve(spec, cfg)
    skip = ("eval_prompts", *LORA_SPEC_FIELDS, *SET_ONLY_SPEC_FIELDS)
    spec_part = {k: v for k, v in dataclasses.asdict(spec).items() if k not in skip}
    spec_part |= {k: getattr(spec, k) for k in SET_ONLY_SPEC_FIELDS if getattr(spec, k)}  # files renamed, loss masked
    spec_part |= {k: getattr(settings, k) for k in ("steps", "learning_rate", "seed", "flip_p")}
    if spec.method != "ti":  # a ti concept hashes as it did before methods existed
        spec_part |= {"method": spec.method, "lora_rank": settings.lora_rank}
    if spec.class_prompt:  # and so does a concept without prior preservation
        spec_part |= {"class_prompt": spec.class_prompt, "prior_loss_weight": settings.prior_loss_weight}
    if manifest_dir:
        prefix = manifest_dir.rstrip("/") + "/"
        for key in ("images", "masks"):
            if key in spec_part:
                spec_part[key] = [u.removeprefix(prefix) for u in getattr(spec, key)]
    train_part = {k: getattr(cfg, k) for k in TRAIN_FIELDS}
    train_part |= {"batch_size": settings.batch_size, "timestep_power": settings.timestep_power}
    if spec.method != "ti":
        train_part |= {k: getattr(cfg, k) for k in LORA_FIELDS}
        if cfg.lora_text_encoder:  # off, a lora concept hashes as before it existed
            train_part["lora_text_encoder"] = True
            if cfg.lora_text_encoder_learning_rate is not None:
                train_part["lora_text_encoder_learning_rate"] = cfg.lora_text_encoder_learning_rate
        if cfg.caption_dropout:  # none, likewise
            train_part["caption_dropout"] = cfg.caption_dropout
    if settings.drawn_class_prompts:
        train_part |= {k: getattr(cfg, k) for k in CLASS_FIELDS}
    if settings.prior_preservation not in (None, "images"):  # images (the default): hashed as before this existed
        train_part["prior_preservation"] = settings.prior_preservation
    if settings.blank_prompt_preservation:  # off, likewise
        train_part |= {"blank_prompt_preservation": True, "prior_loss_weight": settings.prior_loss_weight}
        if settings.blank_loss_weight != settings.prior_loss_weight:  # a weight of its own; else as before it
            train_part["blank_prompt_loss_weight"] = settings.blank_loss_weight
    if model["dtype"] == "torch.float16":
        train_part |= {"loss_scale": cfg.loss_scale, "loss_scale_growth_interval": cfg.loss_scale_growth_interval}
    if cfg.early_stop:
        train_part |= {k: getattr(cfg, k) for k in DVAR_FIELDS}
    if not cfg.aspect_buckets:  # on (the default), a run hashes as before buckets: square pictures train the same
        train_part["aspect_buckets"] = False
    if start != "word" and settings.trains_vectors:
        train_part["start"] = start
    model_part = {k: model[k] for k in ("base_model_fingerprint", "resolution", "dtype", "templates")}
    blob = json.dumps({"version": FINGERPRINT_VERSION, "spec": spec_part, "train": train_part, "model": model_part},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def loss_summary(losses: list[float]) -> dict[str, float | int]:
    """First, last, min and final (mean of the last tenth) loss."""
    if not losses:
        return {"n": 0}
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "n": len(losses),
        "first": losses[0],
        "last": losses[-1],
        "min": min(losses),
        "final": sum(tail) / len(tail),
    }


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def write_concept(
    output: str,
    trained: TrainedConcept,
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
    files = learned_files(trained, {**model_info, "config_fingerprint": fingerprint}, trigger, export)
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
    trained: TrainedConcept, metadata: dict[str, str], trigger: str | None = None, export: tuple[str, ...] = ()
) -> dict[str, bytes]:
    """File name → bytes of what a concept learned: its embedding files (a new token), its LoRA files, and the
    ``export`` layouts (``concepts-library`` for a new token); the web-UI ones are named for ``trigger``
    (default :func:`tinv.webui.default_trigger`)."""
    spec, files = trained.spec, {}
    trigger = trigger or default_trigger(spec.concept_id)
    if trained.vectors is not None:
        files |= embedding_files(spec.concept_id, spec.placeholder_token, trigger, trained.vectors, metadata)
        if CONCEPTS_LIBRARY in export:
            files |= concepts_library_files(spec.placeholder_token, trained.vectors, spec.learnable_property)
    if trained.lora is not None:
        prompts = {"class_prompt": json.dumps(list(spec.class_prompts))} if spec.class_prompts else {}
        files |= lora_files(spec.concept_id, spec.placeholder_token, trigger, spec.method, trained.lora_rank,
                            trained.lora, trained.vectors, metadata | prompts | training_metadata(trained.training),
                            trained.text_lora)
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
    fs, path = storage.filesystem(storage.join(concept_dir(output, concept_id), RESULT_NAME), storage_options)
    try:
        storage.retry(lambda: fs.rm_file(path))
    except FileNotFoundError:
        pass
