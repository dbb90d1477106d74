"""Fit a learned start on earlier runs: ``python -m jobs.fit_init --runs URI [URI ...] --output URI``.

Gathers every succeeded concept with new token vectors (``ti``, ``pivotal``) of the given training runs, its
training pictures and learned vectors, and fits :mod:`tinv.training.starts` on them (HyperDreamBooth's idea,
Ruiz et al. 2023, arXiv 2307.06949: a start learned across many concepts), holding out a share of the
concepts to report its error. Runs of different base models are refused, not mixed. The features and the
fit run in one Ray task, on a GPU when the cluster has one. Writes ``{output}/initializer.safetensors``
(what ``jobs.train --init`` takes) and ``{output}/fit.json`` (counts, errors, timings).

Exit status: 0 fitted; 2 invalid input (no run, runs of different base models, no concept to learn from);
3 infrastructure failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray

from jobs import cli
from jobs.actor import load_model
from jobs.common import EXIT_INFRA, EXIT_INVALID, EXIT_OK, ClusterConfig, JobExit, connect, local_abs, run_main
from jobs.evaluate import run_model
from jobs.report import read_run
from tinv import storage
from tinv.errors import ConceptDataError
from tinv.evaluation.evaluate import read_embedding
from tinv.files import outputs
from tinv.training.pictures import load_images
from tinv.training.starts import INITIALIZER_NAME, VAE_FEATURES, Example, fit, picture_features

log = logging.getLogger("tinv.fit_init")


@dataclass(frozen=True)
class FitConfig:
    """What the initializer is fitted from and how."""

    clip_model: str | None = None
    """A CLIP image model (hub id or folder) whose embeddings are the features; None: the base model's VAE
    latents (no extra weights)."""
    holdout: float = 0.2
    """Share of the concepts held out to report the error on (none below 5 concepts of a vector count)."""
    fit_steps: int = 2000
    """Full-batch AdamW steps of each network."""
    hidden: int = 256
    """Hidden width of each network."""
    seed: int = 0
    """Seed of the held-out split and of the networks' initialisation."""

    def __post_init__(self) -> None:
        if not 0 <= self.holdout < 1 or self.fit_steps < 1 or self.hidden < 1:
            raise ValueError("FitConfig: need 0 <= holdout < 1, fit_steps >= 1, hidden >= 1")

    @property
    def features(self) -> str:
        return f"clip:{self.clip_model}" if self.clip_model else VAE_FEATURES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.fit_init", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="training runs' output folder URIs")
    p.add_argument("--output", required=True, help="folder URI for initializer.safetensors and fit.json")
    p.add_argument("--model", default=None, help="base model (default: the runs' own)")
    cli.add_fields(p, FitConfig)
    cli.add_fields(p, ClusterConfig, skip=("gradient_checkpointing", "num_actors", "take_over",
                                                   "base_precision"))
    return p.parse_args(argv)


def gather(runs: list[str], storage_options: dict | None) -> tuple[str | None, str, list[dict[str, Any]]]:
    """The first run's model URI, the runs' base-model fingerprint, and every succeeded concept with vectors
    (``concept_id``, ``images``, ``learnable_property``, ``embedding``, ``token``); refuses runs of different
    base models."""
    records, tables = {}, {}
    for run in runs:
        records[run], tables[run] = read_run(run, storage_options)
    fingerprints = {run: record["base_model_fingerprint"] for run, record in records.items()}
    if len(set(fingerprints.values())) > 1:
        found = ", ".join(f"{run}: {fp[:12]}…" for run, fp in fingerprints.items())
        raise JobExit(EXIT_INVALID, f"invalid input: the runs are of different base models ({found}); fit one "
                                    "initializer per base model")
    concepts = []
    for run, rows in tables.items():
        for row in rows:
            result = outputs.read_result(run, row["concept_id"], storage_options) if row["status"] != "failed" else None
            if result and result.get("status") == "succeeded" and result.get("embedding_uri"):
                concepts.append({"concept_id": f"{run}#{row['concept_id']}", "images": result["images"],
                                 "learnable_property": result.get("learnable_property", "object"),
                                 "embedding": storage.resolve(result["embedding_uri"], run), "token": result["token"]})
    if not concepts:
        raise JobExit(EXIT_INVALID, f"invalid input: no succeeded concept with token vectors in {runs}")
    return run_model(records[runs[0]]), fingerprints[runs[0]], concepts


