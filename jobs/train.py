"""Bulk personalization on a Ray cluster: ``python -m jobs.train --manifest URI --model URI --output URI ...``.

parse (manifest validated whole, before any model loads) → build (one trainer actor per GPU, or
CPU actors on a cluster without GPUs; the model loaded once per actor) → plan (skip concepts
whose result.json matches their config fingerprint) → loop (dynamic dispatch, dead and hung
actors replaced) → save (results.parquet, run.json) → report (exit status).

Exit status: 0 every concept succeeded or was skipped; 1 some concepts failed (see
results.parquet); 2 the manifest, the arguments or the model are invalid (nothing was trained);
3 infrastructure failure (actors kept dying, no model load, storage unwritable).
With no manifest it runs the shipped demo (the toy world's 12 held-out concepts) on the embedded toy-world
model with its ``toyworld`` recipe, on a local Ray instance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray.util.metrics import Counter

from jobs import cli, lease, preflight
from jobs.actor import TrainerWorker, WorkerSetup
from jobs.common import (
    EXIT_FAILED,
    EXIT_INFRA,
    EXIT_INVALID,
    EXIT_OK,
    ClusterConfig,
    JobExit,
    actor_factory,
    connect,
    local_abs,
    run_main,
    wait_for_model,
)
from jobs.dispatch import ConceptResult, DispatchConfig, Dispatcher, InfrastructureError, Task
from jobs.report import Progress, counts, result_rows, write_results, write_run
from tinv import storage
from tinv.errors import ClassPicturesError, ConceptDataError, InitializerError, LostResultError, TransientError
from tinv.evaluation.metrics import parse_requests
from tinv.evaluation.sampling import SampleConfig
from tinv.files import catalog, outputs, webui
from tinv.files.catalog import PublishConfig
from tinv.manifest import ConceptSpec, read_manifest
from tinv.plan import config_fingerprint, resolve
from tinv.settings import PRESETS, TrainConfig
from tinv.training import classes, starts

REPO = Path(__file__).resolve().parent.parent
DISPATCH_SET_BY_JOB = ("num_actors", "concepts_per_actor")
"""DispatchConfig fields the job fills in itself (the actor count found on the cluster; K from TrainConfig)."""
log = logging.getLogger("tinv.train")


FLAGS: tuple[tuple[str, str, tuple[tuple[type, tuple[str, ...]], ...]], ...] = (
    ("data", "what to learn, from which base model, and where the files go", (
        (TrainConfig, ("resolution", "aspect_buckets")),)),
    ("method", "how each concept learns (a manifest row may override some)", (
        (TrainConfig, ("learning_rate", "lora_rank", "lora_learning_rate", "lora_targets", "lora_text_encoder",
                       "caption_dropout", "prior_preservation", "prior_loss_weight", "class_images", "init",
                       "train_t5")),)),
    ("schedule", "how long and how many at once", (
        (TrainConfig, ("steps", "batch_size", "seed", "early_stop", "concepts_per_actor")),)),
    ("evaluation and publishing", "each concept's samples, and what the serving catalog takes", (
        (SampleConfig, ("samples_per_prompt", "sample_steps", "guidance", "metrics")),
        (PublishConfig, ("publish_if", "export")))),
    ("cluster", "where and how the actors run", (
        (ClusterConfig, ("accelerator", "num_actors", "precision", "base_precision", "attention",
                         "gradient_checkpointing", "storage_options", "storage_retry_s", "take_over")),
        (DispatchConfig, ("max_attempts",)))),
)
"""The job's flags, by group: the settings a user of a personalization trainer sets. Every other field keeps its
default here (the objective's finer terms are :class:`tinv.settings.Recipe`'s); the Ray cluster is
``$RAY_ADDRESS`` (``ray job submit`` sets it), else a new local instance."""
DEMO_MANIFEST = "manifests/demo.parquet"
"""The shipped demo manifest, relative to the repository root (the job's working directory)."""
DEMO_RECIPE = "toyworld"
"""The demo trains with the toy world's preset (:data:`tinv.settings.PRESETS`), as the toy model was tuned."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0].replace("``", ""))
    for title, about, fields in FLAGS:
        group = p.add_argument_group(title, about)
        if title == "data":
            group.add_argument("--manifest", default=None, help="Parquet manifest URI (needs --model); none: the "
                               "shipped demo on the embedded toy-world model")
            group.add_argument("--model", default=None, help="base model: hub id, diffusers folder or fsspec URI")
            group.add_argument("--output", default="out/demo", help="output folder URI (default: out/demo)")
        for cls, names in fields:
            cli.add_fields(group, cls, only=names)
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Everything the job reads before it connects to Ray, validated."""

    manifest: str
    output: str
    train: TrainConfig
    samples: SampleConfig
    publish: PublishConfig
    cluster: ClusterConfig
    storage_options: dict[str, Any] | None
    specs: list[ConceptSpec]


def read_inputs(args: argparse.Namespace) -> Inputs:
    """The URIs, configs and every validated spec; invalid input ends the job (exit 2) before Ray starts.

    A manifest trains against the ``--model`` it names: the embedded toy-world model runs only for the
    demo, so a production run never trains toys by accident.
    """
    if args.manifest and not args.model:
        raise JobExit(EXIT_INVALID, "invalid input: --manifest needs --model, the base model to train against "
                                    "(a hub id, a diffusers folder or an fsspec URI); the embedded toy-world "
                                    "model runs only for the demo (no --manifest)")
    if not args.manifest and args.model:
        raise JobExit(EXIT_INVALID, "invalid input: --model needs --manifest (the demo runs on the embedded model)")
    manifest = args.manifest or (DEMO_MANIFEST if Path(DEMO_MANIFEST).exists() else str(REPO / DEMO_MANIFEST))
    manifest, output = local_abs(manifest), local_abs(args.output)
    cluster = cli.build(ClusterConfig, args)
    storage_options = cluster.parsed_storage_options()
    try:
        demo = {} if args.manifest else {"recipe": PRESETS[DEMO_RECIPE]}
        train, samples = cli.build(TrainConfig, args, **demo), cli.build(SampleConfig, args)
        publish = cli.build(PublishConfig, args)
        parse_requests(samples.metrics)
        return Inputs(manifest, output, train, samples, publish, cluster, storage_options,
                      read_manifest(manifest, storage_options))
    except ValueError as e:  # ManifestError, UnknownMetricError and the configs' checks
        raise JobExit(EXIT_INVALID, f"invalid input: {e}") from e


def plan(
    specs: list[ConceptSpec], cfg: TrainConfig, model: dict, manifest: str, output: str,
    storage_options: dict | None, start: str = starts.WORD, triggers: dict[str, str | ConceptDataError] | None = None,
) -> tuple[list[Task], dict[str, ConceptResult]]:
    """Tasks to run, each a concept's settings resolved once (:func:`tinv.plan.resolve`, its spec with its trigger
    from ``triggers``: :func:`tinv.files.webui.resolve_triggers`) with its config fingerprint; and the results of
    the concepts skipped (their ``result.json`` matching) or refused (their trigger). ``start``: the run's
    :func:`tinv.training.starts.start_id`."""
    todo, results = [], {}
    for spec in specs:
        trigger = (triggers or {}).get(spec.concept_id, spec.trigger)
        if isinstance(trigger, ConceptDataError):
            results[spec.concept_id] = ConceptResult.failed(spec.concept_id, spec.placeholder_token, trigger)
            continue
        settings = resolve(dataclasses.replace(spec, trigger=trigger or spec.trigger), cfg)
        fp = config_fingerprint(settings, cfg, model, manifest_dir=storage.parent(manifest), start=start)
        record = outputs.read_result(output, spec.concept_id, storage_options)
        if outputs.is_complete(record, fp):
            results[spec.concept_id] = ConceptResult(spec.concept_id, "skipped", record.get("token"),
                                                     attempts=record.get("attempts", 0), worker=record.get("worker"),
                                                     seconds=record.get("seconds"), record=record)
        else:
            if record is not None:  # stale: it must not look complete while it is redone
                outputs.clear_result(output, spec.concept_id, storage_options)
            todo.append(Task(settings, fp))
    return todo, results


def draw_classes(
    dispatcher: Dispatcher, todo: list[Task], cfg: TrainConfig, model: dict, output: str,
    storage_options: dict | None,
) -> tuple[list[Task], dict[str, ConceptResult], dict[str, int]]:
    """Draw each class set the concepts to train need and do not have yet, once, on the trainer actors,
    batched across classes (DreamBooth's prior preservation, the bulk way). The concepts of a class whose
    drawing failed fail with its reason; the rest train. Returns the tasks left, those failures, counts."""
    wanted: dict[str, tuple[classes.ClassSet, list[Task]]] = {}
    for task in todo:
        for prompt in task.spec.drawn_class_prompts:
            cls = classes.class_set(prompt, cfg, model)
            wanted.setdefault(cls.key, (cls, []))[1].append(task)
    missing = [cls for cls, _ in wanted.values() if not classes.is_done(output, cls, storage_options)]
    log.info("class pictures: %d classes wanted, %d to draw", len(wanted), len(missing))
    drawn: dict[str, ConceptResult] = {}
    if missing:
        dispatcher.run([Task(cls) for cls in missing], method="draw_classes",
                       on_result=lambda r: drawn.__setitem__(r.concept_id, r))
    failed = {}
    for key, (cls, tasks) in wanted.items():
        outcome = drawn.get(key)
        for task in tasks if outcome is not None and outcome.status != "succeeded" else []:
            error = ClassPicturesError(task.spec.concept_id, f"its class pictures ({cls.prompt!r}) could not be "
                                                             f"drawn: {outcome.error_type}: {outcome.error}")
            failed[task.spec.concept_id] = ConceptResult.failed(task.spec.concept_id, task.spec.placeholder_token,
                                                                error, worker=outcome.worker)
    counts = {"wanted": len(wanted), "drawn": sum(r.status == "succeeded" for r in drawn.values()),
              "failed": sum(r.status != "succeeded" for r in drawn.values())}
    return [t for t in todo if t.spec.concept_id not in failed], failed, counts


def main(argv: list[str] | None = None) -> int:
    return run_main(run, parse_args, argv)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    # -- parse and check, before anything starts ----------------------------------------
    inputs = read_inputs(args)
    cfg, output, storage_options = inputs.train, inputs.output, inputs.storage_options
    storage.set_retry_window(inputs.cluster.storage_retry_s)
    log.info("manifest %s: %d concepts valid; output %s", inputs.manifest, len(inputs.specs), output)
    try:
        start, start_key = starts.load_start(cfg.init, storage_options)
    except InitializerError as e:
        raise JobExit(EXIT_INVALID, f"invalid input: --init {cfg.init}: {e}") from e
    preflight.check_model(args.model)
    preflight.check_output(output, run_id, storage_options)
    try:
        held = lease.acquire(output, run_id, storage_options, take_over=inputs.cluster.take_over)
    except lease.LeaseHeldError as e:
        raise JobExit(EXIT_INVALID, f"invalid input: {e}") from e
    heartbeat = lease.Heartbeat(output, held, storage_options)
    try:
        return train_and_account(args, inputs, run_id, started, start, start_key, heartbeat)
    finally:
        try:
            lease.release(output, heartbeat.stop(), storage_options)
        except OSError as e:  # storage down: the lease ages out, or the next run on this host takes it over
            log.warning("could not release the lease on %s: %s", output, e)


def train_and_account(args: argparse.Namespace, inputs: Inputs, run_id: str, started: float, start: starts.Start,
                      start_key: str, heartbeat: lease.Heartbeat) -> int:
    """Build the actors, plan, draw the class pictures, train; then account for the run from what is on storage."""
    cfg, output, storage_options = inputs.train, inputs.output, inputs.storage_options
    connect(inputs.cluster.ray_address)
    setup_kw = dict(model=args.model, train=cfg, output=output, storage_options=storage_options,
                    export=inputs.publish.export, precision=inputs.cluster.precision,
                    base_precision=inputs.cluster.base_precision,
                    attention=inputs.cluster.attention, gradient_checkpointing=inputs.cluster.gradient_checkpointing,
                    samples=inputs.samples, storage_retry_s=inputs.cluster.storage_retry_s)
    make_actor, n_actors = actor_factory(inputs.cluster, lambda threads: WorkerSetup(threads=threads, **setup_kw),
                                         TrainerWorker)
    dispatch = cli.build(DispatchConfig, args, num_actors=n_actors, concepts_per_actor=cfg.concepts_per_actor)
    results: dict[str, ConceptResult] = {}
    progress = Progress(len(inputs.specs), {"succeeded": Counter("tinv_concepts_succeeded", "concepts trained"),
                                            "failed": Counter("tinv_concepts_failed", "concepts failed")})

    def on_result(result: ConceptResult) -> None:
        results[result.concept_id] = result
        progress.update(result)

    def probe() -> None:  # asked when an actor reports an outage: storage answers, or the run stops
        uri = storage.join(output, f"{preflight.PROBE}-{run_id}")
        storage.write_bytes(uri, b"tinv", storage_options)
        storage.remove(uri, storage_options)

    dispatcher = Dispatcher(make_actor, dispatch, on_result, probe=probe, stop=lambda: heartbeat.lost)
    model = wait_for_model(dispatcher, args.model)
    loaded = time.time()
    if start.initializer is not None:
        try:
            start.initializer.check(model["base_model_fingerprint"])
        except InitializerError as e:
            dispatcher.shutdown()
            raise JobExit(EXIT_INVALID, f"invalid input: --init {cfg.init}: {e}") from e
    # -- plan + loop ---------------------------------------------------------------------
    infra_error, class_counts, todo, planned = None, {"wanted": 0, "drawn": 0, "failed": 0}, [], {}
    try:
        triggers = webui.resolve_triggers(((s.concept_id, s.trigger) for s in inputs.specs),
                                          lambda words: set(dispatcher.ask("one_token_words", words)))
        todo, planned = plan(inputs.specs, cfg, model, inputs.manifest, output, storage_options, start_key, triggers)
        results.update(planned)
        progress.total, progress.started = len(todo), time.monotonic()
        log.info("plan: %d to train, %d skipped (already done), %d refused", len(todo),
                 sum(r.status == "skipped" for r in planned.values()),
                 sum(r.status == "failed" for r in planned.values()))
        todo, class_failed, class_counts = draw_classes(dispatcher, todo, cfg, model, output, storage_options)
        for result in class_failed.values():
            on_result(result)
        dispatcher.run(todo)
    except (InfrastructureError, TransientError) as e:
        infra_error = str(e)
        print(f"[tinv] infrastructure failure: {e}", file=sys.stderr, flush=True)
    dispatcher.shutdown()
    # -- save: from what is on storage ---------------------------------------------------
    fingerprints = {t.spec.concept_id: t.fingerprint for t in todo}
    record = {"manifest": inputs.manifest, "output": output, "model_uri": args.model, "train_config": asdict(cfg),
              "samples": asdict(inputs.samples), "cluster": inputs.cluster.recorded(), "dispatch": asdict(dispatch),
              "base_model": model["base_model"], "base_model_fingerprint": model["base_model_fingerprint"],
              "model": {k: model[k] for k in ("resolution", "dtype", "base_precision", "device")}, "actors": n_actors,
              "actors_replaced": dispatcher.replaced, "storage_outages": dispatcher.outages, "infra_error": infra_error,
              "classes": class_counts, "start": start_key, "publish": asdict(inputs.publish), "run_id": run_id,
              "lease_lost": heartbeat.lost}
    infra_error = infra_error or heartbeat.lost
    accounted = account(inputs, results, fingerprints, planned, infra_error)
    return save(inputs, accounted, record, run_id, started, loaded, infra_error)


def account(inputs: Inputs, results: dict[str, ConceptResult], fingerprints: dict[str, str],
            planned: dict[str, ConceptResult], infra_error: str | None) -> dict[str, ConceptResult]:
    """Every concept's result as storage has it now: a succeeded or skipped one only while its ``result.json`` is
    there under the fingerprint it was planned with (re-read, not remembered); one that is not (another writer
    replaced it, or the run stopped before it) is failed with why. Storage down now: the results as they came."""
    out = dict(results)
    try:
        for cid, result in results.items():
            if result.status == "failed":
                continue
            on_disk = outputs.read_result(inputs.output, cid, inputs.storage_options)
            fp = fingerprints.get(cid) or (planned[cid].record or {}).get("config_fingerprint")
            if on_disk is None or on_disk.get("config_fingerprint") != fp:
                why = "its result.json is gone" if on_disk is None else "its result.json is another run's"
                out[cid] = ConceptResult.failed(cid, result.token, LostResultError(cid, why))
            else:
                out[cid] = dataclasses.replace(result, record=on_disk)
    except TransientError:  # storage down: what the actors reported is all there is to say
        return results
    return out


def save(inputs: Inputs, results: dict[str, ConceptResult], record: dict[str, Any], run_id: str, started: float,
         loaded: float, infra_error: str | None) -> int:
    """``results.parquet``, ``run.json`` and (when the run was whole) the catalog and ``latest``; the exit code.
    Storage down: the rows go to the log, and the run exits 3 (a re-run finishes only what is not done)."""
    output, storage_options, publish = inputs.output, inputs.storage_options, inputs.publish
    held_back = {cid: publish.held_back(r.record) for cid, r in results.items() if r.status != "failed"}
    rows: list[dict[str, Any]] = result_rows(inputs.specs, results, held_back)
    try:
        published = [] if infra_error else published_records(inputs, results, held_back)
        rows = result_rows(inputs.specs, results, held_back)
        summary = counts(rows)
        code = EXIT_INFRA if infra_error else EXIT_FAILED if summary["failed"] else EXIT_OK
        finished = time.time()
        record |= {"counts": summary, "exit_code": code, "infra_error": infra_error,
                   "catalog": {"published": len(published), "held_back": sum(v is not None for v in held_back.values()),
                               "written": not infra_error},
                   "timings": {"started": started, "finished": finished, "seconds": round(finished - started, 3),
                               "load_seconds": round(loaded - started, 3),
                               "train_seconds": round(finished - loaded, 3)}}
        write_results(output, rows, storage_options)
        write_run(output, record, storage_options)
        if not infra_error:  # a broken night leaves the last catalog served
            latest = catalog.write_catalog(output, run_id, published, storage_options)
            log.info("catalog: %d concepts published, %d held back; latest names %s", len(published),
                     record["catalog"]["held_back"], latest["catalog"])
    except OSError as e:  # storage down (after its window) or refusing: say in the log what could not be written
        for row in rows:
            print(f"[tinv] result {json.dumps(row, default=str, sort_keys=True)}", file=sys.stderr, flush=True)
        raise JobExit(EXIT_INFRA, f"could not write results to {output}: {e}") from e
    print(f"[tinv] {summary} in {finished - started:.1f} s; results in {storage.join(output, 'results.parquet')}; "
          f"exit {code}", file=sys.stderr, flush=True)
    return code


def published_records(inputs: Inputs, results: dict[str, ConceptResult], held_back: dict[str, str | None]
                      ) -> list[dict[str, Any]]:
    """The ``result.json`` of every concept that passes the gate and whose served files are on storage as it says,
    in manifest order (:func:`tinv.files.catalog.on_disk`)."""
    out = []
    for spec in inputs.specs:
        cid = spec.concept_id
        if cid not in held_back or held_back[cid] is not None:
            continue
        differs = catalog.on_disk(inputs.output, results[cid].record, inputs.storage_options)
        if differs:
            log.warning("%s held back from the catalog: %s", cid, differs)
            held_back[cid] = differs
            continue
        out.append(results[cid].record)
    return out


if __name__ == "__main__":
    sys.exit(main())
