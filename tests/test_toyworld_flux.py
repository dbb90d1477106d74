"""The lab's FLUX.1-layout toy model: trained from configs, saved as a ``FluxPipeline`` folder tinv loads as [dev]."""

from __future__ import annotations

import torch

from lab.toyworld.flux import FluxFitConfig, logit_normal, train_flux_model
from lab.toyworld.world import TEMPLATES
from tinv.families.model import load_base_model


def test_the_lab_trains_a_flux_layout_toy_model_that_tinv_loads_as_flux_dev(tmp_path):
    cfg = FluxFitConfig(images=96, vae_steps=2, vae_batch=8, steps=2, distill_steps=2, batch=8)
    out = train_flux_model(tmp_path / "toy", cfg, progress=lambda steps, **_: steps)
    model = load_base_model(str(out))
    assert model.family.name == "flux" and model.family.version(model) == "flux-dev" and model.resolution == 32
    vae = model.vae.config
    assert vae.latent_channels == 16 and vae.shift_factor != 0 and vae.scaling_factor != 1  # the latents' own
    assert model.templates["object"] == TEMPLATES  # the world's prompts ship with it
    clip, t5 = model.tokenizers
    assert len(clip("a striped red star").input_ids) == 6  # BOS, a token per word, EOS
    assert len(t5("a striped red star").input_ids) == 5  # a token per word, </s>
    assert model.text_encoders[1].get_input_embeddings().num_embeddings > len(t5)  # padded, as T5's table
    guidance = model.denoiser.time_text_embed.guidance_embedder
    assert any(p.abs().sum() > 0 for p in guidance.parameters()) and torch.isfinite(
        next(model.denoiser.parameters())).all()
    scheduler = model.scheduler.config  # samples with the shift it was trained with
    assert scheduler.shift == cfg.shift == 3.0 and not scheduler.use_dynamic_shifting


def test_the_toy_flow_trains_where_the_shape_is_decided():
    share_noisy = {s: logit_normal(20_000, torch.Generator().manual_seed(0), s).gt(0.85).float().mean().item()
                   for s in (1.0, 3.0)}
    assert share_noisy[1.0] < 0.06 < 0.2 < share_noisy[3.0]  # σ > 0.85: 4 % unshifted, a quarter at shift 3
