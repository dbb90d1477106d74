"""Batched evaluation on a Ray cluster: ``python -m jobs.evaluate --run URI``, ``--embeddings URI ...`` or
``--lora URI ...``.

Regenerates samples, grids and metrics for a training run's concepts of every method (read from its
``results.parquet`` and each concept's ``result.json``), or draws embedding or LoRA files given directly
(any embedding format diffusers loads; a LoRA in diffusers' or kohya's layout). Evaluation actors each
hold one model and pipeline; the driver hands them concepts in chunks with the train job's dispatcher
(same fault handling: a dead or hung actor is replaced and its concepts re-queued), and each call draws
all of its concepts' images in batches that mix concepts. Writes ``concepts/{id}/samples/*.png``, ``grid.png``,
``train/*.png``, then ``eval.parquet`` (a row per image and per concept) and ``index.html``.

Exit status: 0 every concept drawn; 1 some failed (their reasons are in eval.parquet); 2 invalid
input; 3 infrastructure failure.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import sys
import time
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import cli
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
from jobs.dispatch import DispatchConfig, Dispatcher, InfrastructureError, Task
from jobs.eval_actor import EvalResult, EvalSetup, EvalSpec, EvalWorker
from jobs.report import METRICS_TYPE, Progress, read_run
from tinv import storage
from tinv.evaluation.metrics import parse_requests
from tinv.evaluation.sampling import SampleConfig
from tinv.files import outputs
from tinv.files.gallery import gallery_html

log = logging.getLogger("tinv.evaluate")
EVAL_COLUMNS = pa.schema([
    ("kind", pa.string()),  # "image" or "concept" (per-concept means)
    ("concept_id", pa.string()),
    ("token", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("image", pa.string()),
    ("images", pa.int64()),
    ("metrics", METRICS_TYPE),
])
DISPATCH_DEFAULTS = {"concepts_per_actor": 8, "calls_in_flight": 1}
"""An evaluation actor draws 8 concepts of one call in mixed batches, one call at a time."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a training run's output folder URI (reads results.parquet)")
    src.add_argument("--embeddings", nargs="+", help="embedding file URIs (any layout diffusers or the web UIs "
                     "load, for the model's family)")
    src.add_argument("--lora", nargs="+", help="LoRA file URIs (diffusers or kohya layout; a pivotal one's "
                     "bundled embedding is its token)")
    p.add_argument("--token", nargs="+", default=None, help="with --embeddings / --lora: the token of each file "
                   "(a LoRA without a bundled embedding needs its trigger word)")
    p.add_argument("--property", default="object", choices=["object", "style"], help="with --embeddings")
    p.add_argument("--prompt", nargs="+", default=None, help="prompts with {} for the token (default: per property)")
    p.add_argument("--output", default=None, help="where samples, eval.parquet and index.html go "
                   "(default: the run's folder; ./out/eval for --embeddings)")
    p.add_argument("--model", default=None, help="base model (default: the run's; needed with --embeddings)")
    cli.add_fields(p, SampleConfig, inherit=True)  # --run: what the train job drew with, unless given
    cli.add_fields(p, ClusterConfig, skip=("gradient_checkpointing", "take_over"),  # drawing takes no gradient
                   inherit=("base_precision",))  # --run: the base the run trained on, unless given
    cli.add_fields(p, DispatchConfig, skip=("num_actors",), defaults=DISPATCH_DEFAULTS)
    return p.parse_args(argv)


def run_tasks(
    run: str, prompts: list[str] | None, storage_options: dict | None
) -> tuple[list[Task], dict[str, Any]]:
    """A task per trained concept of a run (from its result.json), and the run's record (run.json)."""
    record, rows = read_run(run, storage_options)
    tasks = []
    for row in rows:
        if row["status"] == "failed":
            continue
        result = outputs.read_result(run, row["concept_id"], storage_options)
        if result is None:
            raise JobExit(EXIT_INVALID, f"invalid input: {row['concept_id']} has no readable result.json in {run}")
        uris = [storage.resolve(result[k], run) if result.get(k) else "" for k in ("embedding_uri", "lora_uri")]
        spec = EvalSpec(row["concept_id"], result["token"], result.get("learnable_property", "object"),
                        tuple(prompts or result.get("eval_prompts", ())), tuple(result.get("images", ())), *uris)
        tasks.append(Task(spec))
    return tasks, record


def run_model(record: dict[str, Any]) -> str | None:
    """The model URI a run was trained with, as given (None: the embedded model); older runs kept it in args."""
    return record["model_uri"] if "model_uri" in record else (record.get("args") or {}).get("model")


def run_base_precision(args: argparse.Namespace, record: dict[str, Any]) -> str:
    """``--base-precision`` if given, else how the run's frozen denoiser was stored (its samples were drawn on that
    base; ``auto`` for runs recorded before the flag)."""
    return getattr(args, "base_precision", None) or (record.get("model") or {}).get("base_precision", "auto")


