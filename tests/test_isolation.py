"""A concept's failure is its own: diverging, raising or running out of memory, its neighbours go on unchanged."""

from __future__ import annotations

import pytest
import torch

from tinv.errors import ConceptCrashedError, ConceptDivergedError, ConceptOutOfMemoryError
from tinv.families.model import load_base_model
from tinv.manifest import ConceptSpec
from tinv.settings import Recipe, TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.loop import GuardedStep, train_concepts
from tinv.training.trainer import PackedTrainer

CFG = TrainConfig(concepts_per_actor=3, batch_size=2, learning_rate=5e-3, steps=5)


def spec(cid: str, **kw) -> ConceptSpec:
    return ConceptSpec(cid, ("memory://unused.png",), **{"initializer_token": "cat", "seed": len(cid), **kw})


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_base_model(str(tiny_models["sd1"]))


def solo(model, data: ConceptData, cfg: TrainConfig = CFG) -> torch.Tensor:
    (out,) = train_concepts(model, [data], TrainConfig(**{**cfg.__dict__, "concepts_per_actor": 1}))
    assert out.failure is None
    return out.vectors[0]


def test_a_diverging_concept_fails_alone_and_its_neighbours_end_as_without_it(model, images):
    good = [ConceptData(spec("a"), images), ConceptData(spec("bb", steps=7), images)]
    nan = ConceptData(spec("nan"), torch.full_like(images, float("nan")))  # its latents, hence its loss, are NaN
    huge = ConceptData(spec("lr", learning_rate=1e30), images)  # its vectors overflow after one step
    out = {o.spec.concept_id: o for o in train_concepts(model, [good[0], nan, huge, good[1]], CFG)}
    for bad, text in (("nan", "diverged: loss nan at step 1"), ("lr", "step 2")):
        assert isinstance(out[bad].failure, ConceptDivergedError) and text in out[bad].error, out[bad].error
        assert out[bad].vectors is None and out[bad].failure.retryable is False
    for data in good:
        torch.testing.assert_close(out[data.spec.concept_id].vectors[0], solo(model, data), rtol=0, atol=1e-5)


def test_a_concept_that_raises_fails_alone_and_the_others_step_as_if_it_were_not_there(model, images, monkeypatch):
    trainer_draw = PackedTrainer._draw

    def draw(self, slot, generator, n):
        if slot.spec.concept_id == "boom" and len(slot.losses) == 2:
            raise RuntimeError("a bug in this concept's own data path")
        return trainer_draw(self, slot, generator, n)

    good = [ConceptData(spec("a"), images), ConceptData(spec("bb"), images)]
    expected = {d.spec.concept_id: solo(model, d) for d in good}
    monkeypatch.setattr(PackedTrainer, "_draw", draw)
    out = {o.spec.concept_id: o for o in train_concepts(model, [good[0], ConceptData(spec("boom"), images), good[1]],
                                                         CFG)}
    assert isinstance(out["boom"].failure, ConceptCrashedError) and "RuntimeError: a bug" in out["boom"].error
    assert len(out["boom"].losses) == 2 and out["boom"].failure.retryable is True
    for cid, vectors in expected.items():  # their random streams were rewound: bit-for-bit their solo runs
        torch.testing.assert_close(out[cid].vectors[0], vectors, rtol=0, atol=1e-5)


def test_out_of_memory_halves_the_batch_and_a_concept_too_big_alone_fails_alone(model, images, monkeypatch):
    data = [ConceptData(spec(c), images) for c in ("a", "bb", "ccc")]
    wide = ConceptData(spec("wide", steps=3, num_vectors=1), images)
    expected = {d.spec.concept_id: solo(model, d) for d in data}
    unet = model.denoiser.forward

    def forward(sample, *args, **kwargs):  # an accelerator that fits 4 samples (2 concepts × 2)
        if len(sample) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return unet(sample, *args, **kwargs)

    monkeypatch.setattr(model.denoiser, "forward", forward)
    trainer = PackedTrainer(model, CFG)
    for s, d in enumerate(data):
        trainer.admit(s, d)
    step = GuardedStep(trainer)
    losses, failed = step()
    assert sorted(losses) == [0, 1, 2] and not failed and step.group_size == 1  # 3 → 1 after the split
    out = {o.spec.concept_id: o for o in train_concepts(model, data, CFG)}
    for cid, vectors in expected.items():
        torch.testing.assert_close(out[cid].vectors[0], vectors, rtol=0, atol=1e-5)
    cfg = TrainConfig(**{**CFG.__dict__, "batch_size": 5})  # 5 samples: too big even alone
    (alone,) = train_concepts(model, [wide], cfg)
    assert isinstance(alone.failure, ConceptOutOfMemoryError) and "out of memory alone" in alone.error


def test_fp16_loss_scale_is_per_slot_backs_off_on_overflow_and_grows_after_good_steps(tiny_models, images):
    model = load_base_model(str(tiny_models["sd1"]), precision="fp16")
    cfg = TrainConfig(concepts_per_actor=2, batch_size=1, learning_rate=0.1,
                      recipe=Recipe(loss_scale=1024.0, loss_scale_growth_interval=2))
    trainer = PackedTrainer(model, cfg)
    trainer.admit(0, ConceptData(spec("fine"), images))
    trainer.admit(1, ConceptData(spec("overflows"), images))
    hook = trainer.vectors[1][0].register_hook(lambda g: g * float("inf"))
    before = [row[0].detach().clone() for row in trainer.vectors]
    losses, failed = trainer.step()
    assert sorted(losses) == [0, 1] and not failed  # an overflow is a skipped step, not a failure
    assert not torch.equal(trainer.vectors[0][0], before[0])  # slot 0 stepped
    assert torch.equal(trainer.vectors[1][0], before[1])  # slot 1 skipped, nothing non-finite written
    assert (trainer.slots[0].loss_scale, trainer.slots[1].loss_scale) == (1024.0, 512.0)
    hook.remove()
    trainer.step()
    trainer.step()
    assert (trainer.slots[0].loss_scale, trainer.slots[1].loss_scale) == (2048.0, 1024.0)  # grown after 2 good
