"""The shipped toy-world model and scorer: they load offline, draw words, and TI learns a concept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from lab.toyworld import MODEL_DIR, SCORER_FILE
from lab.toyworld.concepts import CONCEPTS
from lab.toyworld.fidelity import Judged, fidelity_table, worst_shape
from lab.toyworld.scorer import evaluate_scorer, load_scorer, pixels
from lab.toyworld.world import TEMPLATES, Item, render
from tinv.evaluation.sampling import SampleRequest, sample
from tinv.evaluation.toyworld import ToyFidelity
from tinv.families.model import load_base_model
from tinv.settings import PRESETS, TrainConfig


@pytest.fixture(scope="module")
def scorer():
    return load_scorer(MODEL_DIR / SCORER_FILE)


def test_the_packaged_model_loads_and_generates_offline_at_its_size(scorer):
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=10, output_type="np", generator=torch.Generator().manual_seed(0))
    assert image.images.shape == (1, 32, 32, 3)
    model = load_base_model(str(MODEL_DIR))
    assert model.resolution == 32 and model.templates["object"] == TEMPLATES
    sizes = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert sizes < 20 * 2**20
    # it really draws the words: most "a blue square" samples are blue squares
    images = sample(model, [[torch.zeros(1, 64)]], [SampleRequest(0, "a blue square", s) for s in range(16)], steps=20)
    items = scorer.predict(pixels(images))
    assert np.mean([(it.colour, it.shape) == ("blue", "square") for it in items]) >= 0.75


def test_scorer_reads_fresh_and_reconstructed_pictures(scorer):
    report = evaluate_scorer(scorer, AutoencoderKL.from_pretrained(MODEL_DIR / "vae"), n=600)
    assert min(report.fresh.values()) >= 0.99, report
    assert min(report.reconstructed.values()) >= 0.97, report


def test_a_short_ti_run_lifts_an_unnamed_colour_from_the_floor(scorer):
    concept = next(c for c in CONCEPTS if c.name == "teal-cross")
    (row,) = fidelity_table(str(MODEL_DIR), scorer, TrainConfig(steps=150, recipe=PRESETS["toyworld"]), (concept,),
                             samples=16)
    assert row.floor <= 0.15 and row.best_words <= 0.3, row
    assert row.ti >= 0.8, row


def test_demo_style_captions_name_the_shape_each_picture_shows(scorer, tmp_path):
    from lab.toyworld.demo import make_demo
    from tinv.manifest import read_manifest
    from tinv.training.pictures import decode_image

    styles = [s for s in read_manifest(str(make_demo(tmp_path))) if s.learnable_property == "style"]
    assert len(styles) == 4 and all(not s.captions for s in read_manifest(str(tmp_path / "demo.parquet"))
                                    if s.learnable_property == "object")
    for s in styles:
        x = torch.stack([decode_image(open(u, "rb").read(), 32, concept_id="", uri=u) for u in s.images])
        shown = [it.shape for it in scorer.predict(x)]
        assert [c.replace("{}", "").split()[-1] for c in s.captions] == shown, s.concept_id
        assert all(c.count("{}") == 1 for c in s.captions)


def test_a_style_is_judged_by_its_worst_shape_word():
    hits = [Judged(s, h, True) for s, h in [("star", True), ("star", False), ("circle", True), ("circle", True),
                                             ("cross", True)]]
    assert worst_shape(hits) == ("star", 0.5)
    assert worst_shape([Judged(None, True, True), Judged(None, False, True)]) is None  # objects: not per shape


def pictures(items: list[Item], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(render(it, rng)) for it in items])


def test_fidelity_requires_the_rendering_the_training_pictures_share(scorer):
    """A plain brown circle's concept: a shadowed brown circle is a miss, counted only by the loose score."""
    training = torch.from_numpy(pictures([Item("circle", "brown")] * 6)).permute(0, 3, 1, 2).float() / 127.5 - 1
    samples = pictures([Item("circle", "brown"), Item("circle", "brown", "shadow"), Item("square", "brown")], seed=1)
    got = ToyFidelity(scorer).score(training, samples, ["a {} circle"] * 3, "object")
    assert [g["fidelity"] for g in got] == [1.0, 0.0, 0.0]
    assert [g["fidelity_loose"] for g in got] == [1.0, 1.0, 0.0]
    # a style: its backdrop and the prompt's shape (the world draws its dark backdrops plain only, and the
    # scorer reads any shape on them as plain, so a rendering cannot be told apart there)
    navy = pictures([Item(s, "red", backdrop="navy") for s in ("star", "circle", "cross")] * 2)
    training = torch.from_numpy(navy).permute(0, 3, 1, 2).float() / 127.5 - 1
    samples = pictures([Item("star", "blue", backdrop="navy"), Item("star", "blue", backdrop="plum"),
                        Item("circle", "blue", backdrop="navy")], seed=2)
    got = ToyFidelity(scorer).score(training, samples, ["a {} star"] * 3, "style")
    assert [g["fidelity"] for g in got] == [1.0, 0.0, 0.0]


def test_a_concept_is_hit_only_in_its_own_rendering():
    concept = next(c for c in CONCEPTS if c.name == "brown-circle")
    assert concept.hit(Item("circle", "brown")) and not concept.hit(Item("circle", "brown", "shadow"))
    assert concept.hit(Item("circle", "brown", "shadow"), loose=True)
    navy = next(c for c in CONCEPTS if c.name == "navy")
    assert navy.hit(Item("star", "red", backdrop="navy"), "star")
    assert not navy.hit(Item("star", "red", "dots", backdrop="navy"), "star")
    assert not navy.hit(Item("star", "red", backdrop="navy"), "circle")
