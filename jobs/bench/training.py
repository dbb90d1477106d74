"""Training throughput: the recipe, then tinv with each optimisation switched on in turn."""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Callable
from typing import Any

import torch

from jobs.bench.measure import HALF_NAMES, Variant, native_half
from jobs.bench.recipe import RECIPE, recipe_step
from tinv.families.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from tinv.families.model import BaseModel, set_attention
from tinv.manifest import ConceptSpec
from tinv.settings import WITH_CLASS_PICTURES, Recipe, TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.splice import Adapters
from tinv.training.trainer import PackedTrainer

VARIANTS = ["recipe", "latent-cache", "tinv", "tinv-k4", "channels-last", "compile", "threads-1", "bf16", "bf16-unet",
            "fp16", "fp16-unet", "checkpointing", "xformers"]
METHOD_VARIANTS = ["tinv", "tinv-k4", "lora", "lora-k4", "pivotal", "pivotal-k4", "bf16-unet", "tinv-k4-bf16-unet",
                   "lora-bf16-unet", "lora-k4-bf16-unet", "pivotal-bf16-unet", "pivotal-k4-bf16-unet"]
"""The methods section: each method at K=1 and K=4 (a packed batch of K concepts, each its own adapter), fp32
and with the frozen UNet in bf16."""
PRESERVATIONS = {"pivotal-images": ("images", False), "pivotal-output": ("output", False),
                 "pivotal-output-blank": ("output", True)}
"""The preservation section's prior variants (beside plain ``pivotal``): ``--prior-preservation`` and
``--blank-prompt-preservation``."""
PRESERVATION_VARIANTS = ["pivotal", *PRESERVATIONS]


def tinv_trainer(model: BaseModel, images: torch.Tensor, k: int, resolution: int, steps: int,
                 method: str = "ti", preservation: str | None = None, blank: bool = False,
                 batch_size: int = RECIPE["batch_size"], train_t5: bool = False) -> PackedTrainer:
    """K concepts of ``method`` on ``images``; with ``preservation``, each with a class prompt kept that way (the
    class pictures, where it trains on them: ``images`` again, which costs the same as the base model's)."""
    cfg = TrainConfig(steps=steps, concepts_per_actor=k, batch_size=batch_size, resolution=resolution,
                      prior_preservation=preservation or "images", recipe=Recipe(blank_prompt_preservation=blank))
    trainer = PackedTrainer(model, cfg)
    for s in range(k):
        token = f"<bench{s}>" if method != "lora" else f"bench{s}"
        spec = ConceptSpec(f"bench{s}", ("bench:0",), placeholder_token=token, method=method, seed=s,
                           class_prompt="a photo of a thing" if preservation else "", train_t5=train_t5)
        pictures = images if preservation in WITH_CLASS_PICTURES else None
        trainer.admit(s, ConceptData(spec, images, pictures))
    return trainer


def switch(model: BaseModel, modules: list[torch.nn.Module], dtype: torch.dtype) -> Callable[[], None]:
    """Put ``modules`` in ``dtype`` (the model's own dtype follows the UNet); their LoRA adapters stay fp32, as
    the trainer makes them (:meth:`tinv.training.splice.Adapters.add`) whatever the base's dtype."""
    def apply() -> None:
        for m in modules:
            m.to(dtype)
        for adapters in Adapters.present(modules):
            for layer in adapters.layers():
                layer.lora_A.float()
                layer.lora_B.float()
        model.dtype = dtype
    return apply


def checkpointing(model: BaseModel, on: bool) -> None:
    """Switch gradient checkpointing of the UNet and the text encoders on or off."""
    (enable_gradient_checkpointing if on else disable_gradient_checkpointing)(model)


