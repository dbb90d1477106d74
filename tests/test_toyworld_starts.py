"""The toy world's fast-start measurement: its corpus, the start at step 0, its summary."""

from __future__ import annotations

import numpy as np
import torch
from jobtools import TOY
from test_starts import Given

from lab.toyworld.concepts import CONCEPTS
from lab.toyworld.corpus import corpus, write_corpus
from lab.toyworld.fast_start import censored_samples, cost, summary
from lab.toyworld.fidelity import concept_data
from lab.toyworld.schedule import Curve, snapshots
from lab.toyworld.world import BACKDROP_RGB, CANONICAL_RGB, COMBINATIONS, HOLE
from tinv.families.model import load_base_model
from tinv.manifest import read_manifest
from tinv.settings import PRESETS, TrainConfig
from tinv.training.starts import LEARNED, word_start


def test_the_corpus_is_three_families_disjoint_from_the_held_out_concepts(tmp_path):
    concepts = corpus(320)
    assert len({c.name for c in concepts}) == 320 and not {c.name for c in concepts} & {c.name for c in CONCEPTS}
    kinds = [c.kind for c in concepts]
    assert (kinds.count("combination"), kinds.count("described"), kinds.count("style")) == (64, 128, 128)
    assert not {(c.colour, c.shape) for c in concepts} & set(COMBINATIONS)
    described = np.array([c.rgb for c in concepts if c.kind == "described"], float)
    tones = np.array([c.backdrop_rgb for c in concepts if c.kind == "style"], float)
    assert np.linalg.norm(described[:, None] - CANONICAL_RGB[None], axis=-1).min() >= HOLE  # no unnamed colour
    assert np.linalg.norm(tones[:, None] - BACKDROP_RGB[None], axis=-1).min() >= HOLE  # no held-out backdrop
    style = next(c for c in concepts if c.kind == "style")
    corner = np.asarray(style.pictures(6, 0)[0])[0, 0].astype(float)  # what its pictures stand on
    assert np.abs(corner - style.backdrop_rgb).max() <= 3

    specs = read_manifest(str(write_corpus(tmp_path, n=70)))
    assert [s.concept_id for s in specs] == [c.name for c in corpus(70)]
    assert {s.learnable_property for s in specs} == {"object", "style"}
    assert all(len(s.captions) == 6 for s in specs if s.learnable_property == "style")


def test_a_schedules_step_0_is_the_start_itself():
    model = load_base_model(TOY)
    cfg = TrainConfig(steps=2, batch_size=2, recipe=PRESETS["toyworld"])
    rows = [torch.full((1, model.embedding_dims[0]), 0.01)]
    plain, _, _, begun = snapshots(model, CONCEPTS[:1], cfg, [0, 2], dvar=False)
    assert begun == [{"init": "word"}]
    data = concept_data(CONCEPTS[0], 6, model.resolution, 0)
    assert torch.equal(plain[0, 0].vectors, word_start(model, data.spec)[0])
    given, _, _, begun = snapshots(model, CONCEPTS[:1], cfg, [0, 2], dvar=False, start=Given(LEARNED, rows=rows))
    assert begun[0]["requested"] == LEARNED
    assert torch.equal(given[0, 0].vectors, rows[0] if begun[0]["init"] == LEARNED else plain[0, 0].vectors)


def test_the_summary_counts_a_concept_that_never_reaches_its_target_at_its_whole_schedule():
    steps = [0, 10, 20]
    fast = Curve("a", "combination", "learned", 0.9, steps, [0.95, 1.0, 1.0], [1.0] * 3, samples_per_step=4,
                 start={"init": "learned"})
    slow = Curve("b", "style", "learned", 0.9, steps, [0.1, 0.5, 0.6], [0.6] * 3, stopped_at=12,
                 fidelity_at_stop=0.55, samples_per_step=8, start={"init": "word"})
    assert (censored_samples(fast), censored_samples(slow)) == (0, 160)
    s = summary([fast, slow])["learned"]
    assert s["mean_samples_to_target"] == 80 and s["reached"] == 1 and s["kept"] == 1
    assert s["fidelity_at_0"] == (0.95 + 0.1) / 2 and s["fidelity_at_stop_by_kind"] == {"combination": 1.0,
                                                                                         "style": 0.55}
    assert s["mean_stop_step"] == (20 + 12) / 2


def test_the_cost_side_prices_a_concept_step_from_the_night_and_breaks_even_on_the_steps_saved():
    night = {"timings": {"seconds": 130.0, "train_seconds": 100.0}, "actors": 2}
    fit = {"seconds": {"features": 3.0, "fit": 5.0, "total": 20.0}}
    stats = {"word": {"mean_stop_step": 300}, "learned": {"mean_stop_step": 200}}
    c = cost(night, [100] * 40, fit, stats)  # 4 000 concept-steps on 2 actors in 100 s
    assert c["actor_seconds_per_concept_step"] == 0.05 and c["steps_saved_per_concept"] == 100
    assert c["actor_seconds_saved_per_concept"] == 5.0 and c["break_even_concepts"] == 4.0
    assert cost(night, [100] * 40, fit, {**stats, "learned": {"mean_stop_step": 300}})["break_even_concepts"] is None
