"""Packed Textual Inversion (Gal et al. 2022, arXiv 2208.01618) with continuous batching.

K concept slots train at once. Each step draws ``batch_size`` samples (``style_batch_size`` for
a style) per active concept from that concept's own random stream, runs one batched text-encoder
+ UNet pass, and takes a per-concept mean loss; the sum of those losses gives every concept
exactly its own gradient. Each slot has its own AdamW state and learning rate, so concepts never
couple. A concept that reaches its step count is emitted and its slot is refilled with the next.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tinv.conditioning import encode_prompts
from tinv.config import ConceptSpec, Resolved, TrainConfig, resolve
from tinv.images import ConceptDataError
from tinv.models import BaseModel
from tinv.slots import register_slot_tokens, slot_token_names, spliced


@dataclass
class ConceptData:
    """A concept ready to train: its spec and decoded images ``(N, 3, H, W)`` in [-1, 1]."""

    spec: ConceptSpec
    images: torch.Tensor


@dataclass
class TrainedConcept:
    """What training a concept produced (``vectors`` is None when ``error`` says why)."""

    spec: ConceptSpec
    vectors: list[torch.Tensor] | None
    """Per text encoder, ``(num_vectors, dim)`` fp32 on CPU."""
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    @property
    def final_loss(self) -> float:
        """Mean loss over the last tenth of the steps (NaN if none)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail) if tail else math.nan


@dataclass
class StepInfo:
    """Passed to the progress callback after every step."""

    step: int
    losses: dict[str, float]
    """concept_id → this step's loss, for the concepts in the batch."""


@dataclass
class _Slot:
    settings: Resolved
    """The concept's spec with the run's defaults filled in (steps, seed, flip, batch, timesteps)."""
    generator: torch.Generator
    latents: tuple[torch.Tensor, torch.Tensor]
    """Latent mean and std, ``(2N, C, h, w)``: the N images, then their flips."""
    prompt_ids: list[torch.Tensor]
    """Per text encoder, ``(n_prompts, T)`` token ids of every template, or of every image's caption."""
    losses: list[float] = field(default_factory=list)
    fixed_batch_losses: list[float] = field(default_factory=list)
    """Fixed-batch losses every ``dvar_every`` steps (early stopping only)."""
    started: float = field(default_factory=time.perf_counter)

    @property
    def spec(self) -> ConceptSpec:
        return self.settings.spec


