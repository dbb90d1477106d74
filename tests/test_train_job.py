"""The Ray bulk training job on a real local cluster (2 fake GPUs): submit, resume, kill, bad data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from jobtools import REPO, TOY, concept_files, expected_files, run_driver, run_named, submit
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from jobs.train import DEMO_MANIFEST
from tinv import EMBEDDED_MODEL
from tinv.evaluation.sampling import SampleConfig
from tinv.families.fingerprint import model_fingerprint
from tinv.families.sd import SD
from tinv.files.formats import LORA_NAME
from tinv.manifest import read_manifest, write_manifest
from tinv.settings import TrainConfig


def tree(root: Path) -> set[str]:
    return run_named({str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()})


COMBINATIONS = ("red-star", "blue-circle", "green-triangle", "yellow-diamond")  # the toy world's surest kind
DEMO = {s.concept_id: s for s in read_manifest(str(REPO / DEMO_MANIFEST))}


def results(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == len({r["concept_id"] for r in rows}), "a concept appears twice in results.parquet"
    return {r["concept_id"]: r for r in rows}


def record(out: Path, concept_id: str) -> dict:
    """The concept's ``result.json``."""
    return json.loads((out / "concepts" / concept_id / "result.json").read_text())


def test_demo_job_succeeds_with_the_exact_files_and_embeddings_load_in_diffusers(demo_run, tmp_path):
    out, log = demo_run
    assert "succeeded" in log, log[-4000:]
    assert "[tinv] [" in log and "model loaded in" in log  # the job's progress lines; the actors' reach it too
    for noise in ("requires torchvision (not installed)", "Loading weights", "should be kept in float32",
                  "Token indices sequence length"):  # once per process or per actor, and meaning nothing
        assert noise not in log, noise
    methods = {cid: spec.method for cid, spec in DEMO.items()}
    assert "pivotal" in methods.values()  # the demo shows the methods beside TI
    assert tree(out) == expected_files({cid: len(spec.eval_prompts) for cid, spec in DEMO.items()}, methods)
    rows = results(out)
    assert {r["status"] for r in rows.values()} == {"succeeded"} and all(r["attempts"] == 1 for r in rows.values())
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"total": 12, "succeeded": 12, "failed": 0, "skipped": 0} and run["exit_code"] == 0
    assert run["train_config"]["concepts_per_actor"] == run["dispatch"]["concepts_per_actor"] == 4  # one K
    assert run["samples"] == asdict(SampleConfig()) | {"metrics": []} and run["model_uri"] is None
    assert run["versions"]["ray"] and run["base_model_fingerprint"]
    # the toy model's folder names its metric plug-in: each concept's fidelity is in the results' metrics
    fidelity = {cid: dict(rows[cid]["metrics"])["fidelity"] for cid in DEMO}
    assert all(0.0 <= f <= 1.0 for f in fidelity.values()), fidelity
    assert min(fidelity[c] for c in COMBINATIONS) >= 0.5, fidelity  # a random token scores <= 0.15 on each

    model_dir = EMBEDDED_MODEL
    for cid in DEMO:
        result = record(out, cid)
        assert result["base_model_fingerprint"] == run["base_model_fingerprint"]
        assert result["steps"] == DEMO[cid].steps and result["token"] == f"<{cid}>" and result["config_fingerprint"]
        assert result["metrics"] == dict(rows[cid]["metrics"])
        assert set(result["metrics"]) == {"fidelity", "fidelity_loose"}
        assert result["metrics"]["fidelity"] == fidelity[cid] <= result["metrics"]["fidelity_loose"]
        vector = load_file(out / "concepts" / cid / "learned_embeds.safetensors")[f"<{cid}>"]
        webui = f"webui/embeddings/{cid}.safetensors"
        for name, kw in (("learned_embeds.safetensors", {}), (webui, {"token": f"<{cid}>"})):
            pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
            assert model_fingerprint(model_dir, SD.parts) == result["base_model_fingerprint"]  # as a server checks
            pipe.load_textual_inversion(str(out / "concepts" / cid / name), **kw)
            new_id = pipe.tokenizer.convert_tokens_to_ids(f"<{cid}>")
            assert new_id == len(pipe.tokenizer) - 1
            ids = pipe.tokenizer(f"a photo of a <{cid}>").input_ids
            assert ids[-2] == new_id
            row = pipe.text_encoder.get_input_embeddings().weight[new_id]
            torch.testing.assert_close(row, vector[0])

    # the pivotal concept: its LoRA is recorded, and diffusers with its two files draws the job's own sample
    (piv,) = [cid for cid, m in methods.items() if m == "pivotal"]
    result = record(out, piv)
    assert result["method"] == rows[piv]["method"] == "pivotal" and result["lora_rank"] == TrainConfig().lora_rank
    assert result["lora_uri"] == rows[piv]["lora_uri"] == f"concepts/{piv}/pytorch_lora_weights.safetensors"
    assert all(rows[c]["lora_uri"] is None and rows[c]["method"] == "ti" for c in DEMO if c != piv)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # what the job draws with
    pipe.load_textual_inversion(str(out / "concepts" / piv / "learned_embeds.safetensors"))
    pipe.load_lora_weights(str(out / "concepts" / piv))
    usual = SD.sampling(None)  # what the job draws an SD model's samples with when not told
    drawn = pipe(DEMO[piv].eval_prompts[0].format(f"<{piv}>"), num_inference_steps=usual.steps,
                 guidance_scale=usual.guidance, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    job = np.asarray(Image.open(out / "concepts" / piv / "samples" / "00_00.png"), float)
    assert np.abs((drawn * 255).round() - job).max() <= 2
    bundle = load_file(out / "concepts" / piv / "webui" / "loras" / f"{piv}.safetensors")
    assert torch.equal(bundle[f"bundle_emb.{piv}.string_to_param.*"], load_file(
        out / "concepts" / piv / "learned_embeds.safetensors")[f"<{piv}>"])  # A1111's prompt word: the trigger
    check_published(out, rows, list(DEMO))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_published(out: Path, rows: dict[str, dict], published: list[str]) -> list[dict]:
    """Each concept's files are in its result.json with their sha256; its web-UI files are named for its trigger
    (unique in the run, never one token of the base tokenizer), with the first sample as their preview; the
    catalog lists exactly ``published`` in manifest order, and ``latest`` names it."""
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL / "tokenizer")
    lines = [json.loads(x) for x in (out / "catalog.jsonl").read_text().splitlines()]
    assert [x["concept_id"] for x in lines] == published
    latest = json.loads((out / "latest").read_text())
    assert latest["sha256"] == sha256((out / latest["catalog"]).read_bytes()) and latest["concepts"] == len(published)
    assert (out / latest["catalog"]).read_bytes() == (out / "catalog.jsonl").read_bytes()
    stems: dict[str, list[str]] = {"embeddings": [], "loras": []}
    for cid, row in rows.items():
        if row["status"] == "failed":
            continue
        folder = out / "concepts" / cid
        result = json.loads((folder / "result.json").read_text())
        assert result["sha256"] == {f: sha256((folder / f).read_bytes()) for f in result["files"]}
        assert row["trigger"] == result["trigger"] and row["published"] == (cid in published)
        first = (folder / "samples" / "00_00.png").read_bytes()
        for kind, names in stems.items():
            for file in (folder / "webui" / kind).glob("*.safetensors"):
                assert file.stem == result["trigger"]
                assert (file.parent / f"{file.stem}.preview.png").read_bytes() == first
                names.append(file.stem.lower())
    for line in lines:
        result = record(out, line["concept_id"])
        assert line["files"] == {f"concepts/{line['concept_id']}/{f}": h for f, h in result["sha256"].items()
                                 if not f.startswith("samples/") and f != "grid.png"}
        assert line["base_model_fingerprint"] == result["base_model_fingerprint"]
        assert line["metrics"] == result["metrics"] and line["trigger"] == result["trigger"]
    assert all(len(names) == len(set(names)) for names in stems.values()), stems
    assert all(len(tokenizer.encode(s, add_special_tokens=False)) > 1 for names in stems.values() for s in names)
    return lines


