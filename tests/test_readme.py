"""The README is a user's page that works: its snippets run, its links resolve, its commands exist."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil

import torch
from jobtools import REPO

from tinv.families.flux import FLUX
from tinv.families.model import load_base_model
from tinv.families.sd import SD
from tinv.families.sdxl import SDXL, eos_positions
from tinv.files.formats import DIFFUSERS_NAME, LORA_NAME, embedding_files, lora_files
from tinv.training.splice import Adapters

README = (REPO / "README.md").read_text()


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_diffusers_snippets_run_as_written(tiny_models, tmp_path, monkeypatch):
    blocks = [b for b in snippets() if "load_textual_inversion" in b and "load_lora_weights" not in b]
    assert len(blocks) == 2
    for kind, dims in (("sd1", [32]), ("sdxl", [32, 32])):
        folder = tmp_path / kind / "out" / "mine" / "concepts" / "my-cat"
        folder.mkdir(parents=True)
        vectors = [torch.randn(1, d) for d in dims]
        files = embedding_files(SDXL if kind == "sdxl" else SD, "my-cat", "<my-cat>", "my-cat", vectors, {})
        (folder / DIFFUSERS_NAME).write_bytes(files[DIFFUSERS_NAME])
    for block, kind, hub_id in ((blocks[0], "sd1", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                (blocks[1], "sdxl", "stabilityai/stable-diffusion-xl-base-1.0")):
        assert hub_id in block
        code = (block.replace(hub_id, str(tiny_models[kind]))  # the user's model: here a tiny one, offline
                .replace("torch.float16", "torch.float32").replace('.to("cuda")', '.to("cpu")'))
        monkeypatch.chdir(tmp_path / kind)
        exec(compile(code, f"README ({kind})", "exec"), {})
        assert (tmp_path / kind / "my-cat.png").stat().st_size > 0


def test_links_resolve_and_commands_exist():
    assert len(README.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links and all((REPO / link).exists() for link in links), [k for k in links if not (REPO / k).exists()]
    modules = set(re.findall(r"python -m ([\w.]+)", README))
    assert {"jobs.train", "jobs.manifest", "jobs.evaluate", "jobs.bench"} <= modules
    assert all(importlib.util.find_spec(m) for m in modules), modules
    assert os.path.exists(REPO / "cluster.yaml")


def test_the_lora_snippet_runs_as_written(tiny_models, tmp_path, monkeypatch):
    (block,) = [b for b in snippets() if "load_lora_weights" in b and "FluxPipeline" not in b]
    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    folder = tmp_path / "out" / "mine" / "concepts" / "my-dog"
    folder.mkdir(parents=True)
    denoiser = load_base_model(str(tiny_models["sd1"])).denoiser
    adapters = Adapters.of(denoiser)
    adapters.add("my-dog", 4, SD.lora_targets, seed=0)
    vectors = [torch.randn(1, 32)]
    files = {**embedding_files(SD, "my-dog", "<my-dog>", "my-dog", vectors, {}),
             **lora_files(SD, "my-dog", "<my-dog>", "my-dog", "pivotal", 4, adapters.state_dict("my-dog"), vectors, {})}
    for name in (DIFFUSERS_NAME, LORA_NAME):
        (folder / name).write_bytes(files[name])
    assert hub_id in block
    code = block.replace(hub_id, str(tiny_models["sd1"])).replace("torch.float16", "torch.float32")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('.to("cuda")', '.to("cpu")'), "README (lora)", "exec"), {})
    assert (tmp_path / "my-dog.png").stat().st_size > 0


def test_the_flux_snippet_runs_as_written(flux_models, tmp_path, monkeypatch):
    (block,) = [b for b in snippets() if "FluxPipeline" in b]
    hub_id = "black-forest-labs/FLUX.1-dev"
    folder = tmp_path / "out" / "flux" / "concepts" / "my-cat"
    folder.mkdir(parents=True)
    model = load_base_model(str(flux_models["flux-dev"]))
    adapters = Adapters.of(model.denoiser)
    adapters.add("my-cat", 2, FLUX.lora_targets, seed=0)
    vectors = [torch.randn(1, d) for d in model.embedding_dims]  # CLIP-L's and T5's (trained with --train-t5)
    files = {**embedding_files(FLUX, "my-cat", "<my-cat>", "my-cat", vectors, {}),
             **lora_files(FLUX, "my-cat", "<my-cat>", "my-cat", "pivotal", 2, adapters.state_dict("my-cat"), vectors,
                          {})}
    for name in (DIFFUSERS_NAME, LORA_NAME):
        (folder / name).write_bytes(files[name])
    assert hub_id in block
    legacy = tmp_path / "flux-legacy-eos"  # CLIP-L's config as FLUX.1's says it: eos_token_id 2
    shutil.copytree(flux_models["flux-dev"], legacy)
    config = json.loads((legacy / "text_encoder" / "config.json").read_text())
    (legacy / "text_encoder" / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))
    code = (block.replace(hub_id, str(legacy)).replace("torch.bfloat16", "torch.float32")
            .replace('.to("cuda")', '.to("cpu")'))
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(code, "README (flux)", "exec"), names)
    assert (tmp_path / "my-cat.png").stat().st_size > 0
    pipe = names["pipe"]  # its pooled text is CLIP-L's state at the end-of-text token, where tinv pools it in training
    ids = pipe.tokenizer(["a photo of <my-cat>"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids)
    at_eos = out.last_hidden_state[0, eos_positions(ids, pipe.tokenizer.eos_token_id)[0]]
    assert torch.equal(out.pooler_output[0], at_eos)
    pipe.text_encoder.eos_token_id = 2  # without the README's line: pooled at the highest id, the new token
    assert not torch.allclose(pipe.text_encoder(ids).pooler_output[0], at_eos)
