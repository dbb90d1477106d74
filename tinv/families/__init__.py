"""Model families: everything that differs between base models, one module per family.

A family (:class:`Family`) says which components a diffusers folder holds and how they load, which text
encoders hold new token vectors, how prompts become the denoiser's conditioning, how latents are scaled for
it, how the denoiser is called, what it is trained to predict (from the scheduler config), where a LoRA goes,
the layouts and metadata of the files the clients load, and the sampling pipeline. The core (manifest,
planning, actors, trainer, slots, outputs, storage, catalog) asks the model's family and never names a
family's classes or keys. The family of a folder is read from its ``model_index.json`` (:func:`family_of`).

Families: :mod:`tinv.families.sd` (Stable Diffusion 1.x and 2.x), :mod:`tinv.families.sdxl` (SDXL),
:mod:`tinv.families.flux` (FLUX.1 [dev] and [schnell]). A new one
is a new module here, an entry in :func:`families`, and a tiny-model builder in :mod:`tinv.families.tiny`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from tinv.errors import ModelLayoutError

if TYPE_CHECKING:
    from tinv.families.model import BaseModel


@dataclass
class Components:
    """What a family loads from a folder: one tokenizer per text encoder, the denoiser, the VAE, and the
    training noise scheduler (its config says the objective)."""

    tokenizers: list[Any]
    text_encoders: list[nn.Module]
    denoiser: nn.Module
    vae: nn.Module
    scheduler: Any
    text_dtypes: tuple[torch.dtype | None, ...] = ()
    """A text encoder's dtype where the family fixes it (FLUX's T5: the run's); None or absent: the run's text
    encoder dtype (fp32 by default: the new vectors' gradient crosses it)."""
    text_homes: tuple[torch.device | None, ...] = ()
    """Where a text encoder waits from loading on, where the family keeps it off the accelerator until it encodes
    (FLUX's T5: host memory, :data:`tinv.families.flux.PARKED`); None or absent: the model's device."""


@dataclass
class Conditioning:
    """The denoiser's conditioning of a batch, in the family's own names (``hidden``: the text states; SDXL
    adds its pooled text and time ids): what :meth:`Family.encode` gives and :meth:`Family.predict` takes."""

    tensors: dict[str, torch.Tensor]

    def zeros_like(self) -> Conditioning:
        return Conditioning({k: torch.zeros_like(v) for k, v in self.tensors.items()})

    def to(self, dtype: torch.dtype) -> Conditioning:
        return Conditioning({k: v.to(dtype) for k, v in self.tensors.items()})


@dataclass(frozen=True)
class Sampling:
    """How a family's users draw by default: the sampler (a name of :data:`tinv.evaluation.sampling.SCHEDULERS`),
    denoising steps and guidance."""

    scheduler: str
    steps: int
    guidance: float


@dataclass
class LoraParts:
    """A LoRA file's adapters in peft's naming: the denoiser's, and each text encoder's (fitted to the installed
    text encoders' module names; an encoder it has none for gets an empty one; None: denoiser only). Scaled to
    alpha = rank: a file's ``alpha / rank`` is folded into its ``lora_B`` weights."""

    denoiser: dict[str, torch.Tensor]
    text: list[dict[str, torch.Tensor]] | None = None


class Family(Protocol):
    """What a model family owns (one instance per family module)."""

    name: str
    """Its name in records (``sd``, ``sdxl``); :meth:`version` is finer (``sd1``, ``sd2``)."""
    pipeline_class: type
    """The diffusers pipeline that samples it and whose loaders read its files."""
    parts: tuple[str, ...]
    """The component folders it loads (and the base-model fingerprint covers)."""
    lora_targets: tuple[str, ...]
    """The denoiser's default LoRA target modules (the field's recipe for this family)."""
    text_lora_targets: tuple[str, ...]
    """A text encoder's LoRA target modules."""
    text_lora_encoders: int
    """How many of the text encoders (the first ones) a LoRA's text-encoder part sits on."""
    embedding_keys: tuple[str, ...]
    """diffusers' embedding file: one key per text encoder, or none (keyed by the token)."""
    webui_embedding_keys: tuple[str, ...]
    """The web UIs' embedding file: one key per text encoder."""
    bundle_keys: tuple[str, ...]
    """An embedding bundled in a web-UI LoRA: ``bundle_emb.<token>.<key>``, one key per text encoder."""
    training_keys: dict[str, str]
    """kohya's ``ss_`` metadata keys (what sd-scripts writes, the web UIs' LoRA cards show) → tinv's settings."""

    def load(self, path: Path, load: Any, dtype: torch.dtype, vae_dtype: torch.dtype) -> Components:
        """The components of the folder ``path``: ``load(cls, part, **kwargs)`` loads a weighted one."""

    def vector_encoders(self, model: BaseModel, t5: bool) -> int:
        """How many of the text encoders (the first ones) hold a concept's new vectors (``t5``: the run or the
        concept asks for T5's too, where the family has one); the rest read its word as plain text."""

    def max_lengths(self, model: BaseModel) -> list[int]:
        """Tokens per prompt, per text encoder."""

    def version(self, model: BaseModel) -> str:
        """Which of the family's models this is (``sd1``, ``sd2``, ``sdxl``)."""

    def resolution(self, model: BaseModel) -> int:
        """The model's native image size in pixels."""

    def pixel_multiple(self, model: BaseModel) -> int:
        """What every side of a training picture must be a multiple of."""

    def encode(self, model: BaseModel, ids: list[torch.Tensor], size: tuple[int, int],
               zeroed: torch.Tensor | None = None) -> Conditioning:
        """Token ids per text encoder ``(B, T)`` → the denoiser's conditioning at ``size`` (height, width in
        pixels); rows marked in ``zeroed`` ``(B,)`` are the empty prompt where the family conditions it on zeros."""

    def prepare(self, model: BaseModel, ids: list[list[torch.Tensor] | None], vector_encoders: int) -> None:
        """A concept was admitted: ``ids`` are its prompts' token ids (batches, each per text encoder ``(B, T)``
        or ``(T,)``; None: no such batch), and ``vector_encoders`` how many encoders hold a live vector of any
        concept now. A family that caches encodings encodes them now and may move an encoder no vector needs off
        the accelerator."""

    def forces_zeros(self, model: BaseModel) -> bool:
        """Whether an empty prompt is conditioned on zeros rather than on the encoding of ``""``."""

    def scale_latents(self, model: BaseModel, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents as the denoiser takes them."""

    def timesteps(self, model: BaseModel, n: int, generator: torch.Generator, low: float, power: float
                  ) -> torch.Tensor:
        """``n`` training timesteps (``low``, ``power``: :class:`tinv.settings.Recipe`'s draw)."""

    def noisy_and_target(self, model: BaseModel, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy latents at ``t`` and the training target, as the model's scheduler config says."""

    def predict(self, model: BaseModel, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's prediction."""

    def pipeline(self, model: BaseModel, scheduler: Any, text_encoders: bool = False) -> Any:
        """The sampling pipeline over the loaded modules (with the text encoders only when asked)."""

    def sampling(self, model: BaseModel) -> Sampling:
        """The sampler, steps and guidance its users draw with by default."""

    def pipeline_embeds(self, cond: Conditioning, uncond: Conditioning) -> dict[str, torch.Tensor]:
        """The pipeline's keyword arguments for precomputed prompt embeddings."""

    def diffusers_lora(self, denoiser: dict[str, torch.Tensor], text: list[dict[str, torch.Tensor]] | None
                       ) -> dict[str, torch.Tensor]:
        """peft-named adapters → the layout the family's pipeline's ``load_lora_weights`` reads."""

    def kohya_lora(self, diffusers_state: dict[str, torch.Tensor], text_encoders: int) -> dict[str, torch.Tensor]:
        """That layout → the web UIs' (kohya's)."""

    def read_lora(self, state: dict[str, torch.Tensor], model: BaseModel) -> LoraParts:
        """A LoRA file's tensors (either layout, no bundled embedding) → peft-named adapters for ``model``."""

    def file_metadata(self, model: BaseModel) -> dict[str, str]:
        """Every learned file's base-model keys (``family``, kohya's ``ss_base_model_version``…)."""


def families() -> dict[str, Family]:
    """diffusers pipeline class name (``model_index.json``'s ``_class_name``) → its family."""
    from tinv.families.flux import FLUX
    from tinv.families.sd import SD
    from tinv.families.sdxl import SDXL

    return {family.pipeline_class.__name__: family for family in (SD, SDXL, FLUX)}


def family_of(path: Path, uri: str) -> Family:
    """The family of the diffusers folder ``path`` (``uri`` names it in errors), its components checked present and
    their JSON configs parsed; :class:`ModelLayoutError` (naming the file) when it is none of tinv's, misses a part or
    a config is malformed. Cheap: the driver calls it on a local model before anything starts."""
    index = Path(path) / "model_index.json"
    if not Path(path).is_dir():
        raise ModelLayoutError(f"no model folder at {uri!r}")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise ModelLayoutError(f"{uri!r} has no readable model_index.json (a diffusers folder has one): {e}") from e
    known = families()
    if name not in known:
        raise ModelLayoutError(f"{uri!r} is a {name} folder; tinv trains {', '.join(sorted(known))}")
    family = known[name]
    missing = [p for p in family.parts if not (Path(path) / p).is_dir()]
    if missing:
        raise ModelLayoutError(f"{uri!r} is not a whole {name} folder: missing {', '.join(p + '/' for p in missing)}")
    for config in sorted(f for part in family.parts for f in (Path(path) / part).glob("*.json")):
        try:
            json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise ModelLayoutError(f"{uri!r}: {config.relative_to(path)} is not readable JSON: {e}") from e
    return family


def contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous fp32 copies on the CPU (as safetensors writes them), same keys."""
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


def place(module: nn.Module, device: torch.device) -> None:
    """``module`` on ``device`` (a move only where it is elsewhere)."""
    if next(module.parameters()).device != device:
        module.to(device)
