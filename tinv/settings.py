"""The run's training settings: what a user sets (:class:`TrainConfig`, one flag each) and the objective's finer
terms (:class:`Recipe`), which code and the lab set, by name (:data:`PRESETS`).

The product's defaults follow the field's published recipes (diffusers' ``textual_inversion`` and DreamBooth-LoRA
examples, kohya's ``sd-scripts``): every timestep of the schedule drawn uniformly, the same batch for every
concept, the recipe's step cap, with early stopping (DVAR, Voronov et al. 2023, arXiv 2302.04841) on, as its
paper measured it on Stable Diffusion. The values chosen on the toy world (our laboratory, ``lab/``) are the
``toyworld`` preset, which the no-argument demo and the lab use. ``docs/defaults.md`` shows both and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIOR_PRESERVATIONS = ("images", "output", "both")
"""How a concept with a ``class_prompt`` keeps its class's meaning (:attr:`TrainConfig.prior_preservation`)."""
WITH_CLASS_PICTURES = ("images", "both")
"""The preservations that train on the base model's class pictures (the others draw none)."""
WITH_FROZEN_TARGET = ("output", "both")
"""The preservations that train the concept's own samples against the frozen model's prediction."""


@dataclass(frozen=True)
class Recipe:
    """The objective's finer terms: set in code (or by a preset), not on the command line. Defaults: the field's
    recipes."""

    min_timestep_fraction: float = 0.0
    """Training timesteps are drawn from [min_timestep_fraction × T, T) of the schedule's T (0: all of them)."""
    style_timestep_power: float = 1.0
    """Style concepts draw t = lo + (T − lo)·u^(1/p), u uniform: density ∝ (t − lo)^(p − 1), leaning to the noisy
    end (1: uniform, as objects draw)."""
    style_batch_size: int | None = None
    """Samples per step for style concepts; None: the run's ``batch_size``."""
    flip_p: float = 0.5
    """Probability of a horizontal flip per sample, for concepts whose manifest row sets none."""
    max_vectors: int = 8
    """Largest ``num_vectors`` a concept may ask for (each trainer slot's capacity)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the new vectors."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    loss_scale: float = 65536.0
    """fp16 only: each slot's initial dynamic loss scale, halved on overflow (``torch.amp.GradScaler``'s)."""
    loss_scale_growth_interval: int = 2000
    """fp16 only: a slot's loss scale doubles after this many steps without overflow."""
    dvar_window: int = 100
    """DVAR: stop when the variance of the last ``dvar_window`` steps' fixed-batch losses ..."""
    dvar_threshold: float = 0.15
    """... is below this fraction of the variance of all of them."""
    dvar_every: int = 5
    """DVAR: steps between fixed-batch evaluations."""
    dvar_samples: int = 8
    """DVAR: size of the fixed batch (images, flips, templates, noise and timesteps drawn once)."""
    lora_text_encoder_learning_rate: float | None = None
    """Learning rate of a LoRA's text-encoder part (kohya's ``--text_encoder_lr``); None: the run's LoRA rate."""
    blank_prompt_preservation: bool = False
    """Also pull a ``lora`` / ``pivotal`` concept's prediction under the empty prompt, on its own noisy samples, to
    the frozen model's (ai-toolkit's Blank Prompt Preservation); with or without a ``class_prompt``."""
    blank_prompt_loss_weight: float | None = None
    """Weight of that empty-prompt loss (ai-toolkit's ``blank_prompt_preservation_multiplier``); None: the
    concept's ``prior_loss_weight``."""
    class_sample_steps: int = 25
    """Denoising steps per class picture (multistep DPM-Solver++)."""
    class_guidance: float = 5.0
    """Classifier-free guidance of the class pictures."""

    def __post_init__(self) -> None:
        checks = {
            "0 <= min_timestep_fraction < 1": 0 <= self.min_timestep_fraction < 1,
            "style_timestep_power > 0": self.style_timestep_power > 0,
            "style_batch_size is None or >= 1": self.style_batch_size is None or self.style_batch_size >= 1,
            "0 <= flip_p <= 1": 0 <= self.flip_p <= 1,
            "max_vectors >= 1": self.max_vectors >= 1,
            "dvar_every >= 1": self.dvar_every >= 1,
            "dvar_window >= 2 * dvar_every": self.dvar_window >= 2 * self.dvar_every,
            "0 < dvar_threshold < 1": 0 < self.dvar_threshold < 1,
            "dvar_samples >= 1": self.dvar_samples >= 1,
            "loss_scale > 0": self.loss_scale > 0,
            "loss_scale_growth_interval >= 1": self.loss_scale_growth_interval >= 1,
            "lora_text_encoder_learning_rate is None or > 0": self.lora_text_encoder_learning_rate is None
            or self.lora_text_encoder_learning_rate > 0,
            "blank_prompt_loss_weight is None or >= 0": self.blank_prompt_loss_weight is None
            or self.blank_prompt_loss_weight >= 0,
            "blank_prompt_preservation where blank_prompt_loss_weight is set": self.blank_prompt_preservation
            or self.blank_prompt_loss_weight is None,
            "class_sample_steps >= 1": self.class_sample_steps >= 1,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError("Recipe: need " + ", ".join(failed))


PRESETS: dict[str, Recipe] = {
    "recipes": Recipe(),
    "toyworld": Recipe(min_timestep_fraction=0.5, style_timestep_power=4.0, style_batch_size=8),
}
"""Named recipes. ``recipes``: the field's (the product's default). ``toyworld``: chosen on the toy world, a
1.5 M-parameter model of coloured shapes, and measured nowhere else (``docs/defaults.md``): the noisier half
of the schedule, styles leaning further to the noisy end with 8 samples a step. The demo and the lab use it."""


@dataclass(frozen=True)
class TrainConfig:
    """Run-level training settings, each a flag of ``jobs.train``; per-concept manifest columns override some."""

    steps: int = 3000
    """Most optimisation steps per concept (diffusers' textual_inversion recipe: 3 000 at an effective batch of 4);
    early stopping usually ends a concept well before."""
    learning_rate: float = 5e-3
    """AdamW learning rate of the new token vectors (not scaled by batch size)."""
    batch_size: int = 4
    """Samples per concept per step."""
    concepts_per_actor: int = 4
    """K: concepts an actor trains at once in one batch (a slot is refilled when its concept ends)."""
    seed: int = 0
    """Seed of each concept's random stream, for concepts whose manifest row sets none."""
    resolution: int | None = None
    """Training resolution in pixels; None: the model's native size."""
    aspect_buckets: bool = True
    """Train each picture at the aspect-ratio bucket nearest its shape (kohya's --enable_bucket); off: its centre
    square."""
    early_stop: bool = True
    """Stop a concept once its loss on a fixed batch flattens (DVAR, Voronov et al. 2023)."""
    lora_rank: int = 4
    """LoRA rank of lora / pivotal concepts (alpha = rank)."""
    lora_learning_rate: float = 1e-4
    """AdamW learning rate of a concept's LoRA (its token vectors keep --learning-rate)."""
    lora_targets: tuple[str, ...] = ()
    """Denoiser modules (name suffixes) that get LoRA layers; none given: the model family's default."""
    lora_text_encoder: bool = False
    """Give a concept's LoRA the text encoders' attention too (diffusers' --train_text_encoder)."""
    caption_dropout: float = 0.0
    """Share of a lora / pivotal concept's samples trained under the empty prompt (kohya's caption_dropout_rate)."""
    prior_preservation: str = field(default="images", metadata={"choices": ("images", "output")})
    """How a concept with a class_prompt keeps its class: images (DreamBooth's) or output (ai-toolkit's).

    ``images``: the base model's pictures of the class, drawn once per run and class, trained under the class prompt
    (DreamBooth). ``output``: the concept's own noisy samples under the class prompt, pulled to the frozen model's
    prediction for them (ai-toolkit's Differential Output Preservation; no pictures drawn). ``both`` (the two
    losses side by side) is for code and the lab."""
    prior_loss_weight: float = 1.0
    """Weight of the class loss beside a concept's own (diffusers' --prior_loss_weight)."""
    class_images: int = 100
    """Pictures the base model draws per class prompt (diffusers' --num_class_images)."""
    train_t5: bool = False
    """FLUX: learn new vectors in T5 too, not only in CLIP-L (diffusers' --enable_t5_ti); a manifest row may say."""
    init: str = "word"
    """Where new vectors start: word (the initializer word), cross (Cross Initialization, arXiv 2312.15905), or
    the URI of an initializer fitted by jobs.fit_init."""
    recipe: Recipe = Recipe()
    """The objective's finer terms (:class:`Recipe`; :data:`PRESETS`)."""

    def __post_init__(self) -> None:
        checks = {
            "steps >= 1": self.steps >= 1,
            "learning_rate > 0": self.learning_rate > 0,
            "batch_size >= 1": self.batch_size >= 1,
            "concepts_per_actor >= 1": self.concepts_per_actor >= 1,
            "resolution is None or a multiple of 8": self.resolution is None or self.resolution % 8 == 0,
            "lora_rank >= 1": self.lora_rank >= 1,
            "lora_learning_rate > 0": self.lora_learning_rate > 0,
            "0 <= caption_dropout < 1": 0 <= self.caption_dropout < 1,
            "prior_loss_weight >= 0": self.prior_loss_weight >= 0,
            f"prior_preservation in {PRIOR_PRESERVATIONS}": self.prior_preservation in PRIOR_PRESERVATIONS,
            "class_images >= 1": self.class_images >= 1,
            "init is word, cross or an initializer's URI": bool(self.init.strip()),
            "recipe is a Recipe": isinstance(self.recipe, Recipe),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError("TrainConfig: need " + ", ".join(failed))

    @property
    def text_encoder_lora_rate(self) -> float:
        """The text encoders' part of a LoRA trains at this rate: the recipe's, else the denoiser part's."""
        return self.recipe.lora_text_encoder_learning_rate or self.lora_learning_rate

    @classmethod
    def from_dict(cls, fields: dict) -> TrainConfig:
        """A config from :func:`dataclasses.asdict`'s form (the recipe a dict, tuples as lists): what crosses
        processes and what ``run.json`` keeps."""
        recipe = fields.get("recipe") or {}
        recipe = recipe if isinstance(recipe, Recipe) else Recipe(**{k: tuple(v) if isinstance(v, list) else v
                                                                     for k, v in recipe.items()})
        rest = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k != "recipe"}
        return cls(**rest, recipe=recipe)
