"""Where new vectors start: the word, Cross Initialization, a learned start behind its guard; the initializer."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from jobtools import REPO, TOY
from modeltools import fingerprint

from tinv.errors import InitializerError
from tinv.families.model import load_base_model
from tinv.families.sd import SD
from tinv.files.formats import embedding_files
from tinv.manifest import ConceptSpec
from tinv.settings import Recipe, TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.loop import train_concepts
from tinv.training.pictures import load_images
from tinv.training.starts import LEARNED, Example, Initializer, Start, cross_start, fit, picture_features, word_start

FIXED = TrainConfig(steps=6, concepts_per_actor=1, batch_size=2, learning_rate=5e-3, early_stop=False)


@dataclass
class Given(Start):
    """A learned start that predicts the rows it is given."""

    rows: list[torch.Tensor] | None = None

    def vectors(self, model, spec, images, means=None, encoders=None):
        return None if self.rows is None else self.rows[:encoders]


def pictures(name: str, size: int = 32) -> torch.Tensor:
    return load_images(name, [str(REPO / "manifests" / "demo" / name / f"{i}.png") for i in range(6)], size)


def red_star(**kw) -> ConceptSpec:
    return ConceptSpec("red-star", ("memory://unused.png",), initializer_token="star", **kw)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_cross_start_is_each_text_encoders_output_for_the_initializer_word(tiny_models, kind):
    model = load_base_model(str(tiny_models[kind]))
    spec = ConceptSpec("c", ("memory://unused.png",), initializer_token="cat", num_vectors=2)
    cross, word = cross_start(model, spec), word_start(model, spec)
    assert len(cross) == len(model.text_encoders)
    for tokenizer, encoder, rows, plain in zip(model.tokenizers, model.text_encoders, cross, word):
        ids = tokenizer("cat", return_tensors="pt").input_ids  # <bos> cat <eos>, Cross Initialization's prompt
        assert ids.shape == (1, 3)
        out = encoder(ids).last_hidden_state[0, 1]
        assert torch.allclose(rows, out.expand(2, -1), atol=1e-6)
        assert not torch.allclose(rows[0], plain[0], atol=1e-3)  # not the input embedding


def test_a_learned_start_worse_than_the_word_is_dropped_and_the_concept_trains_as_from_the_word():
    model = load_base_model(TOY)
    data = ConceptData(red_star(), pictures("red-star"))
    (plain,) = train_concepts(model, [data], FIXED)
    assert plain.start == {"init": "word"}
    bad = [50 * torch.randn(1, model.embedding_dims[0], generator=torch.Generator().manual_seed(0))]
    (guarded,) = train_concepts(model, [data], FIXED, start=Given(LEARNED, rows=bad))
    assert guarded.start["init"] == "word" and guarded.start["requested"] == LEARNED
    assert guarded.start["losses"][LEARNED] > guarded.start["losses"]["word"]
    assert torch.equal(guarded.vectors[0], plain.vectors[0])  # exactly the word start's run
    assert guarded.losses == plain.losses


def test_a_learned_start_better_than_the_word_is_kept_and_both_losses_are_recorded():
    model = load_base_model(TOY)
    data = ConceptData(red_star(), pictures("red-star"))
    (learned,) = train_concepts(model, [data], replace(FIXED, steps=80))  # what an earlier night found
    (started,) = train_concepts(model, [data], FIXED, start=Given(LEARNED, rows=learned.vectors))
    assert started.start["init"] == LEARNED
    assert started.start["losses"][LEARNED] < started.start["losses"]["word"]
    (plain,) = train_concepts(model, [data], FIXED)
    assert not torch.equal(started.vectors[0], plain.vectors[0])


def test_a_start_without_a_prediction_for_the_vector_count_falls_back_to_the_word():
    model = load_base_model(TOY)
    data = ConceptData(red_star(num_vectors=2), pictures("red-star"))
    (out,) = train_concepts(model, [data], FIXED, start=Given(LEARNED, rows=None))
    assert out.error is None and out.start["init"] == "word" and "2 vectors" in out.start["reason"]


def test_picture_features_tell_concepts_apart_and_ignore_picture_order():
    model = load_base_model(TOY)
    star, circle = pictures("red-star"), pictures("blue-circle")
    f = picture_features(model, star)
    assert f.shape == (2 * 4 * 8 * 8,)  # mean and spread of 4 × 8 × 8 pooled latents
    assert torch.allclose(f, picture_features(model, star.flip(0)), atol=1e-5)
    assert (f - picture_features(model, circle)).abs().max() > 0.1


def test_clip_features_come_from_the_named_image_model(tmp_path, images):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=12)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    f = picture_features(None, images, f"clip:{tmp_path / 'clip'}")
    assert f.shape == (24,)  # mean and spread of the 12-d image embeddings
    assert not torch.allclose(f, picture_features(None, images[:2], f"clip:{tmp_path / 'clip'}"))


def synthetic(n: int, seed: int = 0) -> list[Example]:
    """Vectors that are a fixed linear function of the features (and of the property): a fit should find it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 2 * 8, generator=torch.Generator().manual_seed(99))
    out = []
    for i in range(n):
        x = torch.randn(10, generator=g)
        prop = "style" if i % 3 == 0 else "object"
        y = x @ w + (2.0 if prop == "style" else 0.0)
        out.append(Example(x, prop, [y.view(2, 8)]))
    return out