def test_resubmitting_skips_finished_concepts_and_touches_none_of_their_files(demo_run, ray_cluster):
    out, _ = demo_run
    before = {p: ((out / p).stat().st_mtime_ns, (out / p).read_bytes()) for p in tree(out) if p.startswith("concepts/")}
    first_manifest = json.loads((out / "run.json").read_text())["manifest"]
    # a different working-dir package (one file left out) unpacks to another folder, as on a later night
    log = submit(ray_cluster, f"tinv-demo-again-{os.getpid()}", "--output", str(out), excludes=("cluster.yaml",))
    assert "succeeded" in log, log[-4000:]
    assert json.loads((out / "run.json").read_text())["manifest"] != first_manifest
    catalog = (out / "catalog.jsonl").read_bytes()
    after = {p: ((out / p).stat().st_mtime_ns, (out / p).read_bytes()) for p in tree(out) if p.startswith("concepts/")}
    assert after == before
    assert (out / "catalog.jsonl").read_bytes() == catalog and len(list((out / "catalogs").iterdir())) == 2
    assert {r["status"] for r in results(out).values()} == {"skipped"}
    assert json.loads((out / "run.json").read_text())["counts"]["skipped"] == len(DEMO)


def many_concepts(tmp_path: Path, n: int) -> Path:
    """``n`` concepts over copies of the demo images (relative URIs)."""
    src = REPO / "manifests" / "demo"
    shutil.copytree(src, tmp_path / "demo")
    demo_ids = sorted(DEMO)
    rows = [{"concept_id": f"c{i:02d}", "images": [f"demo/{demo_ids[i % 4]}/{j}.png" for j in range(4)],
             "initializer_token": "circle"} for i in range(n)]
    write_manifest(rows, str(tmp_path / "many.parquet"))
    return tmp_path / "many.parquet"


