"""A concept's settings as it trains: its spec with the run's defaults filled in, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from tinv.config import WITH_CLASS_PICTURES, WITH_FROZEN_TARGET, ConceptSpec, TrainConfig


@dataclass(frozen=True)
class Resolved:
    """A concept's own settings with the run's defaults filled in: what the trainer uses for it and what
    its config fingerprint hashes (both take them from :func:`resolve`, so they cannot drift apart)."""

    spec: ConceptSpec
    steps: int
    learning_rate: float
    seed: int
    flip_p: float
    batch_size: int
    """Samples per step: ``style_batch_size`` for a style, else ``batch_size``."""
    timestep_power: float
    """How far its timesteps lean to the noisy end (1: uniform)."""
    lora_rank: int | None = None
    """Its adapter's rank; None for ``ti`` (no adapter)."""
    prior_loss_weight: float | None = None
    """Its class loss's weight; None without a ``class_prompt`` (no prior preservation) nor blank prompt
    preservation."""
    blank_loss_weight: float | None = None
    """Its empty-prompt preservation loss's weight; None where that is off."""
    caption_dropout: float = 0.0
    """Share of its own samples drawn under the empty prompt (0 for ``ti``)."""
    prior_preservation: str | None = None
    """``images``, ``output`` or ``both`` (:data:`PRIOR_PRESERVATIONS`) with a ``class_prompt``; None without."""
    blank_prompt_preservation: bool = False
    """Its prediction under the empty prompt is kept the frozen model's (never for ``ti``)."""

    @property
    def trains_vectors(self) -> bool:
        return self.spec.method != "lora"

    @property
    def drawn_class_prompts(self) -> tuple[str, ...]:
        """The class prompts whose pictures the base model draws for it: its own, unless preservation is ``output``."""
        return self.spec.class_prompts if self.prior_preservation in WITH_CLASS_PICTURES else ()

    @property
    def preserves_output(self) -> bool:
        """Its own samples also train under its class prompts against the frozen model (``output``, ``both``)."""
        return self.prior_preservation in WITH_FROZEN_TARGET


def resolve(spec: ConceptSpec, cfg: TrainConfig) -> Resolved:
    """The one place a concept's spec meets the run config."""
    style = spec.learnable_property == "style"
    blank = spec.method != "ti" and cfg.blank_prompt_preservation
    prior_loss_weight = cfg.prior_loss_weight if spec.prior_loss_weight is None else spec.prior_loss_weight
    return Resolved(
        spec,
        steps=spec.steps or cfg.steps,
        learning_rate=spec.learning_rate or cfg.learning_rate,
        seed=cfg.seed if spec.seed is None else spec.seed,
        flip_p=cfg.flip_p if spec.flip_p is None else spec.flip_p,
        batch_size=cfg.style_batch_size if style else cfg.batch_size,
        timestep_power=cfg.style_timestep_power if style else 1.0,
        lora_rank=None if spec.method == "ti" else spec.lora_rank or cfg.lora_rank,
        prior_loss_weight=prior_loss_weight if spec.class_prompt or blank else None,
        blank_loss_weight=None if not blank else
        prior_loss_weight if cfg.blank_prompt_loss_weight is None else cfg.blank_prompt_loss_weight,
        caption_dropout=0.0 if spec.method == "ti" else cfg.caption_dropout,
        prior_preservation=cfg.prior_preservation if spec.class_prompt else None,
        blank_prompt_preservation=blank,
    )


def trained_under(settings: Resolved, cfg: TrainConfig) -> dict[str, object]:
    """The settings a concept was trained under, as ``result.json`` and its LoRA files' metadata record them:
    steps, rates, seed and batch for every method; a LoRA's rank, targets, rates and caption dropout; its
    preservation (mode, weight, class pictures per prompt) where it has one."""
    out: dict[str, object] = {"steps": settings.steps, "learning_rate": settings.learning_rate,
                              "seed": settings.seed, "batch_size": settings.batch_size}
    if settings.spec.method == "ti":
        return out
    out |= {"lora_rank": settings.lora_rank, "lora_learning_rate": cfg.lora_learning_rate,
            "lora_targets": list(cfg.lora_targets), "caption_dropout": settings.caption_dropout}
    if cfg.lora_text_encoder:
        out["lora_text_encoder_learning_rate"] = cfg.text_encoder_lora_rate
    if settings.prior_preservation:
        out |= {"prior_preservation": settings.prior_preservation, "prior_loss_weight": settings.prior_loss_weight}
        if settings.drawn_class_prompts:
            out["class_images"] = cfg.class_images
    if settings.blank_prompt_preservation:
        out["blank_prompt_loss_weight"] = settings.blank_loss_weight
    return out
