"""DreamBooth's prior preservation: class pictures drawn once per class and model, and the loss that uses them."""

from __future__ import annotations

import json

import pytest
import torch
from modeltools import class_pictures

from tinv.families.model import load_base_model
from tinv.manifest import ConceptSpec
from tinv.settings import Recipe, TrainConfig
from tinv.training import classes
from tinv.training.concept import ConceptData
from tinv.training.loop import train_concepts
from tinv.training.trainer import PackedTrainer

INFO = {"base_model_fingerprint": "fp", "resolution": 32, "dtype": "torch.float32"}


def spec(cid: str, **kw) -> ConceptSpec:
    return ConceptSpec(cid, ("memory://unused.png",), **{"method": "lora", "placeholder_token": "sks", **kw})


def test_a_class_set_is_keyed_by_everything_its_pictures_depend_on():
    cfg = TrainConfig(class_images=3)
    base = classes.class_set("a photo of a dog", cfg, INFO)
    assert base == classes.class_set("a photo of a dog", cfg, {**INFO, "worker": "other"})  # one per run
    others = [classes.class_set("a photo of a cat", cfg, INFO),
              classes.class_set("a photo of a dog", TrainConfig(class_images=4), INFO),
              classes.class_set("a photo of a dog", TrainConfig(class_images=3, recipe=Recipe(class_sample_steps=9)),
                                INFO),
              classes.class_set("a photo of a dog", TrainConfig(class_images=3, recipe=Recipe(class_guidance=2.0)),
                                INFO),
              classes.class_set("a photo of a dog", cfg, {**INFO, "base_model_fingerprint": "other"}),
              classes.class_set("a photo of a dog", cfg, {**INFO, "dtype": "torch.bfloat16"})]
    assert len({base.key, *(o.key for o in others)}) == 7


def test_class_pictures_are_drawn_in_one_batch_across_classes_and_marked_done_last(tiny_models, tmp_path):
    model = load_base_model(str(tiny_models["sd1"]))
    cfg = TrainConfig(class_images=3, recipe=Recipe(class_sample_steps=2))
    sets = [classes.class_set(p, cfg, model.info | INFO) for p in ("a photo of a dog", "a photo of a cat")]
    out = str(tmp_path)
    assert not any(classes.is_done(out, s) for s in sets)
    classes.generate(model, sets, out, batch_size=4)  # 6 pictures: batches mix the two classes
    for s in sets:
        assert classes.is_done(out, s)
        marker = json.loads((tmp_path / "classes" / s.key / classes.MARKER).read_text())
        assert marker["prompt"] == s.prompt and marker["count"] == 3
        assert sorted(p.name for p in (tmp_path / "classes" / s.key).iterdir()) == ["000.png", "001.png",
                                                                                   "002.png", classes.MARKER]
    dogs, cats = (classes.load(out, s, 32) for s in sets)
    assert dogs.shape == (3, 3, 32, 32) and not torch.equal(dogs, cats)
    # a picture depends on its class and seed only: drawn alone, the cats come out the same
    alone = tmp_path / "alone"
    classes.generate(model, sets[1:], str(alone), batch_size=4)
    assert (classes.load(str(alone), sets[1], 32) - cats).abs().max() <= 2 / 127.5


def test_a_marker_of_another_set_does_not_count(tmp_path):
    cfg = TrainConfig(class_images=2)
    a, b = classes.class_set("a dog", cfg, INFO), classes.class_set("a cat", cfg, INFO)
    folder = tmp_path / "classes" / a.key
    folder.mkdir(parents=True)
    (folder / classes.MARKER).write_text(json.dumps({"key": b.key}))
    assert not classes.is_done(str(tmp_path), a)


