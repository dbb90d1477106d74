"""The train job's samples: finished concepts drawn together from their live vectors and adapters, the other
slots training on, a concept whose drawing raises failing alone."""

from __future__ import annotations

import numpy as np
import pytest

from tinv.evaluation.sampling import SampleRequest, pipeline, sample
from tinv.families.model import load_base_model
from tinv.manifest import ConceptSpec
from tinv.settings import TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.loop import train_concepts

PROMPTS = ("a photo of a {}", "a {} on a table")
HOW = {"steps": 2, "guidance": 5.0, "batch_size": 8}


def spec(cid: str, steps: int, method: str = "ti") -> ConceptSpec:
    token = f"sks {cid}" if method == "lora" else f"<{cid}>"
    return ConceptSpec(cid, ("memory://unused.png",), initializer_token="cat", steps=steps, method=method,
                       placeholder_token=token)


class Recorder:
    """A sampler that draws each finished concept's two prompts (seed 0) from the trainer's live slots, and keeps
    which slots came together and how many steps each other concept had taken by then."""

    def __init__(self, model) -> None:
        self.model, self.pipe, self.calls, self.fail = model, pipeline(model), [], set()

    def __call__(self, trainer, slots: list[int]) -> list[np.ndarray]:
        ids = [trainer.slots[s].spec.concept_id for s in slots]
        others = {trainer.slots[s].spec.concept_id: len(trainer.slots[s].losses) for s in trainer.active}
        self.calls.append((ids, others))
        if self.fail & set(ids):
            raise RuntimeError(f"cannot draw {sorted(self.fail & set(ids))}")
        requests = [SampleRequest(i, p, 0) for i in range(len(slots)) for p in PROMPTS]
        images = trainer.draw(slots, requests, pipe=self.pipe, **HOW)
        return [images[i * len(PROMPTS):(i + 1) * len(PROMPTS)] for i in range(len(slots))]


def test_finished_concepts_are_drawn_together_from_their_live_vectors_and_adapters(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]))
    cfg = TrainConfig(concepts_per_actor=3, batch_size=2, learning_rate=0.05, lora_learning_rate=0.05,
                      early_stop=False)
    concepts = [spec("a", 2, "pivotal"), spec("b", 3, "lora"), spec("c", 12)]
    recorder = Recorder(model)
    out = {t.spec.concept_id: t for t in train_concepts(model, [ConceptData(s, images) for s in concepts], cfg,
                                                        sampler=recorder, sample_group=2, sample_wait=4)}
    assert [o.error for o in out.values()] == [None] * 3
    # a finished first and waited (not training) until b finished: both drawn in one call while c trained on
    (first, others), (last, _) = recorder.calls
    assert first == ["a", "b"] and others == {"c": 3} and last == ["c"]
    assert len(out["c"].losses) == 12 and len(out["a"].losses) == 2
    for cid, trained in out.items():  # live == what the files hold: the vectors and LoRA copied out, drawn alone
        requests = [SampleRequest(0, p, 0) for p in PROMPTS]
        alone = sample(model, [trained.vectors], requests, words=[trained.spec.placeholder_token],
                       loras=[trained.lora], text_loras=[trained.text_lora], **HOW)
        assert np.array_equal(trained.samples, alone), cid
    assert not np.array_equal(out["a"].samples, out["b"].samples)


def test_a_group_waits_at_most_its_bound_and_a_concept_whose_drawing_raises_fails_alone(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]))
    cfg = TrainConfig(concepts_per_actor=3, batch_size=1, early_stop=False)
    recorder = Recorder(model)
    recorder.fail = {"bad"}
    concepts = [spec("ok", 2), spec("bad", 2, "pivotal"), spec("long", 9)]
    out = {t.spec.concept_id: t for t in train_concepts(model, [ConceptData(s, images) for s in concepts], cfg,
                                                        sampler=recorder, sample_group=3, sample_wait=3)}
    # the group of 3 never fills while long trains: the two finished ones are drawn after 3 steps of waiting
    ids, others = recorder.calls[0]
    assert ids == ["ok", "bad"] and others == {"long": 5}
    assert [c[0] for c in recorder.calls[1:3]] == [["ok"], ["bad"]]  # the batch raised: each alone
    assert out["ok"].error is None and out["ok"].samples is not None
    assert out["bad"].vectors is None and "drawing samples" in out["bad"].error
    assert out["long"].error is None and len(out["long"].losses) == 9


@pytest.mark.parametrize("kind", ["sdxl"])
def test_live_samples_match_on_a_two_encoder_family(tiny_models, images, kind):
    model = load_base_model(str(tiny_models[kind]))
    cfg = TrainConfig(concepts_per_actor=2, batch_size=1, learning_rate=0.05, lora_learning_rate=0.05,
                      lora_text_encoder=True, early_stop=False)
    recorder = Recorder(model)
    out = list(train_concepts(model, [ConceptData(spec("p", 2, "pivotal"), images)], cfg, sampler=recorder))
    (trained,) = out
    requests = [SampleRequest(0, p, 0) for p in PROMPTS]
    alone = sample(model, [trained.vectors], requests, loras=[trained.lora], text_loras=[trained.text_lora], **HOW)
    assert trained.text_lora and np.array_equal(trained.samples, alone)
