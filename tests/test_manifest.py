"""Manifest validation (pure pyarrow, no Ray): every bad row at once, unsafe ids refused."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jobtools import TOY, job_env
from modeltools import fingerprint

from tinv.files.outputs import concept_dir
from tinv.manifest import ConceptSpec, ManifestError, read_manifest, specs_from_table, write_manifest
from tinv.settings import Recipe, TrainConfig

GOOD = {"concept_id": "good", "images": ["a.png"]}
NO_RAY = {**job_env(), "RAY_ADDRESS": "127.0.0.1:1"}
"""Nothing listens there: what is refused must be refused before the driver reaches for Ray."""


def problems_of(rows, schema=None) -> list[str]:
    names = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.Table.from_pylist([{k: row.get(k) for k in names} for row in rows], schema=schema)
    with pytest.raises(ManifestError) as info:
        specs_from_table(table, base_dir="/data")
    return info.value.problems


def test_good_manifest_resolves_relative_uris_and_defaults(tmp_path):
    rows = [GOOD, {"concept_id": "b-2", "images": ["s3://bucket/x.png", "/abs/y.png"], "learnable_property": "style",
                   "placeholder_token": "<bee>", "steps": 7, "learning_rate": 0.1, "num_vectors": 2,
                   "captions": ["a {} on a star", "a {} on a cross"]}]
    write_manifest(rows, str(tmp_path / "sub" / "m.parquet"))
    specs = read_manifest(f"file://{tmp_path}/sub/m.parquet")
    assert specs[0].images == (f"file://{tmp_path}/sub/a.png",)
    assert specs[0].placeholder_token == "<good>" and specs[0].initializer_token == "object"
    assert specs[1].images == ("s3://bucket/x.png", "/abs/y.png")
    assert (specs[1].steps, specs[1].num_vectors, specs[1].tokens) == (7, 2, ["<bee>", "<bee>_1"])
    assert (specs[0].captions, specs[1].captions) == ((), ("a {} on a star", "a {} on a cross"))
    assert read_manifest(str(tmp_path / "sub" / "m.parquet"))[0].images == (f"{tmp_path}/sub/a.png",)


def test_every_bad_row_is_reported_at_once():
    rows = [
        GOOD,
        {"concept_id": "good", "images": ["b.png"]},  # duplicate id
        {"concept_id": "../../etc", "images": ["c.png"]},  # unsafe
        {"concept_id": "a/b", "images": ["c.png"]},  # path separator
        {"concept_id": "empty", "images": []},
        {"concept_id": "prop", "images": ["d.png"], "learnable_property": "scene"},
        {"concept_id": "two-words", "images": ["e.png"], "placeholder_token": "two words"},
        {"concept_id": "same-token", "images": ["f.png"], "placeholder_token": "<good>"},
        {"concept_id": None, "images": ["g.png"]},
        {"concept_id": "few-captions", "images": ["h.png", "i.png"], "captions": ["a {}"]},
        {"concept_id": "no-slot", "images": ["j.png"], "captions": ["a red star"]},
        {"concept_id": "brace", "images": ["k.png"], "captions": ["a {} in {font}"]},
    ]
    found = problems_of(rows)
    expect = {1: "duplicates row 0", 2: "concept_id must match", 3: "concept_id must match", 4: "images must hold",
              5: "learnable_property", 6: "placeholder_token must be one word", 7: "token '<good>' is also row 0",
              8: "concept_id is missing", 9: "one caption per image (2), got 1", 10: "every caption must contain {}",
              11: "no other brace"}
    for row, text in expect.items():
        assert any(p.startswith(f"row {row} ") and text in p for p in found), (row, text, found)
    assert not any(p.startswith("row 0 ") for p in found)


def test_bad_method_columns_are_refused_with_the_other_schema_errors(tmp_path):
    rows = [
        GOOD,
        {"concept_id": "m", "images": ["a.png"], "method": "dreambooth"},
        {"concept_id": "r", "images": ["a.png"], "method": "lora", "lora_rank": 0},
        {"concept_id": "c", "images": ["a.png"], "class_prompt": "a dog"},  # ti: a class loss trains nothing
        {"concept_id": "w", "images": ["a.png"], "method": "pivotal", "class_prompt": "a dog",
         "prior_loss_weight": -1.0},
        {"concept_id": "b", "images": ["a.png"], "method": "lora", "class_prompt": "a {} dog"},
        {"concept_id": "t", "images": ["a.png"], "method": "lora", "placeholder_token": "sks {} dog"},
        {"concept_id": "p", "images": ["a.png"], "method": "pivotal", "placeholder_token": "sks dog"},
        {"concept_id": "d", "images": ["a.png"], "method": "lora", "placeholder_token": "sks dog"},  # DreamBooth's
        {"concept_id": "ok", "images": ["a.png"], "method": "pivotal", "lora_rank": 8, "class_prompt": "a dog",
         "prior_loss_weight": 0.5},
    ]
    found = problems_of(rows)
    expect = {1: "method must be one of", 2: "lora_rank must be in 1..1024", 3: "class_prompt needs method lora",
              4: "prior_loss_weight must be >= 0", 5: "class_prompt must be plain text",
              6: "a lora concept's placeholder_token is plain text", 7: "placeholder_token must be one word"}
    for row, text in expect.items():
        assert any(p.startswith(f"row {row} ") and text in p for p in found), (row, text, found)
    assert not any(p.startswith(("row 0 ", "row 8 ", "row 9 ")) for p in found)
    write_manifest([rows[-1]], str(tmp_path / "m.parquet"))
    (ok,) = read_manifest(str(tmp_path / "m.parquet"))
    assert (ok.method, ok.lora_rank, ok.class_prompt, ok.prior_loss_weight) == ("pivotal", 8, "a dog", 0.5)
    # built in Python, "no class prompt" may be written None as well as "" or an empty list
    assert all(replace(ok, class_prompt=none).class_prompts == () for none in (None, "", ()))


def test_class_prompt_may_be_a_list_of_prompts(tmp_path):
    rows = [{"concept_id": "both", "images": ["a.png"], "method": "lora", "class_prompt": ["a dog", "a cat"]},
            {"concept_id": "one", "images": ["a.png"], "method": "pivotal", "class_prompt": ["a dog"]},
            {"concept_id": "none", "images": ["a.png"]}]
    write_manifest(rows, str(tmp_path / "m.parquet"))
    both, one, none = read_manifest(str(tmp_path / "m.parquet"))
    assert (both.class_prompt, one.class_prompt, none.class_prompts) == (("a dog", "a cat"), "a dog", ())
    found = problems_of([{"concept_id": "x", "images": ["a.png"], "method": "lora", "class_prompt": ["a", "a"]}])
    assert any("class_prompt holds a prompt twice" in p for p in found)


def test_wrong_column_types_and_unknown_columns_are_named():
    schema = pa.schema([("concept_id", pa.int64()), ("images", pa.string()), ("steps", pa.string()),
                        ("colour", pa.string())])
    found = problems_of([{"concept_id": 1, "images": "x.png", "steps": "ten", "colour": "red"}], schema)
    assert any("'concept_id' must be string" in p for p in found)
    assert any("'images' must be list<string>" in p for p in found)
    assert any("'steps' must be int" in p for p in found)
    assert any("unknown column 'colour'" in p for p in found)
    assert problems_of([{"images": ["x.png"]}]) == ["missing required column 'concept_id'"]


def test_unsafe_concept_id_never_makes_an_output_path():
    for bad in ("..", "../x", "a/b", "/abs", ".hidden", "a\\b", ""):
        with pytest.raises(ValueError):
            concept_dir("s3://bucket/out", bad)
    assert concept_dir("s3://bucket/out/", "ok.1_x-2") == "s3://bucket/out/concepts/ok.1_x-2"


def test_fingerprint_changes_with_what_changes_the_result(monkeypatch):
    spec = ConceptSpec("c", ("a.png",))
    model = {"base_model_fingerprint": "m1", "resolution": 32, "dtype": "torch.float32", "templates": "t1"}
    fp = fingerprint(spec, TrainConfig(), model)
    assert fp == fingerprint(ConceptSpec("c", ("a.png",), eval_prompts=("a {}",)), TrainConfig(), model)
    assert fp == fingerprint(spec, TrainConfig(concepts_per_actor=7), model)  # packed == solo
    assert fp != fingerprint(spec, TrainConfig(steps=9), model)
    assert fp != fingerprint(ConceptSpec("c", ("a.png",), seed=3), TrainConfig(), model)
    assert fp != fingerprint(spec, TrainConfig(recipe=Recipe(min_timestep_fraction=0.5)), model)
    assert fp != fingerprint(ConceptSpec("c", ("a.png",), captions=("a {} star",)), TrainConfig(), model)
    assert fp != fingerprint(spec, TrainConfig(), {**model, "base_model_fingerprint": "m2"})
    assert fp != fingerprint(spec, TrainConfig(), {**model, "templates": "t2"})  # other prompt templates
    fp16 = {**model, "dtype": "torch.float16"}  # the loss scale counts where it acts: under fp16
    assert fingerprint(spec, TrainConfig(recipe=Recipe(loss_scale_growth_interval=9)), model) == fp
    assert fingerprint(spec, TrainConfig(recipe=Recipe(loss_scale_growth_interval=9)), fp16) != fingerprint(
        spec, TrainConfig(), fp16)
    # the LoRA and prior settings count for the methods they act in, and leave a ti concept's hash as it was
    assert fingerprint(spec, TrainConfig(lora_rank=9, class_images=5), model) == fp
    lora = ConceptSpec("c", ("a.png",), method="lora")
    fl = fingerprint(lora, TrainConfig(), model)
    assert fl != fp and fl != fingerprint(ConceptSpec("c", ("a.png",), method="pivotal"), TrainConfig(), model)
    assert fl != fingerprint(lora, TrainConfig(lora_rank=8), model)
    assert fl != fingerprint(lora, TrainConfig(lora_learning_rate=1e-3), model)
    assert fl == fingerprint(lora, TrainConfig(class_images=5), model)  # no class prompt: no class pictures
    prior = ConceptSpec("c", ("a.png",), method="lora", class_prompt="a dog")
    fprior = fingerprint(prior, TrainConfig(), model)
    assert fprior != fl and fprior != fingerprint(prior, TrainConfig(class_images=5), model)
    assert fprior != fingerprint(prior, TrainConfig(prior_loss_weight=0.5), model)
    monkeypatch.setattr("tinv.plan.CONFIG_FINGERPRINT_VERSION", 2)  # a result of another format version: redone
    assert fingerprint(spec, TrainConfig(), model) != fp
    monkeypatch.undo()
    # early stopping changes where a concept ends; its settings count only while it is on
    assert fp != fingerprint(spec, TrainConfig(recipe=Recipe(dvar_threshold=0.1)), model)
    off = fingerprint(spec, TrainConfig(early_stop=False), model)
    assert off != fp
    assert off == fingerprint(spec, TrainConfig(early_stop=False, recipe=Recipe(dvar_window=50)), model)
    # the style settings count for styles only, and an object's batch size for objects only
    style = ConceptSpec("c", ("a.png",), learnable_property="style")
    sfp = fingerprint(style, TrainConfig(), model)
    assert fp == fingerprint(spec, TrainConfig(recipe=Recipe(style_batch_size=2, style_timestep_power=1.0)), model)
    assert sfp != fingerprint(style, TrainConfig(recipe=Recipe(style_timestep_power=4.0)), model)
    assert sfp != fingerprint(style, TrainConfig(recipe=Recipe(style_batch_size=2)), model)
    assert sfp != fingerprint(style, TrainConfig(batch_size=2), model)  # unset, a style's batch is the run's
    own = Recipe(style_batch_size=8)
    assert fingerprint(style, TrainConfig(recipe=own), model) == fingerprint(style, TrainConfig(batch_size=2,
                                                                                                recipe=own), model)
    # images under the manifest's folder count as written there: a moved manifest folder keeps its results
    moved = [fingerprint(ConceptSpec("c", (f"{d}/img/a.png",)), TrainConfig(), model, manifest_dir=d)
             for d in ("/tmp/ray/pkg_1", "s3://b/in")]
    assert moved[0] == moved[1] != fingerprint(ConceptSpec("c", ("/x/img/b.png",)), TrainConfig(), model, "/x")


def test_driver_refuses_a_bad_manifest_before_touching_ray(tmp_path, job_here):
    manifest = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"concept_id": "../up", "images": ["x.png"]}, GOOD, GOOD]), manifest)
    code, err = job_here("jobs.train", "--manifest", str(manifest), "--model", TOY, "--output", str(tmp_path / "out"))
    assert code == 2, err[-3000:]
    assert "row 0" in err and "row 2" in err and "duplicates row 1" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, says", [
    (["--manifest", "m.parquet"], "--manifest needs --model"),
    (["--model", "some/model"], "--model needs --manifest"),
    (["--demo"], "unrecognized arguments: --demo"),  # the no-argument run is the demo
])
def test_a_manifest_never_trains_on_the_embedded_toy_model_by_accident(tmp_path, job_here, args, says):
    code, err = job_here("jobs.train", *args, "--output", str(tmp_path / "out"))
    assert code == 2 and says in err, err[-2000:]
    assert not (tmp_path / "out").exists()


def test_embedding_files_are_drawn_with_the_model_named_not_the_toy_one(tmp_path, job_here):
    code, err = job_here("jobs.evaluate", "--embeddings", str(tmp_path / "x.bin"))
    assert code == 2 and "--embeddings needs --model" in err, err[-2000:]


def read_only_folder(tmp_path) -> str:
    """A folder this process may not write: a read-only one, or (as root, who writes those) one under /sys."""
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        return str(tmp_path / "ro" / "out")
    return "/sys/tinv-read-only-output"


def test_an_output_that_cannot_be_written_is_refused_before_anything_starts(tmp_path, job_here):
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    for output, says in ((str(a_file), "is a file; it must be a folder"),
                         (read_only_folder(tmp_path), "cannot write to --output")):
        code, err = job_here("jobs.train", "--output", output)
        assert code == 2 and says in err, err[-2000:]
        assert "Traceback" not in err
    assert a_file.read_text() == "not a folder"


def test_a_malformed_model_config_is_invalid_input_naming_the_file(tiny_models, tmp_path, job_here):
    broken = tmp_path / "model"
    shutil.copytree(tiny_models["sd1"], broken)
    (broken / "unet" / "config.json").write_text('{"sample_size": 16,')
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD]), manifest)
    code, err = job_here("jobs.train", "--manifest", str(manifest), "--model", str(broken),
                         "--output", str(tmp_path / "out"))
    assert code == 2 and "unet/config.json is not readable JSON" in err, err[-2000:]
    assert not (tmp_path / "out").exists()
