"""The driver at scale: plan, dispatch, account and write results for N concepts with no-op trainers."""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from jobs.bench.measure import peak_memory, rss_bytes
from jobs.dispatch import ConceptResult, DispatchConfig, Dispatcher, Request
from jobs.report import Progress, result_rows, write_results, write_run
from jobs.train import plan
from tinv.manifest import ConceptSpec
from tinv.settings import TrainConfig


class NoopWorker:
    """A trainer actor that trains nothing: each item comes back succeeded at once."""

    def __init__(self, name: str) -> None:
        self.name = name

    def info(self) -> dict[str, Any]:
        return {"base_model": "noop", "base_model_fingerprint": "0" * 64, "resolution": 32, "dtype": "torch.float32",
                "base_precision": "auto", "templates": "0" * 64,
                "device": "cpu", "worker": self.name, "pid": os.getpid()}

    def train(self, requests: list[Request]) -> list[ConceptResult]:
        return [ConceptResult(r.spec.concept_id, "succeeded", r.spec.placeholder_token, attempts=r.attempt,
                              worker=self.name, seconds=0.0) for r in requests]


def driver(counts: list[int], actors: int = 2) -> list[dict[str, Any]]:
    """Plan, dispatch, account and write results for each count of concepts; driver time and memory."""
    ray.init(address="local", num_cpus=actors, include_dashboard=False, log_to_driver=False)  # its own instance
    remote = ray.remote(NoopWorker).options(num_cpus=1, max_concurrency=8, max_restarts=0)
    out = []
    try:
        for n in counts:
            with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null:
                specs = [ConceptSpec(f"c{i:06d}", (f"{tmp}/images/{i}/0.png",)) for i in range(n)]
                results: dict[str, ConceptResult] = {}
                progress = Progress(n, stream=null)

                def on_result(r: ConceptResult, results=results, progress=progress) -> None:
                    results[r.concept_id] = r
                    progress.update(r)

                names = itertools.count()
                dispatcher = Dispatcher(lambda: remote.remote(f"noop{next(names)}"),
                                        DispatchConfig(actors, TrainConfig().concepts_per_actor), on_result)
                info = dispatcher.wait_ready()[0]
                rss0 = rss_bytes()
                with peak_memory(torch.device("cpu")) as peak:
                    start = time.perf_counter()
                    todo, skipped = plan(specs, TrainConfig(), info, f"{tmp}/manifest.parquet", tmp, None)
                    results.update(skipped)
                    planned = time.perf_counter()
                    dispatcher.run(todo)
                    dispatched = time.perf_counter()
                    rows = result_rows(specs, results)
                    uri = write_results(tmp, rows)
                    write_run(tmp, {"counts": len(rows)})
                    done = time.perf_counter()
                dispatcher.shutdown()
                ok = sum(r["status"] == "succeeded" for r in rows)
                out.append({
                    "concepts": n, "succeeded": ok, "actors": actors,
                    "ms_per_concept": 1000 * (done - start) / n,
                    "plan_s": planned - start, "dispatch_s": dispatched - planned, "write_s": done - dispatched,
                    "peak_rss_gb": peak[0], "rss_growth_mb": (peak[0] * 2**30 - rss0) / 2**20,
                    "results_parquet_mb": Path(uri).stat().st_size / 2**20,
                })
    finally:
        ray.shutdown()
    return out
