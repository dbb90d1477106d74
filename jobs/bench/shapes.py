"""Model shapes from the public configs (random weights: speed does not depend on the values).

SD 1.5: runwayml/stable-diffusion-v1-5's config.json files; SDXL: stabilityai/stable-diffusion-xl-base-1.0's
(its VAE has SD 1.5's shape); ``SMOKE_*``: tiny shapes for ``--smoke``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tinv.families import Components
from tinv.families.model import BaseModel, assemble, template_words
from tinv.families.sd import SD
from tinv.families.sdxl import SDXL
from tinv.families.tiny import BASE_WORDS, clip_tokenizer, sd_scheduler

SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280))
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SMOKE_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
SMOKE_UNET = dict(sample_size=8, cross_attention_dim=32, attention_head_dim=4, layers_per_block=1,
                  block_out_channels=(16, 32), norm_num_groups=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
SMOKE_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)

SDXL_TEXT = [SD15_TEXT,
             dict(SD15_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, hidden_act="gelu", projection_dim=1280)]



def sd_shaped(text: dict, unet: dict, vae: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> BaseModel:
    """A frozen SD 1.x-layout model of the given configs with random weights (no download), built on ``device``."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer([*BASE_WORDS, *template_words()], size=text["vocab_size"])
    eos = tokenizer.eos_token_id
    with torch.device(device):
        encoder = CLIPTextModel(CLIPTextConfig(**text, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos))
        parts = Components([tokenizer], [encoder], UNet2DConditionModel(**unet), AutoencoderKL(**vae), sd_scheduler())
    return assemble("random:sd1.5-shaped", Path("/nonexistent"), SD, parts, device, dtype,
                    fingerprint=f"random-weights-seed-{seed}")


def sdxl_shaped(texts: list[dict], unet: dict, vae: dict, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> BaseModel:
    """A frozen SDXL-layout model (two text encoders, the second with its projection), random weights."""
    torch.manual_seed(seed)
    tokenizers = [clip_tokenizer([*BASE_WORDS, *template_words()], size=t["vocab_size"]) for t in texts]
    eos = tokenizers[0].eos_token_id
    ids = {"bos_token_id": eos - 1, "eos_token_id": eos, "pad_token_id": eos}
    with torch.device(device):
        encoders = [CLIPTextModel(CLIPTextConfig(**texts[0], **ids)),
                    CLIPTextModelWithProjection(CLIPTextConfig(**texts[1], **ids))]
        parts = Components(tokenizers, encoders, UNet2DConditionModel(**unet), AutoencoderKL(**vae), sd_scheduler())
    return assemble("random:sdxl-shaped", Path("/nonexistent"), SDXL, parts, device, dtype,
                    fingerprint=f"random-weights-seed-{seed}")


SMOKE_SDXL_TEXT = [SMOKE_TEXT, SMOKE_TEXT]
SMOKE_SDXL_UNET = dict(SMOKE_UNET, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=8 * 6 + 32)
