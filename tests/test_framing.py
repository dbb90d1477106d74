"""Aspect-ratio buckets and masks: pictures keep their framing, masks weight the loss per latent pixel."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from tinv.errors import ConceptDataError
from tinv.families.model import load_base_model
from tinv.manifest import ConceptSpec
from tinv.settings import TrainConfig
from tinv.training import pictures as buckets
from tinv.training.concept import ConceptData, Framed, Rows
from tinv.training.loop import train_concepts
from tinv.training.pictures import load_pictures
from tinv.training.trainer import PackedTrainer


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_buckets_are_kohyas_for_sd_and_each_picture_goes_to_its_nearest_ratio():
    sizes = buckets.bucket_sizes(512, 64)
    assert {(512, 512), (448, 576), (384, 640), (320, 768), (256, 1024), (576, 448), (1024, 256)} <= set(sizes)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 256 <= min(w, h) for w, h in sizes)
    assert buckets.nearest((768, 1024), sizes) == (448, 576)  # a 3:4 portrait
    assert buckets.nearest((1920, 1080), sizes) == (640, 384) and buckets.nearest((500, 500), sizes) == (512, 512)
    assert buckets.bucket_sizes(32, 8) == [(16, 48), (16, 56), (16, 64), (24, 40), (32, 32), (40, 24), (48, 16),
                                           (56, 16), (64, 16)]


def portrait(head: tuple[int, int, int] = (255, 0, 0)) -> Image.Image:
    """A 30 x 48 grey picture with a coloured 'head' across its top eighth, which a centre square cuts off."""
    img = Image.new("RGB", (30, 48), (128, 128, 128))
    img.paste(head, (0, 0, 30, 6))
    return img


def test_a_portrait_keeps_its_top_in_its_bucket_which_the_centre_square_cuts_off(tmp_path):
    (tmp_path / "p.png").write_bytes(png(portrait()))
    Image.new("RGB", (40, 40), (0, 0, 255)).save(tmp_path / "s.png")
    spec = ConceptSpec("c", (str(tmp_path / "p.png"), str(tmp_path / "s.png"), str(tmp_path / "p.png")))
    squares, framed = load_pictures(spec, 32, step=8)
    assert squares.shape == (3, 3, 32, 32)
    assert (squares[0, 0, :4] < 0.5).all()  # the head is cut off the centre square
    by_size = {tuple(f.images.shape[-2:]): f for f in framed}
    assert set(by_size) == {(40, 24), (32, 32)} and by_size[(40, 24)].index == (0, 2)  # (h, w): the 24 x 40 bucket
    assert by_size[(32, 32)].index == (1,) and all(f.masks is None for f in framed)
    assert (by_size[(40, 24)].images[0, 0, :3] > 0.9).all()  # its top rows are the head
    assert load_pictures(spec, 32)[1] is None  # no buckets, no masks: the squares are what trains
    square = ConceptSpec("c", (str(tmp_path / "s.png"),) * 2)
    assert load_pictures(square, 32, step=8)[1] is None  # square pictures train as before buckets


def test_masks_are_cropped_as_their_pictures_and_bad_ones_are_refused(tmp_path):
    (tmp_path / "p.png").write_bytes(png(portrait()))
    mask = Image.new("L", (30, 48), 0)
    mask.paste(255, (0, 24, 30, 48))  # the lower half is the subject
    mask.save(tmp_path / "m.png")
    spec = ConceptSpec("c", (str(tmp_path / "p.png"),), masks=(str(tmp_path / "m.png"),))
    _, (square,) = load_pictures(spec, 32)
    assert square.images.shape == (1, 3, 32, 32) and square.masks.shape == (1, 1, 32, 32)
    assert square.masks[0, 0, :12].max() == 0 and square.masks[0, 0, 20:].min() == 1  # cropped as the picture
    _, (bucketed,) = load_pictures(spec, 32, step=8)
    assert bucketed.masks.shape == (1, 1, 40, 24) and bucketed.masks[0, 0, 22:].min() > 0.99
    Image.new("L", (30, 48), 0).save(tmp_path / "black.png")
    Image.new("L", (10, 10), 255).save(tmp_path / "small.png")
    cut = Image.new("RGBA", (30, 48), (0, 0, 0, 0))
    cut.paste((255, 0, 0, 255), (5, 5, 25, 40))
    cut.save(tmp_path / "cut.png")
    for masks, alpha, uri, message in ((("black.png",), False, "p.png", "no subject"),
                                       (("small.png",), False, "p.png", "mask is 10x10, its image 30x48"),
                                       ((), True, "p.png", "no alpha channel")):
        bad = ConceptSpec("c", (str(tmp_path / uri),), masks=tuple(str(tmp_path / m) for m in masks),
                          mask_from_alpha=alpha)
        with pytest.raises(ConceptDataError, match=message):
            load_pictures(bad, 32)
    _, (from_alpha,) = load_pictures(ConceptSpec("c", (str(tmp_path / "cut.png"),), mask_from_alpha=True), 32)
    assert from_alpha.masks.max() == 1 and from_alpha.masks.min() == 0


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_base_model(str(tiny_models["sd1"]))


def framed(images: torch.Tensor, masks: torch.Tensor | None = None) -> list[Framed]:
    """Two training sizes: the first two pictures square, the others a 16 x 48 crop of themselves."""
    return [Framed(images[:2], (0, 1), None if masks is None else masks[:2]),
            Framed(images[2:, :, :, 8:24].repeat(1, 1, 2, 1)[:, :, :48], (2, 3),
                   None if masks is None else masks[2:, :, :, 8:24].repeat(1, 1, 2, 1)[:, :, :48])]


def test_a_step_draws_each_concept_from_one_size_and_packed_equals_alone(model, images):
    cfg = TrainConfig(steps=4, concepts_per_actor=2, batch_size=2)
    spec = ConceptSpec("b", ("x",) * 4, initializer_token="toy")
    trainer = PackedTrainer(model, cfg)
    trainer.admit(0, ConceptData(spec, images, framed=framed(images)))
    sizes = {tuple(trainer._draw(trainer.slots[0], torch.Generator().manual_seed(s), 2)[0].latents.shape[-2:])
             for s in range(12)}
    assert sizes == {(16, 16), (24, 8)}  # latents of 32 x 32 and of 16 x 48 pixels, never mixed in one draw
    plain = ConceptData(ConceptSpec("a", ("x",) * 4, initializer_token="toy"), images)
    bucketed = ConceptData(spec, images, framed=framed(images))
    packed = {t.spec.concept_id: t for t in train_concepts(model, [plain, bucketed], cfg)}
    assert packed["b"].sizes == {"32x32": 2, "16x48": 2} and packed["a"].sizes == {"32x32": 4}
    for data in (plain, bucketed):
        alone = next(train_concepts(model, [data], TrainConfig(steps=4, concepts_per_actor=1, batch_size=2)))
        torch.testing.assert_close(packed[data.spec.concept_id].vectors[0], alone.vectors[0], rtol=0, atol=1e-5)


def test_a_mask_weights_each_latent_pixels_error_and_an_all_white_mask_changes_nothing(model, images, monkeypatch):
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=2, batch_size=2))
    half = torch.zeros(4, 1, 32, 32)
    half[..., :16] = 1  # the left half is the subject
    white = torch.ones(4, 1, 32, 32)
    spec = ConceptSpec("c", ("x",) * 4, initializer_token="toy")
    trainer.admit(0, ConceptData(spec, images, framed=[Framed(images, (0, 1, 2, 3), white)]))
    trainer.admit(1, ConceptData(spec, images))
    assert trainer.fixed_loss(0) == pytest.approx(trainer.fixed_loss(1), rel=1e-6)
    trainer.admit(0, ConceptData(spec, images, framed=[Framed(images, (0, 1, 2, 3), half)]))
    weights = trainer.slots[0].latents[0].weights
    assert weights.shape == (8, 1, 16, 16) and weights[:4, :, :, :8].min() == 1 and weights[:4, :, :, 8:].max() == 0
    assert weights[4:, :, :, 8:].min() == 1  # a flipped picture's mask is flipped with it
    error = torch.rand(2, 4, 16, 16)
    monkeypatch.setattr(trainer, "_squared_errors", lambda parts, adapters: error)
    rows = Rows(*(torch.zeros(2, 4, 16, 16),) * 2, torch.zeros(2, dtype=torch.long), [torch.zeros(2, 8)],
                weights[:2])
    (loss,) = trainer._losses([trainer.slots[0]], [[rows]]).tolist()
    assert loss == pytest.approx((error[..., :8].mean(dim=(1, 2, 3))).mean().item(), rel=1e-6)  # the subject's


def test_sdxl_time_ids_name_the_bucket_it_trains_at(tiny_models):
    model = load_base_model(str(tiny_models["sdxl"]))
    ids = model.tokenize(["a toy"])
    added = model.family.encode(model, ids, (48, 16)).tensors
    assert added["time_ids"].tolist() == [[48, 16, 0, 0, 48, 16]]
    square = model.family.encode(model, ids, (32, 32)).tensors
    assert square["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]


def test_masked_and_bucketed_specs_validate_and_hash_only_when_set():
    from modeltools import fingerprint

    with pytest.raises(ValueError, match="one mask URI per image"):
        ConceptSpec("c", ("a.png", "b.png"), masks=("m.png",))
    with pytest.raises(ValueError, match="name one"):
        ConceptSpec("c", ("a.png",), masks=("m.png",), mask_from_alpha=True)
    model = {"base_model_fingerprint": "fp", "resolution": 32, "dtype": "torch.float32", "templates": "t"}
    plain = fingerprint(ConceptSpec("c", ("a.png",)), TrainConfig(), model)
    others = {fingerprint(ConceptSpec("c", ("a.png",), masks=("m.png",)), TrainConfig(), model),
              fingerprint(ConceptSpec("c", ("a.png",), mask_from_alpha=True), TrainConfig(), model),
              fingerprint(ConceptSpec("c", ("a.png",)), TrainConfig(aspect_buckets=False), model)}
    assert plain not in others and len(others) == 3
