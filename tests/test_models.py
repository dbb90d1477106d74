"""Model loading: local folder, file:// and remote URIs through one path; clear layout errors."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch

from tinv import storage
from tinv.families.model import ModelLayoutError, load_base_model, resolve_dtype


def test_local_folder_and_file_uri_load_through_the_same_path(tiny_models):
    plain = load_base_model(str(tiny_models["sd1"]))
    uri = load_base_model(f"file://{tiny_models['sd1']}")
    assert plain.local_dir == uri.local_dir == tiny_models["sd1"]
    assert plain.fingerprint == uri.fingerprint
    for a, b in zip(plain.denoiser.parameters(), uri.denoiser.parameters()):
        assert torch.equal(a, b)
    assert plain.family.name == "sd" and plain.family.version(plain) == "sd1" and plain.resolution == 32
    assert plain.scheduler.config.prediction_type == "epsilon"
    assert plain.dtype == torch.float32 and plain.device.type == "cpu"  # fp32 by default on CPU


def test_auto_precision_is_bf16_only_where_the_gpu_supports_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(torch.device("cuda"), "auto") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 or T4
    assert resolve_dtype(torch.device("cuda"), "auto") == torch.float16  # with a dynamic loss scale per slot
    assert resolve_dtype(torch.device("cpu"), "auto") == torch.float32
    assert resolve_dtype(torch.device("cuda"), "fp16") == torch.float16


def test_kinds_precision_and_prediction_type_come_from_the_folder(tiny_models):
    sd2 = load_base_model(str(tiny_models["sd2"]), precision="fp16")
    assert sd2.scheduler.config.prediction_type == "v_prediction" and sd2.family.version(sd2) == "sd2"
    assert sd2.denoiser.dtype == torch.float16
    assert sd2.text_encoders[0].dtype == torch.float32  # the new vectors' gradient crosses it: fp32
    assert sd2.vae.dtype == torch.float32  # fp16 VAEs overflow: kept in fp32
    xl = load_base_model(str(tiny_models["sdxl"]), precision="bf16")
    assert xl.family.name == "sdxl" and len(xl.tokenizers) == 2 and xl.denoiser.dtype == torch.bfloat16
    assert {te.dtype for te in xl.text_encoders} == {torch.float32}
    assert xl.fingerprint != sd2.fingerprint
    with pytest.raises(ValueError, match="precision must be auto, fp32, bf16, fp16; got 'fp8'"):
        load_base_model(str(tiny_models["sd1"]), precision="fp8")


def test_unknown_layouts_name_what_is_missing(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["sd1"], broken)
    shutil.rmtree(broken / "unet")
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLayoutError, match="missing unet/, vae/"):
        load_base_model(str(broken))
    half_xl = tmp_path / "half_xl"
    shutil.copytree(tiny_models["sdxl"], half_xl)
    shutil.rmtree(half_xl / "text_encoder_2")
    with pytest.raises(ModelLayoutError, match="missing text_encoder_2/"):
        load_base_model(str(half_xl))
    with pytest.raises(ModelLayoutError, match="no model folder at"):
        load_base_model(str(tmp_path / "nothing-here"))


def test_xformers_asked_for_but_missing_is_a_clear_error(tiny_models, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a))
    with pytest.raises(RuntimeError, match="'xformers' was asked for but xformers is not installed"):
        load_base_model(str(tiny_models["sd1"]), attention="xformers")
    with pytest.raises(ValueError, match="attention must be 'sdpa' or 'xformers'"):
        load_base_model(str(tiny_models["sd1"]), attention="flash")


def _copy_in_child(uri: str, cache: str, log: str, out: mp.Queue) -> None:
    fs = fsspec.filesystem("memory")
    original = type(fs).get

    def logged_get(self, *args, **kwargs):
        with open(log, "a") as f:
            f.write("copy\n")
        return original(self, *args, **kwargs)

    type(fs).get = logged_get
    out.put(str(storage.local_copy(uri, cache)))


def test_remote_model_is_copied_once_per_node_even_when_processes_race(tiny_models, tmp_path):
    mem = fsspec.filesystem("memory")
    mem.put(str(tiny_models["sd1"]), "/models/sd1", recursive=True)
    ctx = mp.get_context("fork")  # children inherit the in-memory filesystem
    out: mp.Queue = ctx.Queue()
    log = tmp_path / "copies.log"
    procs = [
        ctx.Process(target=_copy_in_child, args=("memory://models/sd1", str(tmp_path / "cache"), str(log), out))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    paths = {out.get(timeout=5) for _ in procs}
    assert len(paths) == 1 and log.read_text() == "copy\n"
    local = Path(paths.pop())
    assert not list(local.parent.glob("*.partial"))
    model = load_base_model("memory://models/sd1", cache_dir=tmp_path / "cache")
    assert model.local_dir == local
    assert model.fingerprint == load_base_model(str(tiny_models["sd1"])).fingerprint


def test_hub_id_loads_from_the_hub_cache_offline(tiny_models, tmp_path):
    """A hub id goes through ``snapshot_download``; offline it is served from the hub's cache."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-sd" / "snapshots" / "abc123"
    shutil.copytree(tiny_models["sd1"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    code = (
        "from tinv.families.model import load_base_model, ModelLayoutError\n"
        "m = load_base_model('acme/tiny-sd'); print(m.local_dir.name, m.fingerprint)\n"
        "try: load_base_model('acme/absent')\n"
        "except ModelLayoutError as e: print('refused:', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert f"abc123 {load_base_model(str(tiny_models['sd1'])).fingerprint}" in out
    assert "refused: 'acme/absent' is not a local folder and could not be fetched from the hub" in out
