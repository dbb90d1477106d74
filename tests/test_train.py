"""The training core: frozen base, falling loss, packed == solo, per-concept failures."""

from __future__ import annotations

import pytest
import torch

from tinv.families.model import load_base_model
from tinv.manifest import ConceptSpec
from tinv.settings import Recipe, TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.loop import StepInfo, train_concepts
from tinv.training.trainer import PackedTrainer


def spec(cid: str, **kw) -> ConceptSpec:
    return ConceptSpec(cid, ("memory://unused.png",), **{"initializer_token": "cat", **kw})


def snapshot(model) -> dict[str, torch.Tensor]:
    modules = {"denoiser": model.denoiser, "vae": model.vae, **{f"te{i}": t for i, t in enumerate(model.text_encoders)}}
    return {f"{n}.{k}": v.detach().clone() for n, m in modules.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_every_base_weight_is_bit_identical_after_training(tiny_models, images, kind):
    model = load_base_model(str(tiny_models[kind]))
    before = snapshot(model)
    cfg = TrainConfig(steps=5, concepts_per_actor=2, batch_size=2, learning_rate=0.1)
    out = list(train_concepts(model, [ConceptData(spec(f"c{i}", num_vectors=2), images) for i in range(3)], cfg))
    assert [o.error for o in out] == [None] * 3
    after = snapshot(model)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert all(not p.requires_grad for m in [model.denoiser, model.vae, *model.text_encoders] for p in m.parameters())
    # the learned vectors really moved away from the initializer
    init = model.text_encoders[0].get_input_embeddings().weight[model.tokenizers[0].convert_tokens_to_ids("cat</w>")]
    assert (out[0].vectors[0] - init).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_loss_on_a_fixed_draw_falls(tiny_models, images, kind):
    model = load_base_model(str(tiny_models[kind]))
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=1, batch_size=4, learning_rate=2e-2))
    trainer.admit(0, ConceptData(spec("c"), images))
    losses = [trainer.fixed_loss(0, n=32)]
    for _ in range(3):
        for _ in range(10):
            trainer.step()
        losses.append(trainer.fixed_loss(0, n=32))
    # deterministic draw: any change is the vectors' doing; the random tiny models barely listen to
    # text, so the fall is small, but it is there after every block of steps
    assert all(later < losses[0] * (1 - 5e-4) for later in losses[1:]), losses


def test_packed_equals_solo_with_continuous_batching(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]))
    specs = [
        spec("a", steps=6, seed=1),
        spec("b", steps=10, seed=2, num_vectors=2, learning_rate=2e-2),
        spec("c", steps=4, seed=3, flip_p=0.0),
        spec("d", steps=7, seed=4, num_vectors=3),  # refills the slot "c" leaves
        spec("e", steps=5, seed=5, learnable_property="style", initializer_token="painting"),
    ]
    data = {s.concept_id: ConceptData(s, images[: 1 + i % 4]) for i, s in enumerate(specs)}
    cfg = TrainConfig(concepts_per_actor=3, batch_size=2, learning_rate=5e-3)
    seen: list[StepInfo] = []
    packed = {o.spec.concept_id: o for o in train_concepts(model, data.values(), cfg, callback=seen.append)}
    assert max(len(i.losses) for i in seen) == 3  # three concepts really shared a batch
    assert len(seen) < sum(s.steps for s in specs)  # and fewer steps than one at a time
    for s in specs:
        solo = next(train_concepts(model, [data[s.concept_id]], TrainConfig(concepts_per_actor=1, **_same(cfg))))
        p = packed[s.concept_id]
        assert len(p.losses) == s.steps and p.vectors[0].shape == (s.num_vectors, 32)
        torch.testing.assert_close(p.vectors[0], solo.vectors[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(p.losses), torch.tensor(solo.losses), rtol=1e-4, atol=1e-5)


def _same(cfg: TrainConfig) -> dict:
    return {"batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate}


def test_a_concept_with_bad_tokens_fails_alone(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]))
    concepts = [
        ConceptData(spec("good"), images),
        ConceptData(ConceptSpec("clash", ("x",), placeholder_token="cat", initializer_token="toy"), images),
        ConceptData(ConceptSpec("multi", ("x",), initializer_token="zyxwv"), images),
        ConceptData(spec("wide", num_vectors=9), images),
    ]
    out = {o.spec.concept_id: o for o in train_concepts(model, concepts, TrainConfig(steps=3))}
    assert out["good"].error is None and out["good"].vectors is not None
    assert "'cat' is already in the vocabulary" in out["clash"].error
    assert "initializer_token 'zyxwv' is 5 tokens" in out["multi"].error
    assert "num_vectors 9 > max_vectors 8" in out["wide"].error
    assert all(out[c].vectors is None for c in ("clash", "multi", "wide"))


