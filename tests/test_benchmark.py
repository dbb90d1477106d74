"""The benchmark package cannot rot: its smoke run covers every section. No test here asserts a speed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from jobs.bench import flops, measure, recipe, shapes
from jobs.bench.report import markdown
from lab.bench import schedule
from tinv.families.model import load_base_model
from tinv.settings import PRESETS

REPO = Path(__file__).resolve().parent.parent
RECORDED = REPO / "benchmarks" / "amd-epyc-2-threads.json"


def test_smoke_run_measures_every_section_and_its_record_renders_the_same_tables(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray instance
    proc = subprocess.run([sys.executable, "-m", "jobs.bench", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          check=True, timeout=600, capture_output=True, text=True)
    r = json.loads(out.read_text())
    assert r["smoke"] and r["matmul"]["fp32_flops"] > 0 and r["matmul"]["fp32_conv_flops"] > 0
    assert not {"schedule", "schedule_methods"} & r.keys()  # the toy world's sections are the lab's
    for section in ("train", "toy_train"):
        rows = {v["variant"]: v for v in r[section]["variants"]}
        assert {"recipe", "latent-cache", "tinv", "tinv-k4"} <= rows.keys()
        for v in rows.values():
            assert v["samples_per_s"] > 0 and v["peak_mem_gb"] > 0 and v["concepts_per_hour"] > 0
            assert v["mfu"] is not None and 0 < v["mfu"] <= 1
        assert rows["tinv-k4"]["samples_per_step"] == 4 * rows["tinv"]["samples_per_step"]
        # the VAE encode per step is real work: the recipe counts more FLOPs per sample than its cached twin
        assert rows["recipe"]["flops_per_sample"] > rows["latent-cache"]["flops_per_sample"]
    for section in ("methods_toy", "methods_sd15", "preservation_toy", "preservation_sd15"):
        # a utilisation: the counted FLOPs over the time never beat the device's measured dense rate
        assert all(0 < v["mfu"] <= 1 for v in r[section]["variants"]), section
    for section in ("methods_toy", "methods_sd15"):  # every method at K=1 and K=4, each concept its own adapter
        rows = {v["variant"]: v for v in r[section]["variants"]}
        assert {"tinv", "tinv-k4", "lora", "lora-k4", "pivotal", "pivotal-k4"} <= rows.keys()
        assert all(v["samples_per_s"] > 0 for v in rows.values())
        assert rows["lora-k4"]["samples_per_step"] == 4 * rows["lora"]["samples_per_step"]
        assert rows["lora"]["flops_per_sample"] > rows["tinv"]["flops_per_sample"]  # the adapters are counted
        if torch.bfloat16 in measure.native_half(torch.device("cpu")):  # and in bf16, K=1 and K=4
            for name in ("tinv-k4", "lora", "lora-k4", "pivotal", "pivotal-k4"):
                half = rows[f"{name}-bf16-unet"]
                assert half["samples_per_step"] == rows[name]["samples_per_step"] and half["samples_per_s"] > 0
    for section in ("preservation_toy", "preservation_sd15"):  # pivotal with each prior preservation, K=1
        rows = {v["variant"]: v for v in r[section]["variants"]}
        assert rows.keys() == {"pivotal", "pivotal-images", "pivotal-output", "pivotal-output-blank"}
        assert len({v["samples_per_step"] for v in rows.values()}) == 1  # the concept's own samples
        flops = {name: v["flops_per_sample"] for name, v in rows.items()}  # each preserved set is real work
        # a class row trains as the own rows do; output's rows also take the frozen model's pass, blank's more
        assert flops["pivotal"] < flops["pivotal-images"] < flops["pivotal-output"] < flops["pivotal-output-blank"]
    rows = {v["variant"]: v for v in r["flux"]["variants"]}  # FLUX: each method, K=1 and 4, and its memory levers
    assert {"ti", "ti-k4", "lora", "lora-k4", "pivotal", "pivotal-k4", "pivotal-t5", "lora-uncached",
            "lora-checkpointing", "lora-int8"} <= rows.keys() and r["flux"]["t5_tokens"] == 32
    assert all(v["samples_per_s"] > 0 and 0 < v["mfu"] <= 1 for v in rows.values())
    assert rows["lora-k4"]["samples_per_step"] == 4 * rows["lora"]["samples_per_step"]
    flux = {name: v["flops_per_sample"] for name, v in rows.items()}  # what each lever adds or spares is counted:
    assert flux["lora-uncached"] > flux["lora"] < flux["lora-checkpointing"]  # T5 every step; the recomputation
    assert flux["pivotal-t5"] > flux["pivotal"]  # T5's forward and backward for its vectors
    g = r["generate"]
    assert g["batched"]["images_per_s"] > 0 and g["per_concept"]["images_per_s"] > 0
    for run in r["train_sampling"]["runs"]:  # mixed methods, drawn a call each from copies, then live together
        assert run["methods"] == {"ti": 1, "pivotal": 1, "lora": 1}
        assert run["before"]["images_per_s"] > 0 and run["after"]["images_per_s"] > 0 and run["speedup"] > 0
        assert run["max_pixel_difference"] <= 1  # the same images either way (an image is its seed's alone)
    d = r["driver"]["runs"][0]
    assert d["succeeded"] == d["concepts"] == 50 and d["ms_per_concept"] > 0
    assert r["writes"]["ratio_slow_to_fast"] > 0 and len(r["writes"]["runs"]) == 2
    assert r["fingerprint"]["folder_gb"] > 0 and r["fingerprint"]["cold_s"] > 0
    # the recorded file (every section stamped with its command) renders exactly what the run printed
    assert markdown(r) + "\n" == proc.stdout
    rendered = subprocess.run([sys.executable, "-m", "jobs.bench", "--render", str(out)], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout
    assert rendered == proc.stdout and "| tinv-k4 |" in rendered and "Driver, 50 concepts" in rendered
    assert "| shipped toy world | 32 | 3 (1 ti, 1 pivotal, 1 lora) |" in rendered


def test_the_labs_schedule_sections_run_in_their_smoke_form_and_render_what_they_printed(tmp_path):
    out = tmp_path / "schedule.json"
    proc = subprocess.run([sys.executable, "-m", "lab.bench.schedule", "--smoke", "--out", str(out)], cwd=REPO,
                          check=True, timeout=600, capture_output=True, text=True)
    r = json.loads(out.read_text())
    s = r["schedule"]
    assert {c["schedule"] for c in s["curves"]} == {"recipe", "tinv"}
    assert all(len(c["fidelity"]) == len(c["steps"]) == 2 for c in s["curves"])
    toyworld = json.loads(json.dumps(dataclasses.asdict(PRESETS["toyworld"])))  # the preset it was recorded under
    assert s["tinv"]["config"]["recipe"] == toyworld | {"dvar_window": 2, "dvar_every": 1}
    assert s["recipe"]["config"]["recipe"]["min_timestep_fraction"] == 0.0
    m = r["schedule_methods"]  # every method's curve over the same concepts and checkpoints
    assert {c["schedule"] for c in m["curves"]} == {"ti", "lora", "pivotal"}
    assert all(c["steps"] == m["checkpoints"] for c in m["curves"]) and len(m["curves"]) == 3 * 2
    assert r["schedule"]["command"].startswith("python -m lab.bench.schedule")
    assert schedule.markdown(r) + "\n" == proc.stdout and "| red-star | combination |" in proc.stdout
    rendered = subprocess.run([sys.executable, "-m", "lab.bench.schedule", "--render", str(out)], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout
    assert rendered == proc.stdout


def test_the_dense_rate_is_the_larger_of_the_matmul_and_the_convolution():
    """MFU's ceiling: on a CPU a UNet's convolutions (oneDNN) can beat the BLAS matmul, so neither alone bounds it."""
    section, rates = measure.dense_rates(torch.device("cpu"), smoke=True)
    threads = torch.get_num_threads()
    assert rates["fp32", threads] == max(section["fp32_flops"], section["fp32_conv_flops"]) > 0
    line = markdown({"device": "cpu", "command": "x", "matmul": section})
    assert "3×3 convolution: fp32" in line and "Dense matmul: fp32" in line


def test_cpu_attention_flops_are_counted_once_registered():
    flops.register_cpu_attention_flops()
    flops.register_cpu_attention_flops()  # idempotent
    q = torch.randn(1, 2, 16, 8)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == sdpa_flop_count(q.shape, q.shape, q.shape) > 0
    assert measure.native_half(torch.device("cpu")) in ([], [torch.bfloat16])


def test_flop_model_counts_on_the_meta_device():
    small = dict(shapes.SMOKE_UNET)
    f8, f16 = (flops.flops_per_sample(small, [shapes.SMOKE_TEXT], latent) for latent in (8, 16))
    assert 0 < f8 < f16  # a bigger latent costs more, and nothing was allocated for real


def test_the_recipe_step_does_what_the_diffusers_script_does(tiny_models, images, monkeypatch):
    """Per step: a VAE encode of the batch, an fp32 text encoder, AdamW over the whole embedding table,
    every row but the placeholder's restored (examples/textual_inversion/textual_inversion.py)."""
    model = load_base_model(str(tiny_models["sd1"]), precision="bf16", text_encoder_dtype=torch.bfloat16)
    encoded: list[int] = []
    real = model.vae.encode
    monkeypatch.setattr(model.vae, "encode", lambda x, *a, **k: encoded.append(len(x)) or real(x, *a, **k))
    prompts = list(model.templates["object"])
    step = recipe.recipe_step(model, images, prompts, cache=False)
    state = {name: cell.cell_contents for name, cell in zip(step.__code__.co_freevars, step.__closure__)}
    encoder, table, optimizer = state["encoder"], state["table"], state["optimizer"]
    before, setup_encodes = table.detach().clone(), len(encoded)
    step()
    step()
    assert len(encoded) - setup_encodes == 2 and encoded[-1] == recipe.RECIPE["batch_size"]  # every step
    assert encoder.dtype == torch.float32 and model.text_encoders[0].dtype == torch.bfloat16
    assert optimizer.param_groups[0]["params"] == [table] and table.shape[0] == len(model.tokenizers[0]) + 1
    placeholder = torch.nonzero(~state["keep"]).item()
    changed = (table.detach() != before).any(-1)
    assert changed[placeholder] and changed.sum() == 1  # only the new row moved; every other row restored
    cached = recipe.recipe_step(model, images, prompts, cache=True)
    setup_encodes = len(encoded)
    cached()
    assert len(encoded) == setup_encodes  # its twin samples the cached latent distribution instead


