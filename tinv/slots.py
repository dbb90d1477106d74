"""New token vectors spliced into a frozen text encoder's token-embedding lookup.

The base embedding table is never touched: ids below its size read it as before, ids at or
above it read trainable fp32 slot vectors. Each slot holds up to ``max_vectors`` vectors and
is named in the tokenizer by its own internal tokens (``<tinv-slot{s}-{j}>``), so one fixed
vocabulary serves every concept a trainer ever sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tinv.models import BaseModel, ModelLayoutError


class SlotEmbedding(nn.Module):
    """Token lookup: ``ids < V`` → frozen ``base``; ``ids >= V`` → the slot vectors."""

    def __init__(self, base: nn.Embedding, vectors: list[nn.Parameter]) -> None:
        super().__init__()
        self.base = base
        self.vectors = vectors  # a plain list: the parameters belong to the trainer, not the encoder

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, D)
        vocab = self.base.num_embeddings
        new = ids >= vocab  # (B, T)
        out = self.base(torch.where(new, 0, ids))  # (B, T, D) frozen dtype
        table = torch.stack(self.vectors).flatten(0, 1)  # (S * M, D) fp32
        picked = table[(ids - vocab).clamp(min=0)]  # (B, T, D)
        return torch.where(new[..., None], picked.to(out.dtype), out)


def slot_token_names(slots: int, max_vectors: int) -> list[list[str]]:
    """Internal token names, ``[slot][vector]``."""
    return [[f"<tinv-slot{s}-{j}>" for j in range(max_vectors)] for s in range(slots)]


def register_slot_tokens(model: BaseModel, names: list[list[str]]) -> None:
    """Add the slot tokens to every tokenizer, right after the base vocabulary (idempotent)."""
    flat = [n for row in names for n in row]
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        vocab_size = encoder.get_input_embeddings().num_embeddings
        known = tokenizer.get_vocab()
        if flat[0] not in known:
            if len(tokenizer) != vocab_size:
                raise ModelLayoutError(
                    f"tokenizer has {len(tokenizer)} tokens but its text encoder has {vocab_size} embedding rows"
                )
            tokenizer.add_tokens(flat)
        ids = tokenizer.convert_tokens_to_ids(flat)
        if ids != list(range(vocab_size, vocab_size + len(flat))):
            raise ModelLayoutError("slot tokens did not get the ids right after the base vocabulary")


@contextmanager
def spliced(model: BaseModel, vectors: list[list[nn.Parameter]]) -> Iterator[None]:
    """Within the block, each text encoder looks slot tokens up in ``vectors[slot][encoder]``."""
    embeddings = [te.get_input_embeddings() for te in model.text_encoders]
    try:
        for e, (encoder, base) in enumerate(zip(model.text_encoders, embeddings)):
            encoder.set_input_embeddings(SlotEmbedding(base, [row[e] for row in vectors]))
        yield
    finally:
        for encoder, base in zip(model.text_encoders, embeddings):
            encoder.set_input_embeddings(base)
