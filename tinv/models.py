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

from tinv import storage
from tinv.prompts import EVAL_PROMPTS, TEMPLATES

SD_PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
SDXL_PARTS = (*SD_PARTS, "tokenizer_2", "text_encoder_2")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CACHE = Path.home() / ".cache" / "tinv" / "models"
TEMPLATES_FILE = "tinv_templates.json"


class ModelLayoutError(ValueError):
    """The model folder is not a diffusers SD/SDXL layout."""


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
    """Dtype of the frozen UNet and text encoders."""
    fingerprint: str
    """sha256 of the text encoders' configs and token-embedding weights."""
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
    def resolution(self) -> int:
        """The UNet's native image size in pixels."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def embedding_dims(self) -> list[int]:
        return [te.get_input_embeddings().embedding_dim for te in self.text_encoders]

    @property
    def info(self) -> dict[str, str]:
        """What a result file records about the base model."""
        return {"base_model": self.uri, "base_model_fingerprint": self.fingerprint}


def resolve_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """bf16 on CUDA and fp32 elsewhere for ``auto``; else ``fp32``/``bf16``/``fp16`` as asked."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


def model_dir(uri: str, cache_dir: str | Path = DEFAULT_CACHE, storage_options: dict | None = None) -> Path:
    """A local folder for ``uri``: the folder itself, a per-node cached copy, or a hub snapshot."""
    if "://" in uri or Path(uri).exists():
        return storage.local_copy(uri, cache_dir, storage_options)
    if uri.startswith((".", "/", "~")) or uri.count("/") != 1:
        raise ModelLayoutError(f"no model folder at {uri!r}")
    from huggingface_hub import snapshot_download

    patterns = [f"{p}/*" for p in SDXL_PARTS] + ["model_index.json"]
    try:
        return Path(snapshot_download(uri, allow_patterns=patterns))
    except Exception as e:  # the hub's errors are many; all mean "could not get it"
        raise ModelLayoutError(f"{uri!r} is not a local folder and could not be fetched from the hub: {e}") from e


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


def fingerprint(text_encoders: list[torch.nn.Module]) -> str:
    """sha256 over each text encoder's config (minus bookkeeping keys) and token-embedding weights."""
    h = hashlib.sha256()
    for te in text_encoders:
        config = {k: v for k, v in te.config.to_dict().items() if not k.startswith("_")}
        for key in ("transformers_version", "dtype", "torch_dtype", "architectures"):
            config.pop(key, None)
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        weight = te.get_input_embeddings().weight.detach().float().cpu().contiguous()
        h.update(weight.numpy().tobytes())
    return h.hexdigest()


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
    cache_dir: str | Path = DEFAULT_CACHE,
    storage_options: dict[str, Any] | None = None,
) -> BaseModel:
    """Load tokenizer(s), text encoder(s), UNet, VAE and scheduler, frozen, in eval mode."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(device, precision)
    path = model_dir(uri, cache_dir, storage_options)
    sdxl = check_layout(path, uri)
    suffixes = ["", "_2"] if sdxl else [""]
    tokenizers = [CLIPTokenizer.from_pretrained(path / f"tokenizer{s}") for s in suffixes]
    encoder_classes = [CLIPTextModel, CLIPTextModelWithProjection][: len(suffixes)]
    text_encoders = [cls.from_pretrained(path / f"text_encoder{s}") for cls, s in zip(encoder_classes, suffixes)]
    text_fingerprint = fingerprint(text_encoders)  # from the fp32 weights, whatever precision we run in
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=vae_dtype(dtype))
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    return assemble(uri, path, tokenizers, text_encoders, unet, vae, scheduler, device, dtype, attention,
                    text_fingerprint)


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
    attention: str = "sdpa",
    text_fingerprint: str | None = None,
) -> BaseModel:
    """A :class:`BaseModel` over modules already built: frozen, in eval mode, on ``device`` in ``dtype``.

    ``load_base_model`` ends here; the benchmark calls it directly on models built from configs.
    """
    text_fingerprint = text_fingerprint or fingerprint(text_encoders)
    for module in [*text_encoders, unet, vae]:
        module.requires_grad_(False).eval().to(device)
    for module in [*text_encoders, unet]:
        module.to(dtype)
    vae.to(vae_dtype(dtype))
    set_attention([unet, vae], attention)
    templates, eval_prompts = read_templates(path)
    return BaseModel(uri, path, tokenizers, text_encoders, unet, vae, scheduler, device, dtype, text_fingerprint,
                     templates, eval_prompts)


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
