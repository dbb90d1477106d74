"""What one training step feeds the UNet for a concept: its cached latents, and samples drawn from them.

A concept's pictures are encoded once (with their flips, and their masks brought to the latents' size); each
step then draws, from the concept's own random stream, which picture, flip, prompt, posterior sample, noise
and timestep each of its samples gets (Textual Inversion's objective, Gal et al. 2022, arXiv 2208.01618), in
a fixed order, so a concept draws the same whatever it is packed with. :class:`tinv.trainer.PackedTrainer`
calls these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinv.concept import Framed, Latents, Rows
from tinv.models import BaseModel, encode_latents
from tinv.resolved import Resolved


def latents_of(model: BaseModel, framed: Framed) -> Latents:
    """Latent mean and std of the pictures, then of their flips (``(2n, C, h, w)`` each), and their masks
    area-averaged to the latents' size, flipped alike."""
    images = framed.images
    mean, std = encode_latents(model, torch.cat([images, images.flip(-1)]))
    weights = None
    if framed.masks is not None:
        w = F.interpolate(framed.masks.to(mean.device, torch.float32), size=tuple(mean.shape[-2:]), mode="area")
        weights = torch.cat([w, w.flip(-1)])
    return Latents(mean, std, torch.tensor(framed.index, dtype=torch.long), weights)


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
    t = timesteps(model, min_timestep_fraction, settings.timestep_power, n, generator)
    row = (image + flip.long() * n_images).to(mean.device)
    latents = mean[row] + std[row] * eps  # (n, C, h, w): a fresh sample of q(z|x)
    vae = model.vae.config
    latents = (latents - (getattr(vae, "shift_factor", None) or 0.0)) * vae.scaling_factor
    ids = [p[template.to(p.device)] for p in prompt_ids]
    dropped = None
    if settings.caption_dropout and empty_ids is not None:  # drawn last: without dropout, draws as before
        dropped = (torch.rand(n, generator=generator) < settings.caption_dropout).to(mean.device)
        ids = [torch.where(dropped[:, None], e.to(p.device), p) for p, e in zip(ids, empty_ids)]
    weights = None if group.weights is None else group.weights[row]
    return Rows(latents, noise, t.to(mean.device), ids, weights, prior, dropped)


def timesteps(
    model: BaseModel, min_timestep_fraction: float, power: float, n: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` timesteps in ``[lo, T)``: uniform, or with density ∝ (t − lo)^(power − 1)."""
    total = model.scheduler.config.num_train_timesteps
    lo = int(min_timestep_fraction * total)
    if power == 1.0:
        return torch.randint(lo, total, (n,), generator=generator)
    u = torch.rand(n, generator=generator)
    return (lo + (total - lo) * u ** (1 / power)).long().clamp(max=total - 1)


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
