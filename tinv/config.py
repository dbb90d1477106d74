"""Typed configuration: one concept to learn, and the run-level training settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tinv.webui import TRIGGER

CONCEPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PROPERTIES = ("object", "style")
DEFAULT_INITIALIZER = {"object": "object", "style": "style"}
METHODS = ("ti", "lora", "pivotal")
"""Textual Inversion (new token vectors); DreamBooth-LoRA (an adapter on the UNet, the token read as
plain text); pivotal tuning (new token vectors and an adapter, trained together)."""
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
"""The UNet's attention projections: the targets of diffusers' ``train_dreambooth_lora.py``."""
LORA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""A CLIP text encoder's attention projections: that script's targets with ``--train_text_encoder``."""
PRIOR_PRESERVATIONS = ("images", "output", "both")
"""How a concept with a ``class_prompt`` keeps its class's meaning (:attr:`TrainConfig.prior_preservation`)."""
WITH_CLASS_PICTURES = ("images", "both")
"""The preservations that train on the base model's class pictures (the others draw none)."""
WITH_FROZEN_TARGET = ("output", "both")
"""The preservations that train the concept's own samples against the frozen model's prediction."""


@dataclass(frozen=True)
class ConceptSpec:
    """One concept to learn: a manifest row with its defaults resolved."""

    concept_id: str
    """Unique id; names the output folder. ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``."""
    images: tuple[str, ...]
    """Absolute image URIs (1..64)."""
    placeholder_token: str = ""
    """The new word (``ti``, ``pivotal``); default ``<concept_id>``. Must not already be in the vocabulary. For
    ``lora`` plain text the tokenizer reads as it is, one or more words (``sks dog``)."""
    initializer_token: str = ""
    """A single-token word whose embedding seeds every vector; default by property."""
    learnable_property: str = "object"
    """``object`` or ``style``: picks the prompt templates."""
    num_vectors: int = 1
    """Vectors per token; diffusers names them ``<t>``, ``<t>_1``, ``<t>_2``…"""
    steps: int | None = None
    """Optimisation steps; ``None`` takes the run's default."""
    learning_rate: float | None = None
    """AdamW learning rate; ``None`` takes the run's default."""
    seed: int | None = None
    """Seed of this concept's own random stream; ``None`` takes the run's seed."""
    flip_p: float | None = None
    """Probability of a horizontal flip per sample; ``None`` takes the run's default."""
    eval_prompts: tuple[str, ...] = ()
    """Evaluation prompts, ``{}`` standing for the token; empty means the property's default set."""
    captions: tuple[str, ...] = ()
    """One training prompt per image, ``{}`` standing for the token (``a {} on a red star``), instead of the
    property's templates: what the caption names stays with its words, out of the new one. Empty: templates."""
    method: str = "ti"
    """``ti``, ``lora`` or ``pivotal`` (:data:`METHODS`). For ``lora`` the token is not a new word: the
    tokenizer reads it as ordinary text, and may be several words: DreamBooth's rare identifier and the class
    noun, ``sks dog``, which the prompts ``{}`` then carry (``a photo of a {}``); only the adapter learns."""
    lora_rank: int | None = None
    """LoRA rank (``lora``, ``pivotal``); ``None`` takes the run's default."""
    class_prompt: str | tuple[str, ...] = ""
    """Turns DreamBooth's prior preservation on (``lora``, ``pivotal``): the bare class prompt, e.g. ``a photo
    of a dog``, whose pictures the base model draws once per run and class; or several (a list), each drawn
    once and shared the same way, every class picture trained under its own prompt (kohya's captioned
    regularization images): a style's subjects, ``a dog``, ``a house``. A list of one is that one string."""
    prior_loss_weight: float | None = None
    """Weight of the class pictures' loss beside the concept's own; ``None`` takes the run's default."""
    masks: tuple[str, ...] = ()
    """One mask URI per image (white = subject), weighting the loss per latent pixel; or ``mask_from_alpha``."""
    mask_from_alpha: bool = False
    """Each image's alpha channel is its mask (a cut-out subject on a transparent background)."""
    trigger: str = ""
    """Its web-UI files' stem and prompt word (:mod:`tinv.webui`); empty: derived from the id at planning."""

    def __post_init__(self) -> None:
        errors = self.problems()
        if errors:
            raise ValueError(f"concept {self.concept_id!r}: " + "; ".join(errors))
        if not isinstance(self.class_prompt, str):  # a list of one is its string: the same concept, hashed the same
            prompts = self.class_prompts  # None: none
            object.__setattr__(self, "class_prompt", prompts[0] if len(prompts) == 1 else prompts or "")
        if not self.placeholder_token:
            object.__setattr__(self, "placeholder_token", f"<{self.concept_id}>")
        if not self.initializer_token:
            object.__setattr__(self, "initializer_token", DEFAULT_INITIALIZER[self.learnable_property])

    def problems(self) -> list[str]:
        """Every schema problem of this spec (empty when valid)."""
        out = []
        if not isinstance(self.concept_id, str) or not CONCEPT_ID.fullmatch(self.concept_id):
            out.append(f"concept_id must match {CONCEPT_ID.pattern}")
        if not 1 <= len(self.images) <= 64:
            out.append(f"images must hold 1..64 URIs, got {len(self.images)}")
        if self.method not in METHODS:
            out.append(f"method must be one of {METHODS}, got {self.method!r}")
        if self.lora_rank is not None and not 1 <= self.lora_rank <= 1024:
            out.append(f"lora_rank must be in 1..1024, got {self.lora_rank}")
        if self.class_prompt and self.method == "ti":
            out.append("class_prompt needs method lora or pivotal (the class loss of a frozen model trains nothing)")
        prompts = self.class_prompts
        if any(not isinstance(p, str) or not p.strip() or "{" in p or "}" in p for p in prompts):
            out.append(f"class_prompt must be plain text without braces (the bare class), got {self.class_prompt!r}")
        elif len(set(prompts)) != len(prompts):
            out.append(f"class_prompt holds a prompt twice: {self.class_prompt!r}")
        if self.prior_loss_weight is not None and not self.prior_loss_weight >= 0:
            out.append(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        if self.learnable_property not in PROPERTIES:
            out.append(f"learnable_property must be one of {PROPERTIES}, got {self.learnable_property!r}")
        token = self.placeholder_token
        if token and self.method == "lora" and (token != " ".join(token.split()) or "{" in token or "}" in token):
            out.append(f"a lora concept's placeholder_token is plain text (DreamBooth's 'sks dog'), single-spaced "
                       f"and without braces, got {token!r}")
        elif token and self.method != "lora" and (len(token.split()) != 1 or token != token.strip()):
            out.append(f"placeholder_token must be one word without spaces, got {token!r}")
        if self.masks and len(self.masks) != len(self.images):
            out.append(f"masks must hold one mask URI per image ({len(self.images)}), got {len(self.masks)}")
        if self.masks and self.mask_from_alpha:
            out.append("masks and mask_from_alpha both give masks: name one")
        if self.trigger and (not isinstance(self.trigger, str) or not TRIGGER.fullmatch(self.trigger)):
            out.append(f"trigger must match {TRIGGER.pattern} (a file name, no '.'), got {self.trigger!r}")
        if self.initializer_token and len(self.initializer_token.split()) != 1:
            out.append(f"initializer_token must be one word, got {self.initializer_token!r}")
        if not 1 <= self.num_vectors <= 64:
            out.append(f"num_vectors must be in 1..64, got {self.num_vectors}")
        if self.steps is not None and self.steps < 1:
            out.append(f"steps must be >= 1, got {self.steps}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            out.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.flip_p is not None and not 0 <= self.flip_p <= 1:
            out.append(f"flip_p must be in [0, 1], got {self.flip_p}")
        if any("{}" not in p for p in self.eval_prompts):
            out.append("every eval prompt must contain {} for the token")
        if self.captions and len(self.captions) != len(self.images):
            out.append(f"captions must hold one caption per image ({len(self.images)}), got {len(self.captions)}")
        if any(not isinstance(c, str) or not c.count("{") == c.count("}") == c.count("{}") == 1 for c in self.captions):
            out.append("every caption must contain {} for the token exactly once, and no other brace")
        return out

    @property
    def class_prompts(self) -> tuple[str, ...]:
        """Its class prompts: none without prior preservation, else one or more."""
        if not self.class_prompt:
            return ()
        return (self.class_prompt,) if isinstance(self.class_prompt, str) else tuple(self.class_prompt)

    @property
    def tokens(self) -> list[str]:
        """The token strings diffusers creates for this concept: ``<t>``, ``<t>_1``, …"""
        t = self.placeholder_token
        return [t] + [f"{t}_{i}" for i in range(1, self.num_vectors)]


@dataclass(frozen=True)
class TrainConfig:
    """Run-level training settings; per-concept fields of :class:`ConceptSpec` override some."""

    steps: int = 500
    """Default optimisation steps per concept."""
    learning_rate: float = 5e-3
    """Default AdamW learning rate for the new vectors (not scaled by batch size)."""
    batch_size: int = 4
    """Samples per object concept per step."""
    concepts_per_actor: int = 4
    """K: concepts an actor trains at once, in one batch (a slot is refilled when its concept ends)."""
    max_vectors: int = 8
    """Largest ``num_vectors`` a concept may ask for (slot capacity)."""
    seed: int = 0
    """Default per-concept seed."""
    flip_p: float = 0.5
    """Default probability of a horizontal flip per sample."""
    weight_decay: float = 0.0
    """AdamW weight decay on the new vectors."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    resolution: int | None = None
    """Training resolution in pixels; ``None`` takes the UNet's native size."""
    aspect_buckets: bool = True
    """Train each picture at the bucket nearest its aspect ratio instead of its centre square (:mod:`tinv.buckets`;
    a square picture trains the same either way). Chosen on the toy world (docs/defaults.md)."""
    min_timestep_fraction: float = 0.5
    """Training timesteps are drawn from ``[min_timestep_fraction × T, T)`` of the model's ``T`` (0: all, as
    the diffusers recipe does; kohya's ``--min_timestep``). Chosen on the toy world (docs/defaults.md): what a
    new word sets (layout, colour, backdrop) is decided at high noise; at low noise the latent shows it."""
    style_timestep_power: float = 4.0
    """``style`` concepts draw t = lo + (T − lo)·u^(1/p), u uniform on [0, 1): density ∝ (t − lo)^(p − 1), leaning
    to the noisy end (1: uniform, as objects draw). Chosen on the toy world (docs/defaults.md): a style's word
    decides the whole look from pure noise, where the prompt is all the denoiser has."""
    style_batch_size: int = 8
    """Samples per step for ``style`` concepts (``batch_size`` is the objects'): most of a style's draws
    are at high noise, so its gradient is noisier. Default chosen on the toy world (docs/defaults.md)."""
    loss_scale: float = 65536.0
    """fp16 only: each slot's initial dynamic loss scale, halved on overflow (``torch.amp.GradScaler``'s)."""
    loss_scale_growth_interval: int = 2000
    """fp16 only: a slot's loss scale doubles after this many steps without overflow."""
    early_stop: bool = True
    """Stop a concept before ``steps`` once its loss on a fixed batch flattens (DVAR, Voronov et al. 2023,
    arXiv 2302.04841). On by default from toy-world measurements (docs/defaults.md)."""
    dvar_window: int = 100
    """DVAR: stop when the variance of the last ``dvar_window`` steps' fixed-batch losses ..."""
    dvar_threshold: float = 0.15
    """... is below this fraction of the variance of all of them."""
    dvar_every: int = 5
    """DVAR: steps between fixed-batch evaluations."""
    dvar_samples: int = 8
    """DVAR: size of the fixed batch (images, flips, templates, noise and timesteps drawn once)."""
    lora_rank: int = 4
    """Default LoRA rank of ``lora`` / ``pivotal`` concepts (alpha = rank); diffusers' DreamBooth-LoRA default."""
    lora_learning_rate: float = 1e-4
    """AdamW learning rate of a concept's LoRA (its vectors keep ``learning_rate``); diffusers' DreamBooth-LoRA rate."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """Module names (suffixes) of the UNet that get LoRA layers."""
    lora_text_encoder: bool = False
    """Give a concept's LoRA the text encoders' attention too (:data:`LORA_TEXT_TARGETS`, diffusers' option)."""
    lora_text_encoder_learning_rate: float | None = None
    """AdamW learning rate of that text-encoder part (kohya's ``--text_encoder_lr``); None: ``lora_learning_rate``."""
    caption_dropout: float = 0.0
    """Share of a ``lora`` / ``pivotal`` concept's own training samples drawn under the empty prompt instead of
    its caption (kohya's ``caption_dropout_rate``; on SDXL all-zero conditioning, what its pipeline gives an
    empty negative prompt): it trains the unconditional branch that classifier-free guidance subtracts, which a
    LoRA otherwise shifts untrained. ``ti`` concepts ignore it (the empty prompt holds no token to train)."""
    prior_loss_weight: float = 1.0
    """Default weight of the class pictures' loss for concepts with a ``class_prompt`` (diffusers' default); of the
    output-preservation losses too (``prior_preservation`` ``output``; ``blank_prompt_preservation`` unless
    ``blank_prompt_loss_weight`` is set)."""
    prior_preservation: str = field(default="images", metadata={"choices": PRIOR_PRESERVATIONS})
    """How a concept with a ``class_prompt`` keeps the class's meaning: ``images``, DreamBooth's (the base model's
    pictures of the class, drawn once per run and class, trained under the class prompt); ``output``, the concept's
    own noisy samples under the class prompt, pulled to the frozen model's prediction for them (no class pictures
    are drawn; ai-toolkit's Differential Output Preservation): the loss is the adapter's change to the class;
    ``both``, the two losses side by side, each at the weight."""
    blank_prompt_preservation: bool = False
    """Also pull a ``lora`` / ``pivotal`` concept's prediction under the empty prompt, on its own noisy samples, to
    the frozen model's (ai-toolkit's Blank Prompt Preservation), so that what classifier-free guidance subtracts
    stays the base model's; with or without a ``class_prompt``."""
    blank_prompt_loss_weight: float | None = None
    """Weight of that empty-prompt loss (ai-toolkit's ``blank_prompt_preservation_multiplier``); None: the
    concept's ``prior_loss_weight``."""
    class_images: int = 100
    """Pictures the base model draws per class prompt for prior preservation (diffusers' default)."""
    class_sample_steps: int = 25
    """Denoising steps per class picture (multistep DPM-Solver++)."""
    class_guidance: float = 5.0
    """Classifier-free guidance of the class pictures."""
    init: str = "word"
    """Where a concept's new vectors start: ``word`` (its initializer word's embedding), ``cross`` (the text
    encoder's output for that word, Cross Initialization, arXiv 2312.15905), or the URI of an initializer
    ``jobs.fit_init`` fitted on earlier runs of this base model (a folder or its ``.safetensors`` file), kept
    per concept only when its fixed-batch loss beats the word start's (:mod:`tinv.starts`)."""

    def __post_init__(self) -> None:
        checks = {
            "steps >= 1": self.steps >= 1,
            "learning_rate > 0": self.learning_rate > 0,
            "batch_size >= 1": self.batch_size >= 1,
            "style_batch_size >= 1": self.style_batch_size >= 1,
            "style_timestep_power > 0": self.style_timestep_power > 0,
            "concepts_per_actor >= 1": self.concepts_per_actor >= 1,
            "max_vectors >= 1": self.max_vectors >= 1,
            "0 <= flip_p <= 1": 0 <= self.flip_p <= 1,
            "0 <= min_timestep_fraction < 1": 0 <= self.min_timestep_fraction < 1,
            "resolution is None or a multiple of 8": self.resolution is None or self.resolution % 8 == 0,
            "dvar_every >= 1": self.dvar_every >= 1,
            "dvar_window >= 2 * dvar_every": self.dvar_window >= 2 * self.dvar_every,
            "0 < dvar_threshold < 1": 0 < self.dvar_threshold < 1,
            "dvar_samples >= 1": self.dvar_samples >= 1,
            "loss_scale > 0": self.loss_scale > 0,
            "loss_scale_growth_interval >= 1": self.loss_scale_growth_interval >= 1,
            "lora_rank >= 1": self.lora_rank >= 1,
            "lora_learning_rate > 0": self.lora_learning_rate > 0,
            "lora_text_encoder_learning_rate is None or > 0": self.lora_text_encoder_learning_rate is None
            or self.lora_text_encoder_learning_rate > 0,
            "lora_targets not empty": bool(self.lora_targets),
            "0 <= caption_dropout < 1": 0 <= self.caption_dropout < 1,
            "prior_loss_weight >= 0": self.prior_loss_weight >= 0,
            f"prior_preservation in {PRIOR_PRESERVATIONS}": self.prior_preservation in PRIOR_PRESERVATIONS,
            "blank_prompt_loss_weight is None or >= 0": self.blank_prompt_loss_weight is None
            or self.blank_prompt_loss_weight >= 0,
            "blank_prompt_preservation where blank_prompt_loss_weight is set": self.blank_prompt_preservation
            or self.blank_prompt_loss_weight is None,
            "class_images >= 1": self.class_images >= 1,
            "class_sample_steps >= 1": self.class_sample_steps >= 1,
            "init is word, cross or an initializer's URI": bool(self.init.strip()),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError("TrainConfig: need " + ", ".join(failed))

    @property
    def text_encoder_lora_rate(self) -> float:
        """The text encoders' part of a LoRA trains at this rate: its own, else the UNet part's."""
        return self.lora_text_encoder_learning_rate or self.lora_learning_rate
