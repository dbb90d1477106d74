"""A quantized frozen base (``--base-precision``): the denoiser's linear weights in int8 through torchao on the
CPU, the adapters of packed concepts training on it as on a full-precision base; fp8 refused where the GPU
lacks it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_flux import spec
from test_train import snapshot

from jobs import evaluate
from jobs.train import parse_args
from tinv.errors import UnsupportedPrecisionError
from tinv.families import model as model_module
from tinv.families.model import assemble, load_base_model
from tinv.families.quantized import check_base_precision
from tinv.plan import config_fingerprint, resolve
from tinv.settings import TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.loop import train_concepts


def test_an_int8_base_trains_packed_concepts_as_alone_close_to_the_full_base_and_stays_frozen(flux_models, images,
                                                                                              monkeypatch):
    full = load_base_model(str(flux_models["flux-dev"]))
    assembled = []  # the denoiser's weight types as loading hands it to the device: quantized already
    monkeypatch.setattr(model_module, "assemble", lambda *a, **k: assembled.append(
        {type(m.weight).__name__ for m in a[3].denoiser.modules() if isinstance(m, torch.nn.Linear)})
        or assemble(*a, **k))
    model = load_base_model(str(flux_models["flux-dev"]), base_precision="int8")
    assert assembled == [{"Int8Tensor"}]
    assert model.denoiser.is_gradient_checkpointing and not full.denoiser.is_gradient_checkpointing  # bounds the
    # dequantized weights kept for the backward pass to one block's
    linears = [m for m in model.denoiser.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)  # torchao's, weight-only
    assert model.base_precision == "int8" and all(p.dtype == torch.float32 for p in full.denoiser.parameters())
    before = snapshot(model)
    specs = [spec("a", method="lora", placeholder_token="sks", steps=3, seed=1),
             spec("b", method="pivotal", steps=3, seed=2)]
    data = [ConceptData(s, images) for s in specs]
    cfg = TrainConfig(concepts_per_actor=2, batch_size=2, learning_rate=5e-2, lora_learning_rate=1e-2)
    packed = list(train_concepts(model, data, cfg))
    for p, d in zip(packed, data):
        solo = next(train_concepts(model, [d], replace(cfg, concepts_per_actor=1)))
        unquantized = next(train_concepts(full, [d], replace(cfg, concepts_per_actor=1)))
        assert p.error is None and p.lora is not None
        torch.testing.assert_close(torch.tensor(p.losses), torch.tensor(solo.losses), rtol=1e-4, atol=1e-5)
        diffs = torch.cat([(p.lora[k] - solo.lora[k]).abs().flatten() for k in p.lora])
        assert diffs.max() <= 1e-4
        # int8 weight-only rounding moves the loss by far less than training does
        torch.testing.assert_close(torch.tensor(p.losses), torch.tensor(unquantized.losses), rtol=2e-2, atol=1e-3)
        assert any(v.abs().max() > 0 for k, v in p.lora.items() if ".lora_B." in k)  # the adapter learned
    after = snapshot(model)
    assert [k for k in before if k in after and not torch.equal(*(stored(t[k]) for t in (before, after)))] == []


def stored(t: torch.Tensor) -> torch.Tensor:
    """A weight's stored numbers: a torchao tensor's int8 data and scales, flattened."""
    if not hasattr(t, "__tensor_flatten__"):
        return t
    names, _ = t.__tensor_flatten__()
    return torch.cat([getattr(t, n).flatten().float() for n in names])


def test_fp8_is_refused_where_the_gpu_lacks_it_and_the_setting_reaches_the_fingerprint(flux_models, monkeypatch):
    with pytest.raises(UnsupportedPrecisionError, match="compute capability 8.9 or newer.*use --base-precision int8"):
        load_base_model(str(flux_models["flux-dev"]), base_precision="fp8")  # this CPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    with pytest.raises(UnsupportedPrecisionError, match=r"compute capability \(8, 0\)"):
        check_base_precision("fp8", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    check_base_precision("fp8", torch.device("cuda"))
    with pytest.raises(UnsupportedPrecisionError, match="one of auto, int8, fp8"):
        check_base_precision("nf4", torch.device("cpu"))
    assert parse_args(["--base-precision", "int8"]).base_precision == "int8"
    settings, cfg = resolve(spec("c"), TrainConfig()), TrainConfig()
    model = {"base_model_fingerprint": "m", "resolution": 32, "dtype": "torch.bfloat16", "templates": "t"}
    plain = config_fingerprint(settings, cfg, model)
    assert plain == config_fingerprint(settings, cfg, {**model, "base_precision": "auto"})
    assert plain != config_fingerprint(settings, cfg, {**model, "base_precision": "int8"})  # not a skip of it


def test_evaluate_draws_a_run_on_the_base_it_trained_on_unless_told_otherwise():
    record = {"model": {"base_precision": "int8", "resolution": 32}}
    assert evaluate.run_base_precision(evaluate.parse_args(["--run", "out/r"]), record) == "int8"
    assert evaluate.run_base_precision(evaluate.parse_args(["--run", "out/r", "--base-precision", "auto"]),
                                       record) == "auto"
    assert evaluate.run_base_precision(evaluate.parse_args(["--run", "out/r"]), {"model": {}}) == "auto"
    assert evaluate.parse_args(["--embeddings", "e.safetensors", "--model", "m"]).__dict__.get("base_precision") is None
