"""A frozen base model loaded from any URI (hub id, local diffusers folder, fsspec URI), family-neutral.

:func:`load_base_model` finds the folder (:func:`model_dir`: local, copied once per node, or fetched from the
hub with back-off), reads its family (:func:`tinv.families.family_of`), lets the family load the components,
and freezes them: the denoiser and VAE in the run's precision, the text encoders (which the new vectors'
gradient crosses) in fp32, as diffusers' training examples keep them. Each component's weights come from one
file (:func:`tinv.families.fingerprint.weight_choice`: the fp16 variant when the model runs in half precision
and the folder has one), and the base-model fingerprint covers exactly those files. The default training
prompt templates (the Textual Inversion paper's) can be replaced by the folder's ``tinv_templates.json``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from tinv import storage
from tinv.errors import ModelLayoutError, ModelUnavailableError
from tinv.families import Family, family_of
from tinv.families.checkpointing import enable_gradient_checkpointing
from tinv.families.fingerprint import FINGERPRINT_VERSION, model_fingerprint, weight_choice
from tinv.families.quantized import check_base_precision, quantize_denoiser

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPLATES_FILE = "tinv_templates.json"
T = TypeVar("T")
DEFAULT_CACHE = Path.home() / ".cache" / "tinv" / "models"
VAE_PIXELS_PER_CHUNK = 8 * 512 * 512
"""Pixels the VAE encodes in one call: 8 images at 512 px, 2 at 1024 px, more when small."""


@dataclass
class BaseModel:
    """A frozen text-to-image model, ready for tinv to personalize."""

    uri: str
    """Where it was loaded from (hub id, folder or fsspec URI)."""
    local_dir: Path
    """The local diffusers folder it was read from."""
    family: Family
    """What differs between base models (:mod:`tinv.families`)."""
    tokenizers: list[Any]
    """One tokenizer per text encoder."""
    text_encoders: list[torch.nn.Module]
    """The text encoders that hold new token vectors, in the family's order."""
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any
    """The training noise scheduler (its config says the objective)."""
    device: torch.device
    dtype: torch.dtype
    """Dtype of the frozen denoiser (the VAE's is :func:`vae_dtype`, the text encoders' fp32 by default)."""
    fingerprint: str
    """The base-model fingerprint (:mod:`tinv.families.fingerprint`)."""
    templates: dict[str, tuple[str, ...]]
    """Training prompt templates per property: tinv's defaults, or the folder's ``tinv_templates.json``."""
    eval_prompts: dict[str, tuple[str, ...]]
    """Default evaluation prompts per property (``eval`` in ``tinv_templates.json``, else tinv's)."""
    base_precision: str = "auto"
    """How the denoiser's frozen weights are stored (:mod:`tinv.families.quantized`)."""

    @property
    def pixels_per_latent(self) -> int:
        """The VAE's downsampling: a latent pixel's side in image pixels (8 for every family so far)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The model's native image size in pixels."""
        return self.family.resolution(self)

    @property
    def embedding_dims(self) -> list[int]:
        return [te.get_input_embeddings().embedding_dim for te in self.text_encoders]

    @property
    def info(self) -> dict[str, str]:
        """What a result file (and every learned file's metadata) records about the base model."""
        return {"base_model": self.uri, "base_model_fingerprint": self.fingerprint,
                "fingerprint_version": str(FINGERPRINT_VERSION), **self.family.file_metadata(self)}

    @property
    def templates_digest(self) -> str:
        """sha256 of the training prompt templates (they shape what is learned)."""
        return hashlib.sha256(json.dumps(self.templates, sort_keys=True).encode()).hexdigest()

    def tokenize(self, prompts: list[str] | list[list[str]]) -> list[torch.Tensor]:
        """Token ids per tokenizer ``(B, T)``, padded to the family's length for it, on the model's device:
        of ``prompts``, or of ``prompts[e]`` for tokenizer ``e`` (a concept's word differs between encoders
        where only some hold its vectors)."""
        each = prompts if prompts and isinstance(prompts[0], list) else [prompts] * len(self.tokenizers)
        return [tok(texts, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids.to(self.device)
                for tok, texts, length in zip(self.tokenizers, each, self.family.max_lengths(self))]


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
    """The frozen denoiser's dtype. ``auto``: bf16 on a CUDA device that supports it, fp16 on one that does not
    (the trainer then scales each slot's loss), fp32 elsewhere; else ``fp32``/``bf16``/``fp16`` as asked."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


def set_attention(modules: list[torch.nn.Module], attention: str) -> None:
    """``sdpa``: PyTorch's scaled_dot_product_attention, diffusers' default processors; ``xformers``: its
    memory-efficient attention (must be installed)."""
    if attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise RuntimeError("attention='xformers' was asked for but xformers is not installed")
        for m in modules:
            m.enable_xformers_memory_efficient_attention()
    elif attention != "sdpa":
        raise ValueError(f"attention must be 'sdpa' or 'xformers', got {attention!r}")


def load_base_model(
    uri: str,
    *,
    device: str | torch.device | None = None,
    precision: str = "auto",
    attention: str = "sdpa",
    gradient_checkpointing: bool = False,
    base_precision: str = "auto",
    text_encoder_dtype: torch.dtype = torch.float32,
    cache_dir: str | Path = DEFAULT_CACHE,
    storage_options: dict[str, Any] | None = None,
) -> BaseModel:
    """The model at ``uri``, frozen, in eval mode, on ``device`` (but a text encoder the family parks, as FLUX's
    T5), its denoiser quantized as ``base_precision`` asks (:mod:`tinv.families.quantized`; see the module
    docstring)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(device, precision)
    check_base_precision(base_precision, device)  # before minutes of loading
    variant = "fp16" if dtype != torch.float32 else None
    path = model_dir(uri, variant=variant, cache_dir=cache_dir, storage_options=storage_options)
    family = family_of(path, uri)

    def load(cls: Any, part: str, **kwargs: Any) -> Any:
        chosen, safetensors = weight_choice(path / part, variant)
        return cls.from_pretrained(path / part, variant=chosen, use_safetensors=safetensors, **kwargs)

    parts = family.load(path, load, dtype, vae_dtype(dtype))
    quantize_denoiser(parts.denoiser, base_precision, device)  # layer by layer onto the device, never whole in bf16
    model = assemble(uri, path, family, parts, device, dtype, model_fingerprint(path, family.parts, variant),
                     attention, text_encoder_dtype)
    model.base_precision = base_precision
    if gradient_checkpointing or base_precision != "auto":  # see quantized.py: what bounds a quantized base's memory
        enable_gradient_checkpointing(model)
    return model


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype when the model runs in ``dtype``: fp32 under fp16 (fp16 VAEs overflow)."""
    return torch.float32 if dtype == torch.float16 else dtype


def assemble(uri: str, path: Path, family: Family, parts: Any, device: torch.device, dtype: torch.dtype,
             fingerprint: str, attention: str = "sdpa", text_encoder_dtype: torch.dtype = torch.float32) -> BaseModel:
    """A :class:`BaseModel` over ``parts`` (:class:`tinv.families.Components`) already built: frozen, in eval mode,
    on ``device`` (a text encoder the family parks: at its ``text_homes``); the denoiser in ``dtype``, the VAE in
    :func:`vae_dtype`, the text encoders in ``text_encoder_dtype``. ``load_base_model`` ends here; the benchmark
    calls it on models built from configs."""
    homes = [*parts.text_homes, *[None] * len(parts.text_encoders)]
    for module, home in [*zip(parts.text_encoders, homes), (parts.denoiser, None), (parts.vae, None)]:
        module.requires_grad_(False).eval().to(home or device)
    fixed = list(parts.text_dtypes) + [None] * len(parts.text_encoders)
    wanted = [(parts.denoiser, dtype), (parts.vae, vae_dtype(dtype)),
              *((m, want or text_encoder_dtype) for m, want in zip(parts.text_encoders, fixed))]
    for module, want in wanted:
        if module.dtype != want:  # a cast with a dtype warns per model per actor even when nothing changes
            module.to(want)
    set_attention([parts.denoiser, parts.vae], attention)
    templates, eval_prompts = read_templates(path)
    return BaseModel(uri, path, family, parts.tokenizers, parts.text_encoders, parts.denoiser, parts.vae,
                     parts.scheduler, device, dtype, fingerprint, templates, eval_prompts)


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


# -- the default prompts (Gal et al. 2022, arXiv 2208.01618, and diffusers' textual_inversion example) ------
OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

TEMPLATES: dict[str, tuple[str, ...]] = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}

EVAL_PROMPTS: dict[str, tuple[str, ...]] = {
    "object": ("a photo of a {}", "a painting of a {}", "a {} on a table", "a close-up photo of a {}"),
    "style": ("a painting in the style of {}", "a cat in the style of {}", "a house in the style of {}"),
}


def template_words() -> set[str]:
    """Every word used by the templates (for building a tokenizer that knows them)."""
    text = " ".join(t.format("") for group in (TEMPLATES, EVAL_PROMPTS) for ts in group.values() for t in ts)
    return set(re.findall(r"[a-z]+", text))


# -- where the folder comes from ----------------------------------------------------------------------
SKIPPED_COMPONENTS = {"safety_checker": None, "feature_extractor": None, "image_encoder": None}
"""Pipeline components tinv never loads, so never downloads (diffusers skips components passed in)."""
PERMANENT = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError",
             "RemoteEntryNotFoundError", "LocalEntryNotFoundError", "HFValidationError", "OfflineModeIsEnabled",
             "DisabledRepoError", "BadRequestError")
"""huggingface_hub errors that another try cannot mend (by name: diffusers wraps them in OSError)."""


def model_dir(
    uri: str, *, variant: str | None = None, cache_dir: str | Path = DEFAULT_CACHE,
    storage_options: dict[str, Any] | None = None, attempts: int = 4, delay_s: float = 2.0,
) -> Path:
    """A local diffusers folder for ``uri``: the folder itself, a per-node cached copy, or a hub snapshot."""
    if "://" in uri or Path(uri).exists():
        try:
            return storage.local_copy(uri, cache_dir, storage_options)
        except FileNotFoundError as e:
            raise ModelLayoutError(f"no model folder at {uri!r}") from e
        except OSError as e:
            raise ModelUnavailableError(f"could not copy the model {uri!r}: {e}") from e
    if uri.startswith((".", "/", "~")) or uri.count("/") != 1:
        raise ModelLayoutError(f"no model folder at {uri!r}")
    return Path(with_backoff(lambda: download(uri, variant), uri, attempts, delay_s))


def download(repo_id: str, variant: str | None = None) -> str:
    """The snapshot folder of ``repo_id`` with diffusers' choice of files (see the module docstring)."""
    from diffusers import DiffusionPipeline

    return str(DiffusionPipeline.download(repo_id, variant=variant, **SKIPPED_COMPONENTS))


def with_backoff(fetch: Callable[[], T], uri: str, attempts: int = 4, delay_s: float = 2.0) -> T:
    """``fetch()``, retried ``attempts`` times with exponential back-off while the failure is transient."""
    for i in range(attempts):
        try:
            return fetch()
        except Exception as e:  # noqa: BLE001 — the hub's errors are many; classified below
            if is_permanent(e):
                raise ModelLayoutError(f"{uri!r} is not a local folder and could not be fetched from the hub: "
                                       f"{e}") from e
            if i == attempts - 1:
                raise ModelUnavailableError(f"could not fetch {uri!r} from the hub after {attempts} tries: {e}") from e
            time.sleep(delay_s * 2**i)
    raise AssertionError("unreachable")


def is_permanent(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) says the repo cannot be had: missing, gated, offline."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ in PERMANENT:
            return True
        status = getattr(getattr(seen, "response", None), "status_code", None)
        if status in (401, 403, 404):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
