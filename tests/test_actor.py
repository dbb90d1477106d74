"""The trainer actor's body, in-process: typed results, writes off the training thread, pictures only for metrics."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from jobs.actor import TrainerWorker, WorkerSetup
from jobs.dispatch import ConceptResult, Request
from tinv import EMBEDDED_MODEL, storage
from tinv.evaluation.sampling import SampleConfig, png_bytes
from tinv.manifest import ConceptSpec
from tinv.plan import resolve
from tinv.settings import Recipe, TrainConfig


def write_images(folder: Path, n: int = 3) -> tuple[str, ...]:
    from PIL import Image

    uris = []
    for i in range(n):
        (folder / f"{i}.png").write_bytes(png_bytes(Image.new("RGB", (32, 32), (40 * i, 90, 200))))
        uris.append(str(folder / f"{i}.png"))
    return tuple(uris)


CFG = TrainConfig(steps=40, batch_size=1, concepts_per_actor=2, early_stop=False)


def request(spec: ConceptSpec) -> Request:
    """What the driver sends: the concept's settings resolved once, its fingerprint, the attempt."""
    return Request(resolve(spec, CFG), f"fp-{spec.concept_id}", 1)


@pytest.fixture
def worker(tiny_models, tmp_path):
    setup = WorkerSetup(model=str(tiny_models["sd1"]), train=CFG, output=str(tmp_path / "out"),
                        samples=SampleConfig(samples_per_prompt=1, sample_steps=2))
    return TrainerWorker(setup)


def test_a_slow_write_never_stalls_training_and_result_json_is_still_last(worker, tmp_path, monkeypatch):
    images = write_images(tmp_path)
    entered, release = threading.Event(), threading.Event()
    write = storage.write_bytes

    def slow(uri, data, options=None):  # a bucket that hangs on the first concept's marker
        if uri.endswith("/concepts/quick/result.json"):
            entered.set()
            assert release.wait(120)
        return write(uri, data, options)

    monkeypatch.setattr(storage, "write_bytes", slow)
    specs = [ConceptSpec("quick", images, initializer_token="cat", steps=2),
             ConceptSpec("long", images, initializer_token="cat")]
    results = []
    caller = threading.Thread(target=lambda: results.extend(worker.train([request(s) for s in specs])))
    caller.start()
    assert entered.wait(120), "the first concept's files were never written"
    stepped = worker.steps_taken
    deadline = time.monotonic() + 120
    while worker.steps_taken < stepped + 10:  # the training thread goes on while the writer waits
        assert time.monotonic() < deadline, (stepped, worker.steps_taken)
        time.sleep(0.01)
    assert not (tmp_path / "out" / "concepts" / "quick" / "result.json").exists()  # nothing looks complete early
    assert (tmp_path / "out" / "concepts" / "quick" / "learned_embeds.safetensors").exists()
    assert all(p.images is None for p in worker.waiting.values())  # no metric reads them on this model: none kept
    release.set()
    caller.join(120)
    assert [r.status for r in results] == ["succeeded", "succeeded"] and results[1].record["steps"] == 40


def test_concept_failures_are_typed_results_and_never_fail_the_call(worker, tmp_path):
    images = write_images(tmp_path)
    specs = [ConceptSpec("fine", images, initializer_token="cat", steps=3),
             ConceptSpec("wild", images, initializer_token="cat", steps=3, learning_rate=1e30),
             ConceptSpec("gone", (str(tmp_path / "nowhere.png"),), initializer_token="cat")]
    fine, wild, gone = worker.train([request(s) for s in specs])
    assert isinstance(fine, ConceptResult) and fine.status == "succeeded" and fine.error_type is None
    assert (wild.status, wild.error_type, wild.retryable) == ("failed", "ConceptDivergedError", False)
    assert "diverged" in wild.error
    assert (gone.status, gone.error_type, gone.retryable) == ("failed", "ConceptDataError", False)


def test_the_toy_models_metric_reads_training_pictures_so_the_actor_keeps_them(tmp_path):
    setup = WorkerSetup(model=str(EMBEDDED_MODEL), train=TrainConfig(), output=str(tmp_path))
    assert TrainerWorker(setup).evaluator.needs_training_pictures


def test_class_sets_drawn_by_two_calls_at_once_both_succeed(worker, tmp_path, monkeypatch):
    """Ray runs an actor's calls in threads at once: two draw_classes calls must not share the model."""
    from tinv.evaluation import sampling as samples
    from tinv.training import classes

    embed, inside = samples._embed, threading.Barrier(2, timeout=2)

    def slow_embed(*args, **kwargs):  # both calls inside the spliced encoder together, if nothing stops them
        try:
            inside.wait()
        except threading.BrokenBarrierError:
            pass
        return embed(*args, **kwargs)

    monkeypatch.setattr(samples, "_embed", slow_embed)
    cfg = TrainConfig(class_images=1, recipe=Recipe(class_sample_steps=2))
    info = worker.info()
    sets = [classes.class_set(p, cfg, info) for p in ("a photo of a dog", "a photo of a cat")]
    results: list = [None, None]

    def call(i: int) -> None:
        results[i] = worker.draw_classes([Request(sets[i], "", 1)])[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.status for r in results] == ["succeeded", "succeeded"], results
    assert all(classes.is_done(worker.setup.output, s) for s in sets)


def test_a_model_that_does_not_load_is_kept_for_info_with_its_type(tmp_path):
    from tinv.errors import ModelLayoutError

    broken = TrainerWorker(WorkerSetup(model=str(tmp_path / "absent"), train=TrainConfig(), output=str(tmp_path)))
    with pytest.raises(ModelLayoutError, match="no model folder"):
        broken.info()
