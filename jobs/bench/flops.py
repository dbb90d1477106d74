"""The FLOP model: FLOPs per training sample counted on the meta device, and the GPU projection.

``register_cpu_attention_flops`` gives ``FlopCounterMode`` a formula for PyTorch's CPU attention kernels,
which it lacks (attention is about a fifth of a 512 px UNet step); the benchmark calls it before counting.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count
from transformers import CLIPTextConfig, CLIPTextModel

from jobs.bench.recipe import RECIPE
from jobs.bench.shapes import SD15_TEXT, SD15_UNET, SD15_VAE, SDXL_TEXT, SDXL_UNET


@functools.cache
def register_cpu_attention_flops() -> None:
    """Register FLOP formulas for ``_scaled_dot_product_flash_attention_for_cpu`` and its backward (once)."""

    @register_flop_formula([torch.ops.aten._scaled_dot_product_flash_attention_for_cpu])
    def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    @register_flop_formula([torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward])
    def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)


def flops_per_sample(unet_cfg: dict, text_cfgs: list[dict], latent: int, tokens: int = 77) -> float:
    """FLOPs of one TI training sample (text encoders forward + backward to the input, UNet forward +
    backward to its input), counted on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg).requires_grad_(False)
        encoders = [CLIPTextModel(CLIPTextConfig(**c)).requires_grad_(False) for c in text_cfgs]
        with FlopCounterMode(display=False) as counter:
            hidden = []
            for enc in encoders:  # the gradient flows back to the token embeddings, as TI's does
                enc.get_input_embeddings().weight.requires_grad_(True)
                ids = torch.zeros(1, tokens, dtype=torch.long)
                hidden.append(enc(ids, output_hidden_states=True).hidden_states[-2])
            cond = torch.cat(hidden, -1)
            added = None
            if unet_cfg.get("addition_embed_type") == "text_time":
                added = {"text_embeds": torch.randn(1, text_cfgs[-1]["projection_dim"]), "time_ids": torch.randn(1, 6)}
            x = torch.randn(1, 4, latent, latent)
            out = unet(x, torch.tensor([500]), cond, added_cond_kwargs=added).sample
            out.sum().backward()
    return float(counter.get_total_flops())



def projection(h100_dense_bf16: float = 989e12, utilisation: float = 0.4,
               samples_per_concept: int = 2000) -> dict[str, Any]:
    """Concepts per GPU-hour on paper: FLOPs/sample × samples/concept ÷ (peak × utilisation)."""
    out = {"label": "PROJECTION from a FLOP model, not a measurement", "gpu": "H100 SXM",
           "peak_dense_bf16_flops": h100_dense_bf16, "assumed_utilisation": utilisation,
           "samples_per_concept": samples_per_concept}
    budget = 3600 * h100_dense_bf16 * utilisation  # FLOPs in one GPU-hour
    for name, unet_cfg, texts, latent in [("sd15_512px", SD15_UNET, [SD15_TEXT], 64),
                                          ("sdxl_1024px", SDXL_UNET, SDXL_TEXT, 128)]:
        f, vae = flops_per_sample(unet_cfg, texts, latent), vae_encode_flops(latent * 8)
        out[name] = {"flops_per_sample": f, "vae_encode_flops": vae,
                     "concepts_per_gpu_hour": budget / (f * samples_per_concept),
                     "recipe_concepts_per_gpu_hour": budget / ((f + vae) * RECIPE["steps"] * RECIPE["batch_size"])}
    return out


def vae_encode_flops(size: int) -> float:
    """FLOPs of one VAE encode of a ``size`` px image (the recipe pays it every sample), on the meta device."""
    with torch.device("meta"):
        vae = AutoencoderKL(**SD15_VAE).requires_grad_(False)  # SDXL's VAE has the same shape
        with FlopCounterMode(display=False) as counter:
            vae.encode(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())
