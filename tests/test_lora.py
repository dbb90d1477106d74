"""LoRA and pivotal concepts in the packed trainer: frozen base, own adapters, packed == solo."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_train import snapshot

from tinv.families.model import load_base_model
from tinv.manifest import ConceptSpec
from tinv.settings import Recipe, TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.loop import train_concepts
from tinv.training.splice import BASE, Adapters
from tinv.training.trainer import PackedTrainer


def spec(cid: str, **kw) -> ConceptSpec:
    return ConceptSpec(cid, ("memory://unused.png",), **{"initializer_token": "cat", **kw})


def lora_snapshot(model) -> dict[str, torch.Tensor]:
    """The base weights only: peft's wrappers rename a targeted layer's weight ``…base_layer.weight``."""
    return {k.replace(".base_layer", ""): v for k, v in snapshot(model).items() if "lora_" not in k}


@pytest.mark.parametrize("kind,text", [("sd1", False), ("sdxl", False), ("sd1", True), ("sdxl", True)])
def test_base_weights_are_bit_identical_and_only_adapters_and_vectors_train(tiny_models, images, kind, text):
    """``text``: the adapters cover the text encoders' attention too (``lora_text_encoder``)."""
    model = load_base_model(str(tiny_models[kind]))
    before = snapshot(model)
    cfg = TrainConfig(steps=4, concepts_per_actor=3, batch_size=2, lora_learning_rate=1e-2, lora_text_encoder=text)
    specs = [spec("t"), spec("l", method="lora", placeholder_token="sks"), spec("p", method="pivotal", lora_rank=2)]
    out = {o.spec.concept_id: o for o in train_concepts(model, [ConceptData(s, images) for s in specs], cfg)}
    assert [out[c].error for c in "tlp"] == [None] * 3
    after = lora_snapshot(model)
    assert before.keys() == after.keys() and [k for k in before if not torch.equal(before[k], after[k])] == []
    for module in (model.denoiser, *model.text_encoders):
        assert all(not p.requires_grad for n, p in module.named_parameters() if "lora_" not in n)
    assert out["t"].text_lora is None
    assert out["t"].lora is None and out["t"].vectors is not None
    assert out["l"].vectors is None and out["p"].vectors is not None  # a lora token is plain text
    for c, rank in (("l", 4), ("p", 2)):
        lora = out[c].lora
        assert out[c].lora_rank == rank and {v.shape[0] for k, v in lora.items() if "lora_A" in k} == {rank}
        ups = [v for k, v in lora.items() if "lora_B" in k]
        assert ups and all(v.dtype == torch.float32 for v in lora.values())
        assert max(v.abs().max() for v in ups) > 0  # B starts at zero: it moved
        assert (out[c].text_lora is not None) == text
        for encoder, state in zip(model.text_encoders, out[c].text_lora or []):  # one per encoder, on its attention
            assert {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[1] for k in state} == {"q_proj", "k_proj", "v_proj",
                                                                                  "out_proj"}
            assert max(v.abs().max() for k, v in state.items() if "lora_B" in k) > 0
        assert len(out[c].text_lora or []) == (len(model.text_encoders) if text else 0)
    init = model.text_encoders[0].get_input_embeddings().weight[model.tokenizers[0].convert_tokens_to_ids("cat</w>")]
    assert (out["p"].vectors[0] - init).abs().max() > 1e-4  # pivotal: the token learns beside the adapter


@pytest.mark.parametrize("text", [False, True])
def test_a_packed_lora_concept_equals_it_trained_alone(tiny_models, images, text):
    """Each sample goes through its own concept's adapter: packing changes nothing, nor does a slot's reuse;
    ``text``: nor in the text encoders, whose adapters the same routes steer."""
    model = load_base_model(str(tiny_models["sd1"]))
    specs = [
        spec("a", method="lora", placeholder_token="sks", steps=5, seed=1),
        spec("b", method="pivotal", steps=7, seed=2, lora_rank=2, class_prompt="a photo of a toy"),  # + prior
        spec("c", steps=3, seed=3),  # ti: through the base weights, beside two adapters
        spec("d", method="pivotal", steps=4, seed=4, num_vectors=2),  # refills the slot "c" leaves
    ]
    data = {s.concept_id: ConceptData(s, images[: 2 + i % 3], images[1:] if s.class_prompt else None)
            for i, s in enumerate(specs)}
    cfg = TrainConfig(concepts_per_actor=3, batch_size=2, lora_learning_rate=1e-2, lora_text_encoder=text)
    packed = {o.spec.concept_id: o for o in train_concepts(model, data.values(), cfg)}
    for s in specs:
        solo = next(train_concepts(model, [data[s.concept_id]], replace(cfg, concepts_per_actor=1)))
        p = packed[s.concept_id]
        assert len(p.losses) == s.steps
        torch.testing.assert_close(torch.tensor(p.losses), torch.tensor(solo.losses), rtol=1e-4, atol=1e-5)
        if p.vectors is not None:
            torch.testing.assert_close(p.vectors[0], solo.vectors[0], rtol=0, atol=1e-5)
        assert (p.lora is None) == (solo.lora is None) == (s.method == "ti")
        # AdamW moves an element by about its learning rate whatever the size of its gradient, so where a
        # gradient is near zero the float noise of another batch composition shows: a bound of 1% of one
        # step's move on any element, and a mean difference a hundred times smaller
        for mine, alone in zip([p.lora, *(p.text_lora or [])], [solo.lora, *(solo.text_lora or [])]):
            if mine is None:
                continue
            diffs = torch.cat([(mine[k] - alone[k]).abs().flatten() for k in mine])
            assert diffs.max() <= 1e-4 and diffs.mean() <= 1e-6, (s.concept_id, diffs.max(), diffs.mean())
        assert (p.text_lora is not None) == (solo.text_lora is not None) == (text and s.method != "ti")