def test_benchmarks_readme_holds_the_tables_every_recorded_json_renders():
    readme = (REPO / "benchmarks" / "README.md").read_text().splitlines()
    files = sorted((REPO / "benchmarks").glob("*.json"))
    assert RECORDED in files
    for path in files:  # the lab renders the toy world's schedule sections after the product benchmark's tables
        tables = [line for line in schedule.markdown(json.loads(path.read_text())).splitlines() if line.strip()][1:]
        assert path != RECORDED or len([line for line in tables if line.startswith("| ")]) > 30
        missing = [line for line in tables if line not in readme]
        assert not missing, (path.name, missing)  # every table there is rendered from the recorded numbers


def test_the_gpu_check_runs_every_configuration_and_cuda_path_in_its_cpu_smoke_form(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, "-m", "jobs.bench.gpu_check", "--smoke", "--out", str(out)], cwd=REPO,
                   check=True, timeout=600, capture_output=True)
    r = json.loads(out.read_text())
    grid = {(x["shape"], x["checkpointing"], x["k"]) for x in r["runs"]}
    assert grid == {(s, c, k) for s in ("sd15", "sdxl") for c in (False, True) for k in (1, 2)}
    assert all(x["seconds_per_step"] > 0 and x["samples_per_s"] > 0 and x["mfu"] > 0 for x in r["runs"])
    assert r["paths"]["fp16"]["losses_finite"] and len(r["paths"]["fp16"]["loss_scales"]) == 2
    flux = {(x["base_precision"], x["checkpointing"], x["k"], x["method"]) for x in r["flux"]}
    assert flux == {(b, c, k, "lora") for b in ("auto", "int8") for c in (False, True) for k in (1, 2)} | {
        ("auto", True, 1, "pivotal-t5")}  # no fp8 on a CPU
    assert all(x["samples_per_s"] > 0 and (x.get("mfu", 0) > 0) == (x["method"] == "lora") for x in r["flux"])
    assert "partial" not in r  # the rows saved along the way were replaced by the whole
    backoff = r["paths"]["oom_backoff"]
    assert backoff["stepped"] == backoff["slots"] and backoff["group_size_after"] < backoff["slots"]