def test_spec_and_config_validation_name_every_problem():
    with pytest.raises(ValueError) as e:
        ConceptSpec("../x", (), learnable_property="pose", num_vectors=0, eval_prompts=("no token",))
    for part in ("concept_id", "images", "learnable_property", "num_vectors", "eval prompt"):
        assert part in str(e.value)
    assert spec("x", num_vectors=3).tokens == ["<x>", "<x>_1", "<x>_2"]
    with pytest.raises(ValueError, match="steps >= 1.*batch_size >= 1"):
        TrainConfig(steps=0, batch_size=0)


def test_fp16_overflow_skips_only_the_slot_that_overflowed(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]), precision="fp16")
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=2, batch_size=1, learning_rate=0.1))
    trainer.admit(0, ConceptData(spec("fine"), images))
    trainer.admit(1, ConceptData(spec("overflows"), images))
    trainer.vectors[1][0].register_hook(lambda g: g * float("inf"))
    before = [row[0].detach().clone() for row in trainer.vectors]
    trainer.step()
    assert not torch.equal(trainer.vectors[0][0], before[0])  # slot 0 stepped
    assert torch.equal(trainer.vectors[1][0], before[1])  # slot 1 skipped, nothing non-finite written
    assert trainer.vectors[1][0] not in trainer.optimizer.state or not trainer.optimizer.state[trainer.vectors[1][0]]


def test_latents_are_encoded_once_per_image_and_flip_not_per_step(tiny_models, images, monkeypatch):
    model = load_base_model(str(tiny_models["sd1"]))
    encoded: list[int] = []
    real = model.vae.encode
    monkeypatch.setattr(model.vae, "encode", lambda x, *a, **k: encoded.append(len(x)) or real(x, *a, **k))
    cfg = TrainConfig(steps=6, concepts_per_actor=2, batch_size=2)
    out = list(train_concepts(model, [ConceptData(spec("a"), images[:3]), ConceptData(spec("b"), images)], cfg))
    assert [o.error for o in out] == [None, None]
    assert sum(encoded) == 2 * 3 + 2 * 4  # every image and its flip, once, whatever the step count
    assert all(row[0].dtype == torch.float32 for row in PackedTrainer(model, cfg).vectors)


def test_sdxl_pools_at_the_real_end_of_text_token_even_with_a_legacy_config(tiny_models):
    from tinv.training.splice import spliced

    model = load_base_model(str(tiny_models["sdxl"]))
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=1))
    ids = model.tokenize(["a photo of a <tinv-slot0-0>"])
    encoder = model.text_encoders[1]
    for module in encoder.modules():  # the pre-2023 CLIP configs: transformers then pools at the largest id
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = 2
    with torch.no_grad(), spliced(model, trainer.vectors, trainer.token_ids):
        added = model.family.encode(model, ids, (32, 32)).tensors
        final = encoder(ids[1]).last_hidden_state
        hijacked = encoder(ids[1]).text_embeds  # pooled at the slot token (the largest id)
    eos = (ids[1][0] == model.tokenizers[1].eos_token_id).nonzero()[0, 0]
    expected = encoder.text_projection(final[0, eos])
    torch.testing.assert_close(added["text_embeds"][0], expected)
    assert not torch.allclose(hijacked[0], expected)


