"""SDXL: two CLIP text encoders (CLIP-L and OpenCLIP bigG), a UNet with added text-time conditioning.

As diffusers' ``StableDiffusionXLPipeline`` builds it: the penultimate hidden states of both encoders side
by side, the pooled embedding from the second encoder's final state at the real end-of-text token, projected,
and time ids "uncropped, at this size" (Podell et al. 2023, arXiv 2307.01952). New token vectors train in
both encoders. An empty prompt is all zeros where the folder's ``force_zeros_for_empty_prompt`` says so (the
pipeline's default). The files: ``clip_l`` / ``clip_g`` embeddings (the web UIs' keys too), a LoRA with
``lora_te1_`` / ``lora_te2_``, and kohya's ``sdxl_base_v1-0``. The UNet side is :mod:`tinv.families.sd`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tinv.families import Components, Conditioning
from tinv.families.sd import KOHYA_TRAINING_KEYS, StableDiffusion, load_unet_parts, unet_kohya_lora

if TYPE_CHECKING:
    from tinv.families.model import BaseModel

TIME_IDS = 6
"""Original size, crop top-left, target size: two numbers each."""


def eos_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the first end-of-text token in each row of ``ids`` ``(B, T)`` → ``(B,)``."""
    return (ids == eos_id).int().argmax(dim=-1)


@dataclass(frozen=True)
class StableDiffusionXL(StableDiffusion):
    """SDXL (``StableDiffusionXLPipeline`` folders): Stable Diffusion's UNet side with a second text encoder, added
    conditioning and its own files."""

    name: str = "sdxl"
    pipeline_class: type = StableDiffusionXLPipeline
    parts: tuple[str, ...] = ("tokenizer", "text_encoder", "unet", "vae", "scheduler", "tokenizer_2", "text_encoder_2")
    embedding_keys: tuple[str, ...] = ("clip_l", "clip_g")
    webui_embedding_keys: tuple[str, ...] = ("clip_l", "clip_g")
    bundle_keys: tuple[str, ...] = ("clip_l", "clip_g")
    training_keys: dict[str, str] = field(default_factory=lambda: dict(KOHYA_TRAINING_KEYS))

    def load(self, path: Path, load: Any, dtype: torch.dtype, vae_dtype: torch.dtype) -> Components:
        unet, vae, scheduler = load_unet_parts(path, load, dtype, vae_dtype)
        tokenizers = [CLIPTokenizer.from_pretrained(path / p) for p in ("tokenizer", "tokenizer_2")]
        encoders = [load(CLIPTextModel, "text_encoder"), load(CLIPTextModelWithProjection, "text_encoder_2")]
        return Components(tokenizers, encoders, unet, vae, scheduler)

    def version(self, model: BaseModel) -> str:
        return "sdxl"

    def encode(self, model: BaseModel, ids: list[torch.Tensor], size: tuple[int, int],
               zeroed: torch.Tensor | None = None) -> Conditioning:
        """Both encoders' penultimate states ``(B, T, D_1 + D_2)``, the pooled text ``(B, P)`` (never at the
        largest token id, which new tokens would hijack) and time ids for ``size`` (height, width in pixels);
        rows marked in ``zeroed`` ``(B,)`` all zeros (what the pipeline gives an empty prompt that
        :meth:`forces_zeros`)."""
        hidden = []
        for encoder, row in zip(model.text_encoders, ids):
            out = encoder(row, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (B, T, D_e)
        final = out.last_hidden_state  # (B, T, D_2), after the final layer norm
        rows = torch.arange(final.shape[0], device=final.device)
        pooled = model.text_encoders[1].text_projection(final[rows, eos_positions(ids[1], model.tokenizers[1]
                                                                                  .eos_token_id)])  # (B, P)
        height, width = size
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=pooled.device, dtype=pooled.dtype)
        states = torch.cat(hidden, dim=-1)
        if zeroed is not None:
            keep = (~zeroed).to(states.dtype)
            states, pooled = states * keep[:, None, None], pooled * keep[:, None].to(pooled.dtype)
        return Conditioning({"hidden": states, "text_embeds": pooled,
                             "time_ids": time_ids.expand(pooled.shape[0], TIME_IDS)})

    def forces_zeros(self, model: BaseModel) -> bool:
        """The folder's ``force_zeros_for_empty_prompt`` (the pipeline's default when unsaid: True)."""
        index = Path(model.local_dir) / "model_index.json"
        config = json.loads(index.read_text()) if index.is_file() else {}
        return bool(config.get("force_zeros_for_empty_prompt", True))

    def pipeline(self, model: BaseModel, scheduler: Any, text_encoders: bool = False) -> StableDiffusionXLPipeline:
        encoders = model.text_encoders if text_encoders else [None, None]
        tokenizers = model.tokenizers if text_encoders else [None, None]
        return StableDiffusionXLPipeline(
            force_zeros_for_empty_prompt=self.forces_zeros(model), vae=model.vae, text_encoder=encoders[0],
            text_encoder_2=encoders[1], tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=model.denoiser,
            scheduler=scheduler, add_watermarker=False)

    def pipeline_embeds(self, cond: Conditioning, uncond: Conditioning) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": cond.tensors["hidden"], "negative_prompt_embeds": uncond.tensors["hidden"],
                "pooled_prompt_embeds": cond.tensors["text_embeds"],
                "negative_pooled_prompt_embeds": uncond.tensors["text_embeds"]}

    def kohya_lora(self, diffusers_state: dict[str, torch.Tensor], text_encoders: int) -> dict[str, torch.Tensor]:
        return unet_kohya_lora(diffusers_state, single_text=False)

    def file_metadata(self, model: BaseModel) -> dict[str, str]:
        return {"family": "sdxl", "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
                "modelspec.architecture": "stable-diffusion-xl-v1-base"}


SDXL = StableDiffusionXL()