def test_a_gpu_check_configuration_that_fails_is_recorded_and_the_others_run_and_are_saved_as_they_go(monkeypatch):
    import argparse

    from jobs.bench import gpu_check

    def time_steps(model, size, k, steps, method, batch_size, train_t5):
        if k == 2:
            raise RuntimeError("CUDA error: an illegal memory access")
        return {"out_of_memory": False, "seconds_per_step": 1.0, "samples_per_s": 1.0, "peak_gb": None}

    def flux_shaped(shapes, device, dtype, tokens):
        if not built:
            built.append(1)
            return torch.nn.Module()
        raise RuntimeError("no memory for a second base")

    built, saved = [], []
    monkeypatch.setattr(gpu_check, "time_steps", time_steps)
    monkeypatch.setattr(gpu_check, "flux_shaped", flux_shaped)
    monkeypatch.setattr(gpu_check, "quantize_denoiser", lambda *a: None)
    monkeypatch.setattr(gpu_check, "checkpointing", lambda *a: None)
    args = argparse.Namespace(smoke=True, flux_budget_s=600.0)
    rows = gpu_check.flux_runs(args, torch.device("cpu"), torch.float32, 1e9, lambda r: saved.append(len(r)))
    auto = [r for r in rows if r["base_precision"] == "auto"]
    assert [("error" in r, r["k"]) for r in auto] == [(False, 1), (True, 2), (False, 1), (True, 2), (False, 1)]
    assert "illegal memory access" in auto[1]["error"] and auto[0]["mfu"] > 0 and "mfu" not in auto[-1]
    int8 = [r for r in rows if r["base_precision"] == "int8"]
    assert len(int8) == 4 and all("no memory for a second base" in r["error"] for r in int8)
    assert saved == list(range(1, len(rows) + 1))