def test_fit_learns_a_mapping_reports_held_out_error_and_round_trips_through_its_file():
    init = fit(synthetic(80), "fp-1", "vae-latents", holdout=0.25, steps=300, hidden=64)
    (report,) = init.stats["groups"]["2"]["encoders"]
    assert init.stats["groups"]["2"]["held_out"] == 20
    assert report["relative_mse"] < 0.1 and report["cosine"] > 0.95  # far better than the training mean
    again = Initializer.from_bytes(init.to_bytes())
    x = synthetic(1, seed=5)[0]
    (pred,) = init.predict(x.features, x.learnable_property, 2)
    assert pred.shape == (2, 8) and torch.equal(again.predict(x.features, "style", 2)[0],
                                                 init.predict(x.features, "style", 2)[0])
    assert again.fingerprint == "fp-1" and again.stats == init.stats
    assert init.predict(x.features, "object", 3) is None  # no network for 3 vectors


def test_an_initializer_refuses_another_base_model_and_a_file_that_is_not_one():
    init = fit(synthetic(6), "fp-1", "vae-latents", steps=5, hidden=4)
    init.check("fp-1")
    with pytest.raises(InitializerError, match="fitted on base model"):
        init.check("fp-2")
    embedding = embedding_files(SD, "c", "<c>", "c", [torch.zeros(1, 8)], {})["learned_embeds.safetensors"]
    with pytest.raises(InitializerError, match="not an initializer"):
        Initializer.from_bytes(embedding)
    with pytest.raises(InitializerError, match="not an initializer"):
        Initializer.from_bytes(b"garbage")


def test_the_start_counts_in_the_fingerprint_of_concepts_with_new_vectors_only():
    model = {"base_model_fingerprint": "m", "resolution": 32, "dtype": "torch.float32", "templates": "t"}
    cfg = TrainConfig()
    ti, lora = red_star(), red_star(method="lora", placeholder_token="sks star")
    assert fingerprint(ti, cfg, model) == fingerprint(ti, cfg, model, start="word")
    starts = ("word", "cross", "learned:ab", "learned:cd")
    assert len({fingerprint(ti, cfg, model, start=s) for s in starts}) == 4
    assert fingerprint(lora, cfg, model, start="cross") == fingerprint(lora, cfg, model)


def test_an_sdxl_initializer_predicts_each_text_encoders_vectors():
    examples = [Example(ex.features, ex.learnable_property, [ex.vectors[0], 3 * ex.vectors[0][:, :4]])
                for ex in synthetic(12)]
    init = Initializer.from_bytes(fit(examples, "fp", "vae-latents", steps=50, hidden=16).to_bytes())
    first, second = init.predict(examples[0].features, "object", 2)
    assert first.shape == (2, 8) and second.shape == (2, 4)
    assert len(init.stats["groups"]["2"]["encoders"]) == 2  # an error per text encoder


def test_dvar_counts_the_fall_from_the_word_start_so_a_good_learned_start_stops_as_early_as_dvar_allows():
    model = load_base_model(TOY)
    data = ConceptData(red_star(), pictures("red-star"))
    (learned,) = train_concepts(model, [data], replace(FIXED, steps=80))
    dvar = replace(FIXED, steps=200, early_stop=True, recipe=Recipe(dvar_window=20, dvar_every=2, dvar_samples=8))
    (started,) = train_concepts(model, [data], dvar, start=Given(LEARNED, rows=learned.vectors))
    assert started.start["init"] == LEARNED
    assert len(started.losses) == 2 * dvar.recipe.dvar_window - dvar.recipe.dvar_every  # DVAR's earliest stop


@dataclass
class Breaks(Start):
    """A start whose prediction raises for one concept."""

    def vectors(self, model, spec, images, means=None, encoders=None):
        if spec.concept_id == "bad":
            raise RuntimeError("the initializer broke")
        return None


def test_a_start_that_raises_fails_its_concept_alone_and_frees_the_slot():
    model = load_base_model(TOY)
    star = pictures("red-star")
    concepts = [ConceptData(replace(red_star(), concept_id=c), star) for c in ("bad", "good")]
    bad, good = train_concepts(model, concepts, FIXED, start=Breaks(LEARNED))  # K = 1: good takes bad's slot
    assert bad.error and "the initializer broke" in bad.error and bad.spec.concept_id == "bad"
    assert good.error is None and good.start["init"] == "word" and len(good.losses) == FIXED.steps
