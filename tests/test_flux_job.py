"""FLUX.1 through the jobs on a real local cluster: jobs.train on a tiny [dev] folder (pivotal with T5 vectors and
lora mixed in one run), its samples drawn through FluxPipeline at the family's sampler, and jobs.evaluate --run
redrawing them."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
from jobtools import REPO, run_driver
from PIL import Image
from safetensors import safe_open

from jobs.train import DEMO_MANIFEST
from tinv.manifest import read_manifest, write_manifest


def test_a_flux_run_trains_mixed_methods_and_evaluate_redraws_its_samples(ray_cluster, flux_models, tmp_path):
    specs = [s for s in read_manifest(str(REPO / DEMO_MANIFEST)) if s.concept_id in ("red-star", "teal-cross")]
    methods = {"red-star": {"method": "pivotal", "train_t5": True},
               "teal-cross": {"method": "lora", "placeholder_token": "sks"}}
    rows = [{"concept_id": s.concept_id, "images": list(s.images)[:3], "initializer_token": "cat",
             "eval_prompts": ["a {}"], **methods[s.concept_id]} for s in specs]
    write_manifest(rows, str(tmp_path / "m.parquet"))
    run = tmp_path / "run"
    proc = run_driver(ray_cluster, "--manifest", str(tmp_path / "m.parquet"), "--model", str(flux_models["flux-dev"]),
                      "--output", str(run), "--steps", "3", "--samples-per-prompt", "1", "--sample-steps", "2",
                      "--concepts-per-actor", "2", "--num-actors", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["concept_id"]: r for r in pq.read_table(run / "results.parquet").to_pylist()}
    assert {r["status"] for r in results.values()} == {"succeeded"}
    assert results["teal-cross"]["method"] == "lora" and results["red-star"]["method"] == "pivotal"
    with safe_open(run / "concepts" / "red-star" / "learned_embeds.safetensors", "pt") as f:
        assert set(f.keys()) == {"clip_l", "t5xxl"} and f.metadata()["ss_base_model_version"] == "flux1"
    assert json.loads((run / "run.json").read_text())["model"]["base_precision"] == "auto"
    proc = run_driver(ray_cluster, "--run", str(run), "--output", str(tmp_path / "eval"), "--num-actors", "1",
                      module="jobs.evaluate")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for cid in results:
        trained = (run / "concepts" / cid / "samples" / "00_00.png").read_bytes()
        redrawn = (tmp_path / "eval" / "concepts" / cid / "samples" / "00_00.png").read_bytes()
        diff = np.abs(decode(trained) - decode(redrawn)).max()
        assert diff <= 2, (cid, diff)  # the same drawing, through FluxPipeline, each with its own adapter


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
