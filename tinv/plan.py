"""A concept's settings as it trains, resolved once, and the fingerprint that decides whether it is done.

The driver resolves every manifest row against the run config (:func:`resolve`) once, and the result travels
with the concept's task to the actor that trains it; the trainer reads nothing else of the concept's settings.
:func:`config_fingerprint` hashes exactly that resolution with the run-level terms and the base model, so what
is trained and what a re-run compares cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tinv.manifest import ConceptSpec
from tinv.settings import WITH_CLASS_PICTURES, WITH_FROZEN_TARGET, TrainConfig

CONFIG_FINGERPRINT_VERSION = 3
"""The config fingerprint's format: a result written under another is redone."""


@dataclass(frozen=True)
class Resolved:
    """A concept's own settings with the run's defaults filled in: what the trainer uses for it and what its
    config fingerprint hashes."""

    spec: ConceptSpec
    steps: int
    learning_rate: float
    seed: int
    flip_p: float
    batch_size: int
    """Samples per step: the recipe's ``style_batch_size`` for a style where set, else ``batch_size``."""
    timestep_power: float
    """How far its timesteps lean to the noisy end (1: uniform)."""
    lora_rank: int | None = None
    """Its adapter's rank; None for ``ti`` (no adapter)."""
    prior_loss_weight: float | None = None
    """Its class loss's weight; None without a ``class_prompt`` nor blank prompt preservation."""
    blank_loss_weight: float | None = None
    """Its empty-prompt preservation loss's weight; None where that is off."""
    caption_dropout: float = 0.0
    """Share of its own samples drawn under the empty prompt (0 for ``ti``)."""
    prior_preservation: str | None = None
    """``images``, ``output`` or ``both`` with a ``class_prompt``; None without."""
    blank_prompt_preservation: bool = False
    """Its prediction under the empty prompt is kept the frozen model's (never for ``ti``)."""
    train_t5: bool = False
    """Its new vectors train in T5 too, where the model has one (FLUX)."""

    @property
    def concept_id(self) -> str:
        return self.spec.concept_id

    @property
    def placeholder_token(self) -> str:
        return self.spec.placeholder_token

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
    recipe = cfg.recipe
    style = spec.learnable_property == "style"
    blank = spec.method != "ti" and recipe.blank_prompt_preservation
    prior_loss_weight = cfg.prior_loss_weight if spec.prior_loss_weight is None else spec.prior_loss_weight
    return Resolved(
        spec,
        steps=spec.steps or cfg.steps,
        learning_rate=spec.learning_rate or cfg.learning_rate,
        seed=cfg.seed if spec.seed is None else spec.seed,
        flip_p=recipe.flip_p if spec.flip_p is None else spec.flip_p,
        batch_size=recipe.style_batch_size or cfg.batch_size if style else cfg.batch_size,
        timestep_power=recipe.style_timestep_power if style else 1.0,
        lora_rank=None if spec.method == "ti" else spec.lora_rank or cfg.lora_rank,
        prior_loss_weight=prior_loss_weight if spec.class_prompt or blank else None,
        blank_loss_weight=None if not blank else
        prior_loss_weight if recipe.blank_prompt_loss_weight is None else recipe.blank_prompt_loss_weight,
        caption_dropout=0.0 if spec.method == "ti" else cfg.caption_dropout,
        prior_preservation=cfg.prior_preservation if spec.class_prompt else None,
        blank_prompt_preservation=blank,
        train_t5=spec.method != "lora" and (cfg.train_t5 if spec.train_t5 is None else spec.train_t5),
    )