def test_early_stopping_emits_a_concept_once_its_fixed_batch_loss_flattens(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]))
    dvar = dict(steps=400, batch_size=2, learning_rate=5e-2,
                recipe=Recipe(dvar_window=20, dvar_every=2, dvar_samples=4))
    early = next(train_concepts(model, [ConceptData(spec("a"), images)], TrainConfig(early_stop=True, **dvar)))
    assert early.error is None
    # it trained at least two windows of history, and stopped well before the schedule's end
    assert 40 <= len(early.losses) < 400, len(early.losses)
    longer = TrainConfig(**{**dvar, "steps": len(early.losses) + 5}, early_stop=False)
    fixed = next(train_concepts(model, [ConceptData(spec("a"), images)], longer))
    assert len(fixed.losses) == len(early.losses) + 5  # without it, the schedule runs to the end
    # the fixed-batch check draws from its own generator: the training stream is the same either way
    assert fixed.losses[: len(early.losses)] == pytest.approx(early.losses, rel=1e-5)


def test_early_stopping_settings_are_checked():
    with pytest.raises(ValueError, match="dvar_window >= 2 \\* dvar_every"):
        TrainConfig(early_stop=True, recipe=Recipe(dvar_window=4, dvar_every=5))


def test_early_stopping_costs_nothing_on_a_schedule_too_short_to_use_it(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]))
    trainer = PackedTrainer(model, TrainConfig(steps=40, concepts_per_actor=1,
                                               recipe=Recipe(dvar_window=20, dvar_every=2)))
    trainer.admit(0, ConceptData(spec("a"), images))
    for _ in range(40):
        trainer.slots[0].losses.append(trainer.step()[0][0])
        assert not trainer.flattened(0)
    assert trainer.slots[0].fixed_batch_losses == []  # no fixed-batch pass was spent


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9])
def test_training_timesteps_come_from_the_noisy_share_of_the_schedule(tiny_models, images, fraction):
    model = load_base_model(str(tiny_models["sd1"]))
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=1, recipe=Recipe(min_timestep_fraction=fraction)))
    trainer.admit(0, ConceptData(spec("c"), images))
    t = trainer._draw(trainer.slots[0], torch.Generator().manual_seed(0), 4000)[0].t
    steps = model.scheduler.config.num_train_timesteps
    low = int(fraction * steps)
    assert t.min().item() == low and t.max().item() == steps - 1  # the whole share, nothing below it
    assert abs(t.float().mean().item() - (low + steps - 1) / 2) < 0.02 * steps  # uniform over it


@pytest.mark.parametrize("power", [1.0, 6.0])
def test_style_timesteps_lean_to_the_noisy_end_and_objects_stay_uniform(tiny_models, images, power):
    model = load_base_model(str(tiny_models["sd1"]))
    cfg = TrainConfig(concepts_per_actor=2, recipe=Recipe(style_timestep_power=power))
    trainer = PackedTrainer(model, cfg)
    trainer.admit(0, ConceptData(spec("o"), images))
    trainer.admit(1, ConceptData(spec("s", learnable_property="style"), images))
    steps = model.scheduler.config.num_train_timesteps
    low = int(cfg.recipe.min_timestep_fraction * steps)
    for s, p in ((0, 1.0), (1, power)):
        t = trainer._draw(trainer.slots[s], torch.Generator().manual_seed(0), 4000)[0].t.float()
        assert t.min() >= low and t.max() <= steps - 1
        # P(t < low + x (T - low)) = x^p: the median sits at 0.5^(1/p) of the range
        assert abs(t.median().item() - (low + 0.5 ** (1 / p) * (steps - low))) < 0.02 * steps


