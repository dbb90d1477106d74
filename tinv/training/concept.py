"""A concept on its way through the trainer: its data going in, what training made of it coming out."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tinv.errors import ConceptError
from tinv.manifest import ConceptSpec
from tinv.plan import Resolved


@dataclass
class Framed:
    """A concept's pictures of one training size (an aspect-ratio bucket, :mod:`tinv.training.pictures`)."""

    images: torch.Tensor
    """``(n, 3, h, w)`` in [-1, 1]."""
    index: tuple[int, ...]
    """Each picture's position in the concept's list (which caption it trains under)."""
    masks: torch.Tensor | None = None
    """``(n, 1, h, w)`` in [0, 1], 1 = subject: the loss's weight per pixel; None: every pixel counts."""


@dataclass
class ConceptData:
    """A concept ready to train: its spec and decoded images ``(N, 3, H, W)`` in [-1, 1]."""

    spec: ConceptSpec
    images: torch.Tensor
    class_images: torch.Tensor | None = None
    """Prior preservation: the base model's pictures of its class prompts, ``(M, 3, H, W)``."""
    class_captions: tuple[str, ...] = ()
    """Each class picture's prompt (one per picture); empty: every one under the spec's single class prompt."""
    framed: list[Framed] | None = None
    """The pictures as they train when they are not ``images`` as they are: per bucket, with their masks."""
    settings: Resolved | None = None
    """Its settings as the driver resolved them (:func:`tinv.plan.resolve`); None: resolved at admission."""

    @property
    def training(self) -> list[Framed]:
        """What trains: ``framed``, else ``images`` as one group without masks."""
        return self.framed or [Framed(self.images, tuple(range(len(self.images))))]


@dataclass
class Latents:
    """Cached latents of pictures of one size: the ``n`` pictures, then their flips."""

    mean: torch.Tensor
    """``(2n, C, h, w)``."""
    std: torch.Tensor
    index: torch.Tensor
    """``(n,)``: each picture's position in the concept's list."""
    weights: torch.Tensor | None = None
    """``(2n, 1, h, w)``: the masks at latent resolution (area-averaged), flipped with their pictures."""


@dataclass
class TrainedConcept:
    """What training a concept produced (``vectors`` is None when ``failure`` says why)."""

    spec: ConceptSpec
    vectors: list[torch.Tensor] | None
    """Per text encoder, ``(num_vectors, dim)`` fp32 on CPU; None for a ``lora`` concept (no new token)."""
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    failure: ConceptError | None = None
    lora: dict[str, torch.Tensor] | None = None
    """``lora`` / ``pivotal``: the UNet adapter in peft's naming (``…to_q.lora_A.weight``), fp32 on CPU."""
    lora_rank: int | None = None
    text_lora: list[dict[str, torch.Tensor]] | None = None
    """With ``lora_text_encoder``: its adapter on each text encoder, in peft's naming (``…q_proj.lora_A.weight``)."""
    start: dict | None = None
    """Where its vectors started (:func:`tinv.training.starts.choose`): ``{"init": …}``, with both fixed-batch losses
    when another start than the word was asked for."""
    sizes: dict[str, int] | None = None
    """Its pictures per training size, ``{"WxH": n}`` (one entry without aspect buckets)."""
    training: dict[str, object] | None = None
    """The settings it was trained under (:func:`tinv.plan.trained_under`); None for a failed concept."""
    samples: Any = None
    """What the loop's sampler drew of it from its live vectors and adapter (:func:`tinv.training.loop.train_concepts`);
    None without a sampler."""

    @property
    def error(self) -> str | None:
        return None if self.failure is None else str(self.failure)

    @property
    def final_loss(self) -> float:
        """Mean loss over the last tenth of the steps (NaN if none)."""
        return final_loss(self.losses)


def final_loss(losses: list[float]) -> float:
    """A run of losses' final value: the mean over its last tenth (NaN if empty)."""
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail) if tail else math.nan


@dataclass
class Rows:
    """Samples of one concept of one latent size, as the UNet takes them (the trainer's draw)."""

    latents: torch.Tensor
    """``(n, C, h, w)``, scaled as the UNet sees them."""
    noise: torch.Tensor
    t: torch.Tensor
    ids: list[torch.Tensor]
    """Per text encoder, ``(n, T)``."""
    weights: torch.Tensor | None = None
    """``(n, 1, h, w)``: the loss's weight per latent pixel (masks); None: a plain mean."""
    prior: bool = False
    """Prior preservation's samples (weighted by ``prior_loss_weight``), not the concept's own."""
    dropped: torch.Tensor | None = None
    """``(n,)`` bool: the samples drawn under the empty prompt (``caption_dropout``); None: none."""
    preserve: bool = False
    """Their target is the frozen model's own prediction (output preservation), not the noise."""
    blank: bool = False
    """The empty prompt's preserved samples (weighted by ``blank_loss_weight``, not ``prior_loss_weight``)."""

    def uncaptioned(self) -> torch.Tensor:
        """``(n,)`` bool: which samples are under the empty prompt."""
        none = torch.zeros(len(self.latents), dtype=torch.bool, device=self.latents.device)
        return none if self.dropped is None else self.dropped


@dataclass
class Slot:
    """A trainer slot's concept: its settings, random stream, cached latents and prompts, and progress."""

    settings: Resolved
    """The concept's spec with the run's defaults filled in (steps, seed, flip, batch, timesteps)."""
    generator: torch.Generator
    latents: list[Latents]
    """Per training size (one without aspect buckets)."""
    prompt_ids: list[torch.Tensor]
    """Per text encoder, ``(n_prompts, T)`` token ids of every template, or of every image's caption."""
    loss_scale: float = 1.0
    """fp16 only: this slot's dynamic loss scale (grows after a run of good steps, halves on overflow)."""
    good_steps: int = 0
    losses: list[float] = field(default_factory=list)
    fixed_batch_losses: list[float] = field(default_factory=list)
    """Fixed-batch losses every ``dvar_every`` steps (early stopping only)."""
    started: float = field(default_factory=time.perf_counter)
    adapter: str | None = None
    """Its LoRA adapter's name on the UNet (``lora`` / ``pivotal``)."""
    class_latents: Latents | None = None
    """Prior preservation: its class pictures' latents."""
    class_ids: list[torch.Tensor] | None = None
    """Per text encoder, ``(M, T)``: each class picture's prompt (``output`` preservation: each class prompt)."""
    start: dict | None = None
    """Where its vectors started (:func:`tinv.training.starts.choose`)."""
    encoders: int = 0
    """How many text encoders (the first ones) hold its vectors (0: none, ``lora``)."""
    finished: bool = False
    """Its training is over; it waits in the slot, its vectors and adapter live, for its samples to be drawn."""

    @property
    def spec(self) -> ConceptSpec:
        return self.settings.spec