def config_fingerprint(settings: Resolved, cfg: TrainConfig, model: dict[str, Any], manifest_dir: str | None = None,
                       start: str = "word") -> str:
    """sha256 of the format version, a concept's resolved settings (its evaluation prompts left out), the run-level
    terms that shape it and the model (``model``: ``base_model_fingerprint``, ``resolution``, ``dtype`` and
    ``templates``, a digest of the training prompt templates).

    Image and mask URIs under ``manifest_dir`` count as written in the manifest (relative), so a manifest folder
    that moves (a job's working dir) keeps its results. A run-level term counts where it acts: the LoRA's with an
    adapter, the class pictures' where they are drawn, the fp16 loss scale under fp16, DVAR's with early stopping,
    and ``start`` (:func:`tinv.training.starts.start_id`) for new vectors. K and ``max_vectors`` never count: a
    packed concept equals a solo one.
    """
    recipe = cfg.recipe
    concept = dataclasses.asdict(settings)
    concept["spec"].pop("eval_prompts")
    for terms, key in ((concept["spec"], "train_t5"), (concept, "train_t5")):
        if not terms[key]:  # hashed only where set: concepts from before T5 vectors keep their fingerprint
            terms.pop(key)
    if manifest_dir:
        prefix = manifest_dir.rstrip("/") + "/"
        for key in ("images", "masks"):
            concept["spec"][key] = [u.removeprefix(prefix) for u in concept["spec"][key]]
    run: dict[str, Any] = {k: getattr(recipe, k) for k in ("weight_decay", "adam_betas", "adam_eps",
                                                            "min_timestep_fraction")}
    run |= {"aspect_buckets": cfg.aspect_buckets, "early_stop": cfg.early_stop}
    if settings.lora_rank is not None:
        run |= {"lora_learning_rate": cfg.lora_learning_rate, "lora_targets": cfg.lora_targets,
                "lora_text_encoder": cfg.lora_text_encoder,
                "text_encoder_lora_rate": cfg.text_encoder_lora_rate if cfg.lora_text_encoder else None}
    if settings.drawn_class_prompts:
        run |= {"class_images": cfg.class_images, "class_sample_steps": recipe.class_sample_steps,
                "class_guidance": recipe.class_guidance}
    if model["dtype"] == "torch.float16":
        run |= {"loss_scale": recipe.loss_scale, "loss_scale_growth_interval": recipe.loss_scale_growth_interval}
    if cfg.early_stop:
        run |= {k: getattr(recipe, k) for k in ("dvar_window", "dvar_threshold", "dvar_every", "dvar_samples")}
    if settings.trains_vectors:
        run["start"] = start
    base = {k: model[k] for k in ("base_model_fingerprint", "resolution", "dtype", "templates")}
    if model.get("base_precision", "auto") != "auto":  # a quantized base draws other gradients
        base["base_precision"] = model["base_precision"]
    blob = json.dumps({"version": CONFIG_FINGERPRINT_VERSION, "concept": concept, "run": run, "model": base},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def trained_under(settings: Resolved, cfg: TrainConfig, lora_targets: tuple[str, ...] = ()) -> dict[str, object]:
    """The settings a concept was trained under, as ``result.json`` and its LoRA files' metadata record them:
    steps, rates, seed and batch for every method; a LoRA's rank, targets, rates and caption dropout; its
    preservation (mode, weight, class pictures per prompt) where it has one. ``lora_targets``: the modules its
    adapter sat on."""
    out: dict[str, object] = {"steps": settings.steps, "learning_rate": settings.learning_rate,
                              "seed": settings.seed, "batch_size": settings.batch_size}
    if settings.train_t5:
        out["train_t5"] = True
    if settings.spec.method == "ti":
        return out
    out |= {"lora_rank": settings.lora_rank, "lora_learning_rate": cfg.lora_learning_rate,
            "lora_targets": list(lora_targets), "caption_dropout": settings.caption_dropout}
    if cfg.lora_text_encoder:
        out["lora_text_encoder_learning_rate"] = cfg.text_encoder_lora_rate
    if settings.prior_preservation:
        out |= {"prior_preservation": settings.prior_preservation, "prior_loss_weight": settings.prior_loss_weight}
        if settings.drawn_class_prompts:
            out["class_images"] = cfg.class_images
    if settings.blank_prompt_preservation:
        out["blank_prompt_loss_weight"] = settings.blank_loss_weight
    return out
