"""One writer per output: a second run on a held output is refused at once; a dead holder's lease is taken over."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from jobtools import REPO, TOY

from jobs import lease
from tinv.files import catalog
from tinv.manifest import write_manifest


def manifest(tmp_path, n: int, steps: int) -> str:
    rows = [{"concept_id": f"c{i}", "images": [f"demo/red-star/{j}.png" for j in range(3)], "steps": steps,
             "initializer_token": "star", "eval_prompts": ["a {}"]} for i in range(n)]
    shutil.copytree(REPO / "manifests" / "demo", tmp_path / "demo", dirs_exist_ok=True)
    write_manifest(rows, str(tmp_path / "m.parquet"))
    return str(tmp_path / "m.parquet")


def start(cluster: dict, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.train", "--model", TOY, "--batch-size", "2", "--samples-per-prompt", "1", *args]
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"]}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_runs_started_together_on_one_output_one_is_refused_and_the_catalog_is_the_files(ray_cluster, tmp_path):
    m, out = manifest(tmp_path, 3, 8), tmp_path / "out"
    procs = [start(ray_cluster, "--manifest", m, "--output", str(out), "--seed", str(s)) for s in (1, 2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], logs
    refused = logs[[p.returncode for p in procs].index(2)]
    assert "is being written by run" in refused and "pid" in refused  # the holder, named
    assert "model loaded" not in refused  # refused before anything started
    assert not (out / lease.LEASE_NAME).exists()  # released at the end
    latest = json.loads((out / "latest").read_text())
    lines = [json.loads(line) for line in (out / latest["catalog"]).read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:  # every file the catalog names is on disk with that hash
        record = json.loads((out / "concepts" / line["concept_id"] / "result.json").read_text())
        assert catalog.on_disk(str(out), record) is None


def test_a_killed_drivers_lease_is_taken_over_at_once_on_its_host(ray_cluster, tmp_path):
    m, out = manifest(tmp_path, 4, 16), tmp_path / "out"
    first = start(ray_cluster, "--manifest", m, "--output", str(out), "--concepts-per-actor", "1")
    deadline = time.monotonic() + 240
    while not list(out.glob("concepts/*/result.json")):
        assert first.poll() is None and time.monotonic() < deadline, "no concept finished"
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)  # the driver dies holding the lease
    first.wait()
    held = lease.read(str(out))
    assert held is not None and held.pid == first.pid
    second = start(ray_cluster, "--manifest", m, "--output", str(out), "--concepts-per-actor", "1")
    log = second.communicate(timeout=400)[0]
    assert second.returncode == 0, log[-4000:]
    assert "taking over the lease" in log and f"(pid {first.pid}) is not running on this host" in log
    rows = json.loads((out / "run.json").read_text())["counts"]
    assert rows["skipped"] >= 1 and rows["failed"] == 0


def test_a_stale_lease_of_another_host_is_taken_over_and_a_live_one_only_on_request(tmp_path, caplog):
    out = str(tmp_path / "out")
    mine = lease.acquire(out, "run-a")
    with pytest.raises(lease.LeaseHeldError, match="is being written by run run-a"):
        lease.acquire(out, "run-b")
    taken = lease.acquire(out, "run-b", take_over=True)  # explicit, and logged
    assert taken.run_id == "run-b" and "taking over the lease" in caplog.text
    with pytest.raises(lease.LeaseLostError, match="taken by run run-b"):
        lease.renew(out, mine)
    elsewhere = replace(taken, run_id="run-c", host="another-host", pid=1)
    (tmp_path / "out" / lease.LEASE_NAME).write_bytes(elsewhere.to_bytes())
    with pytest.raises(lease.LeaseHeldError):  # alive as far as anyone here can tell: its heartbeat is fresh
        lease.acquire(out, "run-d")
    stale = replace(elsewhere, heartbeat=time.time() - lease.STALE_AFTER_S - 1)
    (tmp_path / "out" / lease.LEASE_NAME).write_bytes(stale.to_bytes())
    assert lease.acquire(out, "run-d").run_id == "run-d"
    assert "its last heartbeat was" in caplog.text


def test_lease_refusal_is_invalid_input_and_exits_2_before_ray(tmp_path, job_here):
    out = tmp_path / "out"
    lease.acquire(str(out), "held-elsewhere")  # this test process holds it, alive
    code, err = job_here("jobs.train", "--output", str(out))
    assert code == 2 and "held-elsewhere" in err, err[-2000:]
