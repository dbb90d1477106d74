"""jobs/benchmark.py cannot rot: its smoke run covers every section. No test here asserts a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from jobs import benchmark

REPO = Path(__file__).resolve().parent.parent


def test_smoke_run_measures_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray instance
    subprocess.run([sys.executable, "-m", "jobs.benchmark", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                   check=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["smoke"] and r["matmul"]["fp32_flops"] > 0
    for section in ("train", "toy_train"):
        rows = {v["variant"]: v for v in r[section]["variants"]}
        assert {"recipe", "latent-cache", "tinv", "tinv-k4"} <= rows.keys()
        for v in rows.values():
            assert v["samples_per_s"] > 0 and v["peak_mem_gb"] > 0 and v["concepts_per_hour"] > 0
            assert v["mfu"] is not None and 0 < v["mfu"]
        assert rows["tinv-k4"]["samples_per_step"] == 4 * rows["tinv"]["samples_per_step"]
        # the VAE encode per step is real work: the recipe counts more FLOPs per sample than its cached twin
        assert rows["recipe"]["flops_per_sample"] > rows["latent-cache"]["flops_per_sample"]
    g = r["generate"]
    assert g["batched"]["images_per_s"] > 0 and g["per_concept"]["images_per_s"] > 0
    d = r["driver"]["runs"][0]
    assert d["succeeded"] == d["concepts"] == 50 and d["ms_per_concept"] > 0
    s = r["schedule"]
    assert {c["schedule"] for c in s["curves"]} == {"recipe", "tinv"}
    assert all(len(c["fidelity"]) == len(c["steps"]) == 2 for c in s["curves"])


def test_cpu_attention_flops_are_counted():
    q = torch.randn(1, 2, 16, 8)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == sdpa_flop_count(q.shape, q.shape, q.shape) > 0
    assert benchmark.native_half(torch.device("cpu")) in ([], [torch.bfloat16])


def test_flop_model_counts_on_the_meta_device():
    small = dict(benchmark.SMOKE_UNET)
    f8, f16 = (benchmark.flops_per_sample(small, [benchmark.SMOKE_TEXT], latent) for latent in (8, 16))
    assert 0 < f8 < f16  # a bigger latent costs more, and nothing was allocated for real


def test_readme_schedule_table_is_the_recorded_run():
    recorded = json.loads((REPO / "benchmarks" / "amd-epyc-2-threads.json").read_text())["schedule"]
    rows = [line for line in benchmark.schedule_table(recorded) if line.startswith("| ")]
    readme = (REPO / "README.md").read_text().splitlines()
    assert len(rows) == 2 + len({c["concept"] for c in recorded["curves"]})  # header, one per concept, mean
    missing = [row for row in rows if row not in readme]
    assert not missing, missing  # README's table is rendered from the numbers the benchmark recorded