def test_a_worker_killed_mid_run_loses_no_concept(ray_cluster, tmp_path):
    manifest, out = many_concepts(tmp_path, 8), tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.train", "--manifest", str(manifest),
           "--model", TOY, "--output", str(out), "--steps", "80", "--batch-size", "2", "--concepts-per-actor", "2"]
    driver = subprocess.Popen(cmd, cwd=REPO, env={**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]},
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob("concepts/*/result.json")):
        assert driver.poll() is None and time.monotonic() < deadline, "no concept finished"
        time.sleep(0.05)
    first = json.loads(next(out.glob("concepts/*/result.json")).read_text())
    victim = int(first["worker"].rsplit(":", 1)[1])
    os.kill(victim, signal.SIGKILL)  # the actor process that just finished a concept, with more in flight
    log, _ = driver.communicate(timeout=240)
    assert driver.returncode == 0, log[-4000:]

    rows = results(out)
    assert sorted(rows) == [f"c{i:02d}" for i in range(8)]
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    retried = [r for r in rows.values() if r["attempts"] >= 2]
    assert retried and all(r["worker"] != first["worker"] for r in retried)
    assert json.loads((out / "run.json").read_text())["actors_replaced"] >= 1
    for cid, row in rows.items():
        files = {f for f in tree(out / "concepts" / cid) if ".tmp-" not in f}
        assert files == concept_files(cid)
        result = record(out, cid)
        assert (result["attempts"], result["worker"]) == (row["attempts"], row["worker"])
        assert load_file(out / "concepts" / cid / "learned_embeds.safetensors")[f"<{cid}>"].shape[0] == 1


