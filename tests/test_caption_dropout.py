"""Caption dropout: a share of a lora / pivotal concept's own samples trained under the empty prompt."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from modeltools import fingerprint

from tinv.families.model import load_base_model
from tinv.manifest import ConceptSpec
from tinv.settings import TrainConfig
from tinv.training.concept import ConceptData, Rows
from tinv.training.splice import BASE
from tinv.training.trainer import PackedTrainer


def spec(cid: str, **kw) -> ConceptSpec:
    return ConceptSpec(cid, ("memory://unused.png",), **kw)


def draw(model, images, cfg: TrainConfig, concept: ConceptSpec, pictures=None):
    trainer = PackedTrainer(model, cfg)
    trainer.admit(0, ConceptData(concept, images, pictures))
    return trainer, trainer._draw(trainer.slots[0], torch.Generator().manual_seed(0), cfg.batch_size)


def test_a_share_of_a_concepts_own_samples_is_drawn_under_the_empty_prompt(tiny_models, images):
    """Only its own rows, never its class pictures'; the rest of the draw is what it is without dropout (the
    dropout is drawn last), and a ti concept ignores it (the empty prompt holds no token)."""
    model = load_base_model(str(tiny_models["sd1"]))
    lora = spec("c", method="lora", placeholder_token="sks toy", class_prompt="a toy")
    pictures = images[:2]
    cfg = TrainConfig(concepts_per_actor=1, batch_size=64, caption_dropout=0.5)
    trainer, (own, prior) = draw(model, images, cfg, lora, pictures)
    _, (plain, plain_prior) = draw(model, images, replace(cfg, caption_dropout=0.0), lora, pictures)
    empty = model.tokenize([""])[0]
    is_empty = (own.ids[0] == empty).all(dim=1)
    assert torch.equal(is_empty, own.dropped) and 16 < int(is_empty.sum()) < 48  # about half of 64
    assert torch.equal(own.ids[0][~is_empty], plain.ids[0][~is_empty])  # the others keep their captions
    assert not (plain.ids[0] == empty).all(dim=1).any() and plain.dropped is None
    for f in ("latents", "noise", "t"):
        assert torch.equal(getattr(own, f), getattr(plain, f))
    assert prior.dropped is None and torch.equal(prior.ids[0], plain_prior.ids[0])
    assert not (prior.ids[0] == empty).all(dim=1).any()
    ti = spec("t", placeholder_token="<t>")
    _, (ti_rows,) = draw(model, images, cfg, ti)
    _, (ti_plain,) = draw(model, images, replace(cfg, caption_dropout=0.0), ti)
    assert ti_rows.dropped is None and torch.equal(ti_rows.ids[0], ti_plain.ids[0])


def test_sdxl_trains_a_dropped_caption_on_zeros_as_its_pipeline_samples_the_empty_prompt(tiny_models, images):
    model = load_base_model(str(tiny_models["sdxl"]))
    trainer, (own,) = draw(model, images, TrainConfig(concepts_per_actor=1, batch_size=8, caption_dropout=0.5),
                           spec("c", method="lora", placeholder_token="sks toy"))
    sd1 = load_base_model(str(tiny_models["sd1"]))
    assert trainer.zeroes_empty and not PackedTrainer(sd1, TrainConfig()).zeroes_empty
    added = model.family.encode(model, own.ids, (32, 32), own.dropped).tensors
    full_added = model.family.encode(model, own.ids, (32, 32)).tensors
    hidden, full = added["hidden"], full_added["hidden"]
    kept = ~own.dropped
    assert own.dropped.any() and kept.any()
    assert (hidden[own.dropped] == 0).all() and (added["text_embeds"][own.dropped] == 0).all()
    assert torch.equal(hidden[kept], full[kept])
    assert torch.equal(added["text_embeds"][kept], full_added["text_embeds"][kept])
    # through the loss: a zeroed row's error does not depend on its prompt, an unzeroed one's does
    other = [torch.flip(i, dims=[0]) for i in own.ids]
    rows = [Rows(own.latents, own.noise, own.t, ids, dropped=own.dropped) for ids in (own.ids, other)]
    with torch.no_grad():
        a, b = (trainer._squared_errors([r], [BASE]).mean(dim=(1, 2, 3)) for r in rows)
    same = (own.ids[0] == other[0]).all(dim=1) & (own.ids[1] == other[1]).all(dim=1)
    assert torch.equal(a[own.dropped], b[own.dropped])
    assert not torch.allclose(a[kept & ~same], b[kept & ~same])


def test_caption_dropout_is_checked_and_counts_in_the_fingerprint_of_lora_concepts_only():
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="caption_dropout"):
            TrainConfig(caption_dropout=bad)
    model = {"base_model_fingerprint": "m", "resolution": 32, "dtype": "torch.float32", "templates": "t"}
    ti, lora = spec("t"), spec("l", method="lora", placeholder_token="sks")
    on = TrainConfig(caption_dropout=0.1)
    assert fingerprint(ti, on, model) == fingerprint(ti, TrainConfig(), model)
    assert fingerprint(lora, on, model) != fingerprint(lora, TrainConfig(), model)
    assert fingerprint(lora, replace(on, caption_dropout=0.2), model) != fingerprint(lora, on, model)
