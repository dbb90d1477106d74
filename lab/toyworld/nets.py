"""The toy world's model: a ~1.5 M-parameter Stable-Diffusion-shaped pipeline, from configs."""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lab.toyworld.world import SIZE, WORDS
from tinv.families.model import template_words
from tinv.families.tiny import clip_tokenizer

MAX_TOKENS = 16
"""Prompts of the world are short; 16 positions keep cross-attention cheap."""


def tokenizer() -> CLIPTokenizer:
    """CLIP BPE whose merges make every word of the world (and of tinv's templates) one token."""
    tok = clip_tokenizer([*WORDS, *template_words(), "object", "style"])
    tok.model_max_length = MAX_TOKENS
    return tok


def text_encoder(vocab_size: int, eos_id: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=eos_id - 1,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            projection_dim=64,
        )
    )


def vae() -> AutoencoderKL:
    """32 px → 8×8×4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=False
    )
