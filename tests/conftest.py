"""Shared fixtures: tiny saved models and images; a real local Ray cluster (fake GPUs); a moto S3 server."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from jobtools import BIN, REPO, free_port, job_env, submit

from tinv.families.tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """kind → folder of a tiny random model saved with ``save_pretrained`` (sd1, sd2, sdxl)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: save_tiny_model(root / kind, kind, seed=0) for kind in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def flux_models(tmp_path_factory) -> dict[str, Path]:
    """kind → folder of a tiny random FLUX.1 saved with ``save_pretrained`` (flux-dev, flux-schnell)."""
    root = tmp_path_factory.mktemp("tiny-flux")
    return {kind: save_tiny_model(root / kind, kind, seed=0) for kind in ("flux-dev", "flux-schnell")}


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """Four 32 px training images ``(4, 3, 32, 32)`` in [-1, 1] (seeded)."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 32, 32, generator=g) * 2 - 1


def pytest_collection_modifyitems(config, items):
    """Tests on the Ray cluster run last, together, so the cluster is up only while they run."""
    items.sort(key=lambda item: "ray_cluster" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def ray_cluster():
    """`ray start --head --num-gpus 2` in its own session; stopped with `ray stop --force`."""
    env = job_env()
    port, dashboard = free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--num-gpus", "2", "--num-cpus", "4", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
           "--disable-usage-stats"]
    subprocess.run(["setsid", *cmd], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def demo_run(ray_cluster, tmp_path_factory):
    """The shipped demo submitted with ``ray job submit`` once per session: (its output folder, the log)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    log = submit(ray_cluster, f"tinv-demo-{os.getpid()}", "--output", str(out))
    return out, log


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3-protocol server on a free loopback port (moto's server mode)."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """A copy of the shipped demo manifest and its images (relative URIs), in a temp folder."""
    target = tmp_path / "manifests"
    shutil.copytree(REPO / "manifests", target)
    return target / "demo.parquet"


@pytest.fixture
def job_here(capsys, monkeypatch):
    """A job's ``main`` run in this process as its command line runs it, from the repository root, with Ray
    forbidden (a refusal must come before the cluster): ``(module, *args) → (exit status, stderr)``."""
    import ray

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the job reached for Ray"))

    def run(module: str, *args: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            code = importlib.import_module(module).main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        return code, capsys.readouterr().err
    return run
