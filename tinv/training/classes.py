"""Prior-preservation class images, generated once per class prompt and base model, and shared.

DreamBooth (Ruiz et al. 2022, arXiv 2208.12242, section 3.3) keeps the class word's meaning by training
the fine-tuned model, beside the subject's pictures, on pictures the *base* model draws for the bare
class prompt ("a photo of a dog"). A bulk run has many subjects of few classes, so each distinct class
is drawn once: ``{output}/classes/{key}/{i:03d}.png``, then ``class.json`` last (the completion marker).
The key hashes everything the pictures depend on (the prompt, the base model's fingerprint, resolution
and dtype, the count and the sampler settings), so every concept of that class in the run, and every
later run with the same output, reuses them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from tinv import storage
from tinv.evaluation.sampling import SampleRequest, pipeline, png_bytes, sample
from tinv.families.model import BaseModel
from tinv.settings import TrainConfig
from tinv.training.pictures import load_images

MARKER = "class.json"
CLASS_SCHEDULER = "dpm++"
"""Class pictures are drawn with the family's default sampler: Stable Diffusion's multistep DPM-Solver++ (what a
class set's key records; FLUX.1's sets are keyed by its base model too)."""


@dataclass(frozen=True)
class ClassSet:
    """One class prompt's pictures: what they are drawn from, and where they live."""

    prompt: str
    count: int
    steps: int
    guidance: float
    model: dict[str, Any]
    """The base model's ``base_model_fingerprint``, ``resolution`` and ``dtype``."""

    @property
    def concept_id(self) -> str:
        """The dispatcher's name for a task (a class set's is its key)."""
        return self.key

    @property
    def placeholder_token(self) -> str:
        return self.prompt

    @property
    def key(self) -> str:
        blob = json.dumps({**asdict(self), "scheduler": CLASS_SCHEDULER, "seeds": "0..count-1"}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def folder(self, output: str) -> str:
        return storage.join(output, "classes", self.key)

    def uris(self, output: str) -> list[str]:
        return [storage.join(self.folder(output), f"{i:03d}.png") for i in range(self.count)]


def class_set(prompt: str, cfg: TrainConfig, model_info: dict[str, Any]) -> ClassSet:
    """The class set a concept with ``class_prompt`` ``prompt`` trains against under ``cfg``."""
    model = {k: model_info[k] for k in ("base_model_fingerprint", "resolution", "dtype")}
    return ClassSet(prompt, cfg.class_images, cfg.recipe.class_sample_steps, cfg.recipe.class_guidance, model)


def is_done(output: str, cls: ClassSet, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``cls``'s marker is there, and says this very set."""
    try:
        marker = json.loads(storage.read_bytes(storage.join(cls.folder(output), MARKER), storage_options))
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("key") == cls.key


def generate(
    model: BaseModel, sets: list[ClassSet], output: str, batch_size: int = 16,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Draw every set's pictures with the base model, in batches that mix classes (seed i for picture i),
    and write each set's PNGs, then its marker."""
    if not sets:
        return
    drawn_with = {(cls.steps, cls.guidance) for cls in sets}
    if len(drawn_with) != 1:
        raise ValueError(f"class sets of one call share their sampler settings, got {sorted(drawn_with)}")
    (steps, guidance), = drawn_with
    # a class prompt holds no braces (the manifest refuses them), so it formats to itself
    requests = [SampleRequest(c, cls.prompt, i) for c, cls in enumerate(sets) for i in range(cls.count)]
    images = sample(model, [None] * len(sets), requests, steps=steps, guidance=guidance, batch_size=batch_size,
                    pipe=pipeline(model), words=[""] * len(sets))
    start = 0
    for cls in sets:
        mine: np.ndarray = images[start : start + cls.count]
        start += cls.count
        for uri, image in zip(cls.uris(output), mine):
            storage.write_bytes(uri, png_bytes(image), storage_options)
        marker = {"key": cls.key, **asdict(cls), "scheduler": model.family.sampling(model).scheduler}  # as drawn
        storage.write_bytes(storage.join(cls.folder(output), MARKER), json.dumps(marker, indent=2).encode(),
                            storage_options)


def load(output: str, cls: ClassSet, resolution: int, storage_options: dict[str, Any] | None = None
         ) -> torch.Tensor:
    """``(count, 3, H, W)`` in [-1, 1]: a finished set's pictures, as training images are read."""
    return load_images(f"class:{cls.key}", cls.uris(output), resolution, storage_options)
