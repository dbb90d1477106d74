"""The FLUX.1 section: a FLUX.1-[dev]-shaped model with random weights, trained the way tinv trains it.

Shapes from black-forest-labs/FLUX.1-dev's config files (transformer, T5 v1.1 XXL, CLIP-L, the 16-channel VAE);
the CPU section keeps their widths and cuts their depth (:data:`REDUCED`), the GPU check runs them whole.
Variants: ``ti`` / ``lora`` / ``pivotal`` at K = 1 and 4 concepts per step; ``pivotal-t5`` (vectors in T5 too: T5
runs every step, for their gradient); ``lora-uncached`` (T5 encodes the prompts every step, as a trainer without
the cache does); ``lora-int8`` (the frozen transformer quantized, ``--base-precision int8``);
``lora-checkpointing``; and, where the device runs bf16 natively, ``lora-bf16`` / ``lora-k4-bf16`` (the frozen
transformer and T5 in bf16, as tinv runs FLUX on a GPU). One sample per concept per step (the FLUX scripts'
``--train_batch_size`` is 1 in the peers' 24 GB recipes).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from jobs.bench.measure import Variant, native_half
from jobs.bench.shapes import SD15_TEXT, SD15_VAE, SMOKE_TEXT
from jobs.bench.training import checkpointing, switch, tinv_trainer
from tinv.families import Components
from tinv.families.flux import FLUX, PARKED, EncodingCache
from tinv.families.model import BaseModel, assemble, template_words
from tinv.families.quantized import quantize_denoiser
from tinv.families.tiny import BASE_WORDS, clip_tokenizer, flux_scheduler, t5_tokenizer

TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
"""FLUX.1 [dev]'s transformer: 19 double-stream and 38 single-stream blocks of width 3 072 (11.9 B parameters)."""
T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
          relative_attention_num_buckets=32, dropout_rate=0.1, feed_forward_proj="gated-gelu")
"""T5 v1.1 XXL's encoder (4.7 B parameters)."""
CLIP_L = dict(SD15_TEXT, projection_dim=768)
VAE = dict(SD15_VAE, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False)
T5_TOKENS = 512
"""[dev]'s ``max_sequence_length``."""
REDUCED = {"transformer": dict(TRANSFORMER, num_layers=1, num_single_layers=2), "t5": dict(T5, num_layers=2),
           "clip": CLIP_L, "vae": VAE}
"""FLUX widths at reduced depth: 1 double + 2 single blocks, T5 with 2 layers (the CPU section)."""
FULL = {"transformer": TRANSFORMER, "t5": T5, "clip": CLIP_L, "vae": VAE}
SMOKE = {"transformer": dict(TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=(4, 6, 6)),
         "t5": dict(T5, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=512),
         "clip": SMOKE_TEXT,
         "vae": dict(VAE, block_out_channels=(8, 16), norm_num_groups=4, sample_size=32,
                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)}
BENCH_TEMPLATES = 4
"""Prompt templates per concept in the CPU section (T5 encodes each once per concept at admission, which is not
timed; the steps cost the same whatever their number)."""
VARIANTS = ["ti", "ti-k4", "lora", "lora-k4", "pivotal", "pivotal-k4", "pivotal-t5", "lora-uncached",
            "lora-checkpointing", "lora-int8", "lora-bf16", "lora-k4-bf16"]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in ``dtype`` (a 12 B transformer never exists in fp32 on the way to bf16)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def flux_shaped(shapes: dict, device: torch.device, dtype: torch.dtype, t5_tokens: int = T5_TOKENS,
                seed: int = 0) -> BaseModel:
    """A frozen FLUX.1-[dev]-layout model of ``shapes`` (:data:`FULL`, :data:`REDUCED`, :data:`SMOKE`) with random
    weights, built on ``device``: CLIP-L in fp32, T5, the transformer and the VAE in ``dtype``."""
    torch.manual_seed(seed)
    words = [*BASE_WORDS, *template_words()]
    tokenizers = [clip_tokenizer(words, size=shapes["clip"]["vocab_size"]), t5_tokenizer(words, t5_tokens)]
    eos = tokenizers[0].eos_token_id
    with torch.device(device):
        clip = CLIPTextModel(CLIPTextConfig(**shapes["clip"], bos_token_id=eos - 1, eos_token_id=eos,
                                            pad_token_id=eos))
        with default_dtype(dtype):
            t5 = T5EncoderModel(T5Config(**shapes["t5"], pad_token_id=0, eos_token_id=1))
            transformer = FluxTransformer2DModel(**shapes["transformer"])
            vae = AutoencoderKL(**shapes["vae"])
    parts = Components(tokenizers, [clip, t5], transformer, vae, flux_scheduler(), text_dtypes=(None, dtype),
                       text_homes=(None, PARKED))
    return assemble("random:flux1-dev-shaped", Path("/nonexistent"), FLUX, parts, device, dtype,
                    fingerprint=f"random-weights-seed-{seed}")