def fit_task(setup: dict[str, Any], cfg: dict[str, Any], fingerprint: str, concepts: list[dict]) -> dict[str, Any]:
    """On a cluster worker: each concept's features and vectors, then the fit; its bytes and report."""
    fit_cfg, started = FitConfig(**cfg), time.perf_counter()
    model = load_model(argparse.Namespace(**setup))
    if model.info["base_model_fingerprint"] != fingerprint:
        loaded = model.info["base_model_fingerprint"]
        return {"error": f"the model loaded is {loaded[:12]}…, the runs' {fingerprint[:12]}…"}
    examples, skipped = [], {}
    for c in concepts:
        try:
            images = load_images(c["concept_id"], c["images"], model.resolution, setup["storage_options"])
            _, vectors = read_embedding(c["embedding"], c["token"], setup["storage_options"])
        except (ConceptDataError, OSError, ValueError) as e:  # this concept is left out, and said so
            skipped[c["concept_id"]] = f"{type(e).__name__}: {e}"
            continue
        examples.append(Example(picture_features(model, images, fit_cfg.features), c["learnable_property"], vectors))
    featured = time.perf_counter()
    if not examples:
        return {"error": "no concept's pictures and vectors could be read", "skipped": skipped}
    initializer = fit(examples, fingerprint, fit_cfg.features, fit_cfg.holdout, fit_cfg.seed, fit_cfg.fit_steps,
                      fit_cfg.hidden)
    initializer.stats |= {"resolution": model.resolution, "concepts": len(examples)}
    return {"initializer": initializer.to_bytes(), "stats": initializer.stats, "skipped": skipped,
            "seconds": {"features": round(featured - started, 3), "fit": round(time.perf_counter() - featured, 3)}}


def main(argv: list[str] | None = None) -> int:
    return run_main(run, parse_args, argv)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    cluster = cli.build(ClusterConfig, args)
    storage_options = cluster.parsed_storage_options()
    try:
        cfg = cli.build(FitConfig, args)
    except ValueError as e:
        raise JobExit(EXIT_INVALID, f"invalid input: {e}") from e
    runs, output = [local_abs(r) for r in args.runs], local_abs(args.output)
    model_uri, fingerprint, concepts = gather(runs, storage_options)
    model_uri = args.model or model_uri
    log.info("%d concepts from %d run(s) of base model %s…", len(concepts), len(runs), fingerprint[:12])
    connect(cluster.ray_address)
    gpus, cpus = int(ray.cluster_resources().get("GPU", 0)), int(ray.cluster_resources().get("CPU", 1))
    use_gpu = cluster.accelerator == "gpu" or (cluster.accelerator == "auto" and gpus > 0)
    threads = cluster.cpus_per_actor or (1 if use_gpu else cpus)
    setup = {"model": model_uri, "precision": cluster.precision, "base_precision": "auto",
             "attention": cluster.attention, "storage_options": storage_options, "threads": threads}
    task = ray.remote(fit_task).options(num_gpus=1 if use_gpu else 0, num_cpus=threads, max_retries=2)
    try:
        report = ray.get(task.remote(setup, asdict(cfg), fingerprint, concepts))
    except Exception as e:  # noqa: BLE001 — the worker died or the model did not load
        raise JobExit(EXIT_INFRA, f"fitting failed: {e}") from e
    if "error" in report:
        raise JobExit(EXIT_INVALID, f"invalid input: {report['error']}")
    record = {"runs": runs, "model_uri": model_uri, "base_model_fingerprint": fingerprint, "config": asdict(cfg),
              "concepts_found": len(concepts), "skipped": report["skipped"], "stats": report["stats"],
              "seconds": {**report["seconds"], "total": round(time.time() - started, 3)}}
    try:
        storage.write_bytes(storage.join(output, INITIALIZER_NAME), report["initializer"], storage_options)
        storage.write_bytes(storage.join(output, "fit.json"), json.dumps(record, indent=2).encode(), storage_options)
    except OSError as e:
        raise JobExit(EXIT_INFRA, f"could not write to {output}: {e}") from e
    print(f"[tinv] initializer fitted on {report['stats']['concepts']} concepts "
          f"({len(report['skipped'])} unreadable) in {time.time() - started:.1f} s: "
          f"{storage.join(output, INITIALIZER_NAME)}", file=sys.stderr, flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
