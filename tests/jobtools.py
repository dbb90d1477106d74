"""Helpers for the Ray job tests: free ports, the job environment, running the driver."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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


def run_driver(cluster: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m jobs.train --ray-address CLUSTER ARGS...` as a subprocess, from the repo root."""
    cmd = [sys.executable, "-m", "jobs.train", "--ray-address", cluster["address"], *args]
    return subprocess.run(cmd, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=timeout)
