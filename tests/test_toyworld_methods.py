"""The toy world's method comparison (ti / lora / pivotal, with and without prior preservation) measures
what it says: every run's concepts, drift against the base model's own samples, the job's file bytes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.report import write_results
from lab.toyworld.concepts import CONCEPTS
from lab.toyworld.fidelity import LORA_WORD, Draw, Judged, judge, learn
from lab.toyworld.methods import (
    RUNS,
    MethodRow,
    class_pictures,
    class_prompt,
    compare,
    paired_se,
    run_markdown,
    run_table,
    shows_attribute,
)
from lab.toyworld.scorer import find_scorer
from lab.toyworld.world import SHAPES, Item
from tinv import EMBEDDED_MODEL
from tinv.evaluation.sampling import SampleRequest, sample
from tinv.families.model import load_base_model
from tinv.settings import PRESETS, TrainConfig

NAMES = ("red-star", "navy")
PICK = tuple(c for c in CONCEPTS if c.name in NAMES)
CFG = TrainConfig(steps=3, class_images=3, recipe=replace(PRESETS["toyworld"], class_sample_steps=2))


def test_the_bare_class_prompt_and_the_attribute_each_concept_is_watched_for():
    star, navy = PICK
    assert class_prompt(star) == "a star"  # a style: every shape its captions name, the prompts drift is read on
    assert class_prompt(navy) == tuple(f"a {s}" for s in SHAPES)
    red_star, blue_star = Item("star", "red"), Item("star", "blue")
    assert shows_attribute(star, Judged(None, False, False, red_star))  # the colour alone counts, not the hit
    assert not shows_attribute(star, Judged(None, True, True, blue_star))
    assert shows_attribute(navy, Judged("star", False, False, Item("circle", "red", backdrop="navy")))
    assert not shows_attribute(navy, Judged("star", False, False, Item("circle", "red", backdrop="plum")))
    row = MethodRow("red-star", "combination", "lora", False, 1.0, 1.0, bare_share=0.5, base_share=0.125,
                    bytes=1, seconds=1.0)
    assert row.drift == pytest.approx(0.375)
    # the paired error: per-sample differences of draws that share their seeds, not two independent shares
    assert paired_se(np.array([1.0, 0.0, -1.0, 0.0])) == pytest.approx((2 / 3) ** 0.5 / 2)
    assert paired_se(np.array([0.0, 0.0, 0.0, 0.0])) == 0.0  # both draws alike on every seed: no noise at all


def test_every_run_is_measured_and_ti_drifts_by_construction_not_at_all():
    rows = compare(str(EMBEDDED_MODEL), find_scorer(EMBEDDED_MODEL), CFG, PICK, samples=2, steps=2)
    by = {(r.concept, r.method, r.prior): r for r in rows}
    assert set(by) == {(n, m, p) for n in NAMES for m, p in RUNS}
    for n in NAMES:
        ti, lora, pivotal = by[n, "ti", False], by[n, "lora", False], by[n, "pivotal", False]
        assert ti.bare_share == ti.base_share and ti.drift == 0 and ti.drift_se == 0
        assert {r.base_share for r in rows if r.concept == n} == {ti.base_share}  # one base draw per concept
        # the job's files: an embedding, a LoRA, both (pivotal also bundles the token into its kohya file)
        assert 0 < ti.bytes < lora.bytes < pivotal.bytes
        assert pivotal.bytes > ti.bytes + lora.bytes
        assert all(0 <= r.fidelity <= r.fidelity_loose <= 1 and r.seconds > 0 for r in rows if r.concept == n)


def test_prior_pictures_are_the_jobs_class_pictures_and_lora_draws_go_through_the_adapter():
    model = load_base_model(str(EMBEDDED_MODEL), precision="fp32")
    pictures = class_pictures(model, PICK, CFG)
    assert {n: p for n, (p, _, _) in pictures.items()} == {n: class_prompt(c) for n, c in zip(NAMES, PICK)}
    star, navy = pictures["red-star"], pictures["navy"]
    assert star[1].shape == (3, 3, 32, 32) and navy[1].shape == (3 * len(SHAPES), 3, 32, 32)
    assert star[2] == ("a star",) * 3 and navy[2] == tuple(f"a {s}" for s in SHAPES for _ in range(3))
    assert torch.equal(navy[1][9:12], star[1])  # "a star" is drawn once, shared by the object and the style
    learned = learn(model, PICK, replace(CFG, lora_learning_rate=1e-2), method="lora", classes=pictures)
    trained = learned["red-star"]
    assert trained.spec.placeholder_token == f"{LORA_WORD} star" and trained.vectors is None
    assert trained.spec.class_prompt == "a star"
    # the bare prompt through the concept's adapter is not the base model's drawing (the drift it measures)
    scorer = find_scorer(EMBEDDED_MODEL)
    plain, adapted = judge(model, scorer, PICK[:1], [Draw(0, word="star"), Draw(0, word="star", lora=trained.lora)],
                           samples=4, steps=2)
    assert len(plain) == len(adapted) == 4
    request = [SampleRequest(0, "a {}", 7)]
    base = sample(model, [None], request, words=["star"], steps=2)
    assert (sample(model, [None], request, words=["star"], steps=2, loras=[trained.lora]) != base).any()
    assert (sample(model, [None], request, words=["star"], steps=2) == base).all()  # and the base is left as it was


def test_the_lab_trains_under_the_toyworld_preset_and_its_flags_set_the_recipe():
    import argparse

    from lab.toyworld import CONFIG
    from lab.toyworld.flags import add_train_flags, train_config

    # the settings its studies were recorded under: the toyworld preset and 500 steps, not the product's defaults
    assert CONFIG == TrainConfig(steps=500, recipe=PRESETS["toyworld"]) and CONFIG.recipe != TrainConfig().recipe
    p = argparse.ArgumentParser()
    add_train_flags(p, {"steps": 200})
    assert train_config(p.parse_args([])) == replace(CONFIG, steps=200)
    cfg = train_config(p.parse_args(["--prior-preservation", "both", "--blank-prompt-preservation",
                                     "--min-timestep-fraction", "0.25", "--style-timestep-power", "2",
                                     "--lora-text-encoder-learning-rate", "3e-3"]))
    assert cfg.prior_preservation == "both" and cfg.steps == 200
    assert cfg.recipe == replace(PRESETS["toyworld"], blank_prompt_preservation=True, min_timestep_fraction=0.25,
                                 style_timestep_power=2.0, lora_text_encoder_learning_rate=3e-3)


def test_a_jobs_train_run_of_the_methods_manifest_is_tabled_per_method_and_kind(tmp_path):
    rows = []
    for method, fid in (("ti", 0.5), ("pivotal", 1.0)):
        for c in CONCEPTS[:2] + CONCEPTS[-1:]:
            ok = not (method == "ti" and c.kind == "style")  # one failed concept: no metrics
            rows.append({"concept_id": f"{c.name}-{method}", "status": "succeeded" if ok else "failed",
                         "method": method, "seconds": 1.0,
                         "metrics": {"fidelity": fid, "fidelity_loose": 1.0} if ok else None})
    write_results(str(tmp_path), rows)
    first = CONCEPTS[0]
    samples = tmp_path / "concepts" / f"{first.name}-ti" / "samples"
    samples.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (32, 32)).save(samples / f"{i}.png")

    class Reads:  # one sample in the concept's colour, one not
        def predict(self, x):
            assert x.shape == (2, 3, 32, 32)
            return [Item("circle", first.colour), Item("circle", "blue" if first.colour != "blue" else "red")]

    assert [r.get("attribute") for r in run_table(tmp_path, Reads())][:2] == [0.5, None]  # where samples are
    table = run_table(tmp_path)
    assert [(r["concept"], r["method"], r["fidelity"]) for r in table][:2] == [
        (CONCEPTS[0].name, "ti", 0.5), (CONCEPTS[1].name, "ti", 0.5)]
    lines = run_markdown(table).splitlines()
    assert lines[0] == "| concept | kind | ti | pivotal |"
    assert f"| **{CONCEPTS[0].kind} mean** |  | 0.50 | 1.00 |" in lines
    assert "| **style mean** |  | — | 1.00 |" in lines and "| **mean** |  | — | 1.00 |" in lines
    write_results(str(tmp_path / "other"), [{"concept_id": "my-dog", "status": "succeeded", "method": None}])
    with pytest.raises(ValueError, match="not a held-out concept by a method"):
        run_table(tmp_path / "other")


def test_the_base_attribute_groups_each_concepts_prompts_and_seeds():
    from lab.toyworld.methods import base_attribute

    class Reads:  # every picture pink on navy: only pink-square and navy show their attribute
        def predict(self, x):
            assert len(x) == 8 + 4 * 6  # objects: one prompt, styles: six, one seed each
            return [Item("circle", "pink", backdrop="navy")] * len(x)

    shown = base_attribute(load_base_model(str(EMBEDDED_MODEL)), Reads(), samples=1)
    assert {name for name, share in shown.items() if share == 1.0} == {"pink-square", "navy"}
    assert set(shown.values()) == {0.0, 1.0} and len(shown) == len(CONCEPTS)