def flux_variants(model: BaseModel, int8: BaseModel | None, resolution: int, tinv_steps: int,
                  which: list[str]) -> list[Variant]:
    """The variants of :data:`VARIANTS` asked for in ``which`` that this device runs (bf16 where native; int8 on
    ``int8``, the same model with its transformer quantized)."""
    torch.manual_seed(0)
    images = torch.rand(4, 3, resolution, resolution) * 2 - 1
    out: list[Variant] = []
    cache = EncodingCache.of(model.text_encoders[1])
    for m in filter(None, (model, int8)):  # admissions are not timed: spare them the full prompt list and the VAE
        m.templates = {k: v[:BENCH_TEMPLATES] for k, v in m.templates.items()}
        m.vae.encode = encode_once(m.vae.encode)

    def trainer(m: BaseModel, k: int, method: str, train_t5: bool = False):
        return tinv_trainer(m, images, k, resolution, tinv_steps, method, batch_size=1, train_t5=train_t5)

    for method in ("ti", "lora", "pivotal"):
        for k, name in ((1, method), (4, f"{method}-k4")):
            if name in which:
                out.append(Variant(name, f"{method}, K={k}, T5 encodings cached", trainer(model, k, method).step,
                                   k, tinv_steps))
    if "pivotal-t5" in which:
        out.append(Variant("pivotal-t5", "pivotal, K=1, vectors in CLIP-L and T5 (T5 runs every step)",
                           trainer(model, 1, "pivotal", train_t5=True).step, 1, tinv_steps))
    if "lora-uncached" in which:
        one = trainer(model, 1, "lora")
        out.append(Variant("lora-uncached", "lora, K=1, T5 encodes the prompts every step (no cache)",
                           lambda: (cache.rows.clear(), one.step()), 1, tinv_steps))
    if "lora-checkpointing" in which:
        one = trainer(model, 1, "lora")
        out.append(Variant("lora-checkpointing", "lora, K=1, gradient checkpointing on the transformer",
                           one.step, 1, tinv_steps, enter=lambda: checkpointing(model, True),
                           leave=lambda: checkpointing(model, False)))
    if "lora-int8" in which and int8 is not None:
        out.append(Variant("lora-int8", "lora, K=1, frozen transformer int8 weight-only (--base-precision int8)",
                           trainer(int8, 1, "lora").step, 1, tinv_steps, flops_from="lora"))
    if torch.bfloat16 in native_half(model.device):
        frozen = [model.denoiser, model.text_encoders[1]]
        bf16 = {"enter": switch(model, frozen, torch.bfloat16), "leave": switch(model, frozen, torch.float32),
                "dtype": "bf16"}
        for k, name in ((1, "lora-bf16"), (4, "lora-k4-bf16")):
            if name in which:
                out.append(Variant(name, f"lora, K={k}, frozen transformer and T5 in bf16",
                                   trainer(model, k, "lora").step, k, tinv_steps,
                                   flops_from=name.removesuffix("-bf16"), **bf16))
    return out


