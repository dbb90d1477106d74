"""Batched evaluation on a Ray cluster: ``python -m jobs.evaluate --run URI`` or ``--embeddings URI ...``.

Regenerates samples, grids and metrics for a training run's concepts (read from its
``results.parquet`` and each concept's ``result.json``), or draws embedding files given directly
(any format diffusers loads). Evaluation actors each hold one model and pipeline; the driver
hands them concepts in chunks with the train job's dispatcher (same fault handling: a dead or
hung actor is replaced and its concepts re-queued), and each call draws all of its concepts'
images in batches that mix concepts. Writes ``concepts/{id}/samples/*.png``, ``grid.png``,
``train/*.png``, then ``eval.parquet`` (a row per image and per concept) and ``index.html``.

Exit status: 0 every concept drawn; 1 some failed (their reasons are in eval.parquet); 2 invalid
input; 3 infrastructure failure.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
import time
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.actor import EvalSetup, EvalSpec, EvalWorker
from jobs.dispatch import DispatchConfig, Dispatcher, InfrastructureError, Task
from jobs.report import Progress
from jobs.train import EXIT_FAILED, EXIT_INFRA, EXIT_INVALID, EXIT_OK, JobExit, actor_factory, connect, local_abs
from tinv import outputs, storage
from tinv.gallery import gallery_html
from tinv.samples import SCHEDULERS, SampleConfig

log = logging.getLogger("tinv.evaluate")
METRICS = ("fidelity", "clip_image", "clip_text")
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
    *((m, pa.float64()) for m in METRICS),
])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a training run's output folder URI (reads results.parquet)")
    src.add_argument("--embeddings", nargs="+", help="embedding file URIs (diffusers, A1111, SDXL clip_l/clip_g)")
    p.add_argument("--token", nargs="+", default=None, help="with --embeddings: the token of each file")
    p.add_argument("--property", default="object", choices=["object", "style"], help="with --embeddings")
    p.add_argument("--prompt", nargs="+", default=None, help="prompts with {} for the token (default: per property)")
    p.add_argument("--output", default=None, help="where samples, eval.parquet and index.html go "
                   "(default: the run's folder; ./out/eval for --embeddings)")
    p.add_argument("--model", default=None, help="base model (default: the run's, else the embedded toy model)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="seeds 0..N-1 for every prompt")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--scheduler", default="dpm++", choices=sorted(SCHEDULERS))
    p.add_argument("--batch-size", type=int, default=16, help="images per denoising batch (mixing concepts)")
    p.add_argument("--clip-model", default=None, help="CLIP hub id or path: adds clip_image / clip_text")
    p.add_argument("--concepts-per-call", type=int, default=8, help="concepts an actor draws together")
    p.add_argument("--accelerator", default="auto", choices=["auto", "gpu", "cpu"])
    p.add_argument("--num-actors", type=int, default=None)
    p.add_argument("--cpus-per-actor", type=int, default=None)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--concept-timeout-s", type=float, default=3600.0)
    p.add_argument("--load-timeout-s", type=float, default=1800.0)
    p.add_argument("--storage-options", default=None, help="fsspec storage options as JSON")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    p.add_argument("--ray-address", default=None)
    return p.parse_args(argv)


def run_tasks(run: str, prompts: list[str] | None, so: dict | None) -> tuple[list[Task], str | None]:
    """A task per trained concept of a run (from its result.json), and the model the run used."""
    try:
        rows = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(run, "results.parquet"), so))).to_pylist()
        record = json.loads(storage.read_bytes(storage.join(run, "run.json"), so))
    except FileNotFoundError as e:
        raise JobExit(EXIT_INVALID, f"invalid input: {run} is not a training run's output ({e})") from e
    tasks = []
    for row in rows:
        if row["status"] == "failed":
            continue
        result = outputs.read_result(run, row["concept_id"], so)
        if result is None:
            raise JobExit(EXIT_INVALID, f"invalid input: {row['concept_id']} has no readable result.json in {run}")
        spec = EvalSpec(row["concept_id"], result["token"], result.get("learnable_property", "object"),
                        tuple(prompts or result.get("eval_prompts", ())), tuple(result.get("images", ())),
                        result["embedding_uri"])
        tasks.append(Task(spec))
    return tasks, (record.get("args") or {}).get("model")


def file_tasks(args: argparse.Namespace) -> list[Task]:
    """A task per embedding file given on the command line."""
    tokens = args.token or [None] * len(args.embeddings)
    if len(tokens) != len(args.embeddings):
        raise JobExit(EXIT_INVALID, f"invalid input: {len(tokens)} --token for {len(args.embeddings)} --embeddings")
    tasks, seen = [], set()
    for uri, token in zip(args.embeddings, tokens):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", uri.rstrip("/").rsplit("/", 1)[-1].split(".")[0]).strip("-.")
        cid = stem if stem not in seen else f"{stem}-{len(seen)}"
        seen.add(cid)
        spec = EvalSpec(cid or "concept", token, args.property, tuple(args.prompt or ()), (), local_abs(uri))
        tasks.append(Task(spec))  # token None: the file's own
    return tasks


def eval_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per image, then a row per concept (metric means; status and error for failed ones)."""
    rows = []
    for r in results:
        for image in r.get("rows", []):
            rows.append({"kind": "image", "concept_id": r["concept_id"], "token": r.get("token"),
                         "status": "succeeded", **image})
    for r in results:
        rows.append({"kind": "concept", "concept_id": r["concept_id"], "token": r.get("token"), "status": r["status"],
                     "error": r.get("error"), "images": len(r.get("rows", [])), **r.get("summary", {})})
    return rows