class PackedTrainer:
    """Holds K slots of trainable vectors over one frozen :class:`BaseModel`."""

    def __init__(self, model: BaseModel, cfg: TrainConfig) -> None:
        self.model, self.cfg = model, cfg
        self.names = slot_token_names(cfg.concepts_per_actor, cfg.max_vectors)
        self.token_ids = register_slot_tokens(model, self.names)  # [encoder][slot][vector]
        self.vectors = [
            [nn.Parameter(torch.zeros(cfg.max_vectors, d, device=model.device)) for d in model.embedding_dims]
            for _ in range(cfg.concepts_per_actor)
        ]  # [slot][encoder] → (M, D) fp32
        groups = [{"params": row, "lr": cfg.learning_rate} for row in self.vectors]
        self.optimizer = torch.optim.AdamW(
            groups, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        self.slots: list[_Slot | None] = [None] * cfg.concepts_per_actor
        self.step_count = 0

    # -- admission -------------------------------------------------------------------------
    def admit(self, s: int, data: ConceptData) -> None:
        """Put a concept into slot ``s``: check its tokens, cache latents, reset vectors and state."""
        spec, cfg = data.spec, self.cfg
        if spec.num_vectors > cfg.max_vectors:
            raise ConceptDataError(spec.concept_id, f"num_vectors {spec.num_vectors} > max_vectors {cfg.max_vectors}")
        if tuple(data.images.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(f"images are {tuple(data.images.shape[-2:])}, the trainer needs {self.resolution} px")
        init = [self._initializer(spec, e) for e in range(len(self.model.tokenizers))]
        latents = self._encode_latents(data.images)
        templates = spec.captions or self.model.templates[spec.learnable_property]
        slot_word = " ".join(self.names[s][: spec.num_vectors])
        prompts = [t.format(slot_word) for t in templates]
        prompt_ids = [self._tokenize(tok, prompts) for tok in self.model.tokenizers]
        with torch.no_grad():
            for e, row in enumerate(init):
                self.vectors[s][e].zero_()
                self.vectors[s][e][: spec.num_vectors] = row
        for p in self.vectors[s]:
            self.optimizer.state.pop(p, None)
        settings = resolve(spec, cfg)
        self.optimizer.param_groups[s]["lr"] = settings.learning_rate
        generator = torch.Generator().manual_seed(settings.seed)
        self.slots[s] = _Slot(settings, generator, latents, prompt_ids)

    def _initializer(self, spec: ConceptSpec, e: int) -> torch.Tensor:
        tokenizer, encoder = self.model.tokenizers[e], self.model.text_encoders[e]
        vocab = tokenizer.get_vocab()  # a word is in it as "word</w>"; it is one token either way
        clash = [t for t in spec.tokens if t in vocab or len(tokenizer.encode(t, add_special_tokens=False)) == 1]
        if clash:
            raise ConceptDataError(spec.concept_id, f"placeholder token {clash[0]!r} is already in the vocabulary")
        ids = tokenizer.encode(spec.initializer_token, add_special_tokens=False)
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ConceptDataError(
                spec.concept_id,
                f"initializer_token {spec.initializer_token!r} is {len(ids)} tokens {pieces}; use a one-token word",
            )
        return encoder.get_input_embeddings().weight[ids[0]].detach().float()  # (D,)

    def _tokenize(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.model.device)

    @torch.no_grad()
    def _encode_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.model.vae
        both = torch.cat([images, images.flip(-1)])  # (2N, 3, H, W)
        means, stds = [], []
        for chunk in both.split(8):
            dist = vae.encode(chunk.to(self.model.device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)  # (2N, C, h, w) each

    # -- one step --------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.cfg.resolution or self.model.resolution

    def _draw(self, slot: _Slot, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        """``n`` samples from the slot's data, in a fixed order of draws from ``generator``."""
        mean, std = slot.latents
        n_images = mean.shape[0] // 2
        image = torch.randint(n_images, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < slot.settings.flip_p
        template = torch.randint(slot.prompt_ids[0].shape[0], (n,), generator=generator)
        if slot.spec.captions:  # image i is trained under prompt i, its caption
            template = image  # drawn anyway, so a concept's other draws do not depend on its captions
        shape = (n, *mean.shape[1:])
        eps = torch.randn(shape, generator=generator).to(mean.device)
        noise = torch.randn(shape, generator=generator).to(mean.device)
        t = self._timesteps(slot.settings.timestep_power, n, generator)
        row = (image + flip.long() * n_images).to(mean.device)
        latents = mean[row] + std[row] * eps  # (n, C, h, w): a fresh sample of q(z|x)
        vae = self.model.vae.config
        latents = (latents - (getattr(vae, "shift_factor", None) or 0.0)) * vae.scaling_factor
        ids = [p[template.to(p.device)] for p in slot.prompt_ids]
        return latents, noise, t.to(mean.device), ids

    def _timesteps(self, power: float, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` timesteps in ``[lo, T)``: uniform, or with density ∝ (t − lo)^(power − 1)."""
        timesteps = self.model.scheduler.config.num_train_timesteps
        lo = int(self.cfg.min_timestep_fraction * timesteps)
        if power == 1.0:
            return torch.randint(lo, timesteps, (n,), generator=generator)
        u = torch.rand(n, generator=generator)
        return (lo + (timesteps - lo) * u ** (1 / power)).long().clamp(max=timesteps - 1)

    def _losses(self, batches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Per-concept mean losses ``(K_active,)`` for a list of per-concept draws."""
        latents, noise, t = (torch.cat([b[i] for b in batches]) for i in range(3))  # (B_total, ...)
        ids = [torch.cat([b[3][e] for b in batches]) for e in range(len(self.model.text_encoders))]
        scheduler = self.model.scheduler
        noisy = scheduler.add_noise(latents, noise, t)
        target = noise if self.model.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        hidden, added = encode_prompts(self.model, ids, self.resolution)
        dtype = self.model.dtype
        pred = self.model.unet(noisy.to(dtype), t, hidden.to(dtype), added_cond_kwargs=added).sample
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (B_total,)
        return torch.stack([part.mean() for part in per_sample.split([len(b[0]) for b in batches])])

    def step(self) -> dict[int, float]:
        """One optimisation step over every active slot; returns slot → loss."""
        active = [s for s, slot in enumerate(self.slots) if slot is not None]
        slots = [self.slots[s] for s in active]
        batches = [self._draw(slot, slot.generator, slot.settings.batch_size) for slot in slots]
        fp16 = self.model.dtype == torch.float16
        scale = self.cfg.loss_scale if fp16 else 1.0
        with spliced(self.model, self.vectors, self.token_ids):
            losses = self._losses(batches)
            (losses.sum() * scale).backward()
        for s, row in enumerate(self.vectors):
            for p in row:
                if s not in active or p.grad is None:
                    p.grad = None
                elif fp16:
                    p.grad.div_(scale)
            if fp16 and any(p.grad is not None and not torch.isfinite(p.grad).all() for p in row):
                for p in row:  # this slot overflowed: skip its step only
                    p.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return dict(zip(active, losses.tolist()))

    @torch.no_grad()
    def fixed_loss(self, s: int, n: int = 16, seed: int = 1234) -> float:
        """Loss of slot ``s``'s current vectors on a fixed draw (same noise, timesteps, images)."""
        draw = self._draw(self.slots[s], torch.Generator().manual_seed(seed), n)
        with spliced(self.model, self.vectors, self.token_ids):
            return self._losses([draw]).item()

    def flattened(self, s: int) -> bool:
        """DVAR: after this step, has slot ``s``'s fixed-batch loss stopped moving?

        Every ``dvar_every`` steps the loss on a fixed batch is recorded; the concept is done when
        the variance of the last ``dvar_window`` steps' values falls below ``dvar_threshold`` of
        the variance of all values so far (Voronov et al. 2023, arXiv 2302.04841), never before
        two windows of history.
        """
        cfg, slot = self.cfg, self.slots[s]
        if slot.settings.steps <= 2 * cfg.dvar_window or len(slot.losses) % cfg.dvar_every:
            return False  # too short a schedule to stop early (e.g. the demo's 150 steps): no cost
        slot.fixed_batch_losses.append(self.fixed_loss(s, n=cfg.dvar_samples))
        recent = cfg.dvar_window // cfg.dvar_every
        if len(slot.fixed_batch_losses) < 2 * recent:
            return False
        history = torch.tensor(slot.fixed_batch_losses)
        return bool(history[-recent:].var() < cfg.dvar_threshold * history.var())

    def emit(self, s: int) -> TrainedConcept:
        """Take the finished concept out of slot ``s``."""
        slot = self.slots[s]
        vectors = [row[: slot.spec.num_vectors].detach().cpu().clone() for row in self.vectors[s]]
        self.slots[s] = None
        return TrainedConcept(slot.spec, vectors, slot.losses, time.perf_counter() - slot.started)


def train_concepts(
    model: BaseModel,
    concepts: Iterable[ConceptData | TrainedConcept],
    cfg: TrainConfig,
    callback: Callable[[StepInfo], None] | None = None,
) -> Iterator[TrainedConcept]:
    """Train every concept, K at a time, yielding each as it finishes (or fails).

    A concept finishes after its steps, or earlier when ``cfg.early_stop`` and DVAR says its
    loss has flattened (:meth:`PackedTrainer.flattened`).

    ``concepts`` is pulled lazily, only when a slot frees up. An item that is already a
    :class:`TrainedConcept` (a concept whose data failed upstream) is passed through. A
    concept whose data is bad for this model (token clash, multi-token initializer) is
    yielded with its error and the others go on.
    """
    trainer = PackedTrainer(model, cfg)
    pending = iter(concepts)
    exhausted = False
    while True:
        for s in range(len(trainer.slots)):
            while trainer.slots[s] is None and not exhausted:
                incoming = next(pending, None)
                if incoming is None:
                    exhausted = True
                elif isinstance(incoming, TrainedConcept):
                    yield incoming
                else:
                    try:
                        trainer.admit(s, incoming)
                    except ConceptDataError as e:
                        yield TrainedConcept(incoming.spec, None, error=str(e))
        active = [s for s, slot in enumerate(trainer.slots) if slot is not None]
        if not active:
            return
        losses = trainer.step()
        for s, loss in losses.items():
            trainer.slots[s].losses.append(loss)
        if callback:
            callback(StepInfo(trainer.step_count, {trainer.slots[s].spec.concept_id: v for s, v in losses.items()}))
        for s in active:
            slot = trainer.slots[s]
            if len(slot.losses) >= slot.settings.steps or (cfg.early_stop and trainer.flattened(s)):
                yield trainer.emit(s)