def encode_once(encode: Callable[..., Any]) -> Callable[..., Any]:
    """``encode``, answering a batch of pictures it has seen from memory (every bench concept has the same ones)."""
    seen: dict[bytes, Any] = {}

    def once(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        key = hashlib.sha256(x.detach().cpu().float().numpy().tobytes()).digest()
        if key not in seen:
            seen[key] = encode(x, *args, **kwargs)
        return seen[key]
    return once


def int8_copy(shapes: dict, device: torch.device, t5_tokens: int) -> BaseModel:
    """The same random model (same seed) with its transformer quantized int8 weight-only."""
    model = flux_shaped(shapes, device, torch.float32, t5_tokens)
    quantize_denoiser(model.denoiser, "int8", device)
    model.base_precision = "int8"
    return model


def flops_per_sample(shapes: dict, resolution: int, t5_tokens: int, method: str = "lora") -> float:
    """FLOPs of one training sample on the meta device: CLIP-L forward (its pooled text), the transformer forward
    and backward to its input (what a LoRA's or a vector's gradient needs; the adapters' own are negligible),
    T5 not counted (its encodings are cached) unless ``method`` is ``pivotal-t5`` (forward and backward)."""
    latent = resolution // 8
    tokens = (latent // 2) ** 2
    t = shapes["transformer"]
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        clip = CLIPTextModel(CLIPTextConfig(**shapes["clip"])).requires_grad_(False)
        clip.get_input_embeddings().weight.requires_grad_(method != "lora")
        pooled = clip(torch.zeros(1, 77, dtype=torch.long)).pooler_output
        if method == "pivotal-t5":
            t5 = T5EncoderModel(T5Config(**shapes["t5"])).requires_grad_(False)
            t5.get_input_embeddings().weight.requires_grad_(True)
            states = t5(torch.zeros(1, t5_tokens, dtype=torch.long)).last_hidden_state
        else:
            states = torch.randn(1, t5_tokens, t["joint_attention_dim"])
        transformer = FluxTransformer2DModel(**t).requires_grad_(False)
        x = torch.randn(1, tokens, t["in_channels"], requires_grad=True)
        out = transformer(hidden_states=x, timestep=torch.ones(1), guidance=torch.ones(1), pooled_projections=pooled,
                          encoder_hidden_states=states, txt_ids=torch.zeros(t5_tokens, 3),
                          img_ids=torch.zeros(tokens, 3), return_dict=False)[0]
        out.sum().backward()
    return float(counter.get_total_flops())


def flux_projection(samples_per_concept: int, h100_dense_bf16: float = 989e12, utilisation: float = 0.4
                    ) -> dict[str, Any]:
    """Full-size FLUX.1 [dev] at 1 024 px on paper: FLOPs per sample (:func:`flops_per_sample`), concepts per
    H100-hour at an assumed utilisation, and the frozen weights' memory per precision (activations not
    included: the GPU check measures them)."""
    budget = 3600 * h100_dense_bf16 * utilisation
    out: dict[str, Any] = {"label": "PROJECTION from a FLOP model and parameter counts, not a measurement",
                           "gpu": "H100 SXM", "peak_dense_bf16_flops": h100_dense_bf16,
                           "assumed_utilisation": utilisation, "samples_per_concept": samples_per_concept,
                           "resolution": 1024, "t5_tokens": T5_TOKENS}
    for method in ("lora", "pivotal", "pivotal-t5"):
        f = flops_per_sample(FULL, 1024, T5_TOKENS, method)
        out[method] = {"flops_per_sample": f, "concepts_per_gpu_hour": budget / (f * samples_per_concept)}
    with torch.device("meta"):
        params = {"transformer": sum(p.numel() for p in FluxTransformer2DModel(**TRANSFORMER).parameters()),
                  "t5": sum(p.numel() for p in T5EncoderModel(T5Config(**T5)).parameters()),
                  "clip_l": sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**CLIP_L)).parameters()),
                  "vae": sum(p.numel() for p in AutoencoderKL(**VAE).parameters())}
    out["parameters"] = params
    gb = 1e9
    out["weights_gb"] = {"transformer_bf16": 2 * params["transformer"] / gb,
                         "transformer_int8_or_fp8": params["transformer"] / gb,
                         "t5_bf16 (host memory once encoded, unless T5 vectors train)": 2 * params["t5"] / gb,
                         "clip_l_fp32": 4 * params["clip_l"] / gb, "vae_bf16": 2 * params["vae"] / gb}
    return out
