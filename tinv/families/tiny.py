"""Tiny diffusers-layout models built from configs: for tests and the offline demo.

They follow the shapes of diffusers' own test fixtures (``get_dummy_components``) but carry a
hand-made CLIP tokenizer whose merges make every word of a given vocabulary a single token, so
no download is ever needed. Weights are random (seeded); nothing here is a trained model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tinv.families.model import template_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BASE_WORDS = ("object", "style", "toy", "cat", "dog", "painting", "red", "blue", "cube", "ball")


def clip_tokenizer(words: Iterable[str], size: int | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over bytes plus merges that make each of ``words`` one token.

    ``size`` pads the vocabulary with unused pieces to that many tokens (e.g. CLIP's 49,408, so
    a text encoder of the real shape has exactly one embedding row per token).
    """
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for piece in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        chars = [bytes_to_unicode()[b] for b in word.encode()]
        chars[-1] += "</w>"
        left = chars[0]
        for right in chars[1:]:
            merged = left + right
            if merged not in vocab:
                merges.append((left, right))
                vocab[merged] = len(vocab)
            left = merged
    # BPE applies the lowest-ranked merge first, so one word's merges can split another word's
    # chain ("on" before "ton"): join such a word's pieces with merges ranked after all others,
    # which only ever apply once no earlier merge does (words already whole stay whole)
    while split := [pieces for pieces in _bpe(vocab, merges, sorted(set(words))) if len(pieces) > 1]:
        for pieces in split:
            left = pieces[0]
            for right in pieces[1:]:
                if (left, right) not in merges:
                    merges.append((left, right))
                    vocab.setdefault(left + right, len(vocab))
                left += right
    for i in range(len(vocab), (size or 0) - 2):
        vocab[f"<unused{i}>"] = i
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], words: list[str]) -> list[list[str]]:
    """The pieces CLIP's BPE makes of each of ``words`` with these merges."""
    tok = CLIPTokenizer(vocab={**vocab, BOS: len(vocab), EOS: len(vocab) + 1}, merges=merges)
    return [tok.tokenize(w) for w in words]


def _text_encoder(vocab_size: int, eos_id: int, hidden: int, projection: bool, seed: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=eos_id - 1,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        projection_dim=hidden,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config)


def _vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _unet(cross_dim: int, sdxl: bool, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + cross_dim // 2,
            transformer_layers_per_block=1,
        )
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **extra,
    )


def sd_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """Stable Diffusion's training noise schedule (scaled linear betas 0.00085..0.012, 1000 steps)."""
    return DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )


def tiny_pipeline(
    kind: str = "sd1", words: Iterable[str] = (), seed: int = 0
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Build a tiny random pipeline: ``sd1`` (epsilon), ``sd2`` (v-prediction) or ``sdxl``."""
    if kind not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"kind must be sd1, sd2 or sdxl, got {kind!r}")
    tokenizer = clip_tokenizer([*BASE_WORDS, *template_words(), *words])
    eos_id = tokenizer.eos_token_id
    scheduler = sd_scheduler("v_prediction" if kind == "sd2" else "epsilon")
    if kind != "sdxl":
        return StableDiffusionPipeline(
            vae=_vae(seed),
            text_encoder=_text_encoder(len(tokenizer), eos_id, 32, False, seed + 1),
            tokenizer=tokenizer,
            unet=_unet(32, False, seed + 2),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=_vae(seed),
        text_encoder=_text_encoder(len(tokenizer), eos_id, 32, False, seed + 1),
        text_encoder_2=_text_encoder(len(tokenizer), eos_id, 32, True, seed + 3),
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer([*BASE_WORDS, *template_words(), *words]),
        unet=_unet(64, True, seed + 2),
        scheduler=scheduler,
        add_watermarker=False,
    )


def save_tiny_model(path: str | Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it to ``path`` (diffusers layout)."""
    path = Path(path)
    tiny_pipeline(kind, seed=seed).save_pretrained(path)
    return path
