"""Helpers for the tests on tiny models: pictures a model draws, as a job's class pictures are."""

from __future__ import annotations

import torch

from tinv.evaluation.sampling import SampleRequest, sample
from tinv.families.model import BaseModel
from tinv.manifest import ConceptSpec
from tinv.plan import config_fingerprint, resolve
from tinv.settings import TrainConfig


def class_pictures(model: BaseModel, prompt: str, n: int) -> torch.Tensor:
    """``n`` pictures ``(n, 3, H, W)`` in [-1, 1] the model draws for ``prompt`` (seeds 0 … n − 1, 2 steps)."""
    drawn = sample(model, [None], [SampleRequest(0, prompt, i) for i in range(n)], steps=2, words=[""])
    return torch.from_numpy(drawn).permute(0, 3, 1, 2).float() / 127.5 - 1


def fingerprint(spec: ConceptSpec, cfg: TrainConfig, model: dict, *args, **kwargs) -> str:
    """The config fingerprint of ``spec`` under ``cfg``, resolved as the driver resolves it."""
    return config_fingerprint(resolve(spec, cfg), cfg, model, *args, **kwargs)
