"""FLUX.1 [dev] and [schnell]: a rectified-flow transformer conditioned on CLIP-L's pooled text and T5's states.

What tinv does with such a model, the way diffusers' ``FluxPipeline`` and its FLUX training scripts
(``train_dreambooth_lora_flux.py``, ``train_dreambooth_lora_flux_advanced.py``) do it:

- **Conditioning.** CLIP-L's pooled output (at the real end-of-text token: new tokens take the largest ids)
  projects into the time embedding; T5's last hidden state is the transformer's text sequence, with zero
  position ids. [dev] also embeds a guidance value: the scripts' training value, 3.5 (:data:`TRAIN_GUIDANCE`).
- **Latents.** 16-channel VAE latents, ``(z − shift) × scale`` from the VAE config, packed into 2×2 patches
  with their position ids (``FluxPipeline._pack_latents`` / ``_prepare_latent_image_ids``); the prediction is
  unpacked back, so the trainer's per-pixel loss, masks and buckets (multiples of 16 px) are the same as a UNet's.
- **Objective.** Rectified flow (Liu et al. 2022, arXiv 2209.03003; Esser et al. 2024, arXiv 2403.03206): for
  σ = t / T, the noisy latents are ``(1 − σ) x + σ ε`` and the target the velocity ``ε − x``. Timesteps are drawn
  as the scripts draw them: ``u`` from diffusers' ``compute_density_for_timestep_sampling`` (their default
  scheme, ``none``: uniform, whose ``compute_loss_weighting_for_sd3`` weight is 1), an index ``u × T`` into the
  folder's ``FlowMatchEulerDiscreteScheduler``'s timesteps.
- **New vectors.** In CLIP-L, and in T5 when asked (the advanced script's ``--enable_t5_ti``); T5's table is
  padded past its tokenizer (32 128 rows for 32 100 tokens) and is never resized: new tokens are spliced in
  after its last row (:mod:`tinv.training.splice`). Without T5 vectors the concept's word reaches T5 as plain
  text, as it does in every client that loads only the CLIP-L vectors, and T5 encodes each prompt once, when
  its concept is admitted, then leaves the accelerator (:class:`EncodingCache`).
- **LoRA.** On the transformer's attention and feed-forward layers: the DreamBooth-LoRA FLUX script's targets.
- **Files.** diffusers' ``transformer.``-prefixed LoRA (``FluxPipeline.load_lora_weights``); embeddings keyed
  ``clip_l`` / ``t5xxl`` (ComfyUI's keys; diffusers loads them by the two-call form); kohya's metadata
  ``flux1`` with the model spec's ``flux-1-dev`` / ``flux-1-schnell``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from tinv.families import Components, Conditioning, LoraParts, Sampling, contiguous, place
from tinv.families.sd import (
    CLIP_LORA_TARGETS,
    KOHYA_TRAINING_KEYS,
    NESTED,
    fit_clip_names,
    scale_latents,
    scaled,
)
from tinv.families.sdxl import eos_positions

if TYPE_CHECKING:
    from tinv.families.model import BaseModel

TRANSFORMER_LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
"""diffusers' ``train_dreambooth_lora_flux.py`` default ``--lora_layers``: both streams' attention and
feed-forward layers."""
TRAIN_GUIDANCE = 3.5
"""The guidance value [dev] is trained at (the FLUX scripts' ``--guidance_scale`` default)."""
WEIGHTING = "none"
"""The FLUX scripts' default ``--weighting_scheme``: uniform timesteps, unit loss weights."""
T5_MAX_LENGTH = 512
"""T5 tokens per prompt (the FLUX scripts' ``--max_sequence_length``; shorter where the tokenizer says so)."""
CACHED_ROWS = 512
"""Prompt encodings :class:`EncodingCache` keeps per model (enough for every prompt of K packed concepts)."""
FILL_BATCH = 32
"""Prompts T5 encodes in one call when a concept is admitted."""
PARKED = torch.device("cpu")
"""Where T5 waits while no concept's T5 vectors train: host memory, off the accelerator."""


class EncodingCache:
    """A frozen text encoder's states of prompts that carry no new vector, each encoded once (least recently
    used dropped): one per encoder (:meth:`of`). T5 (4.7 B parameters, 9.5 GB in bf16) is encoded a concept's
    prompts at once when it is admitted (:meth:`fill`) and then waits in host memory (:data:`PARKED`) while no
    concept's T5 vectors train; a row holding a new vector, or one the cache misses, brings it back."""

    def __init__(self, size: int = CACHED_ROWS) -> None:
        self.size, self.rows = size, OrderedDict()

    @classmethod
    def of(cls, encoder: torch.nn.Module) -> EncodingCache:
        if getattr(encoder, "_tinv_cache", None) is None:
            encoder._tinv_cache = cls()
        return encoder._tinv_cache

    def encode(self, encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """``encoder``'s last hidden state of ``ids`` ``(B, T)``: from the cache unless a row holds a new token
        (an id past the base table, spliced in by :mod:`tinv.training.splice`), when all are encoded now."""
        if new_tokens(encoder, ids).any():
            place(encoder, ids.device)
            return encoder(ids).last_hidden_state
        keys = self._keys(ids)
        self._encode(encoder, ids, keys)
        out = torch.stack([self.rows[k] for k in keys])
        for k in keys:
            self.rows.move_to_end(k)
        return out

    def fill(self, encoder: torch.nn.Module, ids: torch.Tensor) -> None:
        """Encode the rows of ``ids`` that hold no new token and are not cached yet, in batches."""
        ids = ids[~new_tokens(encoder, ids).any(dim=1)]
        if any(k not in self.rows for k in self._keys(ids)):
            place(encoder, ids.device)  # once for the whole fill, not per chunk (the caller places it after)
        for chunk in ids.split(FILL_BATCH):
            self._encode(encoder, chunk, self._keys(chunk))

    def _keys(self, ids: torch.Tensor) -> list[tuple[str, bytes]]:
        return [(str(ids.device), row.tobytes()) for row in ids.cpu().numpy()]  # one copy off the device

    def _encode(self, encoder: torch.nn.Module, ids: torch.Tensor, keys: list[tuple[str, bytes]]) -> None:
        """Encode the rows of ``ids`` the cache misses, on ``ids``' device, leaving ``encoder`` where it was."""
        missing = [k for k in dict.fromkeys(keys) if k not in self.rows]
        if not missing:
            return
        home = next(encoder.parameters()).device
        place(encoder, ids.device)
        with torch.no_grad():
            states = encoder(torch.stack([ids[keys.index(k)] for k in missing])).last_hidden_state
        place(encoder, home)
        self.rows.update(zip(missing, states))
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)


def new_tokens(encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Where ``ids`` hold a token past the encoder's base table (a concept's new vector), ``(B, T)``."""
    table = encoder.get_input_embeddings()
    return ids >= getattr(table, "base", table).num_embeddings


@dataclass(frozen=True)
class Flux:
    """FLUX.1 [dev] / [schnell] (``FluxPipeline`` folders)."""

    name: str = "flux"
    pipeline_class: type = FluxPipeline
    parts: tuple[str, ...] = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "vae",
                              "scheduler")
    lora_targets: tuple[str, ...] = TRANSFORMER_LORA_TARGETS
    text_lora_targets: tuple[str, ...] = CLIP_LORA_TARGETS
    text_lora_encoders: int = 1
    """A LoRA's text-encoder part sits on CLIP-L alone (the FLUX scripts' ``--train_text_encoder``)."""
    embedding_keys: tuple[str, ...] = ("clip_l", "t5xxl")
    webui_embedding_keys: tuple[str, ...] = ("clip_l", "t5xxl")
    bundle_keys: tuple[str, ...] = ()
    """No web UI reads an embedding bundled in a FLUX LoRA: its users load the embedding file."""
    training_keys: dict[str, str] = field(default_factory=lambda: dict(KOHYA_TRAINING_KEYS))

    def load(self, path: Path, load: Any, dtype: torch.dtype, vae_dtype: torch.dtype) -> Components:
        """CLIP-L (fp32, as every family's vector-holding encoder), T5 in the run's precision (frozen unless its
        vectors train; parked from the start: it reaches the accelerator only to encode), the transformer, the VAE
        and the folder's flow-matching scheduler."""
        tokenizers = [CLIPTokenizer.from_pretrained(path / "tokenizer"),
                      T5TokenizerFast.from_pretrained(path / "tokenizer_2")]
        encoders = [load(CLIPTextModel, "text_encoder"), load(T5EncoderModel, "text_encoder_2", torch_dtype=dtype)]
        transformer = load(FluxTransformer2DModel, "transformer", torch_dtype=dtype)
        vae = load(AutoencoderKL, "vae", torch_dtype=vae_dtype)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
        return Components(tokenizers, encoders, transformer, vae, scheduler, text_dtypes=(None, dtype),
                          text_homes=(None, PARKED))

    def vector_encoders(self, model: BaseModel, t5: bool) -> int:
        """New vectors train in CLIP-L, and in T5 too with ``t5``."""
        return 2 if t5 else 1

    def version(self, model: BaseModel) -> str:
        """``flux-dev`` (a guidance embedding) or ``flux-schnell`` (none)."""
        return "flux-dev" if model.denoiser.config.guidance_embeds else "flux-schnell"

    def resolution(self, model: BaseModel) -> int:
        """The VAE's native size (1 024 px for FLUX.1)."""
        return int(model.vae.config.sample_size)

    def pixel_multiple(self, model: BaseModel) -> int:
        """The VAE's downsampling × the 2×2 packing (16 px)."""
        return model.pixels_per_latent * 2

    def max_lengths(self, model: BaseModel) -> list[int]:
        """CLIP-L's 77 tokens, T5's :data:`T5_MAX_LENGTH` (or its tokenizer's, if shorter)."""
        clip, t5 = model.tokenizers
        return [clip.model_max_length, min(t5.model_max_length, T5_MAX_LENGTH)]

    def encode(self, model: BaseModel, ids: list[torch.Tensor], size: tuple[int, int],
               zeroed: torch.Tensor | None = None) -> Conditioning:
        """CLIP-L's pooled text ``(B, 768)`` at the end-of-text token and T5's states ``(B, T, 4096)``."""
        clip, t5 = model.text_encoders
        final = clip(ids[0]).last_hidden_state
        rows = torch.arange(final.shape[0], device=final.device)
        pooled = final[rows, eos_positions(ids[0], model.tokenizers[0].eos_token_id)]  # after the final norm
        states = EncodingCache.of(t5).encode(t5, ids[1])
        return Conditioning({"hidden": states, "pooled": pooled})

    def prepare(self, model: BaseModel, ids: list[list[torch.Tensor] | None], vector_encoders: int) -> None:
        """T5 encodes the concept's prompts now (:meth:`EncodingCache.fill`), then leaves the accelerator unless
        a concept's T5 vectors train (it stays, for their gradient)."""
        t5 = model.text_encoders[1]
        EncodingCache.of(t5).fill(t5, torch.cat([torch.atleast_2d(batch[1]) for batch in ids if batch is not None]))
        place(t5, model.device if vector_encoders > 1 else PARKED)

    def forces_zeros(self, model: BaseModel) -> bool:
        """An empty prompt is encoded as ``""`` (FLUX.1 draws without a negative prompt)."""
        return False

    def scale_latents(self, model: BaseModel, latents: torch.Tensor) -> torch.Tensor:
        return scale_latents(model, latents)

    def timesteps(self, model: BaseModel, n: int, generator: torch.Generator, low: float, power: float
                  ) -> torch.Tensor:
        """``n`` of the scheduler's timesteps at index ``u × T``, ``u`` from diffusers' density (uniform); a
        :class:`tinv.settings.Recipe` other than the field's narrows it to ``[low, 1)`` and leans it by ``power``."""
        scheduler = model.scheduler
        u = compute_density_for_timestep_sampling(WEIGHTING, n, generator=generator)
        if low or power != 1.0:
            u = low + (1 - low) * u ** (1 / power)
        index = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
        return scheduler.timesteps[index].float()

    def noisy_and_target(self, model: BaseModel, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 − σ) x + σ ε`` and the velocity ``ε − x``, σ = t / T."""
        sigma = (t / model.scheduler.config.num_train_timesteps).to(latents.dtype)[:, None, None, None]
        return (1 - sigma) * latents + sigma * noise, noise - latents

    def predict(self, model: BaseModel, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's velocity on the packed latents, unpacked to ``(B, C, h, w)``."""
        dtype, (b, c, h, w) = model.dtype, noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(dtype), b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        hidden = cond.tensors["hidden"].to(dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = (torch.full((b,), TRAIN_GUIDANCE, device=noisy.device)
                    if model.denoiser.config.guidance_embeds else None)
        out = model.denoiser(hidden_states=packed, timestep=(t / 1000).to(dtype), guidance=guidance,
                             pooled_projections=cond.tensors["pooled"].to(dtype), encoder_hidden_states=hidden,
                             txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        ppl = model.pixels_per_latent
        return FluxPipeline._unpack_latents(out, h * ppl, w * ppl, ppl)

    def pipeline(self, model: BaseModel, scheduler: Any, text_encoders: bool = False) -> FluxPipeline:
        encoders = model.text_encoders if text_encoders else [None, None]
        tokenizers = model.tokenizers if text_encoders else [None, None]
        return FluxPipeline(scheduler=scheduler, vae=model.vae, text_encoder=encoders[0], tokenizer=tokenizers[0],
                            text_encoder_2=encoders[1], tokenizer_2=tokenizers[1], transformer=model.denoiser)

    def sampling(self, model: BaseModel) -> Sampling:
        """The folder's flow-matching Euler sampler: [dev] 28 steps at guidance 3.5 (``FluxPipeline``'s defaults),
        [schnell] 4 steps, no guidance (its model card's)."""
        if model.denoiser.config.guidance_embeds:
            return Sampling("flow-euler", 28, 3.5)
        return Sampling("flow-euler", 4, 0.0)

    def pipeline_embeds(self, cond: Conditioning, uncond: Conditioning) -> dict[str, torch.Tensor]:
        """T5's states and CLIP-L's pooled text (no negative prompt: FLUX.1's guidance is distilled)."""
        return {"prompt_embeds": cond.tensors["hidden"], "pooled_prompt_embeds": cond.tensors["pooled"]}

    def diffusers_lora(self, denoiser: dict[str, torch.Tensor], text: list[dict[str, torch.Tensor]] | None
                       ) -> dict[str, torch.Tensor]:
        """``transformer.`` + the peft key (and ``text_encoder.text_model.`` + CLIP-L's), as
        ``FluxPipeline.save_lora_weights`` writes."""
        out = FluxPipeline.pack_weights(contiguous(denoiser), "transformer")
        for layers in (text or [])[:1]:
            nested = {k if k.startswith(NESTED) else NESTED + k: v for k, v in contiguous(layers).items()}
            out |= FluxPipeline.pack_weights(nested, "text_encoder")
        return out

    def kohya_lora(self, diffusers_state: dict[str, torch.Tensor], text_encoders: int) -> dict[str, torch.Tensor]:
        """The web UIs' file: diffusers' layout, which ComfyUI and Forge both map (``docs/clients.md``)."""
        return diffusers_state

    def read_lora(self, state: dict[str, torch.Tensor], model: BaseModel) -> LoraParts:
        """Any layout ``FluxPipeline.lora_state_dict`` reads (diffusers', kohya's, BFL's) → peft names."""
        converted = FluxPipeline.lora_state_dict(state)
        others = sorted({k.split(".")[0] for k in converted} - {"transformer", "text_encoder"})
        if others:
            raise ValueError(f"only transformer and CLIP-L LoRAs are read; this one also holds {others}")
        part = {k.removeprefix("transformer."): v for k, v in converted.items() if k.startswith("transformer.")}
        text = {k.removeprefix("text_encoder."): v for k, v in converted.items() if k.startswith("text_encoder.")}
        return LoraParts(scaled(part, None), [fit_clip_names(scaled(text, None), model.text_encoders[0])]
                         if text else None)

    def file_metadata(self, model: BaseModel) -> dict[str, str]:
        """kohya's ``flux1`` and the model spec's ``flux-1-dev`` / ``flux-1-schnell``."""
        version = self.version(model)
        return {"family": version, "ss_base_model_version": "flux1",
                "modelspec.architecture": version.replace("flux-", "flux-1-")}


FLUX = Flux()