def train_variants(model: BaseModel, resolution: int, tinv_steps: int, which: list[str]) -> list[Variant]:
    """The recipe, then tinv with each optimisation switched on in turn."""
    torch.manual_seed(0)
    images = torch.rand(6, 3, resolution, resolution) * 2 - 1
    prompts = list(model.templates["object"])
    recipe_n, tinv_n = RECIPE["steps"] * RECIPE["batch_size"], tinv_steps * RECIPE["batch_size"]
    b = RECIPE["batch_size"]
    out: list[Variant] = []
    want = lambda name: name in which  # noqa: E731
    if want("recipe"):
        out.append(Variant("recipe", "diffusers example: VAE encode every step, whole-table AdamW + restore",
                           recipe_step(model, images, prompts, cache=False), b, recipe_n))
    if want("latent-cache"):
        out.append(Variant("latent-cache", "recipe + latents cached once per image (sampled from mean/std)",
                           recipe_step(model, images, prompts, cache=True), b, recipe_n))
    one = tinv_trainer(model, images, 1, resolution, tinv_steps)
    if want("tinv"):
        out.append(Variant("tinv", "+ separate trainable vectors (tinv.PackedTrainer, K=1)", one.step, b, tinv_n))
    unet = model.denoiser
    bf16 = {"enter": switch(model, [unet], torch.bfloat16), "leave": switch(model, [unet], torch.float32),
            "dtype": "bf16"} if torch.bfloat16 in native_half(model.device) else None
    if want("tinv-k4") or want("tinv-k4-bf16-unet"):
        four = tinv_trainer(model, images, 4, resolution, tinv_steps)
        if want("tinv-k4"):
            out.append(Variant("tinv-k4", "+ packing K=4 concepts per step", four.step, 4 * b, tinv_n))
        if want("tinv-k4-bf16-unet") and bf16:
            out.append(Variant("tinv-k4-bf16-unet", "tinv K=4, frozen UNet in bf16 (vectors and AdamW fp32)",
                               four.step, 4 * b, tinv_n, flops_from="tinv-k4", **bf16))
    if want("channels-last"):
        out.append(Variant("channels-last", "tinv K=1, UNet in channels_last", one.step, b, tinv_n,
                           enter=lambda: unet.to(memory_format=torch.channels_last),
                           leave=lambda: unet.to(memory_format=torch.contiguous_format), flops_from="tinv"))
    if want("compile"):
        compiled = torch.compile(unet)

        def use(m):
            return lambda: setattr(model, "denoiser", m)
        out.append(Variant("compile", "tinv K=1, torch.compile(UNet) (inductor; compile time excluded)",
                           one.step, b, tinv_n, enter=use(compiled), leave=use(unet), flops_from="tinv"))
    if want("threads-1"):
        threads = torch.get_num_threads()
        out.append(Variant("threads-1", "tinv K=1 on 1 thread (one actor per core)", one.step, b, tinv_n,
                           enter=lambda: torch.set_num_threads(1), leave=lambda: torch.set_num_threads(threads),
                           flops_from="tinv", threads=1))
    for half in native_half(model.device):
        name = HALF_NAMES[half]
        for variant, modules, what in (
            (name, [unet, model.text_encoders[0]], f"frozen UNet and text encoder in {name}"),
            (f"{name}-unet", [unet], f"frozen UNet in {name}, text encoder fp32 (tinv's policy)"),
        ):
            if want(variant):
                out.append(Variant(variant, f"tinv K=1, {what} (vectors and AdamW fp32)", one.step, b, tinv_n,
                                   enter=switch(model, modules, half), leave=switch(model, modules, torch.float32),
                                   flops_from="tinv", dtype=name))
    for method in ("lora", "pivotal"):  # DreamBooth-LoRA and pivotal tuning, rank 4 on the attention projections
        what = {"lora": "LoRA on the UNet's attention, no new token", "pivotal": "new token + LoRA"}[method]
        for k, name, how in ((1, method, f"K=1: {what}"), (4, f"{method}-k4", "K=4 packed, each sample through its "
                                                                             "own adapter")):
            if not (want(name) or want(f"{name}-bf16-unet")):
                continue
            trainer = tinv_trainer(model, images, k, resolution, tinv_steps, method)
            if want(name):
                out.append(Variant(name, f"{method}, {how}", trainer.step, k * b, tinv_n))
            if want(f"{name}-bf16-unet") and bf16:
                out.append(Variant(f"{name}-bf16-unet", f"{method}, K={k}, frozen UNet in bf16 (LoRA and AdamW fp32)",
                                   trainer.step, k * b, tinv_n, flops_from=name, **bf16))
    for name, (preservation, blank) in PRESERVATIONS.items():  # samples/s counts the concept's own samples
        if want(name):
            trainer = tinv_trainer(model, images, 1, resolution, tinv_steps, "pivotal", preservation, blank)
            what = f"pivotal, K=1, --prior-preservation {preservation}" + (" + blank" if blank else "")
            out.append(Variant(name, what, trainer.step, b, tinv_n))
    if want("checkpointing"):
        out.append(Variant("checkpointing", "tinv K=1, gradient checkpointing in the UNet and text encoder",
                           one.step, b, tinv_n, enter=lambda: checkpointing(model, True),
                           leave=lambda: checkpointing(model, False), flops_from="tinv"))
    if want("xformers") and importlib.util.find_spec("xformers") is not None and model.device.type == "cuda":
        out.append(Variant("xformers", "tinv K=1, xformers attention instead of SDPA", one.step, b, tinv_n,
                           enter=lambda: set_attention([unet], "xformers"),
                           leave=lambda: set_attention([unet], "sdpa"), flops_from="tinv"))
    return out


def why_not(variant: str, device: torch.device, smoke: bool) -> str:
    """Why a variant asked for was not timed on this device."""
    if variant.split("-")[0] in ("bf16", "fp16"):
        return f"{variant} is not native on this {device.type} (no AVX512-BF16/AMX or CUDA support)"
    if variant == "xformers":
        return "xformers needs CUDA and the xformers package" if importlib.util.find_spec("xformers") \
            else "xformers is not installed"
    return "left out of the smoke run" if smoke else "not applicable here"


def train_report(variants: list[Variant], rates: dict[tuple[str, int], float]) -> list[dict[str, Any]]:
    base = next((v for v in variants if v.name == "recipe"), None)
    rows = []
    for v in variants:
        sec = statistics.median(v.times)
        sps = v.samples_per_step / sec
        achieved = v.flops / sec
        rate = rates[v.dtype, v.threads or max(t for _, t in rates)]
        rows.append({
            "variant": v.name, "what": v.what, "seconds_per_step": sec, "steps_timed": len(v.times),
            "samples_per_step": v.samples_per_step, "samples_per_s": sps, "seconds_per_sample": 1 / sps,
            "samples_per_concept": v.samples_per_concept,
            "concepts_per_hour": 3600 * sps / v.samples_per_concept,
            "flops_per_sample": v.flops / v.samples_per_step, "achieved_flops": achieved,
            "mfu": achieved / rate if v.flops else None, "peak_mem_gb": v.peak_gb,
            "speedup_per_sample_vs_recipe": (sps * statistics.median(base.times) / base.samples_per_step)
            if base else None,
        })
    return rows
