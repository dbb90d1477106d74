"""Manifest, images and outputs all on S3 (a real local S3-protocol server), through s3fs; no secret leaks."""

from __future__ import annotations

import io
import json

import boto3
import pyarrow.parquet as pq
import s3fs
from jobtools import REPO, TOY, expected_files, run_driver, run_named

from jobs.train import DEMO_MANIFEST
from tinv.manifest import read_manifest, write_manifest

KEY, SECRET = "AKIATINVFAKEKEY00001", "tinv-fake-secret-7f3Qz9wLm2"
ENV_SECRET, ENV_TOKEN = "tinv-env-secret-Kx81vB", "tinv-env-session-token-Pq55"


def test_s3_round_trip_writes_no_credential_anywhere(ray_cluster, moto_endpoint):
    options = {"endpoint_url": moto_endpoint, "key": KEY, "secret": SECRET,
               "client_kwargs": {"region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                 region_name="us-east-1").create_bucket(Bucket="tinv-test")
    fs.put(str(REPO / "manifests") + "/", "tinv-test/in/", recursive=True)  # demo.parquet + demo/<id>/<i>.png
    assert fs.exists("tinv-test/in/demo.parquet") and fs.exists("tinv-test/in/demo/red-star/0.png")
    # three of the demo's concepts, short: a manifest on S3 whose relative image URIs resolve there
    specs = read_manifest(str(REPO / DEMO_MANIFEST))[::4]
    rows = [{"concept_id": s.concept_id, "images": [u.rsplit("manifests/", 1)[1] for u in s.images],
             "learnable_property": s.learnable_property, "initializer_token": s.initializer_token,
             "eval_prompts": list(s.eval_prompts[:1]), "steps": 20} for s in specs]
    write_manifest(rows, "s3://tinv-test/in/short.parquet", options)

    proc = run_driver(ray_cluster, "--manifest", "s3://tinv-test/in/short.parquet", "--model", TOY,
                      "--output", "s3://tinv-test/out", "--storage-options", json.dumps(options), "--steps", "10",
                      env={"AWS_SECRET_ACCESS_KEY": ENV_SECRET, "AWS_SESSION_TOKEN": ENV_TOKEN})
    assert proc.returncode == 0, proc.stderr[-4000:]

    fs.invalidate_cache()
    files = {p.removeprefix("tinv-test/out/") for p in fs.find("tinv-test/out")}
    assert run_named(files) == expected_files({s.concept_id: 1 for s in specs})
    rows = pq.read_table(io.BytesIO(fs.cat_file("tinv-test/out/results.parquet"))).to_pylist()
    assert {r["status"] for r in rows} == {"succeeded"} and len(rows) == len(specs)
    assert all(r["embedding_uri"] == f"concepts/{r['concept_id']}/learned_embeds.safetensors" for r in rows)
    result = json.loads(fs.cat_file(f"tinv-test/out/concepts/{specs[0].concept_id}/result.json"))
    assert result["status"] == "succeeded" and result["steps"] == 20  # the manifest's own steps win
    # no credential, from the options or from the environment, in any object written or in the job's log
    written = {p: fs.cat_file(p) for p in fs.find("tinv-test/out")}
    assert len(written) == len(files)
    for secret in (KEY, SECRET, ENV_SECRET, ENV_TOKEN):
        leaks = [p for p, data in written.items() if secret.encode() in data]
        assert not leaks and secret not in proc.stdout + proc.stderr, (secret, leaks)
    run = json.loads(written["tinv-test/out/run.json"])
    assert run["cluster"]["storage_options"] == sorted(options)  # the names of the options, never their values
