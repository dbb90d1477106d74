"""A night's storage outage, injected in front of a real local S3 server: infrastructure, never a concept's fault.

An outage shorter than the retry window costs no concept and no retraining; one past it stops the run cleanly
(exit 3), losing nothing finished, and a re-run finishes only the rest.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import boto3
import pyarrow.parquet as pq
import s3fs
from faultproxy import FaultProxy
from jobtools import REPO, TOY

from jobs.train import DEMO_MANIFEST
from tinv.manifest import read_manifest, write_manifest

OPTIONS = {"key": "AKIATINVOUTAGE000001", "secret": "tinv-outage-secret", "client_kwargs": {"region_name": "us-east-1"}}
FAIL_FAST = {**OPTIONS, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
"""botocore's own retries off, so tinv's retry window alone decides when an outage is given up on (botocore's
back-off would stretch each try by seconds)."""


def bucket(moto: str, name: str, n: int, steps: int) -> s3fs.S3FileSystem:
    """A bucket on the store itself (not through the proxy) holding ``n`` of the demo's concepts and a manifest."""
    boto3.client("s3", endpoint_url=moto, aws_access_key_id=OPTIONS["key"], aws_secret_access_key=OPTIONS["secret"],
                 region_name="us-east-1").create_bucket(Bucket=name)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=moto, **OPTIONS)
    specs = read_manifest(str(REPO / DEMO_MANIFEST))[:n]
    rows = []
    for s in specs:
        images = []
        for uri in s.images[:3]:
            rel = uri.rsplit("manifests/", 1)[1]
            fs.put(uri, f"{name}/in/{rel}")
            images.append(rel)
        rows.append({"concept_id": s.concept_id, "images": images, "initializer_token": s.initializer_token,
                     "learnable_property": s.learnable_property, "eval_prompts": list(s.eval_prompts[:1]),
                     "steps": steps})
    write_manifest(rows, f"s3://{name}/in/m.parquet", {"endpoint_url": moto, **OPTIONS})
    return fs


def driver(cluster: dict, name: str, proxy: FaultProxy, *args: str, options: dict = OPTIONS) -> subprocess.Popen:
    """The train job on ``s3://{name}``, every byte through the proxy."""
    options = json.dumps({"endpoint_url": proxy.url, **options})
    cmd = [sys.executable, "-m", "jobs.train", "--manifest", f"s3://{name}/in/m.parquet", "--model", TOY,
           "--output", f"s3://{name}/out", "--storage-options", options, "--batch-size", "2",
           "--concepts-per-actor", "1", "--samples-per-prompt", "1", *args]
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"]}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(fs: s3fs.S3FileSystem, name: str) -> dict[str, dict]:
    """The concepts whose result.json is on the store, read from the store itself."""
    fs.invalidate_cache()
    return {p.split("/")[-2]: json.loads(fs.cat_file(p)) for p in fs.glob(f"{name}/out/concepts/*/result.json")}


def wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def rows(fs: s3fs.S3FileSystem, name: str) -> dict[str, dict]:
    table = pq.read_table(io.BytesIO(fs.cat_file(f"{name}/out/results.parquet"))).to_pylist()
    return {r["concept_id"]: r for r in table}


def test_an_outage_inside_the_window_costs_no_concept_and_no_retraining(ray_cluster, moto_endpoint):
    fs, proxy = bucket(moto_endpoint, "tinv-outage-short", 3, 12), FaultProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    proc = driver(ray_cluster, "tinv-outage-short", proxy, "--storage-retry-s", "90")
    wait_for(lambda: finished(fs, "tinv-outage-short"), 240, proc)
    proxy.outage("refuse", 6)  # connections refused and cut mid-request, then 503 SlowDown
    time.sleep(6)
    proxy.outage("slow-down", 4)
    log = proc.communicate(timeout=400)[0]
    assert proc.returncode == 0, log[-4000:]
    got = rows(fs, "tinv-outage-short")
    assert {r["status"] for r in got.values()} == {"succeeded"} and len(got) == 3
    assert all(r["attempts"] == 1 for r in got.values())  # each trained once
    run = json.loads(fs.cat_file("tinv-outage-short/out/run.json"))
    assert run["storage_outages"] == 0 and run["actors_replaced"] == 0


def test_an_outage_past_the_window_stops_the_run_losing_nothing_and_a_rerun_finishes_it(ray_cluster, moto_endpoint):
    name = "tinv-outage-long"
    fs, proxy = bucket(moto_endpoint, name, 4, 12), FaultProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    proc = driver(ray_cluster, name, proxy, "--storage-retry-s", "3", options=FAIL_FAST)
    wait_for(lambda: finished(fs, name), 240, proc)
    proxy.outage("refuse", 300)  # lasts until the driver has given up, however long botocore's own retries take
    before = finished(fs, name)
    log = proc.communicate(timeout=300)[0]
    proxy.end()
    assert proc.returncode == 3, log[-4000:]  # infrastructure: never "fix your data"
    assert "storage stayed unavailable past its retry window" in log or "could not write results" in log, log[-3000:]
    kept = finished(fs, name)
    # the results as written (storage back in time) or, where it was not, printed to the log: no concept is
    # reported failed for the outage
    stopped = rows_from(log) or list(rows(fs, name).values())
    assert len(stopped) == 4 and not {r["error_type"] for r in stopped} & {"StorageUnavailableError", "TransientError"}
    assert set(before) <= set(kept) and all(kept[c]["sha256"] == before[c]["sha256"] for c in before)  # none lost
    rerun = driver(ray_cluster, name, proxy, "--storage-retry-s", "60")
    log = rerun.communicate(timeout=400)[0]
    assert rerun.returncode == 0, log[-4000:]
    got = rows(fs, name)
    assert {c for c, r in got.items() if r["status"] == "skipped"} == set(kept)  # only the rest trained
    assert {r["status"] for c, r in got.items() if c not in kept} == {"succeeded"} and len(got) == 4


def rows_from(log: str) -> list[dict]:
    """The result rows a driver that could not write results.parquet printed to its log."""
    return [json.loads(line.split("[tinv] result ", 1)[1]) for line in log.splitlines() if "[tinv] result {" in line]