def sample_config(args: argparse.Namespace, recorded: dict[str, Any] | None) -> SampleConfig:
    """The flags given, else what the run drew its samples with (``recorded``), else the defaults."""
    known = {k: v for k, v in (recorded or {}).items() if k in SampleConfig.__dataclass_fields__}
    known = {k: tuple(v) if isinstance(v, list) else v for k, v in known.items()}
    return SampleConfig(**{**known, **cli.values(args, SampleConfig)})


def file_tasks(args: argparse.Namespace) -> list[Task]:
    """A task per embedding or LoRA file given on the command line."""
    files, flag = (args.embeddings, "--embeddings") if args.embeddings else (args.lora, "--lora")
    tokens = args.token or [None] * len(files)
    if len(tokens) != len(files):
        raise JobExit(EXIT_INVALID, f"invalid input: {len(tokens)} --token for {len(files)} {flag}")
    tasks, seen = [], set()
    for uri, token in zip(files, tokens):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", uri.rstrip("/").rsplit("/", 1)[-1].split(".")[0]).strip("-.")
        cid = stem if stem not in seen else f"{stem}-{len(seen)}"
        seen.add(cid)
        uris = (local_abs(uri), "") if args.embeddings else ("", local_abs(uri))
        tasks.append(Task(EvalSpec(cid or "concept", token, args.property, tuple(args.prompt or ()), (), *uris)))
    return tasks  # token None: the file's own


def eval_rows(results: list[EvalResult]) -> list[dict[str, Any]]:
    """A row per image, then a row per concept (metric means; status and error for failed ones)."""
    rows = [{"kind": "image", "concept_id": r.concept_id, "token": r.token, "status": "succeeded", **image}
            for r in results for image in r.rows]
    rows += [{"kind": "concept", "concept_id": r.concept_id, "token": r.token, "status": r.status, "error": r.error,
              "images": len(r.rows), "metrics": r.metrics} for r in results]
    return rows


def write_eval(output: str, title: str, results: list[EvalResult], storage_options: dict | None) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(eval_rows(results), schema=EVAL_COLUMNS), sink)
    storage.write_bytes(storage.join(output, "eval.parquet"), sink.getvalue(), storage_options)
    storage.write_bytes(storage.join(output, "index.html"), gallery_html(title, results).encode(), storage_options)


def main(argv: list[str] | None = None) -> int:
    return run_main(run, parse_args, argv)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    cluster = cli.build(ClusterConfig, args, gradient_checkpointing=False)
    storage_options = cluster.parsed_storage_options()
    storage.set_retry_window(cluster.storage_retry_s)
    recorded = None
    if args.run:
        source = local_abs(args.run)
        tasks, record = run_tasks(source, args.prompt, storage_options)
        model, recorded = args.model or run_model(record), record.get("samples")
        cluster = replace(cluster, base_precision=run_base_precision(args, record))
        output = local_abs(args.output or source)
    else:
        flag = "--embeddings" if args.embeddings else "--lora"
        if not args.model:
            raise JobExit(EXIT_INVALID, f"invalid input: {flag} needs --model, the base model to draw them with")
        source, tasks, model = f"{flag.removeprefix('--')} files", file_tasks(args), args.model
        output = local_abs(args.output or "out/eval")
    try:
        samples = sample_config(args, recorded)
        parse_requests(samples.metrics)
    except ValueError as e:  # UnknownMetricError and SampleConfig's checks
        raise JobExit(EXIT_INVALID, f"invalid input: {e}") from e
    connect(cluster.ray_address)
    setup_kw = dict(model=model, output=output, samples=samples, storage_options=storage_options,
                    storage_retry_s=cluster.storage_retry_s,
                    precision=cluster.precision, base_precision=cluster.base_precision, attention=cluster.attention)
    make_actor, n_actors = actor_factory(cluster, lambda threads: EvalSetup(threads=threads, **setup_kw), EvalWorker)
    dispatch = cli.build(DispatchConfig, args, num_actors=min(n_actors, max(1, len(tasks))))
    results: dict[str, EvalResult] = {}
    progress = Progress(len(tasks))

    def on_result(result: EvalResult) -> None:
        results[result.concept_id] = result
        progress.update(result)

    dispatcher = Dispatcher(make_actor, dispatch, on_result, method="evaluate", failure=EvalResult.failed)
    try:
        wait_for_model(dispatcher, model)
        dispatcher.run(tasks)
    except InfrastructureError as e:
        raise JobExit(EXIT_INFRA, f"infrastructure failure: {e}") from e
    finally:
        dispatcher.shutdown()
    ordered = [results[t.spec.concept_id] for t in tasks]
    write_eval(output, f"tinv evaluation: {source}", ordered, storage_options)
    failed = sum(r.status != "succeeded" for r in ordered)
    print(f"[tinv] {len(ordered) - failed} concepts drawn, {failed} failed in {time.time() - started:.1f} s; "
          f"{storage.join(output, 'index.html')}", file=sys.stderr, flush=True)
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