def test_a_style_concept_draws_style_batch_size_samples_per_step(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]))
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=2, batch_size=3, recipe=Recipe(style_batch_size=5)))
    trainer.admit(0, ConceptData(spec("o"), images))
    trainer.admit(1, ConceptData(spec("s", learnable_property="style"), images))
    sizes, draw = [], trainer._draw
    trainer._draw = lambda slot, generator, n: sizes.append((slot.spec.concept_id, n)) or draw(slot, generator, n)
    trainer.step()
    assert sizes == [("o", 3), ("s", 5)]


def test_a_captioned_image_is_always_trained_under_its_own_caption(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]))
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=1))
    captions = ("a {} cat", "a {} dog", "a {} car", "a {} house")
    captioned = ConceptSpec("c", ("memory://x.png",) * 4, initializer_token="cat", captions=captions)
    trainer.admit(0, ConceptData(captioned, images))
    ids = trainer._draw(trainer.slots[0], torch.Generator().manual_seed(0), 64)[0].ids[0]
    drawn = torch.randint(4, (64,), generator=torch.Generator().manual_seed(0))  # the image draw comes first
    expected = model.tokenize([c.format(trainer.names[0][0]) for c in captions])[0]
    assert torch.equal(ids, expected[drawn])
    assert len(set(drawn.tolist())) == 4  # every image, each under its own caption


def test_min_timestep_fraction_is_checked():
    with pytest.raises(ValueError, match="min_timestep_fraction"):
        TrainConfig(recipe=Recipe(min_timestep_fraction=1.0))
    with pytest.raises(ValueError, match="style_timestep_power > 0, style_batch_size is None or >= 1"):
        TrainConfig(recipe=Recipe(style_batch_size=0, style_timestep_power=0.0))


@pytest.mark.parametrize("kind", ["sdxl", "flux-dev"])
def test_gradient_checkpointing_gives_the_same_step_and_is_really_on(tiny_models, flux_models, images, kind):
    stepped, folder = [], {**tiny_models, **flux_models}[kind]
    for checkpointing in (False, True):
        model = load_base_model(str(folder), gradient_checkpointing=checkpointing)
        assert model.denoiser.is_gradient_checkpointing == checkpointing
        assert all(te.is_gradient_checkpointing == checkpointing for te in model.text_encoders)
        # T5 v1.1's dropout (0.1) stays off though its layers are put in training mode to be checkpointed
        assert kind != "flux-dev" or model.text_encoders[1].config.dropout_rate > 0
        trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=1, batch_size=2, learning_rate=0.1))
        trainer.admit(0, ConceptData(spec("c", train_t5=kind == "flux-dev", method="pivotal", lora_rank=2), images))
        trainer.step()
        stepped.append([row.detach().clone() for row in trainer.vectors[0]])
    for plain, recomputed in zip(*stepped):
        torch.testing.assert_close(plain, recomputed, rtol=0, atol=1e-6)


def test_the_vae_encodes_in_chunks_sized_by_resolution(tiny_models, images, monkeypatch):
    import tinv.families.model

    model = load_base_model(str(tiny_models["sd1"]))
    encoded: list[int] = []
    real = model.vae.encode
    monkeypatch.setattr(model.vae, "encode", lambda x, *a, **k: encoded.append(len(x)) or real(x, *a, **k))
    PackedTrainer(model, TrainConfig(concepts_per_actor=1)).admit(0, ConceptData(spec("a"), images))
    assert encoded == [8]  # 4 images and their flips: one call at 32 px
    encoded.clear()
    monkeypatch.setattr(tinv.families.model, "VAE_PIXELS_PER_CHUNK", 3 * 32 * 32)  # a budget of 3 pictures of 32 px
    PackedTrainer(model, TrainConfig(concepts_per_actor=1)).admit(0, ConceptData(spec("a"), images))
    assert encoded == [3, 3, 2]
