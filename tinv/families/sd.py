"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, a 4-channel VAE, epsilon or v-prediction.

What tinv does with such a model, the way diffusers' ``StableDiffusionPipeline`` and its training examples do
it: the UNet reads the text encoder's last hidden state; training noises latents with the DDPM scheduler of
the folder and regresses the noise (epsilon) or the velocity (v-prediction, SD 2.x 768), as its config says
(Ho et al. 2020; Salimans & Ho 2022); a LoRA sits on the UNet's attention projections (diffusers'
``train_dreambooth_lora.py``). The files: diffusers' ``{token: (n, D)}`` embedding and ``unet.``-prefixed
LoRA, AUTOMATIC1111's ``emb_params`` embedding, kohya's ``lora_unet_`` / ``lora_te_`` LoRA with
``bundle_emb.<token>.string_to_param.*``, and kohya's metadata (``ss_base_model_version`` ``sd_v1`` or
``sd_v2``, ``sd_v2_v``, ``ss_v2``, ``modelspec.architecture``).

:mod:`tinv.families.sdxl` reuses the UNet-side functions of this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from tinv.families import Components, Conditioning, LoraParts, Sampling, contiguous

if TYPE_CHECKING:
    from tinv.families.model import BaseModel

UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
"""The UNet's attention projections: the targets of diffusers' ``train_dreambooth_lora.py``."""
CLIP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""A CLIP text encoder's attention projections: that script's targets with ``--train_text_encoder``."""
TEXT_PARTS = ("text_encoder", "text_encoder_2")
"""diffusers' names of a pipeline's text encoders, the prefixes of their LoRA keys."""
KOHYA_TRAINING_KEYS = {"ss_max_train_steps": "steps", "ss_seed": "seed", "ss_batch_size_per_device": "batch_size",
                       "ss_learning_rate": "lora_learning_rate", "ss_unet_lr": "lora_learning_rate",
                       "ss_text_encoder_lr": "lora_text_encoder_learning_rate",
                       "ss_caption_dropout_rate": "caption_dropout", "ss_prior_loss_weight": "prior_loss_weight"}
"""kohya's ``ss_`` metadata keys (what sd-scripts writes and the web UIs' LoRA cards show) → tinv's settings."""
NESTED = "text_model."
"""The CLIP text model's inner module in the published checkpoints' names (flattened in recent transformers)."""


