"""Manifest, images and outputs all on S3 (a real local S3-protocol server), through s3fs."""

from __future__ import annotations

import io
import json

import boto3
import pyarrow.parquet as pq
import s3fs
from jobtools import REPO, expected_files, run_driver

from tinv.demo import CONCEPTS


def test_s3_round_trip(ray_cluster, moto_endpoint):
    options = {"endpoint_url": moto_endpoint, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="tinv-test")
    fs.put(str(REPO / "manifests") + "/", "tinv-test/in/", recursive=True)  # demo.parquet + demo/<id>/<i>.png
    assert fs.exists("tinv-test/in/demo.parquet") and fs.exists("tinv-test/in/demo/red-ball/0.png")

    proc = run_driver(ray_cluster, "--manifest", "s3://tinv-test/in/demo.parquet", "--output", "s3://tinv-test/out",
                      "--storage-options", json.dumps(options), "--steps", "10")
    assert proc.returncode == 0, proc.stderr[-4000:]

    fs.invalidate_cache()
    files = {p.removeprefix("tinv-test/out/") for p in fs.find("tinv-test/out")}
    assert files == expected_files({cid: prop for cid, (*_, prop) in CONCEPTS.items()})
    rows = pq.read_table(io.BytesIO(fs.cat_file("tinv-test/out/results.parquet"))).to_pylist()
    assert {r["status"] for r in rows} == {"succeeded"} and len(rows) == len(CONCEPTS)
    assert all(r["embedding_uri"].startswith("s3://tinv-test/out/concepts/") for r in rows)
    result = json.loads(fs.cat_file("tinv-test/out/concepts/red-ball/result.json"))
    assert result["status"] == "succeeded" and result["steps"] == 30  # the manifest's own steps win