def test_the_class_pictures_train_under_the_class_prompt_with_their_weight(tiny_models, images):
    """A step's draw is the concept's samples, then as many of its class pictures under the bare class
    prompt; its loss is its own mean plus the weight times theirs (DreamBooth's prior-preservation loss)."""
    model = load_base_model(str(tiny_models["sd1"]))
    prompt = "a photo of a toy"
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=3, batch_size=4))
    pictures = class_pictures(model, prompt, 3)
    for s, weight in enumerate((0.0, 1.0, 3.0)):  # one concept, three weights, the same seed and adapter start
        trainer.admit(s, ConceptData(spec("c", class_prompt=prompt, prior_loss_weight=weight), images, pictures))
    own, prior = trainer._draw(trainer.slots[1], torch.Generator().manual_seed(0), 4)
    prompt_ids = model.tokenize([prompt])[0]
    assert len(own.latents) == len(prior.latents) == 4 and prior.prior and not own.prior
    assert torch.equal(prior.ids[0], prompt_ids.expand(4, -1))
    assert not (own.ids[0] == prompt_ids).all(dim=1).any()  # the concept's own rows: its templates
    none, one, three = (trainer.fixed_loss(s) for s in range(3))
    assert abs(one - none) > 1e-4
    assert three - one == pytest.approx(2 * (one - none), rel=1e-4)


def test_a_prior_concept_without_its_class_pictures_fails_alone(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]))
    out = list(train_concepts(model, [ConceptData(spec("a", class_prompt="a toy"), images),
                                      ConceptData(spec("b"), images)], TrainConfig(steps=2, batch_size=2)))
    by_id = {o.spec.concept_id: o for o in out}
    assert by_id["b"].error is None and "class pictures" in by_id["a"].error


def test_several_class_prompts_each_train_their_own_pictures_under_their_own_prompt(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]))
    prompts = ("a photo of a dog", "a photo of a house")
    dogs, houses = (class_pictures(model, p, 2) for p in prompts)
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=1, batch_size=16))
    trainer.admit(0, ConceptData(spec("c", class_prompt=prompts), images, torch.cat([dogs, houses]),
                                 (prompts[0],) * 2 + (prompts[1],) * 2))
    slot = trainer.slots[0]
    mean = slot.class_latents.mean
    slot.class_latents.std = torch.zeros_like(mean)  # no posterior noise: a row is its picture's latent mean
    _, prior = trainer._draw(slot, torch.Generator().manual_seed(0), 16)
    dog_ids, house_ids = (model.tokenize([p])[0] for p in prompts)
    rows, class_ids = prior.latents / model.vae.config.scaling_factor, prior.ids[0]
    is_dog, is_house = ((class_ids == t).all(dim=1) for t in (dog_ids, house_ids))
    assert (is_dog | is_house).all() and is_dog.any() and is_house.any()  # every class row under one of them
    picture = [next(i for i, m in enumerate(mean) if torch.allclose(m, row)) % 4 for row in rows]  # 4: then flips
    assert [p < 2 for p in picture] == is_dog.tolist()  # and each row's picture is its own prompt's
    with pytest.raises(ValueError, match="one prompt each"):  # several prompts need each picture's own
        trainer.admit(0, ConceptData(spec("c", class_prompt=prompts), images, torch.cat([dogs, houses])))


def test_a_list_of_one_class_prompt_is_that_prompt_and_lists_are_checked():
    assert spec("x", class_prompt=["a dog"]) == spec("x", class_prompt="a dog")
    assert spec("x", class_prompt=["a dog", "a cat"]).class_prompts == ("a dog", "a cat")
    assert spec("x").class_prompts == () and spec("x", class_prompt=[]) == spec("x")  # an empty list: none
    for bad in (["a dog", "a dog"], ["a dog", ""], ["a {} dog", "a cat"]):
        with pytest.raises(ValueError, match="class_prompt"):
            spec("x", class_prompt=bad)


@pytest.mark.parametrize("bad,message", [
    ({"method": "ti", "class_prompt": "a dog"}, "class_prompt needs method lora or pivotal"),
    ({"class_prompt": "a {} dog"}, "class_prompt"),
    ({"prior_loss_weight": -1.0}, "prior_loss_weight"),
])
def test_bad_prior_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        spec("x", **bad)
