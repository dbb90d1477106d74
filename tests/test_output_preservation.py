"""Output preservation: a concept's own noisy samples under its class prompt (or the empty prompt), pulled to
the frozen model's prediction for them (ai-toolkit's Differential Output / Blank Prompt Preservation)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from modeltools import class_pictures, fingerprint

from tinv.families.model import load_base_model
from tinv.manifest import ConceptSpec
from tinv.plan import resolve
from tinv.settings import Recipe, TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.loop import train_concepts
from tinv.training.splice import BASE, Adapters
from tinv.training.trainer import PackedTrainer

PROMPT = "a photo of a toy"
OUTPUT = TrainConfig(concepts_per_actor=2, batch_size=4, prior_preservation="output")


def spec(cid: str, **kw) -> ConceptSpec:
    return ConceptSpec(cid, ("memory://unused.png",), **{"method": "lora", "placeholder_token": "sks", **kw})


def nudge(trainer: PackedTrainer, s: int) -> None:
    """Give slot ``s``'s fresh adapter (B = 0: no change yet) a change, seeded."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in Adapters.of(trainer.model.denoiser).parameters(f"slot{s}"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_the_concepts_own_samples_train_under_its_class_prompt_against_the_frozen_models_prediction(
        tiny_models, images):
    """No class pictures are needed; the preserved rows are the concept's own noisy samples under the class
    prompt, and their loss is the adapter's change to the prediction: 0 for a fresh adapter, else the mean
    squared difference between the adapted and the frozen model's predictions there, times the weight."""
    model = load_base_model(str(tiny_models["sd1"]))
    trainer = PackedTrainer(model, OUTPUT)
    for s, weight in enumerate((0.0, 2.0)):
        trainer.admit(s, ConceptData(spec("c", class_prompt=PROMPT, prior_loss_weight=weight), images))
    own, kept = trainer._draw(trainer.slots[1], torch.Generator().manual_seed(0), 4)
    assert kept.preserve and kept.prior and not own.preserve
    for f in ("latents", "noise", "t"):
        assert torch.equal(getattr(kept, f), getattr(own, f))
    assert torch.equal(kept.ids[0], model.tokenize([PROMPT])[0].expand(4, -1))
    assert trainer.fixed_loss(1) == pytest.approx(trainer.fixed_loss(0), abs=1e-7)  # fresh: nothing changed
    for s in (0, 1):
        nudge(trainer, s)
    without, with_ = trainer.fixed_loss(0), trainer.fixed_loss(1)
    draw = trainer._draw(trainer.slots[1], torch.Generator().manual_seed(1234), 16)  # fixed_loss's draw
    with torch.no_grad():
        adapted, _ = trainer._predict([draw[1]], ["slot1"])
        frozen, _ = trainer._predict([draw[1]], [BASE])
    change = (adapted - frozen).pow(2).mean().item()
    assert change > 1e-6 and with_ - without == pytest.approx(2.0 * change, rel=1e-4)


def test_output_preservation_keeps_the_class_prediction_nearer_the_frozen_models(tiny_models, images):
    """Trained alike, a concept with it moves the bare class prompt's prediction less than one without."""
    model = load_base_model(str(tiny_models["sd1"]))
    cfg = replace(OUTPUT, steps=10, lora_learning_rate=3e-2, early_stop=False)
    concepts = [ConceptData(spec("free"), images),
                ConceptData(spec("kept", class_prompt=PROMPT, prior_loss_weight=10.0), images)]
    learned = {t.spec.concept_id: t for t in train_concepts(model, concepts, cfg)}
    probe = PackedTrainer(model, replace(cfg, concepts_per_actor=1))
    probe.admit(0, ConceptData(spec("probe", class_prompt=PROMPT), images))
    rows = probe._draw(probe.slots[0], torch.Generator().manual_seed(7), 16)[1]
    change = {}
    for cid, trained in learned.items():
        assert trained.error is None
        Adapters.of(model.denoiser).load("slot0", trained.lora)
        with torch.no_grad():
            adapted, frozen = (probe._predict([rows], [name])[0] for name in ("slot0", BASE))
        change[cid] = (adapted - frozen).pow(2).mean().item()
    assert change["free"] > 1e-5 and change["kept"] < change["free"] / 10


def test_both_trains_the_class_pictures_and_the_preserved_samples_each_at_the_weight(tiny_models, images):
    """``both`` draws the concept's rows, its class pictures and its preserved samples; the loss is the own rows'
    mean plus the weight times each preserved kind's mean."""
    model = load_base_model(str(tiny_models["sd1"]))
    cfg = replace(OUTPUT, prior_preservation="both", concepts_per_actor=1)
    trainer = PackedTrainer(model, cfg)
    trainer.admit(0, ConceptData(spec("c", class_prompt=PROMPT, prior_loss_weight=3.0), images,
                                 class_pictures(model, PROMPT, 2)))
    nudge(trainer, 0)
    draw = trainer._draw(trainer.slots[0], torch.Generator().manual_seed(0), 4)
    own, pictures, kept = draw
    assert pictures.prior and not pictures.preserve and kept.preserve and torch.equal(kept.latents, own.latents)
    with torch.no_grad():
        means = [trainer._squared_errors([r], ["slot0"]).mean().item() for r in draw]
        total = trainer._losses([trainer.slots[0]], [draw]).item()
    assert total == pytest.approx(means[0] + 3.0 * (means[1] + means[2]), rel=1e-5)


