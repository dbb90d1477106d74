"""What a run publishes: reproducible bytes, trigger words, the gated catalog, the concepts-library layout."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from modeltools import fingerprint
from safetensors import safe_open
from safetensors.torch import load

from tinv import storage
from tinv.errors import ConceptDataError
from tinv.families.sd import SD
from tinv.files import catalog
from tinv.files.catalog import Condition, PublishConfig, write_catalog
from tinv.files.formats import canonical, concepts_library_files, to_bytes
from tinv.files.webui import PREFIX, resolve_triggers
from tinv.manifest import ConceptSpec, ManifestError, read_manifest, write_manifest
from tinv.settings import TrainConfig

META = {f"key{i}": f"value {i}" for i in range(12)}


def test_the_same_tensors_and_metadata_give_the_same_bytes_every_write(tmp_path):
    tensors = {"emb_params": torch.randn(2, 8), "b": torch.randn(3, dtype=torch.float16)}
    writes = {hashlib.sha256(to_bytes(tensors, META)).hexdigest() for _ in range(20)}
    assert len(writes) == 1
    data = to_bytes(tensors, META)
    assert canonical(data) == data  # already canonical: the header is rewritten to itself
    (tmp_path / "x.safetensors").write_bytes(data)
    with safe_open(tmp_path / "x.safetensors", "pt") as f:  # still a safetensors file, metadata and all
        assert {k: v for k, v in f.metadata().items() if k != "tinv_version"} == META
    back = load(data)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert int.from_bytes(data[:8], "little") % 8 == 0  # the tensor data stays 8-byte aligned


def test_default_triggers_are_prefixed_when_a_word_given_ones_are_refused_and_clashes_fail_the_later():
    asked = []

    def one_token(words: list[str]) -> set[str]:
        asked.append(words)
        return {"navy", "cat"} & set(words)

    got = resolve_triggers([("navy", ""), ("my.dog", ""), ("c2", "cat"), ("c3", "Tinv-Navy"), ("c4", "Fido")],
                           one_token)
    assert got["navy"] == f"{PREFIX}navy" and got["my.dog"] == "my-dog" and got["c4"] == "Fido"
    assert isinstance(got["c2"], ConceptDataError) and "reads as one token" in str(got["c2"])
    assert isinstance(got["c3"], ConceptDataError) and "also concept 'navy'" in str(got["c3"])
    assert asked == [sorted({"navy", "my-dog", "cat", "tinv-navy", "fido"})]  # one question for the run


def test_the_manifest_refuses_bad_and_clashing_triggers(tmp_path):
    rows = [{"concept_id": "a.b", "images": ["x.png"]}, {"concept_id": "a-b", "images": ["x.png"]},
            {"concept_id": "c", "images": ["x.png"], "trigger": "has space"},
            {"concept_id": "d", "images": ["x.png"], "trigger": "D.E"},
            {"concept_id": "e", "images": ["x.png"], "trigger": "A-B"}]
    write_manifest(rows, str(tmp_path / "m.parquet"))
    with pytest.raises(ManifestError) as e:
        read_manifest(str(tmp_path / "m.parquet"))
    problems = e.value.problems
    assert any(p.startswith("row 1") and "trigger 'a-b' is also row 0's" in p for p in problems)
    assert any(p.startswith("row 4") and "trigger 'a-b' is also row 0's" in p for p in problems)
    assert sum("trigger must match" in p for p in problems) == 2 and len(problems) == 4
    write_manifest([{"concept_id": "f", "images": ["x.png"], "trigger": "my_cat-2"}], str(tmp_path / "ok.parquet"))
    assert read_manifest(str(tmp_path / "ok.parquet"))[0].trigger == "my_cat-2"


def test_the_gate_parses_checks_every_condition_and_says_why_a_concept_is_held_back():
    gate = PublishConfig(publish_if=("clip_image>=0.7", "final_loss < .2"))
    assert [str(c) for c in gate.conditions] == ["clip_image>=0.7", "final_loss<0.2"]
    assert gate.held_back({"metrics": {"clip_image": 0.7}, "final_loss": 0.1}) is None
    reason = gate.held_back({"metrics": {"clip_image": 0.69}, "final_loss": 0.3})
    assert "clip_image 0.69 fails clip_image>=0.7" in reason and "final_loss 0.3 fails" in reason
    assert "no clip_image" in PublishConfig(publish_if=("clip_image>=0.7",)).held_back({"metrics": {}})
    assert PublishConfig().held_back({"metrics": {}}) is None  # no gate: every succeeded concept
    for bad in ("clip_image=>0.7", "clip_image>=", ">=0.7", "clip_image>=0.7; rm"):
        with pytest.raises(ValueError, match="NAME OP NUMBER"):
            PublishConfig(publish_if=(bad,))
    assert Condition.parse("steps==200").check({"metrics": {}, "steps": 200}) is None


def record(cid: str, clip: float) -> dict:
    return {"concept_id": cid, "token": f"<{cid}>", "tokens": [f"<{cid}>"], "trigger": cid, "method": "ti",
            "metrics": {"clip_image": clip}, "files": ["learned_embeds.safetensors", "samples/00_00.png", "grid.png"],
            "sha256": {"learned_embeds.safetensors": "ab" * 32}, "base_model_fingerprint": "fp", "steps": 5}


def test_the_catalog_lists_its_concepts_files_and_hashes_and_latest_is_written_last(tmp_path, monkeypatch):
    written = []
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data, opts=None: (written.append(uri), real(uri, data)))
    latest = write_catalog(str(tmp_path), "20261201T000000Z", [record("a", 0.9), record("b", 0.8)])
    assert [w.removeprefix(str(tmp_path) + "/") for w in written] == [
        "catalogs/20261201T000000Z.jsonl", catalog.CATALOG_NAME, catalog.LATEST_NAME]
    lines = [json.loads(x) for x in (tmp_path / "catalog.jsonl").read_text().splitlines()]
    assert [x["concept_id"] for x in lines] == ["a", "b"]
    assert lines[0]["files"] == {"concepts/a/learned_embeds.safetensors": "ab" * 32}  # samples left out
    assert lines[0]["base_model_fingerprint"] == "fp" and lines[0]["metrics"] == {"clip_image": 0.9}
    data = (tmp_path / latest["catalog"]).read_bytes()
    assert json.loads((tmp_path / "latest").read_text()) == latest
    assert latest["sha256"] == hashlib.sha256(data).hexdigest() and latest["concepts"] == 2
    assert data == (tmp_path / "catalog.jsonl").read_bytes()


def test_latest_only_moves_forward_and_a_catalog_line_needs_its_files_as_result_json_says(tmp_path):
    newer = write_catalog(str(tmp_path), "20261202T000000Z", [record("a", 0.9)])
    older = write_catalog(str(tmp_path), "20261201T000000Z", [record("b", 0.9)])  # a run that started earlier
    assert older == newer == json.loads((tmp_path / "latest").read_text())  # latest still names the newer one
    assert (tmp_path / "catalogs" / "20261201T000000Z.jsonl").exists()  # its own catalog is kept beside
    assert json.loads((tmp_path / "catalog.jsonl").read_text())["concept_id"] == "a"
    folder = tmp_path / "concepts" / "a"
    folder.mkdir(parents=True)
    data = b"the embedding"
    (folder / "learned_embeds.safetensors").write_bytes(data)
    good = {**record("a", 0.9), "sha256": {"learned_embeds.safetensors": hashlib.sha256(data).hexdigest()}}
    assert catalog.on_disk(str(tmp_path), good) is None
    (folder / "learned_embeds.safetensors").write_bytes(b"another writer's embedding")  # re-read, not remembered
    assert "is not the file its result.json names" in catalog.on_disk(str(tmp_path), good)
    (folder / "learned_embeds.safetensors").unlink()
    assert "is not on storage" in catalog.on_disk(str(tmp_path), good)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_the_concepts_library_layout_loads_with_load_textual_inversion(tiny_models, tmp_path, kind):
    vectors = [torch.randn(2, 32)]
    files = concepts_library_files(SD, "<my-toy>", vectors, "style")
    assert files == concepts_library_files(SD, "<my-toy>", vectors, "style")  # byte-reproducible too
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    folder = tmp_path / "concepts-library"
    assert sorted(p.name for p in folder.iterdir()) == ["learned_embeds.bin", "token_identifier.txt",
                                                        "type_of_concept.txt"]
    assert (folder / "token_identifier.txt").read_text() == "<my-toy>"
    assert (folder / "type_of_concept.txt").read_text() == "style"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models[kind], safety_checker=None)
    pipe.load_textual_inversion(str(folder))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<my-toy>", "<my-toy>_1"])
    table = pipe.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[ids], vectors[0], rtol=0, atol=0)


def test_a_manifest_trigger_changes_the_fingerprint_so_its_files_are_renamed():
    model = {"base_model_fingerprint": "fp", "resolution": 32, "dtype": "torch.float32", "templates": "t"}
    plain = fingerprint(ConceptSpec("c", ("a.png",)), TrainConfig(), model)
    assert plain != fingerprint(ConceptSpec("c", ("a.png",), trigger="my-c"), TrainConfig(), model)
