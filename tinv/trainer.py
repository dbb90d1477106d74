"""The packed trainer: K slots of new token vectors over one frozen model, stepped in one batch.

Each active slot draws its own samples from its own random stream (image, flip, template, latent sample,
noise, timestep), one batched text-encoder + UNet pass gives a mean loss per slot, and the sum of those
losses gives every slot exactly its own gradient (Textual Inversion, Gal et al. 2022, arXiv 2208.01618).
Each slot has its own AdamW state, learning rate and fp16 loss scale, so slots never couple (a slot that
turns non-finite is dropped alone). :func:`tinv.train.train_concepts` runs it over a stream of concepts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tinv.conditioning import encode_prompts
from tinv.config import ConceptSpec, Resolved, TrainConfig, resolve
from tinv.errors import ConceptDataError, ConceptDivergedError, ConceptError
from tinv.models import BaseModel
from tinv.slots import register_slot_tokens, slot_token_names, spliced

VAE_PIXELS_PER_CHUNK = 8 * 512 * 512
"""Pixels the VAE encodes in one call at admission: 8 images at 512 px, 2 at 1024 px, more when small."""


@dataclass
class ConceptData:
    """A concept ready to train: its spec and decoded images ``(N, 3, H, W)`` in [-1, 1]."""

    spec: ConceptSpec
    images: torch.Tensor


@dataclass
class TrainedConcept:
    """What training a concept produced (``vectors`` is None when ``failure`` says why)."""

    spec: ConceptSpec
    vectors: list[torch.Tensor] | None
    """Per text encoder, ``(num_vectors, dim)`` fp32 on CPU."""
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    failure: ConceptError | None = None

    @property
    def error(self) -> str | None:
        return None if self.failure is None else str(self.failure)

    @property
    def final_loss(self) -> float:
        """Mean loss over the last tenth of the steps (NaN if none)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail) if tail else math.nan


@dataclass
class _Slot:
    settings: Resolved
    """The concept's spec with the run's defaults filled in (steps, seed, flip, batch, timesteps)."""
    generator: torch.Generator
    latents: tuple[torch.Tensor, torch.Tensor]
    """Latent mean and std, ``(2N, C, h, w)``: the N images, then their flips."""
    prompt_ids: list[torch.Tensor]
    """Per text encoder, ``(n_prompts, T)`` token ids of every template, or of every image's caption."""
    loss_scale: float = 1.0
    """fp16 only: this slot's dynamic loss scale (grows after a run of good steps, halves on overflow)."""
    good_steps: int = 0
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

    @property
    def active(self) -> list[int]:
        """The occupied slots, in order."""
        return [s for s, slot in enumerate(self.slots) if slot is not None]

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
        self.slots[s] = _Slot(settings, generator, latents, prompt_ids, loss_scale=cfg.loss_scale)

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
        for chunk in both.split(max(1, VAE_PIXELS_PER_CHUNK // (both.shape[-1] * both.shape[-2]))):
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
        added = {k: v.to(dtype) for k, v in added.items()} if added else None  # SDXL's pooled text, time ids
        pred = self.model.unet(noisy.to(dtype), t, hidden.to(dtype), added_cond_kwargs=added).sample
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (B_total,)
        return torch.stack([part.mean() for part in per_sample.split([len(b[0]) for b in batches])])

    def step(self, group: list[int] | None = None) -> tuple[dict[int, float], dict[int, ConceptError]]:
        """One optimisation step of the slots in ``group`` (default: every active one).

        Returns slot → loss for the slots that stepped, and slot → :class:`ConceptDivergedError` for those
        whose loss, gradient or vectors became non-finite (their vectors are left as they were; the others
        step exactly as they would alone). In fp16 each slot's loss is multiplied by its own scale; a slot
        whose gradient overflows skips this step and halves its scale, ``loss_scale_growth_interval`` good
        steps double it (``torch.amp.GradScaler``'s rule, kept per slot because slots must not share a
        skipped step), and a slot whose gradient overflows even below a scale of 1 has diverged.
        """
        group = self.active if group is None else group
        slots = [self.slots[s] for s in group]
        batches = [self._draw(slot, slot.generator, slot.settings.batch_size) for slot in slots]
        fp16 = self.model.dtype == torch.float16
        scales = torch.tensor([slot.loss_scale if fp16 else 1.0 for slot in slots], device=self.model.device)
        with spliced(self.model, self.vectors, self.token_ids):
            losses = self._losses(batches)  # (G,)
            (losses * scales).sum().backward()
        for s, row in enumerate(self.vectors):
            if s not in group:  # the spliced lookup gives every slot a zero gradient: AdamW must not step it
                for p in row:
                    p.grad = None
        values, failed = {}, {}
        for s, slot, loss, scale in zip(group, slots, losses.tolist(), scales.tolist()):
            grads = [p.grad.div_(scale) for p in self.vectors[s] if p.grad is not None]
            finite = all(torch.isfinite(g).all() for g in grads)
            if not math.isfinite(loss) or (not finite and not fp16):
                what = f"loss {loss}" if not math.isfinite(loss) else "non-finite gradients"
                at = len(slot.losses) + 1
                failed[s] = ConceptDivergedError(slot.spec.concept_id, f"diverged: {what} at step {at}")
            elif fp16:
                self._rescale(slot, finite)
                if slot.loss_scale < 1.0:
                    failed[s] = ConceptDivergedError(slot.spec.concept_id, "diverged: its fp16 gradient overflows "
                                                     f"even at loss scale {slot.loss_scale}")
            if s in failed or not finite:
                for p in self.vectors[s]:
                    p.grad = None  # this slot skips the step; the optimizer leaves it as it was
            if s not in failed:
                values[s] = loss  # an fp16 overflow is a step taken, as GradScaler counts it
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for s in values:
            if not all(torch.isfinite(p).all() for p in self.vectors[s]):
                failed[s] = ConceptDivergedError(self.slots[s].spec.concept_id, "vectors became non-finite")
        return {s: v for s, v in values.items() if s not in failed}, failed

    def _rescale(self, slot: _Slot, finite: bool) -> None:
        if not finite:
            slot.loss_scale, slot.good_steps = slot.loss_scale / 2, 0
            return
        slot.good_steps += 1
        if slot.good_steps == self.cfg.loss_scale_growth_interval:
            slot.loss_scale, slot.good_steps = slot.loss_scale * 2, 0

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

    def fail(self, s: int, failure: ConceptError) -> TrainedConcept:
        """Take the failed concept out of slot ``s`` (its losses so far are kept, its vectors are not)."""
        slot = self.slots[s]
        self.slots[s] = None
        return TrainedConcept(slot.spec, None, slot.losses, time.perf_counter() - slot.started, failure)
