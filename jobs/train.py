"""Bulk Textual Inversion on a Ray cluster: ``python -m jobs.train [--manifest URI] [--output URI] ...``.

parse (manifest validated whole, before any model loads) → build (one trainer actor per GPU, or
CPU actors on a cluster without GPUs; the model loaded once per actor) → plan (skip concepts
whose result.json matches their config fingerprint) → loop (dynamic dispatch, dead and hung
actors replaced) → save (results.parquet, run.json) → report (exit status).

Exit status: 0 every concept succeeded or was skipped; 1 some concepts failed (see
results.parquet); 2 the manifest, the arguments or the model are invalid (nothing was trained);
3 infrastructure failure (actors kept dying, no model load, storage unwritable).
With no arguments it runs the shipped demo on a local Ray instance.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.metrics import Counter

from jobs.actor import TrainerWorker, WorkerSetup
from jobs.dispatch import DispatchConfig, Dispatcher, InfrastructureError, Task
from jobs.report import Progress, counts, result_rows, skipped_row, write_results, write_run
from tinv import outputs, storage
from tinv.config import ConceptSpec, TrainConfig
from tinv.manifest import ManifestError, read_manifest
from tinv.samples import SampleConfig

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INFRA = 0, 1, 2, 3
REPO = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = "manifests/demo.parquet"
log = logging.getLogger("tinv.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", default=None, help=f"Parquet manifest URI (default: the demo, {DEMO_MANIFEST})")
    p.add_argument("--output", default="out/demo", help="output folder URI (default: ./out/demo)")
    p.add_argument("--model", default=None, help="base model: hub id, folder or fsspec URI (default: embedded)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps,
                   help="default steps per concept (manifest may override)")
    p.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="samples per concept per step")
    p.add_argument("--concepts-per-actor", type=int, default=TrainConfig.concepts_per_batch,
                   help="K: concepts each actor trains at once")
    p.add_argument("--max-vectors", type=int, default=TrainConfig.max_vectors,
                   help="largest num_vectors a concept may ask for")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--min-timestep-fraction", type=float, default=TrainConfig.min_timestep_fraction,
                   help="train on the noisiest (1 - this) share of the timesteps; 0: all, as the recipe")
    p.add_argument("--style-batch-size", type=int, default=TrainConfig.style_batch_size,
                   help="samples per style concept per step")
    p.add_argument("--style-timestep-power", type=float, default=TrainConfig.style_timestep_power,
                   help="how far style concepts' timesteps lean to the noisy end (1: uniform, as objects)")
    p.add_argument("--resolution", type=int, default=None, help="training size in px (default: the model's)")
    p.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=TrainConfig.early_stop,
                   help="stop a concept once its fixed-batch loss flattens (DVAR; --dvar-* tune it)")
    p.add_argument("--dvar-window", type=int, default=TrainConfig.dvar_window, help="DVAR window in steps")
    p.add_argument("--dvar-threshold", type=float, default=TrainConfig.dvar_threshold)
    p.add_argument("--accelerator", default="auto", choices=["auto", "gpu", "cpu"],
                   help="auto: GPU actors if the cluster has GPUs now, else CPU actors; say gpu on an "
                        "autoscaling cluster that starts without GPU nodes (with --num-actors)")
    p.add_argument("--num-actors", type=int, default=None, help="default: #GPUs, or min(2, #CPUs) without GPUs")
    p.add_argument("--cpus-per-actor", type=int, default=None, help="default: 1 with GPUs, else CPUs / actors")
    p.add_argument("--max-attempts", type=int, default=3, help="tries per concept when actors die")
    p.add_argument("--concept-timeout-s", type=float, default=3600.0, help="an actor silent this long is hung")
    p.add_argument("--load-timeout-s", type=float, default=1800.0, help="longest model load per actor")
    p.add_argument("--storage-options", default=None, help="fsspec storage options as JSON (e.g. S3 endpoint)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    p.add_argument("--samples-per-prompt", type=int, default=SampleConfig.per_prompt,
                   help="evaluation images per prompt (0: none)")
    p.add_argument("--sample-steps", type=int, default=SampleConfig.steps, help="denoising steps per evaluation image")
    p.add_argument("--guidance", type=float, default=SampleConfig.guidance,
                   help="classifier-free guidance of evaluation images")
    p.add_argument("--ray-address", default=None, help="default: $RAY_ADDRESS, else start a local Ray instance")
    return p.parse_args(argv)


def local_abs(uri: str) -> str:
    """Local paths made absolute (actors and the driver may run in other folders); URIs as they are."""
    return uri if not storage.is_local(uri) else os.path.abspath(uri.removeprefix("file://"))


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, learning_rate=args.learning_rate, batch_size=args.batch_size,
        concepts_per_batch=args.concepts_per_actor, max_vectors=args.max_vectors, seed=args.seed,
        resolution=args.resolution, early_stop=args.early_stop, dvar_window=args.dvar_window,
        dvar_threshold=args.dvar_threshold, min_timestep_fraction=args.min_timestep_fraction,
        style_batch_size=args.style_batch_size, style_timestep_power=args.style_timestep_power,
    )


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``); otherwise start a local instance."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def actor_factory(
    args: argparse.Namespace, make_setup: Callable[[int], Any], worker: type = TrainerWorker
) -> tuple[Callable[[], Any], int]:
    """A function making one actor (``worker`` with ``make_setup(threads)``), and how many to run."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if args.accelerator == "cpu":
        gpus = 0
    elif args.accelerator == "gpu" and not gpus:
        if not args.num_actors:
            raise ValueError("--accelerator gpu on a cluster with no GPU yet needs --num-actors")
        gpus = args.num_actors
    n = args.num_actors or (gpus if gpus else max(1, min(2, cpus)))
    per_actor = args.cpus_per_actor or (1 if gpus else max(1, cpus // n))
    options = {"num_gpus": 1, "num_cpus": per_actor} if gpus else {"num_cpus": per_actor}
    log.info("cluster: %d GPU(s), %d CPU(s): %d %s actor(s) with %s", gpus, cpus, n, worker.__name__, options)
    setup = make_setup(per_actor)
    remote = ray.remote(worker).options(max_concurrency=8, max_restarts=0, **options)
    return (lambda: remote.remote(setup)), n


def plan(
    specs: list[ConceptSpec], cfg: TrainConfig, model: dict, manifest: str, output: str, so: dict | None
) -> tuple[list[Task], dict[str, dict]]:
    """Tasks to run, and ``results`` pre-filled with skipped concepts (result.json matching)."""
    todo, results = [], {}
    for spec in specs:
        fp = outputs.config_fingerprint(spec, cfg, model, manifest_dir=storage.parent(manifest))
        record = outputs.read_result(output, spec.concept_id, so)
        if outputs.is_complete(record, fp):
            results[spec.concept_id] = skipped_row(record)
        else:
            if record is not None:  # stale: it must not look complete while it is redone
                outputs.clear_result(output, spec.concept_id, so)
            todo.append(Task(spec, fp))
    return todo, results


class JobExit(Exception):
    """Stop the job with an exit status and a message for the log."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_inputs(args: argparse.Namespace) -> tuple[str, str, dict | None, TrainConfig, list[ConceptSpec]]:
    """Manifest URI, output URI, storage options, run config and every validated spec."""
    manifest = args.manifest or (DEMO_MANIFEST if Path(DEMO_MANIFEST).exists() else str(REPO / DEMO_MANIFEST))
    manifest, output = local_abs(manifest), local_abs(args.output)
    try:
        so = json.loads(args.storage_options) if args.storage_options else None
        return manifest, output, so, train_config(args), read_manifest(manifest, so)
    except (ManifestError, ValueError) as e:
        raise JobExit(EXIT_INVALID, f"invalid input: {e}") from e


def wait_for_model(dispatcher: Dispatcher, model_uri: str | None) -> dict[str, Any]:
    """The loaded model's info, once every actor has it (all the same model)."""
    try:
        infos = dispatcher.wait_ready()
    except (RayActorError, RayTaskError, InfrastructureError) as e:
        code = EXIT_INVALID if "ModelLayoutError" in str(e) else EXIT_INFRA
        raise JobExit(code, f"could not load the model {model_uri or '(embedded)'}: {e}") from e
    if len({i["base_model_fingerprint"] for i in infos}) != 1:
        raise JobExit(EXIT_INFRA, f"actors loaded different models: {infos}")
    return infos[0]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.time()
    try:
        return run(parse_args(argv), started)
    except JobExit as e:
        print(f"[tinv] {e}", file=sys.stderr, flush=True)
        return e.code


def run(args: argparse.Namespace, started: float) -> int:
    # -- parse ---------------------------------------------------------------------------
    manifest, output, so, cfg, specs = read_inputs(args)
    log.info("manifest %s: %d concepts valid; output %s", manifest, len(specs), output)
    # -- build ---------------------------------------------------------------------------
    connect(args.ray_address)
    samples = SampleConfig(args.samples_per_prompt, args.sample_steps, args.guidance)
    setup_kw = dict(model=args.model, train=asdict(cfg), output=output, storage_options=so,
                    precision=args.precision, attention=args.attention, samples=asdict(samples))
    try:
        make_actor, n_actors = actor_factory(args, lambda threads: WorkerSetup(threads=threads, **setup_kw))
    except ValueError as e:
        raise JobExit(EXIT_INVALID, f"invalid input: {e}") from e
    dcfg = DispatchConfig(num_actors=n_actors, concepts_per_call=args.concepts_per_actor,
                          max_attempts=args.max_attempts, concept_timeout_s=args.concept_timeout_s,
                          load_timeout_s=args.load_timeout_s)
    results: dict[str, dict] = {}
    progress = Progress(len(specs), {"succeeded": Counter("tinv_concepts_succeeded", "concepts trained"),
                                     "failed": Counter("tinv_concepts_failed", "concepts failed")})

    def on_result(result: dict) -> None:
        results[result["concept_id"]] = result
        progress.update(result)

    dispatcher = Dispatcher(make_actor, dcfg, on_result)
    model = wait_for_model(dispatcher, args.model)
    loaded = time.time()
    # -- plan + loop ---------------------------------------------------------------------
    todo, skipped = plan(specs, cfg, model, manifest, output, so)
    results.update(skipped)
    progress.total, progress.started = len(todo), time.monotonic()
    log.info("plan: %d to train, %d skipped (already done)", len(todo), len(skipped))
    infra_error = None
    try:
        dispatcher.run(todo)
    except InfrastructureError as e:
        infra_error = str(e)
        print(f"[tinv] infrastructure failure: {e}", file=sys.stderr, flush=True)
    dispatcher.shutdown()
    # -- save ----------------------------------------------------------------------------
    rows = result_rows(specs, results)
    summary = counts(rows)
    code = EXIT_INFRA if infra_error else EXIT_FAILED if summary["failed"] else EXIT_OK
    finished = time.time()
    record = {
        "manifest": manifest, "output": output, "train_config": asdict(cfg), "args": vars(args),
        "base_model": model["base_model"], "base_model_fingerprint": model["base_model_fingerprint"],
        "model": {k: model[k] for k in ("resolution", "dtype", "device")}, "actors": n_actors,
        "actors_replaced": dispatcher.replaced, "counts": summary, "exit_code": code, "infra_error": infra_error,
        "timings": {"started": started, "finished": finished, "seconds": round(finished - started, 3),
                    "load_seconds": round(loaded - started, 3), "train_seconds": round(finished - loaded, 3)},
    }
    try:
        write_results(output, rows, so)
        write_run(output, record, so)
    except OSError as e:
        raise JobExit(EXIT_INFRA, f"could not write results to {output}: {e}") from e
    # -- report --------------------------------------------------------------------------
    print(f"[tinv] {summary} in {finished - started:.1f} s; results in {storage.join(output, 'results.parquet')}; "
          f"exit {code}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # a crash of the driver itself (cluster unreachable, a bug): not a data problem
        logging.getLogger("tinv.train").exception("the driver failed")
        sys.exit(EXIT_INFRA)
