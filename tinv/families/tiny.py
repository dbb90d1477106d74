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
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
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


def t5_tokenizer(words: Iterable[str], max_length: int = 32) -> T5TokenizerFast:
    """A T5 (SentencePiece Unigram) tokenizer whose pieces make each of ``words`` one token ``▁word``, other text
    single characters; ``</s>`` ends every prompt, as T5's does."""
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789<>-_.,"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"▁{w}", -1.0) for w in sorted(set(words))),
              ("▁", -3.0), *((c, -5.0) for c in chars)]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=max_length)


def _t5(vocab_size: int, seed: int) -> T5EncoderModel:
    """A tiny T5 encoder whose table is padded past its tokenizer, as T5's is (32 128 rows for 32 100 tokens), with
    T5 v1.1's dropout (inactive while frozen: a test that ran it in training mode would see it)."""
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size + 28, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.1,
                                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))


def _flux_transformer(guidance: bool, seed: int) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=[4, 6, 6])


def _flux_vae(seed: int) -> AutoencoderKL:
    """16 latent channels with FLUX.1's shift and scale, no quant convs, 2× downsampling, 32 px native."""
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=32,
                         scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def flux_scheduler(schnell: bool = False) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's: [dev] shifts with the image's length, [schnell] does not."""
    if schnell:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


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


KINDS = ("sd1", "sd2", "sdxl", "flux-dev", "flux-schnell")


def tiny_pipeline(
    kind: str = "sd1", words: Iterable[str] = (), seed: int = 0
) -> StableDiffusionPipeline | StableDiffusionXLPipeline | FluxPipeline:
    """Build a tiny random pipeline: ``sd1`` (epsilon), ``sd2`` (v-prediction), ``sdxl``, ``flux-dev`` or
    ``flux-schnell``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    tokenizer = clip_tokenizer([*BASE_WORDS, *template_words(), *words])
    eos_id = tokenizer.eos_token_id
    if kind.startswith("flux"):
        t5 = t5_tokenizer([*BASE_WORDS, *template_words(), *words])
        clip = _text_encoder(len(tokenizer), eos_id, 32, False, seed + 1)
        return FluxPipeline(scheduler=flux_scheduler(kind == "flux-schnell"), vae=_flux_vae(seed),
                            text_encoder=clip, tokenizer=tokenizer, text_encoder_2=_t5(len(t5), seed + 3),
                            tokenizer_2=t5, transformer=_flux_transformer(kind == "flux-dev", seed + 2))
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