def test_bad_concepts_fail_alone_with_their_reasons(ray_cluster, tmp_path):
    shutil.copytree(REPO / "manifests" / "demo", tmp_path / "demo")
    (tmp_path / "broken.png").write_bytes(b"this is not an image")
    good = [f"demo/red-star/{j}.png" for j in range(4)]
    for j in range(4):  # a portrait (its 24 x 40 bucket) and a mask per picture (the left half its subject)
        tall = Image.new("RGB", (32, 52), (230, 230, 230))
        tall.paste(Image.open(tmp_path / good[j]), (0, 10))
        tall.save(tmp_path / f"tall-{j}.png")
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 32))
        mask.save(tmp_path / f"mask-{j}.png")
    rows = [
        {"concept_id": "good-1", "images": good},
        {"concept_id": "corrupt", "images": [*good[:2], "broken.png"]},
        {"concept_id": "missing", "images": ["demo/red-star/0.png", "nowhere/404.png"]},
        {"concept_id": "clash", "images": good, "placeholder_token": "star"},  # a word of the toy world
        {"concept_id": "good-2", "images": good, "learnable_property": "style", "initializer_token": "striped"},
        {"concept_id": "wild", "images": good, "learning_rate": 1e30},  # its vectors overflow: it diverges
        {"concept_id": "star", "images": good, "steps": 4},  # a toy word: its default trigger is prefixed
        {"concept_id": "named", "images": good, "trigger": "circle"},  # a toy word given as trigger: refused
        {"concept_id": "tall", "images": [f"tall-{j}.png" for j in range(4)]},
        {"concept_id": "masked", "images": good, "masks": [f"mask-{j}.png" for j in range(4)]},
        {"concept_id": "folder", "images": [*good[:2], "demo/red-star"]},  # a directory where an image should be
        {"concept_id": "loop", "images": [*good[:2], "loop-a.png"]},  # a symlink loop
    ]
    (tmp_path / "loop-a.png").symlink_to(tmp_path / "loop-b.png")
    (tmp_path / "loop-b.png").symlink_to(tmp_path / "loop-a.png")
    write_manifest(rows, str(tmp_path / "mixed.parquet"))
    out = tmp_path / "out"
    proc = run_driver(ray_cluster, "--manifest", str(tmp_path / "mixed.parquet"), "--model", TOY, "--output", str(out),
                      "--steps", "10", "--batch-size", "2", "--publish-if", "steps>=10", "--export", "concepts-library")
    assert proc.returncode == 1, proc.stderr[-4000:]
    got = results(out)
    assert [r["status"] for r in got.values()] == ["succeeded", "failed", "failed", "failed", "succeeded", "failed",
                                                   "succeeded", "failed", "succeeded", "succeeded", "failed", "failed"]
    for cid, says, uri in (("folder", "Is a directory", "demo/red-star"), ("loop", "symbolic links", "loop-a.png")):
        assert got[cid]["error_type"] == "ConceptDataError" and got[cid]["attempts"] == 1  # failed once, not retried
        assert says in got[cid]["error"] and uri in got[cid]["error"] and f"'{cid}'" in got[cid]["error"]
    assert got["named"]["error_type"] == "ConceptDataError" and got["named"]["attempts"] == 0
    assert "trigger 'circle' is a word the base model's tokenizer reads as one token" in got["named"]["error"]
    assert got["star"]["trigger"] == "tinv-star" and got["star"]["held_back"] == "steps 4 fails steps>=10"
    check_published(out, got, ["good-1", "good-2", "tall", "masked"])  # star trained 4 steps: held back
    sizes = {c: record(out, c)["sizes"] for c in ("tall", "masked")}
    assert sizes == {"tall": {"24x40": 4}, "masked": {"32x32": 4}}  # the portrait kept its framing
    assert "cannot decode image" in got["corrupt"]["error"] and "broken.png" in got["corrupt"]["error"]
    assert "image not found" in got["missing"]["error"] and "nowhere/404.png" in got["missing"]["error"]
    assert "'star' is already in the vocabulary" in got["clash"]["error"]
    assert "diverged" in got["wild"]["error"] and got["wild"]["error_type"] == "ConceptDivergedError"
    assert {got[c]["error_type"] for c in ("corrupt", "missing", "clash")} == {"ConceptDataError"}
    assert all(got[c]["attempts"] == 1 and got[c]["embedding_uri"] is None
               for c in ("corrupt", "missing", "clash", "wild"))  # none of them is retried: another try fails alike
    objects = {c: "object" for c in ("good-1", "star", "tall", "masked")}
    assert tree(out) == expected_files(objects | {"good-2": "style"}, triggers={"star": "tinv-star"}, export=True)
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"total": 12, "succeeded": 5, "failed": 7, "skipped": 0}
    assert run["catalog"] == {"published": 4, "held_back": 1, "written": True}
    assert run["actors_replaced"] == 0  # a bad concept is not a lost node


