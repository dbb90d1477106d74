"""Load a frozen diffusers-layout base model (SD 1.x, SD 2.x, SDXL) from any URI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tinv.errors import ModelLayoutError
from tinv.fingerprint import FINGERPRINT_VERSION, model_fingerprint, weight_choice
from tinv.hub import DEFAULT_CACHE, model_dir
from tinv.prompts import EVAL_PROMPTS, TEMPLATES

SD_PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
SDXL_PARTS = (*SD_PARTS, "tokenizer_2", "text_encoder_2")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPLATES_FILE = "tinv_templates.json"
VAE_PIXELS_PER_CHUNK = 8 * 512 * 512
"""Pixels the VAE encodes in one call: 8 images at 512 px, 2 at 1024 px, more when small."""


@dataclass
class BaseModel:
    """A frozen text-to-image model, ready for Textual Inversion."""

    uri: str
    """Where it was loaded from (hub id, folder or fsspec URI)."""
    local_dir: Path
    """The local diffusers folder it was read from."""
    tokenizers: list[CLIPTokenizer]
    """One tokenizer per text encoder."""
    text_encoders: list[torch.nn.Module]
    """``[CLIPTextModel]`` for SD 1/2; ``[CLIPTextModel, CLIPTextModelWithProjection]`` for SDXL."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    """The training noise scheduler (its config gives the prediction type)."""
    device: torch.device
    dtype: torch.dtype
    """Dtype of the frozen UNet (the VAE's is :func:`vae_dtype`, the text encoders' fp32 by default)."""
    fingerprint: str
    """The base-model fingerprint (:mod:`tinv.fingerprint`): its files, format 2."""
    templates: dict[str, tuple[str, ...]]
    """Training prompt templates per property: tinv's defaults, or the folder's ``tinv_templates.json``."""
    eval_prompts: dict[str, tuple[str, ...]]
    """Default evaluation prompts per property (``eval`` in ``tinv_templates.json``, else tinv's)."""

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def pixels_per_latent(self) -> int:
        """The VAE's downsampling: a latent pixel's side in image pixels (SD: 8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The UNet's native image size in pixels."""
        return self.unet.config.sample_size * self.pixels_per_latent

    @property
    def embedding_dims(self) -> list[int]:
        return [te.get_input_embeddings().embedding_dim for te in self.text_encoders]

    @property
    def info(self) -> dict[str, str]:
        """What a result file (and an embedding's metadata) records about the base model."""
        return {"base_model": self.uri, "base_model_fingerprint": self.fingerprint,
                "fingerprint_version": str(FINGERPRINT_VERSION)}

    @property
    def templates_digest(self) -> str:
        """sha256 of the training prompt templates (they shape what is learned)."""
        return hashlib.sha256(json.dumps(self.templates, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def encode_latents(model: BaseModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent mean and std of ``images`` ``(N, 3, H, W)`` in [-1, 1], fp32, ``(N, C, h, w)`` each,
    in calls of at most :data:`VAE_PIXELS_PER_CHUNK` pixels."""
    vae = model.vae
    means, stds = [], []
    for chunk in images.split(max(1, VAE_PIXELS_PER_CHUNK // (images.shape[-1] * images.shape[-2]))):
        dist = vae.encode(chunk.to(model.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def resolve_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The frozen UNet's dtype. ``auto``: bf16 on a CUDA device that supports it, fp16 on one that does not
    (the trainer then scales each slot's loss), fp32 elsewhere; else ``fp32``/``bf16``/``fp16`` as asked."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


def check_layout(path: Path, uri: str) -> bool:
    """Raise if a part is missing; return True for an SDXL layout."""
    if not path.is_dir():
        raise ModelLayoutError(f"no model folder at {uri!r}")
    missing = [p for p in SD_PARTS if not (path / p).is_dir()]
    if missing:
        raise ModelLayoutError(
            f"{uri!r} is not a diffusers Stable Diffusion layout: missing {', '.join(p + '/' for p in missing)}"
        )
    has_second = [(path / p).is_dir() for p in ("tokenizer_2", "text_encoder_2")]
    if any(has_second) and not all(has_second):
        raise ModelLayoutError(f"{uri!r} has only one of tokenizer_2/ and text_encoder_2/")
    return all(has_second)


def set_attention(modules: list[torch.nn.Module], attention: str) -> None:
    """``sdpa`` (PyTorch scaled_dot_product_attention) or ``xformers`` (must be installed)."""
    if attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise RuntimeError("attention='xformers' was asked for but xformers is not installed")
        for m in modules:
            m.enable_xformers_memory_efficient_attention()
    elif attention == "sdpa":
        for m in modules:
            m.set_attn_processor(AttnProcessor2_0())
    else:
        raise ValueError(f"attention must be 'sdpa' or 'xformers', got {attention!r}")


def load_base_model(
    uri: str,
    *,
    device: str | torch.device | None = None,
    precision: str = "auto",
    attention: str = "sdpa",
    gradient_checkpointing: bool = False,
    text_encoder_dtype: torch.dtype = torch.float32,
    cache_dir: str | Path = DEFAULT_CACHE,
    storage_options: dict[str, Any] | None = None,
) -> BaseModel:
    """Load tokenizer(s), text encoder(s), UNet, VAE and scheduler, frozen, in eval mode.

    The UNet and VAE run in ``precision``; the text encoders, which the new vectors' gradient crosses, in
    ``text_encoder_dtype`` (fp32, as diffusers' own training examples keep them). Each component's weights
    are read from one file (:func:`tinv.fingerprint.weight_choice`), the fp16 variant when the model runs
    in half precision and the folder has one; the fingerprint covers exactly those files.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(device, precision)
    variant = "fp16" if dtype != torch.float32 else None
    path = model_dir(uri, variant=variant, cache_dir=cache_dir, storage_options=storage_options)
    sdxl = check_layout(path, uri)
    parts = SDXL_PARTS if sdxl else SD_PARTS
    suffixes = ["", "_2"] if sdxl else [""]

    def load(cls: Any, part: str, **kwargs: Any) -> Any:
        chosen, safetensors = weight_choice(path / part, variant)
        return cls.from_pretrained(path / part, variant=chosen, use_safetensors=safetensors, **kwargs)

    tokenizers = [CLIPTokenizer.from_pretrained(path / f"tokenizer{s}") for s in suffixes]
    encoder_classes = [CLIPTextModel, CLIPTextModelWithProjection][: len(suffixes)]
    text_encoders = [load(cls, f"text_encoder{s}") for cls, s in zip(encoder_classes, suffixes)]
    unet = load(UNet2DConditionModel, "unet", torch_dtype=dtype)
    vae = load(AutoencoderKL, "vae", torch_dtype=vae_dtype(dtype))
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    model = assemble(uri, path, tokenizers, text_encoders, unet, vae, scheduler, device, dtype,
                     model_fingerprint(path, parts, variant), attention, text_encoder_dtype)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype when the model runs in ``dtype``: fp32 under fp16 (fp16 VAEs overflow)."""
    return torch.float32 if dtype == torch.float16 else dtype


def assemble(
    uri: str,
    path: Path,
    tokenizers: list[CLIPTokenizer],
    text_encoders: list[torch.nn.Module],
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler: DDPMScheduler,
    device: torch.device,
    dtype: torch.dtype,
    fingerprint: str,
    attention: str = "sdpa",
    text_encoder_dtype: torch.dtype = torch.float32,
) -> BaseModel:
    """A :class:`BaseModel` over modules already built: frozen, in eval mode, on ``device``; the UNet in
    ``dtype``, the VAE in :func:`vae_dtype`, the text encoders in ``text_encoder_dtype``.

    ``load_base_model`` ends here; the benchmark calls it directly on models built from configs.
    """
    for module in [*text_encoders, unet, vae]:
        module.requires_grad_(False).eval().to(device)
    for module, want in [(unet, dtype), (vae, vae_dtype(dtype)), *((m, text_encoder_dtype) for m in text_encoders)]:
        if module.dtype != want:  # a cast with a dtype warns per model per actor even when nothing changes
            module.to(want)
    set_attention([unet, vae], attention)
    templates, eval_prompts = read_templates(path)
    return BaseModel(uri, path, tokenizers, text_encoders, unet, vae, scheduler, device, dtype, fingerprint,
                     templates, eval_prompts)


def enable_gradient_checkpointing(model: BaseModel) -> None:
    """Recompute the UNet's and the text encoders' activations in the backward pass instead of keeping them.

    transformers checkpoints only modules in training mode, so the text encoders are put in it; that is
    only the same computation when they have no dropout (CLIP's configs have none), which is checked.
    """
    model.unet.enable_gradient_checkpointing()
    for encoder in model.text_encoders:
        config = encoder.config
        if getattr(config, "dropout", 0) or getattr(config, "attention_dropout", 0):
            raise ModelLayoutError("gradient checkpointing needs text encoders without dropout")
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.train()


def read_templates(path: Path) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """Training templates and eval prompts a folder ships in ``tinv_templates.json``, else tinv's.

    The file holds ``{"object": [...], "style": [...], "eval": {"object": [...], "style": [...]}}``.
    """
    file = path / TEMPLATES_FILE
    if not file.exists():
        return dict(TEMPLATES), dict(EVAL_PROMPTS)
    found = json.loads(file.read_text())
    found_eval = found.get("eval", EVAL_PROMPTS)
    bad = [k for k in TEMPLATES for g in (found, found_eval) if not g.get(k) or any("{}" not in t for t in g[k])]
    if bad:
        raise ModelLayoutError(f"{file}: needs non-empty template lists with {{}} for {', '.join(sorted(set(bad)))}")
    return {k: tuple(found[k]) for k in TEMPLATES}, {k: tuple(found_eval[k]) for k in TEMPLATES}
