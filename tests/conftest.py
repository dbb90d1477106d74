"""Shared fixtures: tiny diffusers models built from configs and saved to disk (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinv.tiny import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """kind → folder of a saved tiny model: ``sd1`` (epsilon), ``sd2`` (v-prediction), ``sdxl``."""
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny_model(root / kind, kind) for kind in ("sd1", "sd2", "sdxl")}


@pytest.fixture
def images() -> torch.Tensor:
    """Four random 32 px images in [-1, 1]: ``(4, 3, 32, 32)``."""
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
