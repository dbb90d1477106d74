"""The baseline: diffusers' ``examples/textual_inversion/textual_inversion.py``, one training step of it.

What the script does per step, reproduced on tinv's loaded model: the VAE encodes the batch's images
again (``cache=False``), the text encoder runs in fp32 whatever the frozen model's precision, AdamW
updates the whole token-embedding table, and every row but the placeholder's is restored afterwards.
``RECIPE`` holds the script's defaults.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tinv.families.model import BaseModel

RECIPE = {"steps": 3000, "batch_size": 4, "learning_rate": 5e-4 * 4, "weight_decay": 1e-2}
"""diffusers' examples/textual_inversion defaults (lr 5e-4 scaled by batch 4, --scale_lr)."""


def recipe_step(model: BaseModel, images: torch.Tensor, prompts: list[str], cache: bool) -> Callable[[], None]:
    """diffusers' textual_inversion example: whole-table AdamW, other rows restored every step.

    The placeholder is added to a copy of the tokenizer and text encoder (``resize_token_embeddings``);
    ``cache`` swaps the per-step VAE encode for a cached latent distribution (everything else equal).
    """
    tokenizer, encoder = copy.deepcopy(model.tokenizers[0]), copy.deepcopy(model.text_encoders[0]).float()
    tokenizer.add_tokens("<recipe-ph>")
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = encoder.get_input_embeddings().weight
    table.requires_grad_(True)
    original = table.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[tokenizer.convert_tokens_to_ids("<recipe-ph>")] = False
    optimizer = torch.optim.AdamW([table], lr=RECIPE["learning_rate"], weight_decay=RECIPE["weight_decay"])
    ids = tokenizer([p.format("<recipe-ph>") for p in prompts], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(model.device)
    vae, unet, scheduler, dtype = model.vae, model.denoiser, model.scheduler, model.dtype
    with torch.no_grad():
        dist = vae.encode(images.to(model.device, vae.dtype)).latent_dist
        cached = dist.mean, dist.std
    batch, generator = RECIPE["batch_size"], torch.Generator().manual_seed(0)

    def step() -> None:
        pick = torch.randint(len(images), (batch,), generator=generator)
        with torch.no_grad():
            if cache:
                mean, std = cached[0][pick], cached[1][pick]
                latents = mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)
            else:
                latents = vae.encode(images[pick].to(model.device, vae.dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=generator).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = encoder(ids[torch.randint(len(ids), (batch,), generator=generator)])[0].to(dtype)
        pred = unet(noisy.to(dtype), t, hidden).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            table[keep] = original[keep]

    return step
