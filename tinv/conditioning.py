"""Text conditioning for the UNet, the way diffusers' SD and SDXL pipelines build it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tinv.models import BaseModel


def eos_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the first end-of-text token in each row of ``ids`` ``(B, T)`` → ``(B,)``."""
    return (ids == eos_id).int().argmax(dim=-1)


def forces_zeros(model: BaseModel) -> bool:
    """Does the model's pipeline condition an empty negative prompt on zeros, not on the encoding of ``""``?
    SDXL: its folder's ``force_zeros_for_empty_prompt`` (the pipeline's default when unsaid: True; SDXL base
    says so). SD 1/2 pipelines have no such setting: never."""
    if not model.is_sdxl:
        return False
    index = Path(model.local_dir) / "model_index.json"
    config = json.loads(index.read_text()) if index.is_file() else {}
    return bool(config.get("force_zeros_for_empty_prompt", True))


def encode_prompts(
    model: BaseModel, ids: list[torch.Tensor], size: int | tuple[int, int], zeroed: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Token ids per text encoder ``(B, T)`` → UNet ``encoder_hidden_states`` and added conditions.

    SD 1/2: the last hidden state of the one encoder. SDXL: the penultimate hidden states of
    both encoders side by side; the pooled embedding is the second encoder's final state at
    the real end-of-text token, projected (never the largest token id, which new tokens
    would hijack); time ids say "uncropped, ``size``" (pixels: square, or ``(height, width)``). SDXL rows
    marked in ``zeroed`` ``(B,)`` get all-zero hidden states and pooled embedding (what its pipeline
    gives an empty prompt when it :func:`forces_zeros`).
    """
    if not model.is_sdxl:
        return model.text_encoders[0](ids[0]).last_hidden_state, None  # (B, T, D)
    hidden = []
    for encoder, row in zip(model.text_encoders, ids):
        out = encoder(row, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # (B, T, D_e)
    encoder2, ids2 = model.text_encoders[1], ids[1]
    final = out.last_hidden_state  # (B, T, D_2), after the final layer norm
    rows = torch.arange(final.shape[0], device=final.device)
    at_eos = final[rows, eos_positions(ids2, model.tokenizers[1].eos_token_id)]
    pooled = encoder2.text_projection(at_eos)  # (B, P)
    height, width = (size, size) if isinstance(size, int) else size
    time_ids = torch.tensor([height, width, 0, 0, height, width], device=pooled.device, dtype=pooled.dtype)
    states = torch.cat(hidden, dim=-1)  # (B, T, D_1 + D_2)
    if zeroed is not None:
        keep = (~zeroed).to(states.dtype)
        states, pooled = states * keep[:, None, None], pooled * keep[:, None].to(pooled.dtype)
    return states, {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], 6)}
