"""Embedding files that diffusers' ``load_textual_inversion`` and AUTOMATIC1111 load as they are."""

from __future__ import annotations

import torch
from safetensors.torch import save as save_safetensors

from tinv import __version__

DIFFUSERS_NAME = "learned_embeds.safetensors"
SDXL_KEYS = ("clip_l", "clip_g")


def cpu_fp32(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Detached fp32 copies on the CPU, contiguous (as safetensors writes them)."""
    return [v.detach().to("cpu", torch.float32).contiguous().clone() for v in vectors]


def diffusers_embedding(token: str, vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD: ``{token: (n, D)}``. SDXL: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``."""
    tensors = cpu_fp32(vectors)
    if len(tensors) == 1:
        return {token: tensors[0]}
    return dict(zip(SDXL_KEYS, tensors))


def a1111_embedding(vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A1111 ``.safetensors`` layout: SD ``{"emb_params": (n, D)}``; SDXL the clip_l/clip_g pair."""
    tensors = cpu_fp32(vectors)
    if len(tensors) == 1:
        return {"emb_params": tensors[0]}
    return dict(zip(SDXL_KEYS, tensors))


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes, with tinv's version added to the string metadata."""
    return save_safetensors(tensors, metadata={**metadata, "tinv_version": __version__})


def embedding_files(
    concept_id: str, token: str, vectors: list[torch.Tensor], metadata: dict[str, str]
) -> dict[str, bytes]:
    """File name → bytes for a concept's diffusers and A1111 embedding files."""
    meta = {"concept_id": concept_id, "token": token, **metadata}
    return {
        DIFFUSERS_NAME: to_bytes(diffusers_embedding(token, vectors), meta),
        f"{concept_id}.a1111.safetensors": to_bytes(a1111_embedding(vectors), meta),
    }