def test_pivotal_trains_vectors_and_adapter_at_their_own_learning_rates(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]))
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=2, learning_rate=3e-3, lora_learning_rate=7e-4))
    trainer.admit(0, ConceptData(spec("p", method="pivotal"), images))
    trainer.admit(1, ConceptData(spec("t", learning_rate=2e-3), images))
    groups = trainer.optimizer.param_groups
    (lora,) = trainer.lora_groups[0]
    assert groups[0]["lr"] == 3e-3 and groups[1]["lr"] == 2e-3 and lora["lr"] == 7e-4
    assert {id(p) for p in lora["params"]} == {id(p) for p in Adapters.of(model.denoiser).parameters("slot0")}
    assert 1 not in trainer.lora_groups  # a ti slot has no adapter
    trainer.admit(0, ConceptData(spec("t2"), images))  # a ti concept takes the pivotal slot: its adapter goes
    assert Adapters.of(model.denoiser).parameters("slot0") == [] and trainer.lora_groups[0][0]["params"] == []


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("text_rate", [None, 5e-6])
def test_the_text_encoders_lora_trains_at_its_own_rate(tiny_models, images, kind, text_rate):
    """``lora_text_encoder_learning_rate`` (kohya's ``--text_encoder_lr``): the encoders' part of a slot's
    adapter in its own optimizer group at that rate (None: the LoRA rate), the UNet's at the LoRA rate."""
    model = load_base_model(str(tiny_models[kind]))
    cfg = TrainConfig(concepts_per_actor=1, lora_learning_rate=7e-4, lora_text_encoder=True,
                      recipe=Recipe(lora_text_encoder_learning_rate=text_rate))
    trainer = PackedTrainer(model, cfg)
    trainer.admit(0, ConceptData(spec("l", method="lora", placeholder_token="sks"), images))
    unet, *texts = trainer.lora_groups[0]  # one group per encoder
    assert len(texts) == len(model.text_encoders)
    assert unet["lr"] == 7e-4 and [t["lr"] for t in texts] == [text_rate or 7e-4] * len(texts)
    for group, module in zip([unet, *texts], [model.denoiser, *model.text_encoders]):
        assert {id(p) for p in group["params"]} == {id(p) for p in Adapters.of(module).parameters("slot0")}
        assert {id(p) for p in trainer.slot_parameters(0)} >= {id(p) for p in group["params"]}
    before = [p.detach().clone() for t in texts for p in t["params"]]
    trainer.step()
    moved = max((p - b).abs().max().item() for p, b in zip([p for t in texts for p in t["params"]], before))
    assert 0 < moved <= 1.5 * (text_rate or 7e-4)  # AdamW's first step moves an element by at most about its rate


def test_routing_sends_each_sample_through_its_own_adapter_only(tiny_models):
    model = load_base_model(str(tiny_models["sd1"]))
    unet = model.denoiser
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 77, 32, generator=g)
    t = torch.tensor([100, 500, 900])
    base = unet(x, t, h).sample
    adapters = Adapters.of(unet)
    for name, seed in (("slot0", 1), ("slot1", 2)):
        with torch.no_grad():
            for p in adapters.add(name, 4, ("to_q", "to_v"), seed=seed):
                p.normal_(generator=g)  # B too, so each adapter really changes its samples
    torch.testing.assert_close(unet(x, t, h).sample, base, rtol=0, atol=0)  # no routing: base weights alone
    with adapters.routed(["slot0", BASE, "slot1"]):
        mixed = unet(x, t, h).sample
    with adapters.routed(["slot1"] * 3):
        ones = unet(x, t, h).sample
    with adapters.routed(["slot0"] * 3):
        zeros = unet(x, t, h).sample
    torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=0)
    torch.testing.assert_close(mixed[0], zeros[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], ones[2], rtol=1e-5, atol=1e-5)
    assert (zeros[0] - base[0]).abs().max() > 1e-3 and (ones[2] - zeros[2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="routes"), adapters.routed(["slot0"]):
        unet(x, t, h)


def test_a_text_encoder_lora_counts_in_the_fingerprint_of_lora_concepts_only():
    from modeltools import fingerprint

    model = {"base_model_fingerprint": "m", "resolution": 32, "dtype": "torch.float32", "templates": "t"}
    ti, lora = spec("t"), spec("l", method="lora", placeholder_token="sks")
    on = TrainConfig(lora_text_encoder=True)
    assert fingerprint(ti, on, model) == fingerprint(ti, TrainConfig(), model)
    assert fingerprint(lora, on, model) != fingerprint(lora, TrainConfig(), model)
    for bad in (0.0, -1e-4):  # refused, not read as "the LoRA rate"
        with pytest.raises(ValueError, match="lora_text_encoder_learning_rate"):
            TrainConfig(recipe=Recipe(lora_text_encoder_learning_rate=bad))
    rate = replace(on, recipe=Recipe(lora_text_encoder_learning_rate=1e-5))  # counted when given, with the flag on
    assert fingerprint(lora, rate, model) != fingerprint(lora, on, model)
    assert fingerprint(lora, TrainConfig(recipe=Recipe(lora_text_encoder_learning_rate=1e-5)), model) == \
        fingerprint(lora, TrainConfig(), model)
