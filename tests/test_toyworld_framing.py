"""The framing measurement's pictures: tall ones keep their subject off-centre, busy ones never cover it."""

from __future__ import annotations

import numpy as np
import torch

from lab.toyworld import MODEL_DIR
from lab.toyworld.concepts import CONCEPTS
from lab.toyworld.framing import TALL, busy, tall, variant_data
from lab.toyworld.world import render_with_mask
from tinv.families.model import load_base_model


def test_tall_pictures_sit_at_an_end_and_busy_ones_leave_the_subject_alone():
    concept = CONCEPTS[0]
    rng = np.random.default_rng(0)
    picture, mask = render_with_mask(concept.items(1, rng)[0], rng)
    place = np.random.default_rng(1)
    canvases = [np.asarray(tall(picture, place)) for _ in range(8)]
    ends = {"top" if np.array_equal(c[:32], np.asarray(picture)) else "bottom" for c in canvases}
    assert all(c.shape == (TALL[1], TALL[0], 3) for c in canvases) and ends == {"top", "bottom"}
    cluttered = np.asarray(busy(picture, mask, concept.colour, place))
    subject = np.asarray(mask) > 16
    assert np.array_equal(cluttered[subject], np.asarray(picture)[subject])  # the subject untouched
    assert (cluttered[~subject] != np.asarray(picture)[~subject]).any()  # and clutter around it


def test_each_variant_reaches_the_trainer_as_a_job_would_read_it():
    model = load_base_model(str(MODEL_DIR))
    concept = CONCEPTS[0]
    cropped = variant_data(concept, "tall_cropped", 4, 0, model)
    assert cropped.framed is None and cropped.images.shape == (4, 3, 32, 32)
    (bucketed,) = variant_data(concept, "tall_bucketed", 4, 0, model).framed
    assert bucketed.images.shape == (4, 3, 40, 24) and bucketed.masks is None
    masked = variant_data(concept, "busy_masked", 4, 0, model)
    (square,) = masked.framed
    assert square.masks.shape == (4, 1, 32, 32) and torch.equal(square.images, masked.images)
    assert variant_data(concept, "busy", 4, 0, model).framed is None
