"""Embedding files that diffusers' ``load_textual_inversion`` and AUTOMATIC1111 load as they are, written
byte-reproducibly (:func:`canonical`)."""

from __future__ import annotations

import io
import json

import torch
from safetensors.torch import save as save_safetensors

from tinv import __version__
from tinv.webui import embedding_path

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


def canonical(data: bytes) -> bytes:
    """safetensors ``data`` with its header's ``__metadata__`` map in sorted key order, so the same tensors and
    metadata give the same bytes. safetensors writes that map in a random order on every save
    (safetensors#584; 19–20 distinct sha256 in 20 writes); the tensors, their order and offsets are kept."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Reproducible safetensors bytes, with tinv's version added to the string metadata."""
    return canonical(save_safetensors(tensors, metadata={**metadata, "tinv_version": __version__}))


def embedding_files(
    concept_id: str, token: str, trigger: str, vectors: list[torch.Tensor], metadata: dict[str, str]
) -> dict[str, bytes]:
    """File name → bytes for a concept's diffusers embedding and its web-UI one (named for its trigger)."""
    meta = {"concept_id": concept_id, "token": token, "trigger": trigger, **metadata}
    return {
        DIFFUSERS_NAME: to_bytes(diffusers_embedding(token, vectors), meta),
        embedding_path(trigger): to_bytes(a1111_embedding(vectors), meta),
    }


CONCEPTS_LIBRARY = "concepts-library"
"""Folder of the sd-concepts-library layout (``--export concepts-library``)."""


def concepts_library_files(token: str, vectors: list[torch.Tensor], learnable_property: str) -> dict[str, bytes]:
    """The sd-concepts-library layout, which its notebooks and ``load_textual_inversion(folder)`` load:
    ``learned_embeds.bin`` (``torch.save`` of diffusers' ``{token: (n, D)}``; SDXL the clip_l/clip_g pair),
    ``token_identifier.txt`` (the token) and ``type_of_concept.txt`` (``object`` or ``style``)."""
    sink = io.BytesIO()
    torch.save(diffusers_embedding(token, vectors), sink)
    return {f"{CONCEPTS_LIBRARY}/learned_embeds.bin": sink.getvalue(),
            f"{CONCEPTS_LIBRARY}/token_identifier.txt": token.encode(),
            f"{CONCEPTS_LIBRARY}/type_of_concept.txt": learnable_property.encode()}
