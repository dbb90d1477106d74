"""The packed trainer: K slots of new token vectors (and adapters) over one frozen model, stepped in one batch.

A concept's pictures are encoded once (with their flips, and their masks brought to the latents' size); each
step then draws, from the concept's own random stream, which picture, flip, prompt, posterior sample, noise and
timestep each of its samples gets (Textual Inversion's objective, Gal et al. 2022, arXiv 2208.01618), in a fixed
order, so a concept draws the same whatever it is packed with. One batched text-encoder + denoiser pass gives a
mean loss per slot, and the sum of those losses gives every slot exactly its own gradient. Each slot has its own
AdamW state, learning rate and fp16 loss scale, so slots never couple (a slot that turns non-finite is dropped
alone). A ``lora`` or ``pivotal`` concept's slot also owns a LoRA adapter on the denoiser, and on the text
encoders with ``lora_text_encoder`` (:mod:`tinv.training.splice`, DreamBooth's bulk form, Ruiz et al. 2022, arXiv
2208.12242), through which only that concept's samples pass, at its own rate. Everything that differs between
base models (conditioning, latent scale, the objective, the denoiser call) is the model's family's
(:mod:`tinv.families`). :func:`tinv.training.loop.train_concepts` runs it over a stream of concepts.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinv.errors import ConceptDataError, ConceptDivergedError, ConceptError
from tinv.evaluation.sampling import SampleRequest, draw
from tinv.families.model import BaseModel
from tinv.manifest import ConceptSpec
from tinv.plan import Resolved, resolve, trained_under
from tinv.settings import TrainConfig
from tinv.training.concept import ConceptData, Framed, Latents, Rows, Slot, TrainedConcept
from tinv.training.pictures import latents_of
from tinv.training.splice import (
    BASE,
    Adapters,
    add_everywhere,
    register_slot_tokens,
    remove_everywhere,
    routed,
    slot_token_names,
    slot_words,
    spliced,
)
from tinv.training.starts import Start, choose, dvar_history, word_start


class PackedTrainer:
    """Holds K slots of trainable vectors over one frozen :class:`BaseModel`."""

    def __init__(self, model: BaseModel, cfg: TrainConfig, start: Start | None = None) -> None:
        self.model, self.cfg, self.start = model, cfg, start
        """``start``: where new vectors start (:mod:`tinv.training.starts`); None: the initializer word."""
        self.names = slot_token_names(cfg.concepts_per_actor, cfg.recipe.max_vectors)
        self.token_ids = register_slot_tokens(model, self.names)  # [encoder][slot][vector]
        self.vectors = [
            [nn.Parameter(torch.zeros(cfg.recipe.max_vectors, d, device=model.device)) for d in model.embedding_dims]
            for _ in range(cfg.concepts_per_actor)
        ]  # [slot][encoder] → (M, D) fp32
        groups = [{"params": row, "lr": cfg.learning_rate} for row in self.vectors]
        self.optimizer = torch.optim.AdamW(groups, betas=cfg.recipe.adam_betas, eps=cfg.recipe.adam_eps,
                                           weight_decay=cfg.recipe.weight_decay)
        self.slots: list[Slot | None] = [None] * cfg.concepts_per_actor
        self.step_count = 0
        texts = model.text_encoders[: model.family.text_lora_encoders] if cfg.lora_text_encoder else []
        self.lora_targets = cfg.lora_targets or model.family.lora_targets
        self.lora_places = [(model.denoiser, self.lora_targets),
                            *((e, model.family.text_lora_targets) for e in texts)]
        """Where a lora / pivotal concept's adapter goes, the denoiser first (added at admission; a ti run: none)."""
        self.lora_modules = [module for module, _ in self.lora_places]
        self.lora_rates = [cfg.lora_learning_rate, *[cfg.text_encoder_lora_rate] * len(texts)]  # each place's
        self.lora_groups: dict[int, list[dict]] = {}  # slot → its adapter's optimizer parameter groups
        self.empty_ids = [ids[0] for ids in model.tokenize([""])]  # caption dropout's prompt
        self.zeroes_empty = model.family.forces_zeros(model)  # ... which SDXL conditions on zeros

    @property
    def active(self) -> list[int]:
        """The slots that train: occupied, and not finished (a finished one waits for its samples)."""
        return [s for s, slot in enumerate(self.slots) if slot is not None and not slot.finished]

    # -- admission -------------------------------------------------------------------------
    def admit(self, s: int, data: ConceptData) -> None:
        """Put a concept into slot ``s``: check its tokens, cache latents, reset vectors and state."""
        spec, cfg = data.spec, self.cfg
        settings = data.settings or resolve(spec, cfg)
        if spec.num_vectors > cfg.recipe.max_vectors:
            raise ConceptDataError(spec.concept_id,
                                   f"num_vectors {spec.num_vectors} > max_vectors {cfg.recipe.max_vectors}")
        if tuple(data.images.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(f"images are {tuple(data.images.shape[-2:])}, the trainer needs {self.resolution} px")
        encoders = self.model.family.vector_encoders(self.model, settings.train_t5) if settings.trains_vectors else 0
        start = self._word_start(spec, encoders) if encoders else []
        latents = [latents_of(self.model, framed) for framed in data.training]
        templates = spec.captions or self.model.templates[spec.learnable_property]
        prompt_ids = self.model.tokenize([[t.format(w) for t in templates] for w in self.words(s, spec, encoders)])
        for p in self.slot_parameters(s):
            self.optimizer.state.pop(p, None)
        self.optimizer.param_groups[s]["lr"] = settings.learning_rate
        prior = {}
        if settings.preserves_output and not settings.drawn_class_prompts:  # the class prompts alone
            prior = {"class_ids": self.model.tokenize(list(spec.class_prompts))}
        elif settings.drawn_class_prompts:
            if data.class_images is None:
                raise ConceptDataError(spec.concept_id, f"no class pictures of {spec.class_prompt!r} were given")
            one = spec.class_prompts[0] if len(spec.class_prompts) == 1 else None
            captions = list(data.class_captions) or [one] * len(data.class_images)
            if len(captions) != len(data.class_images) or None in captions:
                raise ConceptDataError(spec.concept_id, f"{len(data.class_images)} class pictures need one prompt each "
                                       f"of {spec.class_prompts}, got {len(data.class_captions)}")
            whole = Framed(data.class_images, tuple(range(len(data.class_images))))
            prior = {"class_latents": latents_of(self.model, whole),
                     "class_ids": self.model.tokenize(captions)}
        adapter = self._adapter(s, settings)
        generator = torch.Generator().manual_seed(settings.seed)
        self.slots[s] = Slot(settings, generator, latents, prompt_ids, loss_scale=cfg.recipe.loss_scale,
                             adapter=adapter, encoders=encoders, **prior)
        self.model.family.prepare(self.model, [prompt_ids, prior.get("class_ids"), self.empty_ids],
                                  max(self.slots[a].encoders for a in self.active))
        if settings.trains_vectors:  # a failure from here on leaves the slot to train.py's _admit to free
            # the pictures' own latent means, as encoded above (framed otherwise: the start encodes the squares)
            means = latents[0].mean[: len(data.images)] if data.framed is None else None
            rows, self.slots[s].start = choose(self.start, start, self.model, spec, data.images, means, lambda rows: (
                self._set_vectors(s, rows) or self.fixed_loss(s, cfg.recipe.dvar_samples)))
            self._set_vectors(s, rows)
            self.slots[s].fixed_batch_losses = dvar_history(self.slots[s].start)

    @torch.no_grad()
    def _set_vectors(self, s: int, rows: list[torch.Tensor]) -> None:
        """Slot ``s``'s vectors: ``rows`` (per text encoder, ``(num_vectors, D)``), zeros beyond them."""
        for e, row in enumerate(rows):
            self.vectors[s][e].zero_()
            self.vectors[s][e][: len(row)] = row.to(self.vectors[s][e].device)

    def _adapter(self, s: int, settings: Resolved) -> str | None:
        """Give slot ``s`` a fresh LoRA adapter (seeded by the concept) if its method has one: on the denoiser, and
        on the text encoders with ``lora_text_encoder``."""
        name = f"slot{s}"
        if settings.lora_rank is None:
            remove_everywhere(self.lora_modules, name)
            for group in self.lora_groups.get(s, []):
                group["params"] = []
            return None
        parts = add_everywhere(self.lora_places, name, settings.lora_rank, seed=settings.seed)
        if s not in self.lora_groups:  # one optimizer group per place, at its rate
            for params, lr in zip(parts, self.lora_rates):
                self.optimizer.add_param_group({"params": params, "lr": lr})
            self.lora_groups[s] = self.optimizer.param_groups[-len(parts):]
        for group, params in zip(self.lora_groups[s], parts):
            group["params"] = params
        return name

    def slot_parameters(self, s: int) -> list[nn.Parameter]:
        """Everything slot ``s`` trains: its token vectors and its adapter, if it has one."""
        return [*self.vectors[s], *(p for group in self.lora_groups.get(s, []) for p in group["params"])]

    def words(self, s: int, spec: ConceptSpec, encoders: int) -> list[str]:
        """Slot ``s``'s concept in each text encoder's prompts (:func:`slot_words`)."""
        return slot_words(self.names[s], spec.num_vectors, encoders, spec.placeholder_token,
                          len(self.model.text_encoders))

    def _word_start(self, spec: ConceptSpec, encoders: int) -> list[torch.Tensor]:
        """Its tokens checked new to the tokenizers of its vectors, then its word start (:func:`word_start`)."""
        for tokenizer in self.model.tokenizers[:encoders]:
            vocab = tokenizer.get_vocab()  # a word is in it as "word</w>"; it is one token either way
            clash = [t for t in spec.tokens if t in vocab or len(tokenizer.tokenize(t)) == 1]  # encode warns if long
            if clash:
                raise ConceptDataError(spec.concept_id, f"placeholder token {clash[0]!r} is already in the vocabulary")
        return word_start(self.model, spec, encoders)

    # -- one step --------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.cfg.resolution or self.model.resolution

    def _draw(self, slot: Slot, generator: torch.Generator, n: int) -> list[Rows]:
        """``n`` samples of the concept (from one of its training sizes), then (prior preservation) ``n`` of its
        class pictures under their prompts, or its own ``n`` again under its class prompts (``output``), then its
        own again under the empty prompt (blank prompt preservation), in a fixed order of draws from ``generator``."""
        model, lo, settings = self.model, self.cfg.recipe.min_timestep_fraction, slot.settings
        own = draw_rows(model, lo, slot.latents, slot.prompt_ids, settings, generator, n, bool(slot.spec.captions),
                        empty_ids=self.empty_ids)
        rows = [own]
        if slot.class_latents is not None:
            rows.append(draw_rows(model, lo, [slot.class_latents], slot.class_ids, settings, generator, n, True, True))
        if settings.preserves_output:  # with class pictures too: each row under one of its pictures' prompts
            rows.append(preserved(own, slot.class_ids, generator))
        if settings.blank_prompt_preservation:
            rows.append(preserved(own, [e[None] for e in self.empty_ids], generator, blank=True))
        return rows

    def _losses(self, slots: list[Slot], draws: list[list[Rows]]) -> torch.Tensor:
        """Per-concept mean losses ``(K_active,)`` for each concept's draw: one batched text-encoder + UNet pass
        per latent size among them (one without aspect buckets), each sample through its own concept's adapter;
        a sample with a mask weighs its squared error by it (kohya's ``--masked_loss``), normalised by the mask."""
        blocks = [(k, rows) for k, draw in enumerate(draws) for rows in draw]
        per_block: list[torch.Tensor] = [torch.empty(0)] * len(blocks)
        for size in dict.fromkeys(tuple(r.latents.shape[-2:]) for _, r in blocks):
            members = [i for i, (_, r) in enumerate(blocks) if tuple(r.latents.shape[-2:]) == size]
            parts = [blocks[i][1] for i in members]
            errors = self._squared_errors(parts, [slots[blocks[i][0]].adapter or BASE for i in members])
            for i, rows, error in zip(members, parts, errors.split([len(r.latents) for r in parts])):
                if rows.weights is None:
                    per_block[i] = error.mean(dim=(1, 2, 3))
                else:
                    weight = rows.weights.expand_as(error)
                    per_block[i] = (error * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp_min(1e-8)
        losses = []
        for k, slot in enumerate(slots):  # DreamBooth: its own loss + w × each prior set's mean (a set a block)
            own = torch.cat([per_block[i] for i, (j, r) in enumerate(blocks) if j == k and not r.prior])
            settings = slot.settings
            prior = [(settings.blank_loss_weight if r.blank else settings.prior_loss_weight) * per_block[i].mean()
                     for i, (j, r) in enumerate(blocks) if j == k and r.prior]
            losses.append(own.mean() + torch.stack(prior).sum() if prior else own.mean())
        return torch.stack(losses)

    def _squared_errors(self, parts: list[Rows], adapters: list[str]) -> torch.Tensor:
        """The denoiser's squared error per element ``(B, C, h, w)`` on ``parts`` (samples of one latent size), each
        part through its adapter (``adapters``, one per part: ``__base__`` for a ti concept's); a part to
        ``preserve`` has the frozen model's prediction for it as its target (one batched pass without gradient)."""
        pred, target = self._predict(parts, adapters)
        kept = [r for r in parts if r.preserve]
        if kept:
            with torch.no_grad():
                frozen, _ = self._predict(kept, [BASE] * len(kept))
            which = torch.cat([torch.full((len(r.latents),), r.preserve, device=target.device) for r in parts])
            target = target.clone()
            target[which] = frozen.float()
        return F.mse_loss(pred.float(), target, reduction="none")

    def _predict(self, parts: list[Rows], adapters: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's prediction on ``parts``, each through its adapter, and the training target the model's
        scheduler config names."""
        model, family = self.model, self.model.family
        latents, noise, t = (torch.cat([getattr(r, f) for r in parts]) for f in ("latents", "noise", "t"))
        ids = [torch.cat([r.ids[e] for r in parts]) for e in range(len(model.text_encoders))]
        zeroed = torch.cat([r.uncaptioned() for r in parts]) if self.zeroes_empty else None
        noisy, target = family.noisy_and_target(model, latents, noise, t)
        size = (latents.shape[-2] * model.pixels_per_latent, latents.shape[-1] * model.pixels_per_latent)
        with routed(self.lora_modules, [a for a, r in zip(adapters, parts) for _ in r.latents]):
            pred = family.predict(model, noisy, t, family.encode(model, ids, size, zeroed))
        return pred, target

    def step(self, group: list[int] | None = None) -> tuple[dict[int, float], dict[int, ConceptError]]:
        """One optimisation step of the slots in ``group`` (default: every active one).

        Returns slot → loss for the slots that stepped, and slot → :class:`ConceptDivergedError` for those whose
        loss, gradient or vectors became non-finite (left as they were; the others step as they would alone). In
        fp16 each slot's loss is multiplied by its own scale (``torch.amp.GradScaler``'s rule, per slot: slots must
        not share a skipped step): an overflow skips the step and halves it, ``loss_scale_growth_interval`` good
        steps double it, and a slot overflowing below a scale of 1 has diverged."""
        group = self.active if group is None else group
        slots = [self.slots[s] for s in group]
        draws = [self._draw(slot, slot.generator, slot.settings.batch_size) for slot in slots]
        fp16 = self.model.dtype == torch.float16
        scales = torch.tensor([slot.loss_scale if fp16 else 1.0 for slot in slots], device=self.model.device)
        with spliced(self.model, self.vectors, self.token_ids):
            losses = self._losses(slots, draws)  # (G,)
            (losses * scales).sum().backward()
        for s in range(len(self.slots)):  # AdamW must not step what did not train: the spliced lookup gives every
            # slot a zero gradient, a routed layer every adapter; a concept's word is plain text where it has no vectors
            for p in self.slot_parameters(s) if s not in group else self.vectors[s][self.slots[s].encoders:]:
                p.grad = None
        values, failed = {}, {}
        for s, slot, loss, scale in zip(group, slots, losses.tolist(), scales.tolist()):
            grads = [p.grad.div_(scale) for p in self.slot_parameters(s) if p.grad is not None]
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
                for p in self.slot_parameters(s):
                    p.grad = None  # this slot skips the step; the optimizer leaves it as it was
            if s not in failed:
                values[s] = loss  # an fp16 overflow is a step taken, as GradScaler counts it
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for s in values:
            if not all(torch.isfinite(p).all() for p in self.slot_parameters(s)):
                failed[s] = ConceptDivergedError(self.slots[s].spec.concept_id, "weights became non-finite")
        return {s: v for s, v in values.items() if s not in failed}, failed

    def _rescale(self, slot: Slot, finite: bool) -> None:
        if not finite:
            slot.loss_scale, slot.good_steps = slot.loss_scale / 2, 0
            return
        slot.good_steps += 1
        if slot.good_steps == self.cfg.recipe.loss_scale_growth_interval:
            slot.loss_scale, slot.good_steps = slot.loss_scale * 2, 0

    @torch.no_grad()
    def fixed_loss(self, s: int, n: int = 16, seed: int = 1234) -> float:
        """Loss of slot ``s``'s current vectors on a fixed draw (same noise, timesteps, images)."""
        draw = self._draw(self.slots[s], torch.Generator().manual_seed(seed), n)
        with spliced(self.model, self.vectors, self.token_ids):
            return self._losses([self.slots[s]], [draw]).item()

    def flattened(self, s: int) -> bool:
        """DVAR: after this step, has slot ``s``'s fixed-batch loss stopped moving?

        Every ``dvar_every`` steps the loss on a fixed batch is recorded; the concept is done when
        the variance of the last ``dvar_window`` steps' values falls below ``dvar_threshold`` of
        the variance of all values so far (Voronov et al. 2023, arXiv 2302.04841), never before
        two windows of history.
        """
        cfg, slot = self.cfg, self.slots[s]
        if slot.settings.steps <= 2 * cfg.recipe.dvar_window or len(slot.losses) % cfg.recipe.dvar_every:
            return False  # too short a schedule to stop early (e.g. the demo's 150 steps): no cost
        slot.fixed_batch_losses.append(self.fixed_loss(s, n=cfg.recipe.dvar_samples))
        recent = cfg.recipe.dvar_window // cfg.recipe.dvar_every
        if len(slot.fixed_batch_losses) < 2 * recent:
            return False
        history = torch.tensor(slot.fixed_batch_losses)
        return bool(history[-recent:].var() < cfg.recipe.dvar_threshold * history.var())

    def draw(self, slots: list[int], requests: list[SampleRequest], *, pipe: Any, steps: int, guidance: float,
             batch_size: int) -> np.ndarray:
        """Samples of the concepts in ``slots`` (request ``concept`` ``i`` is ``slots[i]``) from their live token
        vectors and adapters, as they are now, batched across them (:func:`tinv.evaluation.sampling.draw`)."""
        said = [self.words(s, self.slots[s].spec, self.slots[s].encoders) for s in slots]
        routes = [self.slots[s].adapter or BASE for s in slots]
        with torch.no_grad(), spliced(self.model, self.vectors, self.token_ids):
            return draw(self.model, pipe, requests, said, routes, steps=steps, guidance=guidance,
                        batch_size=batch_size, vector_encoders=max(self.slots[s].encoders for s in slots))

    def emit(self, s: int) -> TrainedConcept:
        """Take the finished concept out of slot ``s``."""
        slot = self.slots[s]
        vectors = [row[: slot.spec.num_vectors].detach().cpu().clone() for row in self.vectors[s][: slot.encoders]]
        lora, text = self.lora_states(s)
        self.slots[s], scale = None, self.model.pixels_per_latent
        sizes = {f"{g.mean.shape[-1] * scale}x{g.mean.shape[-2] * scale}": len(g.index) for g in slot.latents}
        return TrainedConcept(slot.spec, vectors if slot.settings.trains_vectors else None, slot.losses,
                              time.perf_counter() - slot.started, lora=lora, lora_rank=slot.settings.lora_rank,
                              text_lora=text, start=slot.start, sizes=sizes,
                              training=trained_under(slot.settings, self.cfg, self.lora_targets))

    def lora_states(self, s: int) -> tuple[dict[str, torch.Tensor] | None, list[dict[str, torch.Tensor]] | None]:
        """Slot ``s``'s adapter now: the denoiser's and the text encoders' (None without), peft naming, fp32 copies."""
        name = self.slots[s].adapter
        denoiser, *text = [Adapters.of(m).state_dict(name) for m in self.lora_modules] if name else [None]
        return denoiser, text or None

    def fail(self, s: int, failure: ConceptError) -> TrainedConcept:
        """Take the failed concept out of slot ``s`` (its losses so far are kept, its vectors are not)."""
        slot, self.slots[s] = self.slots[s], None
        return TrainedConcept(slot.spec, None, slot.losses, time.perf_counter() - slot.started, failure)


def draw_rows(
    model: BaseModel, min_timestep_fraction: float, groups: list[Latents], prompt_ids: list[torch.Tensor],
    settings: Resolved, generator: torch.Generator, n: int, captioned: bool, prior: bool = False,
    empty_ids: list[torch.Tensor] | None = None,
) -> Rows:
    """``n`` samples of one of ``groups`` (chosen by its share of the pictures, when there are several),
    each under one of ``prompt_ids`` (its own picture's, when ``captioned``), or, for a share
    ``caption_dropout`` of them, under the empty prompt (``empty_ids``, ``(T,)`` per text encoder; None, as for
    class pictures, drops no caption)."""
    group = groups[0]
    if len(groups) > 1:  # one training size per step and concept (drawn only then: one size draws as before)
        counts = torch.tensor([float(len(g.index)) for g in groups])
        group = groups[int(torch.multinomial(counts, 1, generator=generator))]
    mean, std, n_images = group.mean, group.std, len(group.index)
    image = torch.randint(n_images, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < settings.flip_p
    template = torch.randint(prompt_ids[0].shape[0], (n,), generator=generator)
    if captioned:  # image i is trained under prompt i, its caption
        template = group.index[image]  # drawn anyway, so a concept's other draws do not depend on its captions
    shape = (n, *mean.shape[1:])
    eps = torch.randn(shape, generator=generator).to(mean.device)
    noise = torch.randn(shape, generator=generator).to(mean.device)
    t = model.family.timesteps(model, n, generator, min_timestep_fraction, settings.timestep_power)
    row = (image + flip.long() * n_images).to(mean.device)
    latents = mean[row] + std[row] * eps  # (n, C, h, w): a fresh sample of q(z|x)
    latents = model.family.scale_latents(model, latents)
    ids = [p[template.to(p.device)] for p in prompt_ids]
    dropped = None
    if settings.caption_dropout and empty_ids is not None:  # drawn last: without dropout, draws as before
        dropped = (torch.rand(n, generator=generator) < settings.caption_dropout).to(mean.device)
        ids = [torch.where(dropped[:, None], e.to(p.device), p) for p, e in zip(ids, empty_ids)]
    weights = None if group.weights is None else group.weights[row]
    return Rows(latents, noise, t.to(mean.device), ids, weights, prior, dropped)


def preserved(own: Rows, prompt_ids: list[torch.Tensor], generator: torch.Generator, blank: bool = False) -> Rows:
    """``own``'s noisy samples again, each under one of ``prompt_ids`` (drawn from ``generator``), with the frozen
    model's prediction for them as the target: ai-toolkit's Differential Output Preservation under the class
    prompts; its Blank Prompt Preservation with ``blank`` (``prompt_ids`` the empty prompt's, which SDXL
    conditions on zeros). Every pixel counts (no mask): the class is kept over the whole picture."""
    n, device = len(own.latents), own.latents.device
    pick = torch.randint(prompt_ids[0].shape[0], (n,), generator=generator)
    ids = [p[pick.to(p.device)] for p in prompt_ids]
    dropped = torch.ones(n, dtype=torch.bool, device=device) if blank else None
    return Rows(own.latents, own.noise, own.t, ids, prior=True, dropped=dropped, preserve=True, blank=blank)