def test_blank_prompt_preservation_adds_the_empty_prompt_for_adapter_concepts_only(tiny_models, images):
    model = load_base_model(str(tiny_models["sdxl"]))
    cfg = TrainConfig(concepts_per_actor=1, batch_size=4, recipe=Recipe(blank_prompt_preservation=True))
    trainer = PackedTrainer(model, cfg)
    trainer.admit(0, ConceptData(spec("c"), images))  # no class prompt needed
    own, blank = trainer._draw(trainer.slots[0], torch.Generator().manual_seed(0), 4)
    assert blank.preserve and blank.dropped.all() and torch.equal(blank.latents, own.latents)  # SDXL: zeros
    for e, ids in enumerate(blank.ids):
        assert torch.equal(ids, trainer.empty_ids[e].expand(4, -1))
    assert resolve(spec("c"), cfg).prior_loss_weight == cfg.prior_loss_weight
    ti = ConceptSpec("t", ("memory://unused.png",))
    trainer.admit(0, ConceptData(ti, images))
    assert len(trainer._draw(trainer.slots[0], torch.Generator().manual_seed(0), 4)) == 1  # ti: nothing to keep


def test_the_empty_prompts_loss_has_its_own_weight_when_set(tiny_models, images):
    """``blank_prompt_loss_weight`` weighs the blank rows alone (ai-toolkit's multiplier); unset, they take the
    concept's ``prior_loss_weight`` as the class prompt's rows do."""
    model = load_base_model(str(tiny_models["sd1"]))
    cfg = replace(OUTPUT, concepts_per_actor=1, recipe=Recipe(blank_prompt_preservation=True), prior_loss_weight=3.0)
    totals = {}
    for blank_weight in (None, 0.5):
        trainer = PackedTrainer(model, replace(cfg, recipe=replace(cfg.recipe, blank_prompt_loss_weight=blank_weight)))
        trainer.admit(0, ConceptData(spec("c", class_prompt=PROMPT), images))
        nudge(trainer, 0)
        draw = trainer._draw(trainer.slots[0], torch.Generator().manual_seed(0), 4)
        assert [(r.prior, r.blank) for r in draw] == [(False, False), (True, False), (True, True)]
        with torch.no_grad():
            means = [trainer._squared_errors([r], ["slot0"]).mean().item() for r in draw]
            totals[blank_weight] = trainer._losses(trainer.slots[0:1], [draw]).item()
        blank = 3.0 if blank_weight is None else blank_weight
        assert totals[blank_weight] == pytest.approx(means[0] + 3.0 * means[1] + blank * means[2], rel=1e-5)
    assert totals[None] != pytest.approx(totals[0.5], rel=1e-3)
    with pytest.raises(ValueError, match="blank_prompt_preservation where blank_prompt_loss_weight is set"):
        TrainConfig(recipe=Recipe(blank_prompt_loss_weight=0.5))
    with pytest.raises(ValueError, match="blank_prompt_loss_weight is None or >= 0"):
        TrainConfig(recipe=Recipe(blank_prompt_preservation=True, blank_prompt_loss_weight=-1.0))
    info = {"base_model_fingerprint": "m", "resolution": 32, "dtype": "torch.float32", "templates": "t"}
    on = replace(cfg, prior_preservation="images")
    # 3: the weight it takes unset
    same, other = (replace(on, recipe=replace(on.recipe, blank_prompt_loss_weight=w)) for w in (3.0, 1.0))
    fp = {c: fingerprint(spec("l"), c, info) for c in (on, same, other)}
    assert fp[on] == fp[same] != fp[other]
    assert resolve(spec("l"), same).blank_loss_weight == 3.0 and resolve(spec("l"), OUTPUT).blank_loss_weight is None


def test_the_preservation_settings_are_checked_and_count_in_the_fingerprint_where_they_act():
    with pytest.raises(ValueError, match="prior_preservation"):
        TrainConfig(prior_preservation="teacher")
    model = {"base_model_fingerprint": "m", "resolution": 32, "dtype": "torch.float32", "templates": "t"}
    prior, lora, ti = spec("p", class_prompt=PROMPT), spec("l"), ConceptSpec("t", ("memory://unused.png",))
    plain, blank = TrainConfig(), TrainConfig(recipe=Recipe(blank_prompt_preservation=True))
    fp = fingerprint
    assert fp(prior, OUTPUT, model) != fp(prior, replace(OUTPUT, prior_preservation="images"), model)
    assert fp(lora, OUTPUT, model) == fp(lora, replace(OUTPUT, prior_preservation="images"), model)  # no class
    assert fp(prior, replace(OUTPUT, prior_preservation="both"), model) not in (fp(prior, OUTPUT, model),
                                                                               fp(prior, plain, model))
    assert fp(prior, replace(OUTPUT, class_images=7), model) == fp(prior, OUTPUT, model)  # no pictures drawn
    assert fp(prior, replace(plain, class_images=7), model) != fp(prior, plain, model)
    assert fp(lora, blank, model) != fp(lora, plain, model) and fp(ti, blank, model) == fp(ti, plain, model)
    assert resolve(prior, OUTPUT).drawn_class_prompts == () and resolve(prior, plain).drawn_class_prompts == (PROMPT,)
    assert resolve(prior, replace(OUTPUT, prior_preservation="both")).drawn_class_prompts == (PROMPT,)
