"""The learned start end to end: a run, ``jobs.fit_init`` on it, a later run with ``--init``, and refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from jobtools import REPO, TOY, run_driver

from jobs.common import EXIT_INVALID, JobExit
from jobs.fit_init import gather
from tinv.errors import InitializerError
from tinv.manifest import write_manifest
from tinv.training.starts import Initializer, load_start

FAST = ("--model", TOY, "--steps", "20", "--batch-size", "2", "--samples-per-prompt", "0", "--num-actors", "1")


def manifest(tmp_path, name: str, concepts: dict[str, str]) -> str:
    """concept id → the demo concept whose pictures it learns."""
    if not (tmp_path / "demo").exists():
        shutil.copytree(REPO / "manifests" / "demo", tmp_path / "demo")
    rows = [{"concept_id": cid, "images": [f"demo/{src}/{j}.png" for j in range(6)],
             "initializer_token": src.split("-")[1]} for cid, src in concepts.items()]
    write_manifest(rows, str(tmp_path / name))
    return str(tmp_path / name)


def test_a_run_fits_an_initializer_that_a_later_run_starts_from(demo_run, ray_cluster, tmp_path):
    night1, _ = demo_run  # 12 concepts, one of them pivotal (its token vectors count too)
    fitted, night2 = tmp_path / "init", tmp_path / "night2"
    fit = run_driver(ray_cluster, "--runs", str(night1), "--output", str(fitted), "--fit-steps", "200",
                     module="jobs.fit_init")
    assert fit.returncode == 0, fit.stderr[-3000:]
    record = json.loads((fitted / "fit.json").read_text())
    run = json.loads((night1 / "run.json").read_text())
    assert record["stats"]["concepts"] == 12 and record["skipped"] == {}
    assert record["stats"]["groups"]["1"]["held_out"] == 2  # a share held out, its error reported
    assert all(math.isfinite(v) for v in record["stats"]["groups"]["1"]["encoders"][0].values())
    initializer = Initializer.from_bytes((fitted / "initializer.safetensors").read_bytes())
    assert initializer.fingerprint == run["base_model_fingerprint"] == record["base_model_fingerprint"]
    assert initializer.features == "vae-latents"

    second = run_driver(ray_cluster, "--manifest", manifest(tmp_path, "2.parquet", {"new-star": "red-star",
                        "new-circle": "blue-circle"}), "--output", str(night2), "--init", str(fitted), *FAST)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((night2 / "run.json").read_text())["start"].startswith("learned:")
    for cid in ("new-star", "new-circle"):
        start = json.loads((night2 / "concepts" / cid / "result.json").read_text())["start"]
        assert start["requested"] == "learned" and start["init"] in ("learned", "word")
        assert set(start["losses"]) == {"learned", "word"} and all(map(math.isfinite, start["losses"].values()))
        assert (start["init"] == "learned") == (start["losses"]["learned"] < start["losses"]["word"])


def test_an_initializer_of_another_base_model_is_refused(ray_cluster, tmp_path):
    other = Initializer("0" * 64, "vae-latents", {})
    (tmp_path / "other.safetensors").write_bytes(other.to_bytes())
    proc = run_driver(ray_cluster, "--manifest", manifest(tmp_path, "m.parquet", {"c": "red-star"}),
                      "--output", str(tmp_path / "out"), "--init", str(tmp_path / "other.safetensors"), *FAST)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "fitted on base model 000000000000" in proc.stderr
    assert not (tmp_path / "out" / "concepts").exists()  # nothing trained


def test_an_init_that_names_no_initializer_is_refused(tmp_path):
    with pytest.raises(InitializerError, match="no initializer at"):
        load_start(str(tmp_path / "nowhere"))
    (tmp_path / "x.safetensors").write_bytes(b"not one")
    with pytest.raises(InitializerError, match="not an initializer"):
        load_start(str(tmp_path / "x.safetensors"))
    assert load_start("cross")[1] == "cross"


def test_fit_init_refuses_runs_of_different_base_models(tmp_path):
    for name, fingerprint in (("a", "1" * 64), ("b", "2" * 64)):
        (tmp_path / name).mkdir()
        record = {"base_model_fingerprint": fingerprint, "model_uri": None}
        (tmp_path / name / "run.json").write_text(json.dumps(record))
        shutil.copy(REPO / "manifests" / "demo.parquet", tmp_path / name / "results.parquet")  # any table
    with pytest.raises(JobExit, match="different base models") as refused:
        gather([str(tmp_path / "a"), str(tmp_path / "b")], None)
    assert refused.value.code == EXIT_INVALID
    with pytest.raises(JobExit, match="not a training run") as refused:
        gather([str(tmp_path / "a"), str(tmp_path / "nowhere")], None)
    assert refused.value.code == EXIT_INVALID
