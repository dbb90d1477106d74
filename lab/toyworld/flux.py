"""The toy world's FLUX.1-layout model: a tiny flow-matching transformer with the toy's two text encoders.

``python -m lab.toyworld train --layout flux --out DIR`` calls :func:`train_flux_model`. The result is an ordinary
``FluxPipeline`` folder of the [dev] layout (a guidance embedding), made the way FLUX.1 [dev] was:

1. a 16-channel VAE (FLUX.1's latent width; its shift and scale are the latents' mean and 1 / std);
2. the transformer, CLIP-L's stand-in (its pooled text) and T5's stand-in (its states) trained jointly by rectified
   flow (Liu et al. 2022; Esser et al. 2024's logit-normal timesteps), latents packed 2×2 as ``FluxPipeline`` packs
   them, with the world's empty captions for the unconditional case;
3. guidance distillation (Meng et al. 2023, stage one): the transformer learns to predict, at guidance ``g`` in its
   guidance embedding, what classifier-free guidance at ``g`` gives with the frozen stage-2 model as teacher, so
   that the product samples it as it samples [dev] (embedded guidance, no negative prompt).

Shapes (all small): 32 px pictures → 8×8×16 latents → 16 packed tokens of 64; 16 text tokens; 4 heads of 16.
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
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tqdm import tqdm
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from lab.toyworld import nets
from lab.toyworld.fit import (
    Description,
    FitConfig,
    _batches,
    _schedule,
    encode_all,
    rgb_inputs,
    step_with_ema,
    train_vae,
    write_templates,
)
from lab.toyworld.scorer import pixels
from lab.toyworld.world import BACKDROP_WORD, DESCRIPTOR_WORD, SIZE, WORDS, Item, training_set
from tinv.families.model import template_words
from tinv.families.tiny import t5_tokenizer

LATENT_CHANNELS = 16
WIDTH = 64
"""The text encoders' width and the transformer's (4 heads of 16)."""


@dataclass(frozen=True)
class FluxFitConfig(FitConfig):
    """How the FLUX-layout toy model is trained: :class:`FitConfig`'s data, VAE, optimiser and steps, σ shifted,
    then guidance distillation."""

    steps: int = 12_000
    """Transformer + text encoder steps by rectified flow on cached latents (the SD toy's count)."""
    shift: float = 3.0
    """SD3's timestep shift (Esser et al. 2024, §5.3.2), FLUX.1 [dev]'s ``shift``: σ = s·u / (1 + (s − 1)·u) for
    logit-normal ``u``, in training and (the saved scheduler's static shift) in sampling. This world's 16-channel
    latents are redundant: a noised picture keeps its shape up to σ ≈ 0.8, so the shape is decided above it, where
    unshifted logit-normal σ falls 8 % of the time, shifted 39 % (lab/README.md, ``lab.probes.flux_shapes``)."""
    distill_steps: int = 1_500
    """Guidance-distillation steps (transformer only, the text encoders frozen)."""
    distill_lr: float = 3e-4
    guidance: tuple[float, float] = (1.0, 7.0)
    """The range of guidance values distilled into the guidance embedding."""


def t5_tokenizer_toy() -> T5TokenizerFast:
    """T5's stand-in tokenizer: every word of the world one piece, anything else single characters."""
    return t5_tokenizer([*WORDS, *template_words(), "object", "style"], max_length=nets.MAX_TOKENS)


def t5_encoder(vocab_size: int) -> T5EncoderModel:
    """T5's stand-in: 2 layers of width 64, its table padded past the tokenizer as T5's is."""
    return T5EncoderModel(T5Config(vocab_size=vocab_size + 28, d_model=WIDTH, d_kv=16, d_ff=2 * WIDTH, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))


def vae() -> AutoencoderKL:
    """32 px → 8×8×16 latents, no quant convs (as FLUX.1's)."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=SIZE, use_quant_conv=False,
                         use_post_quant_conv=False)


def transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=4,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=WIDTH,
                                  pooled_projection_dim=WIDTH, guidance_embeds=True, axes_dims_rope=[4, 6, 6])


class Denoiser:
    """The transformer on ``(B, 16, 8, 8)`` latents as ``FluxPipeline`` calls it (packed 2×2, position ids)."""

    def __init__(self, model: FluxTransformer2DModel) -> None:
        self.model = model
        self.image_ids = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
        self.text_ids = torch.zeros(nets.MAX_TOKENS, 3)

    def __call__(self, z, sigma, states, pooled, guidance):
        b, c, h, w = z.shape
        out = self.model(hidden_states=FluxPipeline._pack_latents(z, b, c, h, w), timestep=sigma, guidance=guidance,
                         pooled_projections=pooled, encoder_hidden_states=states, txt_ids=self.text_ids,
                         img_ids=self.image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * 4, w * 4, 4)


def logit_normal(n: int, gen: torch.Generator, shift: float) -> torch.Tensor:
    """σ = shift(sigmoid(N(0, 1))) (Esser et al. 2024's logit-normal sampling and timestep shift)."""
    u = torch.sigmoid(torch.randn(n, generator=gen))
    return shift * u / (1 + (shift - 1) * u)


def scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    """The sampling schedule with the training shift, static (as SD3's; the toy has one picture size)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


def train_denoiser(latents, stds, ids, items: list[Item], cfg: FluxFitConfig, progress: Callable = tqdm):
    """Rectified flow (transformer + both text encoders) then guidance distillation; EMA weights returned."""
    torch.manual_seed(cfg.seed + 2)
    clip_ids, t5_ids = ids
    tok, t5_tok = nets.tokenizer(), t5_tokenizer_toy()
    clip, t5 = nets.text_encoder(len(tok), tok.eos_token_id), t5_encoder(len(t5_tok))
    denoiser = Denoiser(transformer())
    live = (denoiser.model, clip, t5)
    ema = tuple(copy.deepcopy(m).requires_grad_(False) for m in live)  # before the hooks, which stay on the live ones
    descriptions = [
        (Description(encoder, tokenizer.encode(word, add_special_tokens=False)[0]), rgb_inputs(items, field))
        for encoder, tokenizer in ((clip, tok), (t5, t5_tok))
        for field, word in (("rgb", DESCRIPTOR_WORD), ("backdrop_rgb", BACKDROP_WORD))
    ]
    linears = [p for description, _ in descriptions for p in description.linear.parameters()]
    params = [p for m in live for p in m.parameters()] + linears
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    batches = _batches(len(latents), cfg.batch, np.random.default_rng(cfg.seed + 4))
    low, high = cfg.guidance

    def draw(idx):
        x = latents[idx] + stds[idx] * torch.randn(latents[idx].shape, generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        sigma = logit_normal(len(idx), gen, cfg.shift)
        noisy = (1 - sigma[:, None, None, None]) * x + sigma[:, None, None, None] * noise
        return noisy, noise - x, sigma

    def encode(encoders, idx):
        for description, rgb in descriptions:
            description.rgb = rgb[idx]
        clip_model, t5_model = encoders
        return t5_model(t5_ids[idx]).last_hidden_state, clip_model(clip_ids[idx]).pooler_output

    bar = progress(range(cfg.steps), desc="flow")
    for step in bar:
        idx = next(batches)
        noisy, target, sigma = draw(idx)
        states, pooled = encode((clip, t5), idx)
        guidance = low + (high - low) * torch.rand(len(idx), generator=gen)  # not yet meaningful: learnt as noise
        loss = F.mse_loss(denoiser(noisy, sigma, states, pooled, guidance), target)
        step_with_ema(opt, loss, params, cfg.lr * _schedule(step, cfg.steps), cfg.ema, step, zip(ema, live))
        if step % 100 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.4f}")

    # stage 3: the frozen EMA model is the teacher; the student transformer starts from it
    teacher = Denoiser(ema[0])
    student = Denoiser(copy.deepcopy(ema[0]).requires_grad_(True))
    ema_student = copy.deepcopy(ema[0]).requires_grad_(False)
    frozen = (ema[1], ema[2])
    for (description, _), encoder in zip(descriptions, (ema[1], ema[1], ema[2], ema[2])):
        encoder.get_input_embeddings().register_forward_hook(description._hook)
    for description, _ in descriptions:
        description.rgb = torch.zeros(1, 3)
    empty_states, empty_pooled = (t[None] for t in _empty(frozen, t5_tok, tok))
    opt = torch.optim.AdamW(student.model.parameters(), lr=cfg.distill_lr, weight_decay=1e-2)
    bar = progress(range(cfg.distill_steps), desc="guidance")
    for step in bar:
        idx = next(batches)
        noisy, _, sigma = draw(idx)
        guidance = low + (high - low) * torch.rand(len(idx), generator=gen)
        with torch.no_grad():
            states, pooled = encode(frozen, idx)
            b = len(idx)
            cond = teacher(noisy, sigma, states, pooled, guidance)
            uncond = teacher(noisy, sigma, empty_states.expand(b, -1, -1), empty_pooled.expand(b, -1), guidance)
            target = uncond + guidance[:, None, None, None] * (cond - uncond)
        loss = F.mse_loss(student(noisy, sigma, states, pooled, guidance), target)
        step_with_ema(opt, loss, list(student.model.parameters()), cfg.distill_lr * _schedule(step, cfg.distill_steps),
                      cfg.ema, step, [(ema_student, student.model)])
        if step % 100 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.4f}")
    for description, _ in descriptions:
        description.rgb = torch.zeros(0, 3)
    return ema_student.eval(), ema[1].eval(), ema[2].eval()


@torch.no_grad()
def _empty(encoders, t5_tok, tok) -> tuple[torch.Tensor, torch.Tensor]:
    clip_model, t5_model = encoders
    ids = tok("", padding="max_length", max_length=nets.MAX_TOKENS, return_tensors="pt").input_ids
    t5 = t5_tok("", padding="max_length", max_length=nets.MAX_TOKENS, return_tensors="pt").input_ids
    return t5_model(t5).last_hidden_state[0], clip_model(ids).pooler_output[0]


def train_flux_model(out: str | Path, cfg: FluxFitConfig = FluxFitConfig(), progress: Callable = tqdm) -> Path:
    """Generate the data, train everything, save a ``FluxPipeline`` folder at ``out``."""
    torch.set_num_threads(cfg.threads)
    images, captions, items = training_set(cfg.images, cfg.seed)
    x = pixels(images)
    autoencoder = train_vae(x, cfg, progress, build=vae)
    means, stds = encode_all(autoencoder, x)
    shift, scale = float(means.mean()), float(1.0 / means.std())
    autoencoder.register_to_config(shift_factor=shift, scaling_factor=scale)
    tok, t5_tok = nets.tokenizer(), t5_tokenizer_toy()
    ids = [t(captions, padding="max_length", max_length=nets.MAX_TOKENS, truncation=True,
             return_tensors="pt").input_ids for t in (tok, t5_tok)]
    model, clip, t5 = train_denoiser((means - shift) * scale, stds * scale, ids, items, cfg, progress)
    pipe = FluxPipeline(scheduler=scheduler(cfg.shift), vae=autoencoder, text_encoder=clip, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=model)
    out = Path(out)
    pipe.save_pretrained(out)
    (out / "tinv_toyworld.json").write_text(json.dumps({"fit": asdict(cfg)}, indent=1))
    write_templates(out)
    return out
