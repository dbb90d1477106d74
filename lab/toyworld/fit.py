"""Train the toy world's text-to-image model from a seed: VAE first, then UNet + text encoder.

``python -m lab.toyworld train --out DIR`` calls :func:`train_model`. The result is an
ordinary diffusers folder (``StableDiffusionPipeline.save_pretrained``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from tqdm import tqdm

from lab.toyworld import nets
from lab.toyworld.scorer import pixels
from lab.toyworld.world import (
    BACKDROP_WORD,
    DESCRIPTOR_WORD,
    EVAL_PROMPTS,
    STYLE_TEMPLATES,
    TEMPLATES,
    Item,
    training_set,
)
from tinv.families.model import TEMPLATES_FILE


@dataclass(frozen=True)
class FitConfig:
    """How the toy model is trained."""

    seed: int = 0
    """Seeds the data, the weights and every draw."""
    images: int = 30_000
    """Training pictures generated once."""
    vae_steps: int = 1_200
    """VAE optimisation steps."""
    vae_batch: int = 32
    """Pictures per VAE step."""
    steps: int = 12_000
    """UNet + text encoder steps on cached latents."""
    batch: int = 96
    """Captioned latents per UNet step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (cosine decay after a 500-step warm-up)."""
    ema: float = 0.999
    """EMA decay of the saved weights."""
    threads: int = 1
    """torch threads (one is faster than two when anything else shares the 2 cores)."""


def _batches(n: int, size: int, rng: np.random.Generator):
    while True:
        yield torch.from_numpy(rng.integers(n, size=size))


def _schedule(step: int, total: int, warmup: int = 500) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(pixels: torch.Tensor, cfg: FitConfig, progress: Callable = tqdm,
              build: Callable[[], torch.nn.Module] = nets.vae) -> torch.nn.Module:
    """Reconstruction (MSE) plus a small KL term, so latents stay sampled, not memorised (``build``: the VAE)."""
    torch.manual_seed(cfg.seed)
    vae = build()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed + 1)
    batches = _batches(len(pixels), cfg.vae_batch, rng)
    for step in progress(range(cfg.vae_steps), desc="vae"):
        x = pixels[next(batches)]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * dist.kl().mean()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _schedule(step, cfg.vae_steps, 200)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in pixels.split(512):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def rgb_inputs(items: list[Item], field: str = "rgb") -> torch.Tensor:
    """``(N, 3)`` in [-1, 1]: each described picture's colour, or its backdrop's (zeros for the others)."""
    return torch.tensor([getattr(it, field) or (127.5,) * 3 for it in items]) / 127.5 - 1


class Description:
    """Adds a learned linear function of a described colour to the embedding of its word.

    A forward hook on the text encoder's token embedding, so the encoder itself stays a plain
    ``CLIPTextModel`` (the function is used in training only and not saved).
    """

    def __init__(self, te: torch.nn.Module, marker: int) -> None:
        self.linear = torch.nn.Linear(3, te.config.hidden_size)
        self.marker = marker
        self.rgb = torch.zeros(0, 3)
        te.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, out: torch.Tensor) -> torch.Tensor:
        at = (args[0] == self.marker).unsqueeze(-1)  # (B, T, 1)
        return out + at * self.linear(self.rgb).unsqueeze(1)


def step_with_ema(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, lr: float, ema: float, step: int,
                  pairs) -> None:
    """One AdamW step at ``lr`` (gradients clipped to norm 1), then each ``(ema, live)`` pair's EMA copy moved
    toward the live model (decay warming up to ``ema``)."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        decay = min(ema, (1 + step) / (10 + step))
        for copy_, live in pairs:
            for e, p in zip(copy_.parameters(), live.parameters()):
                e.lerp_(p, 1 - decay)


def train_denoiser(latents, stds, ids, items: list[Item], scale: float, cfg: FitConfig, progress: Callable = tqdm):
    """UNet + text encoder jointly on cached latents, epsilon loss, EMA weights returned."""
    torch.manual_seed(cfg.seed + 2)
    tok = nets.tokenizer()
    unet, te = nets.unet(), nets.text_encoder(len(tok), tok.eos_token_id)
    sched = nets.scheduler()
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    descriptions = [  # (hook, its described RGB per training picture), for a colour and for a backdrop
        (Description(te, tok.encode(word, add_special_tokens=False)[0]), rgb_inputs(items, field))
        for field, word in (("rgb", DESCRIPTOR_WORD), ("backdrop_rgb", BACKDROP_WORD))
    ]
    linears = [p for description, _ in descriptions for p in description.linear.parameters()]
    params = [*unet.parameters(), *te.parameters(), *linears]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    batches = _batches(len(latents), cfg.batch, np.random.default_rng(cfg.seed + 4))
    bar = progress(range(cfg.steps), desc="unet+text")
    for step in bar:
        idx = next(batches)
        z = (latents[idx] + stds[idx] * torch.randn(latents[idx].shape, generator=gen)) * scale  # (B, 4, 8, 8)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        for description, rgb in descriptions:
            description.rgb = rgb[idx]
        hidden = te(ids[idx]).last_hidden_state  # (B, T, 64)
        pred = unet(sched.add_noise(z, noise, t), t, hidden).sample
        loss = F.mse_loss(pred, noise)
        step_with_ema(opt, loss, params, cfg.lr * _schedule(step, cfg.steps), cfg.ema, step,
                      ((ema_unet, unet), (ema_te, te)))
        if step % 100 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema_unet.eval(), ema_te.eval()


def train_model(out: str | Path, cfg: FitConfig = FitConfig(), progress: Callable = tqdm) -> Path:
    """Generate the data, train everything, save a diffusers folder at ``out``."""
    torch.set_num_threads(cfg.threads)
    images, captions, items = training_set(cfg.images, cfg.seed)
    x = pixels(images)  # (N, 3, 32, 32)
    vae = train_vae(x, cfg, progress)
    means, stds = encode_all(vae, x)
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    tok = nets.tokenizer()
    ids = tok(captions, padding="max_length", max_length=nets.MAX_TOKENS, truncation=True, return_tensors="pt")
    unet, te = train_denoiser(means, stds, ids.input_ids, items, scale, cfg, progress)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=nets.scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out)
    pipe.save_pretrained(out)
    (out / "tinv_toyworld.json").write_text(json.dumps({"fit": asdict(cfg)}, indent=1))
    write_templates(out)
    return out


def write_templates(out: Path) -> None:
    """Ship the world's own prompt templates with the model (read by ``tinv.families.model``)."""
    templates = {"object": TEMPLATES, "style": STYLE_TEMPLATES, "eval": EVAL_PROMPTS}
    (out / TEMPLATES_FILE).write_text(json.dumps(templates, indent=1))