# -- the UNet side, shared with SDXL --------------------------------------------------------------
def load_unet_parts(path: Path, load: Any, dtype: torch.dtype, vae_dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """The UNet (in ``dtype``), the VAE (in ``vae_dtype``) and the folder's DDPM training scheduler."""
    unet = load(UNet2DConditionModel, "unet", torch_dtype=dtype)
    vae = load(AutoencoderKL, "vae", torch_dtype=vae_dtype)
    return unet, vae, DDPMScheduler.from_pretrained(path / "scheduler")


def unet_resolution(model: BaseModel) -> int:
    """The UNet's native image size in pixels."""
    return model.denoiser.config.sample_size * model.pixels_per_latent


def unet_pixel_multiple(model: BaseModel) -> int:
    """A side's multiple: the VAE's and the UNet's downsampling together (SD: 8 × 8 = 64)."""
    return model.pixels_per_latent * 2 ** (len(model.denoiser.config.block_out_channels) - 1)


def scale_latents(model: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's latents as the UNet sees them: ``(z − shift) × scale`` from the VAE config."""
    vae = model.vae.config
    return (latents - (getattr(vae, "shift_factor", None) or 0.0)) * vae.scaling_factor


def ddpm_timesteps(model: BaseModel, n: int, generator: torch.Generator, low: float, power: float) -> torch.Tensor:
    """``n`` DDPM timesteps in ``[low × T, T)`` of the scheduler's ``T``: uniform (``power`` 1, the recipes' draw),
    or with density ∝ (t − low·T)^(power − 1), leaning to the noisy end."""
    total = model.scheduler.config.num_train_timesteps
    lo = int(low * total)
    if power == 1.0:
        return torch.randint(lo, total, (n,), generator=generator)
    u = torch.rand(n, generator=generator)
    return (lo + (total - lo) * u ** (1 / power)).long().clamp(max=total - 1)


def ddpm_noisy_and_target(model: BaseModel, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's noisy latents at ``t``, and the target its config names: the noise (``epsilon``) or the
    velocity (``v_prediction``)."""
    scheduler = model.scheduler
    noisy = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noisy, noise
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"prediction type {kind!r} is not trained by tinv (epsilon, v_prediction)")


def unet_predict(model: BaseModel, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's prediction, in its dtype: text states as ``encoder_hidden_states``, the rest as added
    conditions (SDXL's pooled text and time ids)."""
    dtype, tensors = model.dtype, dict(cond.tensors)
    hidden = tensors.pop("hidden").to(dtype)
    added = {k: v.to(dtype) for k, v in tensors.items()} or None
    return model.denoiser(noisy.to(dtype), t, hidden, added_cond_kwargs=added).sample


def unet_diffusers_lora(denoiser: dict[str, torch.Tensor], text: list[dict[str, torch.Tensor]] | None
                        ) -> dict[str, torch.Tensor]:
    """peft-named UNet LoRA (and text encoders' LoRAs) → diffusers' pipeline layout (``unet.`` + the key,
    ``text_encoder.text_model.`` + the key …)."""
    out = StableDiffusionPipeline.pack_weights(contiguous(denoiser), "unet")
    for part, layers in zip(TEXT_PARTS, text or []):
        nested = {k if k.startswith(NESTED) else NESTED + k: v for k, v in contiguous(layers).items()}
        out |= StableDiffusionPipeline.pack_weights(nested, part)
    return out


def unet_kohya_lora(diffusers_state: dict[str, torch.Tensor], single_text: bool) -> dict[str, torch.Tensor]:
    """diffusers' layout → kohya's (``lora_unet_…``, ``lora_down`` / ``lora_up`` / ``alpha``), through diffusers'
    ``convert_state_dict_to_kohya``; one text encoder's keys are ``lora_te_…`` (kohya's SD 1/2 name; the
    converter writes SDXL's ``lora_te1_``)."""
    out = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(diffusers_state).items()}
    if single_text:
        out = {k.replace("lora_te1_", "lora_te_", 1) if k.startswith("lora_te1_") else k: v for k, v in out.items()}
    return out


def unet_read_lora(state: dict[str, torch.Tensor], encoders: list[nn.Module]) -> LoraParts:
    """Either layout (diffusers', or kohya's with ``alpha``), through diffusers' own ``lora_state_dict``
    conversion, text-encoder parts included, fitted to ``encoders``' naming. Per-layer alphas are refused."""
    converted, alphas = StableDiffusionPipeline.lora_state_dict(state)
    others = sorted({k.split(".")[0] for k in converted} - {"unet", *TEXT_PARTS})
    if others:
        raise ValueError(f"only UNet and text-encoder LoRAs are read; this one also holds {others}")
    values = set((alphas or {}).values())
    if len(values) > 1:
        raise ValueError(f"per-layer LoRA alphas are not supported: {sorted(values)}")
    alpha = float(values.pop()) if values else None
    unet = scaled(convert_unet_state_dict_to_peft(_part(converted, "unet")), alpha)
    present = [i for i, part in enumerate(TEXT_PARTS) if any(k.startswith(part + ".") for k in converted)]
    text = [fit_clip_names(scaled(convert_state_dict_to_peft(convert_state_dict_to_diffusers(_part(converted, part))),
                                  alpha), encoder)
            for part, encoder in zip(TEXT_PARTS[: present[-1] + 1], encoders)] if present else []
    return LoraParts(unet, text or None)  # SDXL's second encoder alone: the first gets {}


def fit_clip_names(state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP LoRA's peft names (``text_model.encoder.…`` as published) as the installed ``encoder`` names its
    modules: nested in some transformers classes and versions, flattened in others."""
    if hasattr(encoder, "text_model"):
        return {k if k.startswith(NESTED) else NESTED + k: v for k, v in state.items()}
    return {k.removeprefix(NESTED): v for k, v in state.items()}


def _part(converted: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """The keys of one of a pipeline's parts (``unet``, ``text_encoder`` …), without its prefix."""
    return {k.removeprefix(part + "."): v for k, v in converted.items() if k.startswith(part + ".")}


def scaled(peft: dict[str, torch.Tensor], alpha: float | None) -> dict[str, torch.Tensor]:
    """fp32, with a file's ``alpha / rank`` folded into each ``lora_B`` (alpha = rank from then on)."""
    if alpha is not None:
        peft = {k: v * (alpha / peft[k.replace("lora_B", "lora_A")].shape[0]) if ".lora_B." in k else v
                for k, v in peft.items()}
    return {k: v.float() for k, v in peft.items()}


# -- the family ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StableDiffusion:
    """Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline`` folders)."""

    name: str = "sd"
    pipeline_class: type = StableDiffusionPipeline
    parts: tuple[str, ...] = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
    lora_targets: tuple[str, ...] = UNET_LORA_TARGETS
    text_lora_targets: tuple[str, ...] = CLIP_LORA_TARGETS
    text_lora_encoders: int = 2
    """Every text encoder (SD has one, SDXL two)."""
    embedding_keys: tuple[str, ...] = ()
    """diffusers' embedding file is keyed by the token itself (``{token: (n, D)}``)."""
    webui_embedding_keys: tuple[str, ...] = ("emb_params",)
    """AUTOMATIC1111's ``.safetensors`` embedding layout."""
    bundle_keys: tuple[str, ...] = ("string_to_param.*",)
    """An embedding bundled in a kohya LoRA: ``bundle_emb.<token>.<key>`` (AUTOMATIC1111's)."""
    training_keys: dict[str, str] = field(default_factory=lambda: dict(KOHYA_TRAINING_KEYS))

    def load(self, path: Path, load: Any, dtype: torch.dtype, vae_dtype: torch.dtype) -> Components:
        unet, vae, scheduler = load_unet_parts(path, load, dtype, vae_dtype)
        return Components([CLIPTokenizer.from_pretrained(path / "tokenizer")], [load(CLIPTextModel, "text_encoder")],
                          unet, vae, scheduler)

    def vector_encoders(self, model: BaseModel, t5: bool) -> int:
        """Every text encoder holds the new vectors."""
        return len(model.text_encoders)

    def max_lengths(self, model: BaseModel) -> list[int]:
        return [tokenizer.model_max_length for tokenizer in model.tokenizers]

    def version(self, model: BaseModel) -> str:
        """``sd1`` or ``sd2``: SD 2.x has the 1 024-wide OpenCLIP text encoder, or predicts the velocity."""
        wide = model.embedding_dims[0] >= 1024
        return "sd2" if wide or model.scheduler.config.prediction_type == "v_prediction" else "sd1"

    def resolution(self, model: BaseModel) -> int:
        return unet_resolution(model)

    def pixel_multiple(self, model: BaseModel) -> int:
        return unet_pixel_multiple(model)

    def encode(self, model: BaseModel, ids: list[torch.Tensor], size: tuple[int, int],
               zeroed: torch.Tensor | None = None) -> Conditioning:
        """The text encoder's last hidden state ``(B, T, D)``; an empty prompt is encoded as ``""`` (never zeros)."""
        return Conditioning({"hidden": model.text_encoders[0](ids[0]).last_hidden_state})

    def prepare(self, model: BaseModel, ids: list[list[torch.Tensor] | None], vector_encoders: int) -> None:
        """Nothing: CLIP's encoders are small and run on every step."""

    def forces_zeros(self, model: BaseModel) -> bool:
        """SD 1/2 pipelines encode an empty negative prompt as ``""``."""
        return False

    def scale_latents(self, model: BaseModel, latents: torch.Tensor) -> torch.Tensor:
        return scale_latents(model, latents)

    def timesteps(self, model: BaseModel, n: int, generator: torch.Generator, low: float, power: float
                  ) -> torch.Tensor:
        return ddpm_timesteps(model, n, generator, low, power)

    def noisy_and_target(self, model: BaseModel, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        return ddpm_noisy_and_target(model, latents, noise, t)

    def predict(self, model: BaseModel, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return unet_predict(model, noisy, t, cond)

    def pipeline(self, model: BaseModel, scheduler: Any, text_encoders: bool = False) -> StableDiffusionPipeline:
        """A ``StableDiffusionPipeline`` over the loaded modules (without the text encoder unless asked: tinv
        passes ``prompt_embeds``)."""
        return StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0] if text_encoders else None,
            tokenizer=model.tokenizers[0] if text_encoders else None, unet=model.denoiser, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def pipeline_embeds(self, cond: Conditioning, uncond: Conditioning) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": cond.tensors["hidden"], "negative_prompt_embeds": uncond.tensors["hidden"]}

    def sampling(self, model: BaseModel) -> Sampling:
        """Multistep DPM-Solver++, 25 steps, guidance 5."""
        return Sampling("dpm++", 25, 5.0)

    def diffusers_lora(self, denoiser: dict[str, torch.Tensor], text: list[dict[str, torch.Tensor]] | None
                       ) -> dict[str, torch.Tensor]:
        return unet_diffusers_lora(denoiser, text)

    def kohya_lora(self, diffusers_state: dict[str, torch.Tensor], text_encoders: int) -> dict[str, torch.Tensor]:
        return unet_kohya_lora(diffusers_state, single_text=text_encoders == 1)

    def read_lora(self, state: dict[str, torch.Tensor], model: BaseModel) -> LoraParts:
        return unet_read_lora(state, model.text_encoders)

    def file_metadata(self, model: BaseModel) -> dict[str, str]:
        """kohya's and the model spec's base-model keys, which AUTOMATIC1111 lists a LoRA under (``sd_v1``,
        ``sd_v2`` + ``ss_v2``)."""
        v2 = self.version(model) == "sd2"
        v_pred = model.scheduler.config.prediction_type == "v_prediction"
        arch = "stable-diffusion-v1" if not v2 else "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
        version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_pred else "")  # kohya's model_util naming
        return {"family": self.version(model), "ss_base_model_version": version, "ss_v2": str(v2),
                "modelspec.architecture": arch}


SD = StableDiffusion()
