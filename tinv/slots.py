"""New token vectors spliced into a frozen text encoder's token-embedding lookup.

The base embedding table is never touched: ids below its size read it as before, ids of
slot tokens read trainable fp32 slot vectors. Slot ``s`` vector ``j`` is named in the
tokenizer by its own internal token ``<tinv-slot{s}-{j}>``, added once and reused, so one
vocabulary serves every concept a trainer or sampler ever sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tinv.errors import ModelLayoutError
from tinv.models import BaseModel


class SlotEmbedding(nn.Module):
    """Token lookup: base ids → frozen ``base``; slot-token ids → the slot vectors."""

    def __init__(self, base: nn.Embedding, vectors: list[nn.Parameter], ids: list[list[int]]) -> None:
        super().__init__()
        self.base = base
        self.vectors = vectors  # a plain list: the parameters belong to the trainer, not the encoder
        vocab, width = base.num_embeddings, vectors[0].shape[0]
        lookup = torch.zeros(max(i for row in ids for i in row) - vocab + 1, dtype=torch.long)
        for s, row in enumerate(ids):
            for j, token_id in enumerate(row):
                lookup[token_id - vocab] = s * width + j  # row of the flattened (S * M, D) table
        self.register_buffer("lookup", lookup.to(base.weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, D)
        vocab = self.base.num_embeddings
        new = ids >= vocab  # (B, T)
        out = self.base(torch.where(new, 0, ids))  # (B, T, D) frozen dtype
        table = torch.stack(self.vectors).flatten(0, 1)  # (S * M, D) fp32
        rows = self.lookup[(ids - vocab).clamp(0, len(self.lookup) - 1)]  # (B, T)
        return torch.where(new[..., None], table[rows].to(out.dtype), out)


def slot_token_names(slots: int, max_vectors: int) -> list[list[str]]:
    """Internal token names, ``[slot][vector]``."""
    return [[f"<tinv-slot{s}-{j}>" for j in range(max_vectors)] for s in range(slots)]


def register_slot_tokens(model: BaseModel, names: list[list[str]]) -> list[list[list[int]]]:
    """Add any missing slot tokens to every tokenizer; their ids per encoder, ``[e][slot][vector]``."""
    out = []
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        vocab_size = encoder.get_input_embeddings().num_embeddings
        missing = [n for row in names for n in row if n not in tokenizer.get_vocab()]
        if missing:
            if len(tokenizer) < vocab_size or not all(
                t.startswith("<tinv-slot") for t in tokenizer.convert_ids_to_tokens(range(vocab_size, len(tokenizer)))
            ):
                raise ModelLayoutError(
                    f"tokenizer has {len(tokenizer)} tokens but its text encoder has {vocab_size} embedding rows"
                )
            tokenizer.add_tokens(missing)
        out.append([tokenizer.convert_tokens_to_ids(row) for row in names])
        if min(i for row in out[-1] for i in row) < vocab_size:
            raise ModelLayoutError("a slot token got an id inside the base vocabulary")
    return out


@contextmanager
def spliced(model: BaseModel, vectors: list[list[nn.Parameter]], ids: list[list[list[int]]]) -> Iterator[None]:
    """Within the block, encoder ``e`` looks slot ``s`` up in ``vectors[s][e]`` at ids ``ids[e][s]``."""
    embeddings = [te.get_input_embeddings() for te in model.text_encoders]
    try:
        for e, (encoder, base) in enumerate(zip(model.text_encoders, embeddings)):
            encoder.set_input_embeddings(SlotEmbedding(base, [row[e] for row in vectors], ids[e]))
        yield
    finally:
        for encoder, base in zip(model.text_encoders, embeddings):
            encoder.set_input_embeddings(base)
