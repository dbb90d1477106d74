"""Helpers for the Ray job tests: free ports, the job environment, running the driver."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from tinv import EMBEDDED_MODEL
from tinv.families.model import read_templates

REPO = Path(__file__).resolve().parent.parent
TOY = str(EMBEDDED_MODEL)
"""The embedded toy-world model, named as a user names a model folder (a manifest needs --model)."""
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env() -> dict[str, str]:
    """Environment for `ray`, the driver and everything they start: the venv first on PATH, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"  # a loopback-only test cluster; the job CLI does not read the token
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def run_driver(
    cluster: dict, *args: str, timeout: float = 240, module: str = "jobs.train", env: dict | None = None
) -> subprocess.CompletedProcess:
    """`RAY_ADDRESS=CLUSTER python -m MODULE ARGS...` as a subprocess, from the repo root (``env`` added)."""
    cmd = [sys.executable, "-m", module, *args]
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


FILES = {"result.json", "grid.png"}
EMBEDDING_FILES = {"learned_embeds.safetensors", "webui/embeddings/{trigger}.safetensors",
                   "webui/embeddings/{trigger}.preview.png"}
LORA_FILES = {"pytorch_lora_weights.safetensors", "webui/loras/{trigger}.safetensors",
              "webui/loras/{trigger}.preview.png"}
EXPORT_FILES = {"concepts-library/learned_embeds.bin", "concepts-library/token_identifier.txt",
                "concepts-library/type_of_concept.txt"}
RUN_FILES = {"results.parquet", "run.json", "catalog.jsonl", "latest", "catalogs/{run}.jsonl"}
CATALOG = re.compile(r"catalogs/\d{8}T\d{6}Z\.jsonl")
METHOD_FILES = {"ti": EMBEDDING_FILES, "lora": LORA_FILES, "pivotal": EMBEDDING_FILES | LORA_FILES}


def concept_files(cid: str, prompts: str | int = "object", method: str = "ti", trigger: str | None = None,
                  export: bool = False) -> set[str]:
    """One concept's exact files: embeddings and/or LoRA by method (the web-UI ones named ``trigger``, default
    ``cid``), the concepts-library layout when ``export``, marker, grid, 2 seeds per eval prompt.

    ``prompts`` is the number of eval prompts, or a property whose defaults (the embedded model's) apply.
    """
    n = prompts if isinstance(prompts, int) else len(read_templates(EMBEDDED_MODEL)[1][prompts])
    samples = {f"samples/{p:02d}_{s:02d}.png" for p in range(n) for s in range(2)}
    names = FILES | METHOD_FILES[method] | (EXPORT_FILES if export else set())
    return {name.format(trigger=trigger or cid) for name in names} | samples


def submit(cluster: dict, submission_id: str, *args: str, excludes: tuple[str, ...] = ()) -> str:
    """`ray job submit --working-dir REPO -- python -m jobs.train ARGS`; returns the CLI output."""
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1"}, "excludes": [".git", "out", ".ruff_cache", *excludes]}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--submission-id", submission_id,
           "--", "python", "-m", "jobs.train", *args]
    for _ in range(90):  # right after `ray start` (on a busy machine, minutes) the job agent may not be up yet
        proc = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(2)
    return proc.stdout + proc.stderr


def expected_files(props: dict[str, str | int], methods: dict[str, str] | None = None,
                   triggers: dict[str, str] | None = None, export: bool = False) -> set[str]:
    """concept_id → property or number of eval prompts (and → method, default ti; → trigger, default the id),
    to the run's exact files."""
    methods, triggers = methods or {}, triggers or {}
    files = {f"concepts/{c}/{name}" for c, prop in props.items()
             for name in concept_files(c, prop, methods.get(c, "ti"), triggers.get(c), export)}
    return files | RUN_FILES


def run_named(files: set[str]) -> set[str]:
    """``files`` with the run's catalog (``catalogs/{UTC time}.jsonl``) named ``catalogs/{run}.jsonl``."""
    return {"catalogs/{run}.jsonl" if CATALOG.fullmatch(f) else f for f in files}