def test_a_missing_model_is_invalid_input_by_its_type_not_a_lost_node(ray_cluster, tmp_path):
    proc = run_driver(ray_cluster, "--manifest", str(REPO / DEMO_MANIFEST), "--model", str(tmp_path / "no-such-model"),
                      "--output", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "could not load the model" in proc.stderr and "no model folder at" in proc.stderr


def test_class_pictures_are_drawn_once_per_class_shared_and_kept_for_later_runs(ray_cluster, tmp_path):
    shutil.copytree(REPO / "manifests" / "demo", tmp_path / "demo")
    pics = {c: [f"demo/{c}/{j}.png" for j in range(3)] for c in ("red-star", "teal-cross")}
    # a list<string> column: a list of one is that prompt; "cross" trains against both classes' pictures
    rows = [{"concept_id": "star-a", "images": pics["red-star"], "method": "lora", "placeholder_token": "sks star",
             "class_prompt": ["a star"]},
            {"concept_id": "star-b", "images": pics["red-star"], "method": "pivotal", "initializer_token": "star",
             "class_prompt": ["a star"], "prior_loss_weight": 0.5},
            {"concept_id": "cross", "images": pics["teal-cross"], "method": "pivotal", "initializer_token": "cross",
             "class_prompt": ["a cross", "a star"]},
            {"concept_id": "plain", "images": pics["teal-cross"], "initializer_token": "cross"}]
    write_manifest(rows, str(tmp_path / "m.parquet"))
    out = tmp_path / "out"
    args = ("--manifest", str(tmp_path / "m.parquet"), "--model", TOY, "--output", str(out), "--batch-size", "2",
            "--class-images", "3", "--samples-per-prompt", "1")
    proc = run_driver(ray_cluster, *args, "--steps", "6")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {r["status"] for r in results(out).values()} == {"succeeded"}
    folders = sorted((out / "classes").iterdir())
    assert len(folders) == 2  # two classes for three concepts: "a star" drawn once for both of its concepts
    markers = {json.loads((f / "class.json").read_text())["prompt"]: f for f in folders}
    assert set(markers) == {"a star", "a cross"} and all(len(list(f.glob("*.png"))) == 3 for f in folders)
    assert json.loads((out / "run.json").read_text())["classes"] == {"wanted": 2, "drawn": 2, "failed": 0}
    for cid, prompts in (("star-a", ["a star"]), ("cross", ["a cross", "a star"])):  # named in the LoRA files
        trigger = record(out, cid)["trigger"]
        assert trigger == {"star-a": "star-a", "cross": "tinv-cross"}[cid]  # "cross" is a word of the toy world
        for name in (LORA_NAME, f"webui/loras/{trigger}.safetensors"):
            with safe_open(str(out / "concepts" / cid / name), "pt") as f:
                meta = f.metadata()
            assert json.loads(meta["class_prompt"]) == prompts
            # what it was trained under: all of it as JSON, and kohya's ss_ keys for what kohya names
            training = record(out, cid)["training"]
            assert json.loads(meta["training"]) == training
            assert training | {"steps": 6, "prior_preservation": "images", "class_images": 3,
                               "prior_loss_weight": 1.0} == training
            assert (meta["ss_max_train_steps"], meta["ss_prior_loss_weight"]) == ("6", "1.0")
    assert set(record(out, "plain")["training"]) == {"steps", "learning_rate", "seed", "batch_size"}  # ti
    before = {p: p.stat().st_mtime_ns for f in folders for p in f.iterdir()}
    # more steps: every concept is redone, against the class pictures already there
    proc = run_driver(ray_cluster, *args, "--steps", "7")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {r["status"] for r in results(out).values()} == {"succeeded"}
    assert json.loads((out / "run.json").read_text())["classes"] == {"wanted": 2, "drawn": 0, "failed": 0}
    assert {p: p.stat().st_mtime_ns for f in folders for p in f.iterdir()} == before
    # output preservation needs no class pictures: none wanted, and the prior concepts are redone without them
    proc = run_driver(ray_cluster, *args, "--steps", "7", "--prior-preservation", "output")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {c: r["status"] for c, r in results(out).items()} == {
        "star-a": "succeeded", "star-b": "succeeded", "cross": "succeeded", "plain": "skipped"}  # no class: kept
    assert json.loads((out / "run.json").read_text())["classes"] == {"wanted": 0, "drawn": 0, "failed": 0}
    kept = record(out, "star-b")["training"]
    assert (kept["prior_preservation"], kept["prior_loss_weight"], "class_images" in kept) == ("output", 0.5, False)