def write_eval(output: str, title: str, results: list[dict[str, Any]], so: dict | None) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(eval_rows(results), schema=EVAL_COLUMNS), sink)
    storage.write_bytes(storage.join(output, "eval.parquet"), sink.getvalue(), so)
    storage.write_bytes(storage.join(output, "index.html"), gallery_html(title, results).encode(), so)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(parse_args(argv))
    except JobExit as e:
        print(f"[tinv] {e}", file=sys.stderr, flush=True)
        return e.code


def run(args: argparse.Namespace) -> int:
    started = time.time()
    try:
        so = json.loads(args.storage_options) if args.storage_options else None
    except ValueError as e:
        raise JobExit(EXIT_INVALID, f"invalid input: --storage-options: {e}") from e
    if args.run:
        source = local_abs(args.run)
        tasks, run_model = run_tasks(source, args.prompt, so)
        output = local_abs(args.output or source)
    else:
        source, tasks, run_model = "embedding files", file_tasks(args), None
        output = local_abs(args.output or "out/eval")
    model = args.model or run_model
    samples = SampleConfig(args.samples_per_prompt, args.sample_steps, args.guidance, args.scheduler, args.batch_size)
    connect(args.ray_address)
    setup_kw = dict(model=model, output=output, samples=asdict(samples), clip_model=args.clip_model,
                    storage_options=so, precision=args.precision, attention=args.attention)
    try:
        make_actor, n_actors = actor_factory(args, lambda threads: EvalSetup(threads=threads, **setup_kw), EvalWorker)
    except ValueError as e:
        raise JobExit(EXIT_INVALID, f"invalid input: {e}") from e
    dcfg = DispatchConfig(num_actors=min(n_actors, max(1, len(tasks))), concepts_per_call=args.concepts_per_call,
                          calls_in_flight=1, max_attempts=args.max_attempts,
                          concept_timeout_s=args.concept_timeout_s, load_timeout_s=args.load_timeout_s)
    results: dict[str, dict] = {}
    progress = Progress(len(tasks))

    def on_result(result: dict) -> None:
        results[result["concept_id"]] = result
        progress.update(result)

    dispatcher = Dispatcher(make_actor, dcfg, on_result, method="evaluate")
    try:
        dispatcher.wait_ready()
        dispatcher.run(tasks)
    except InfrastructureError as e:
        raise JobExit(EXIT_INFRA, f"infrastructure failure: {e}") from e
    finally:
        dispatcher.shutdown()
    ordered = [results[t.spec.concept_id] for t in tasks]
    write_eval(output, f"tinv evaluation: {source}", ordered, so)
    failed = sum(r["status"] != "succeeded" for r in ordered)
    print(f"[tinv] {len(ordered) - failed} concepts drawn, {failed} failed in {time.time() - started:.1f} s; "
          f"{storage.join(output, 'index.html')}", file=sys.stderr, flush=True)
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        logging.getLogger("tinv.evaluate").exception("the driver failed")
        sys.exit(EXIT_INFRA)
