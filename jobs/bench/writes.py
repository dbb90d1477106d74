"""A slow bucket does not slow training: the trainer actor's step rate with fast and with slow writes.

The actor (in-process, no Ray) trains concepts on the embedded toy model, from random pictures (the pictures'
content does not change a step's cost), while every storage write sleeps ``delay_s``;
its writer thread encodes and writes each concept's files behind a bounded queue, so the training
thread's steps per second should not change.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from PIL import Image

from jobs.actor import TrainerWorker, WorkerSetup
from jobs.dispatch import Request
from tinv import EMBEDDED_MODEL, storage
from tinv.evaluation.sampling import SampleConfig, png_bytes
from tinv.manifest import ConceptSpec
from tinv.plan import resolve
from tinv.settings import TrainConfig


def pictures(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """``n`` random pictures: smooth colour fields with noise (procedural, no data set)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)[None, :, None]
    out = []
    for _ in range(n):
        low, high = rng.random(3), rng.random(3)
        field = low + (high - low) * (ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2))
        pixels = np.clip(field + 0.1 * rng.standard_normal((size, size, 3)), 0, 1)
        out.append(Image.fromarray((pixels * 255).astype(np.uint8)))
    return out


def step_rate(delay_s: float, concepts: int, steps: int) -> dict[str, Any]:
    """Steps per second of the training thread, and the whole call's seconds, with writes sleeping ``delay_s``."""
    write = storage.write_bytes

    def slow(uri: str, data: bytes, options: Any = None) -> None:
        time.sleep(delay_s)
        write(uri, data, options)

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(storage, "write_bytes", slow):
        images = []
        for i, picture in enumerate(pictures(4)):
            (Path(tmp) / f"{i}.png").write_bytes(png_bytes(picture))
            images.append(f"{tmp}/{i}.png")
        cfg = TrainConfig(steps=steps, early_stop=False)
        setup = WorkerSetup(model=str(EMBEDDED_MODEL), train=cfg, output=f"{tmp}/out",
                            samples=SampleConfig(samples_per_prompt=2, sample_steps=10))
        worker = TrainerWorker(setup)
        stamps: list[float] = []
        worker._stepped = lambda info: stamps.append(time.perf_counter())  # the training thread's own clock
        specs = [ConceptSpec(f"c{i}", tuple(images), initializer_token="star") for i in range(concepts)]
        requests = [Request(resolve(s, cfg), "bench", 1) for s in specs]
        start = time.perf_counter()
        results = worker.train(requests)
        seconds = time.perf_counter() - start
    assert all(r.status == "succeeded" for r in results), results
    return {"delay_s_per_write": delay_s, "steps": len(stamps), "call_seconds": seconds,
            "steps_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "writes_per_concept": len(results[0].record["files"]) + 1}


def slow_storage(delay_s: float = 0.25, concepts: int = 12, steps: int = 60, reps: int = 2) -> dict[str, Any]:
    """Fast and slow writes, interleaved ``reps`` times."""
    runs = [step_rate(d, concepts, steps) for _ in range(reps) for d in (0.0, delay_s)]
    fast = [r["steps_per_s"] for r in runs if r["delay_s_per_write"] == 0.0]
    slow = [r["steps_per_s"] for r in runs if r["delay_s_per_write"] > 0.0]
    return {"runs": runs, "ratio_slow_to_fast": (sum(slow) / len(slow)) / (sum(fast) / len(fast))}
