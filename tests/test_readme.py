"""The README is a user's page that works: its snippets run, its links resolve, its commands exist."""

from __future__ import annotations

import importlib.util
import os
import re

import torch
from jobtools import REPO

from tinv.formats import DIFFUSERS_NAME, embedding_files

README = (REPO / "README.md").read_text()


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_diffusers_snippets_run_as_written(tiny_models, tmp_path, monkeypatch):
    blocks = [b for b in snippets() if "load_textual_inversion" in b]
    assert len(blocks) == 2
    for kind, dims in (("sd1", [32]), ("sdxl", [32, 32])):
        folder = tmp_path / kind / "out" / "mine" / "concepts" / "my-cat"
        folder.mkdir(parents=True)
        vectors = [torch.randn(1, d) for d in dims]
        (folder / DIFFUSERS_NAME).write_bytes(embedding_files("my-cat", "<my-cat>", vectors, {})[DIFFUSERS_NAME])
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
