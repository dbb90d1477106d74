"""Throughput on this device, measured side by side: ``python -m jobs.benchmark [--size 256] [--smoke]``.

No Ray (except the driver section), no download: models are built from the public SD 1.5 configs
with random weights (speed does not depend on the values), plus the shipped toy-world model.
Every comparison is interleaved (A, B, C, A, B, C…) in one process, so the machine's noise hits
all variants alike; every gain is a ratio of the same run. Results go to
``benchmarks/<device>.json`` and a markdown table to stdout.

Sections: ``matmul`` (the device's dense rate, always), ``toy`` and ``train`` (the common recipe
against tinv with each optimisation switched on in turn, on the toy model and the SD 1.5 shape),
``generate`` (batched across concepts against ``load_textual_inversion`` + one pipeline call per
concept), ``schedule`` (toy-world fidelity against samples seen: the recipe's schedule, tinv's
defaults, DVAR early stopping), ``driver`` (plan, dispatch, account and write results for N
concepts with a no-op trainer on a local Ray instance) and ``projection`` (the FLOP model).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count
from transformers import CLIPTextConfig, CLIPTextModel

from tinv.config import ConceptSpec, TrainConfig
from tinv.models import BaseModel, assemble, load_base_model
from tinv.prompts import template_words
from tinv.samples import SampleConfig, SampleRequest, pipeline, sample
from tinv.tiny import BASE_WORDS, clip_tokenizer, sd_scheduler
from tinv.train import ConceptData, PackedTrainer

REPO = Path(__file__).resolve().parent.parent
RECIPE = {"steps": 3000, "batch_size": 4, "learning_rate": 5e-4 * 4, "weight_decay": 1e-2}
"""diffusers' examples/textual_inversion defaults (lr 5e-4 scaled by batch 4, --scale_lr)."""

# -- models from public configs (runwayml/stable-diffusion-v1-5 config.json files) --------------
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
"""stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (used only on the meta device, for FLOPs)."""
SMOKE_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
SMOKE_UNET = dict(sample_size=8, cross_attention_dim=32, attention_head_dim=4, layers_per_block=1,
                  block_out_channels=(16, 32), norm_num_groups=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
SMOKE_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def sd_shaped(text: dict, unet: dict, vae: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> BaseModel:
    """A frozen SD 1.x-layout model of the given configs with random weights (no download)."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer([*BASE_WORDS, *template_words()], size=text["vocab_size"])
    eos = tokenizer.eos_token_id
    encoder = CLIPTextModel(CLIPTextConfig(**text, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos))
    return assemble("random:sd1.5-shaped", Path("/nonexistent"), [tokenizer], [encoder], UNet2DConditionModel(**unet),
                    AutoencoderKL(**vae), sd_scheduler(), device, dtype)


# -- measuring ---------------------------------------------------------------------------------
@register_flop_formula([torch.ops.aten._scaled_dot_product_flash_attention_for_cpu])
def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


@register_flop_formula([torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward])
def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Yields a list that holds, after the block, the peak memory in GB: max allocated on CUDA, else RSS."""
    box: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield box
        box.append(torch.cuda.max_memory_allocated(device) / 2**30)
        return
    peak, done = [rss_bytes()], threading.Event()

    def poll() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_bytes())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        done.set()
        thread.join()
        box.append(max(peak[0], rss_bytes()) / 2**30)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


HALF_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def native_half(device: torch.device) -> list[torch.dtype]:
    """Reduced precisions the hardware runs natively (CUDA; CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return [torch.bfloat16, torch.float16] if torch.cuda.is_bf16_supported() else [torch.float16]
    checks = [getattr(torch.cpu, n, lambda: False) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return [torch.bfloat16] if any(c() for c in checks) else []


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0) -> float:
    """Dense ``n × n`` matmul FLOP/s on the current threads."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


# -- training variants -------------------------------------------------------------------------
@dataclass
class Variant:
    """One way of taking a training step; ``enter``/``leave`` switch the shared model in and out of it."""

    name: str
    what: str
    step: Callable[[], None]
    samples_per_step: int
    samples_per_concept: int
    enter: Callable[[], None] = lambda: None
    leave: Callable[[], None] = lambda: None
    flops_from: str | None = None
    """Same computation as that variant (its FLOP count is reused)."""
    threads: int | None = None
    dtype: str = "fp32"
    """Precision of the frozen model: the matmul rate its utilisation is measured against."""
    times: list[float] = field(default_factory=list)
    flops: float = 0.0
    peak_gb: float = 0.0


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
    vae, unet, scheduler, dtype = model.vae, model.unet, model.scheduler, model.dtype
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


def tinv_trainer(model: BaseModel, images: torch.Tensor, k: int, resolution: int, steps: int) -> PackedTrainer:
    cfg = TrainConfig(steps=steps, concepts_per_batch=k, batch_size=RECIPE["batch_size"], resolution=resolution)
    trainer = PackedTrainer(model, cfg)
    for s in range(k):
        spec = ConceptSpec(f"bench{s}", ("bench:0",), placeholder_token=f"<bench{s}>")
        trainer.admit(s, ConceptData(spec, images))
    return trainer


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
    if want("tinv-k4"):
        four = tinv_trainer(model, images, 4, resolution, tinv_steps)
        out.append(Variant("tinv-k4", "+ packing K=4 concepts per step", four.step, 4 * b, tinv_n))
    unet = model.unet
    if want("channels-last"):
        out.append(Variant("channels-last", "tinv K=1, UNet in channels_last", one.step, b, tinv_n,
                           enter=lambda: unet.to(memory_format=torch.channels_last),
                           leave=lambda: unet.to(memory_format=torch.contiguous_format), flops_from="tinv"))
    if want("compile"):
        compiled = torch.compile(unet)

        def use(m):
            return lambda: setattr(model, "unet", m)
        out.append(Variant("compile", "tinv K=1, torch.compile(UNet) (inductor; compile time excluded)",
                           one.step, b, tinv_n, enter=use(compiled), leave=use(unet), flops_from="tinv"))
    if want("threads-1"):
        threads = torch.get_num_threads()
        out.append(Variant("threads-1", "tinv K=1 on 1 thread (one actor per core)", one.step, b, tinv_n,
                           enter=lambda: torch.set_num_threads(1), leave=lambda: torch.set_num_threads(threads),
                           flops_from="tinv", threads=1))
    for half in native_half(model.device):
        name = HALF_NAMES[half]
        if not want(name):
            continue
        modules = [unet, model.text_encoders[0]]

        def to(dtype):
            def switch() -> None:
                for m in modules:
                    m.to(dtype)
                model.dtype = dtype
            return switch
        out.append(Variant(name, f"tinv K=1, frozen UNet and text encoder in {name} (vectors and AdamW fp32)",
                           one.step, b, tinv_n, enter=to(half), leave=to(torch.float32), flops_from="tinv",
                           dtype=name))
    if want("xformers") and importlib.util.find_spec("xformers") is not None and model.device.type == "cuda":
        from tinv.models import set_attention
        out.append(Variant("xformers", "tinv K=1, xformers attention instead of SDPA", one.step, b, tinv_n,
                           enter=lambda: set_attention([unet], "xformers"),
                           leave=lambda: set_attention([unet], "sdpa"), flops_from="tinv"))
    return out


def why_not(variant: str, device: torch.device, smoke: bool) -> str:
    """Why a variant asked for was not timed on this device."""
    if variant in ("bf16", "fp16"):
        return f"{variant} is not native on this {device.type} (no AVX512-BF16/AMX or CUDA support)"
    if variant == "xformers":
        return "xformers needs CUDA and the xformers package" if importlib.util.find_spec("xformers") \
            else "xformers is not installed"
    return "left out of the smoke run" if smoke else "not applicable here"


def measure(variants: list[Variant], device: torch.device, reps: int, count_flops: bool = True) -> None:
    """Warm every variant up, count its FLOPs once, then time it ``reps`` times, interleaved."""
    for v in variants:
        v.enter()
        v.step()
        if count_flops and v.flops_from is None:
            with FlopCounterMode(display=False) as counter:
                v.step()
            v.flops = counter.get_total_flops()
        v.leave()
        print(f"[benchmark] warmed up {v.name}", file=sys.stderr, flush=True)
    by_name = {v.name: v for v in variants}
    for v in variants:
        if v.flops_from:
            v.flops = by_name[v.flops_from].flops if v.flops_from in by_name else 0.0
    for _ in range(reps):
        for v in variants:
            v.enter()
            sync(device)
            with peak_memory(device) as peak:
                start = time.perf_counter()
                v.step()
                sync(device)
                v.times.append(time.perf_counter() - start)
            v.peak_gb = max(v.peak_gb, peak[0])
            v.leave()
            print(f"[benchmark] {v.name}: {v.times[-1]:.3f} s", file=sys.stderr, flush=True)


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


# -- generation --------------------------------------------------------------------------------
def generation(model: BaseModel, plain: BaseModel, concepts: int, steps: int, reps: int) -> dict[str, Any]:
    """Images/s: tinv's batched sampler across concepts vs load_textual_inversion + a call per concept.

    The workload is tinv's default evaluation: every object eval prompt of the model, ``per_prompt``
    seeds each, drawn in batches of ``SampleConfig.batch_size``; the per-concept way draws each
    concept's images in one pipeline call. ``plain`` is a second load of the same model for the
    per-concept way (diffusers resizes its text encoder there; tinv's slot tokens must not share it).
    """
    cfg = SampleConfig(steps=steps)
    torch.manual_seed(0)
    table = model.text_encoders[0].get_input_embeddings().weight.detach().float()
    vectors = [[table[torch.randint(len(table), (1,))] + 0.1 * torch.randn(1, table.shape[1])]
               for _ in range(concepts)]
    pairs = [(p, k) for p in model.eval_prompts["object"] for k in range(cfg.per_prompt)]
    requests = [SampleRequest(c, p, k) for c in range(concepts) for p, k in pairs]
    pipe, plain_pipe = pipeline(model, cfg.scheduler), pipeline(plain, cfg.scheduler)

    def batched() -> None:
        sample(model, vectors, requests, steps=cfg.steps, guidance=cfg.guidance, batch_size=cfg.batch_size, pipe=pipe)

    def per_concept_way() -> None:
        for c, row in enumerate(vectors):
            token = f"<gen{c}>"
            plain_pipe.load_textual_inversion({token: row[0][0]})
            plain_pipe([p.format(token) for p, _ in pairs], num_inference_steps=cfg.steps,
                       guidance_scale=cfg.guidance, generator=[torch.Generator().manual_seed(k) for _, k in pairs],
                       output_type="np")
            plain_pipe.unload_textual_inversion(token)

    n = len(requests)
    ways = [Variant("batched", "tinv.samples.sample, batches mixing concepts", batched, n, len(pairs)),
            Variant("per_concept", "load_textual_inversion + a pipeline call per concept", per_concept_way, n,
                    len(pairs))]
    measure(ways, model.device, reps, count_flops=False)
    out: dict[str, Any] = {}
    for v in ways:
        seconds = statistics.median(v.times)
        out[v.name] = {"images_per_s": n / seconds, "seconds": seconds, "peak_mem_gb": v.peak_gb}
    out["speedup"] = out["batched"]["images_per_s"] / out["per_concept"]["images_per_s"]
    out["setup"] = {"concepts": concepts, "images_per_concept": len(pairs), **asdict(cfg),
                    "resolution": model.resolution}
    return out


# -- fewer samples per concept (toy world) ------------------------------------------------------
def schedules(smoke: bool) -> dict[str, Any]:
    """Fidelity against samples seen: the recipe's schedule, tinv's defaults, and DVAR early stopping."""
    from tinv.demo import default_model
    from tinv.toyworld.concepts import CONCEPTS
    from tinv.toyworld.schedule import schedule_curves
    from tinv.toyworld.scorer import find_scorer

    model = load_base_model(str(default_model()), precision="fp32")
    default = TrainConfig()
    recipe = TrainConfig(steps=RECIPE["steps"], learning_rate=RECIPE["learning_rate"], batch_size=RECIPE["batch_size"],
                         weight_decay=RECIPE["weight_decay"], min_timestep_fraction=0.0,  # the recipe draws every t
                         style_batch_size=RECIPE["batch_size"], style_timestep_power=1.0)  # alike for styles
    plans = {"recipe": (recipe, [100, 200, 500, 1000, 2000, 3000], False),
             "tinv": (default, [25, 50, 100, 150, 200, 300, 400, 500], True)}
    concepts, samples, gen = CONCEPTS, 32, {"steps": 25, "batch_size": 64}
    if smoke:
        plans = {"recipe": (replace(recipe, steps=4), [2, 4], False),
                 "tinv": (replace(default, steps=6, dvar_window=2, dvar_every=1), [3, 6], True)}
        concepts, samples, gen = CONCEPTS[:2], 2, {"steps": 2}
    curves = schedule_curves(model, find_scorer(default_model()), plans, concepts, samples, **gen)
    out: dict[str, Any] = {"samples_per_checkpoint": samples, "curves": [asdict(c) | {
        "samples_to_target": c.samples_to_target} for c in curves]}
    for name, (cfg, checkpoints, _) in plans.items():
        mine = [c for c in curves if c.schedule == name]
        mean = [float(statistics.mean(c.fidelity[k] for c in mine)) for k in range(len(checkpoints))]
        out[name] = {"config": asdict(cfg), "checkpoints": checkpoints, "mean_fidelity": mean,
                     "samples_per_concept": statistics.mean(cfg.steps * c.samples_per_step for c in mine),
                     "reached": sum(c.samples_to_target is not None for c in mine), "concepts": len(mine)}
        stopped = [c for c in mine if c.stopped_at is not None]
        if stopped:
            out[name]["dvar"] = {
                "stopped": len(stopped), "mean_stop_step": statistics.mean(c.stopped_at for c in stopped),
                "mean_fidelity_at_stop": statistics.mean(
                    c.fidelity_at_stop if c.stopped_at is not None else c.fidelity[-1] for c in mine),
                "mean_fidelity_fixed": mean[-1],
                "mean_samples": statistics.mean((c.stopped_at or cfg.steps) * c.samples_per_step for c in mine)}
    return out


# -- the driver at scale -----------------------------------------------------------------------
class NoopWorker:
    """A trainer actor that trains nothing: each item comes back succeeded at once."""

    def __init__(self, name: str) -> None:
        self.name = name

    def info(self) -> dict[str, Any]:
        return {"base_model": "noop", "base_model_fingerprint": "0" * 64, "resolution": 32, "dtype": "torch.float32",
                "device": "cpu", "worker": self.name, "pid": os.getpid()}

    def train(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"concept_id": it["spec"]["concept_id"], "token": it["spec"]["placeholder_token"],
                 "status": "succeeded", "error": None, "worker": self.name, "attempts": it["attempt"], "steps": 0,
                 "seconds": 0.0, "final_loss": None, "embedding_uri": None, "retryable": False} for it in items]


def driver(counts: list[int], actors: int = 2) -> list[dict[str, Any]]:
    """Plan, dispatch, account and write results for each count of concepts; driver time and memory."""
    import ray

    from jobs.dispatch import DispatchConfig, Dispatcher
    from jobs.report import Progress, result_rows, write_results, write_run
    from jobs.train import plan

    ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(NoopWorker).options(num_cpus=1, max_concurrency=8, max_restarts=0)
    out = []
    try:
        for n in counts:
            with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null:
                specs = [ConceptSpec(f"c{i:06d}", (f"{tmp}/images/{i}/0.png",)) for i in range(n)]
                results: dict[str, dict] = {}
                progress = Progress(n, stream=null)

                def on_result(r: dict, results=results, progress=progress) -> None:
                    results[r["concept_id"]] = r
                    progress.update(r)

                names = itertools.count()
                dispatcher = Dispatcher(lambda: remote.remote(f"noop{next(names)}"),
                                        DispatchConfig(num_actors=actors), on_result)
                info = dispatcher.wait_ready()[0]
                rss0 = rss_bytes()
                with peak_memory(torch.device("cpu")) as peak:
                    start = time.perf_counter()
                    todo, skipped = plan(specs, TrainConfig(), info, f"{tmp}/manifest.parquet", tmp, None)
                    results.update(skipped)
                    planned = time.perf_counter()
                    dispatcher.run(todo)
                    dispatched = time.perf_counter()
                    rows = result_rows(specs, results)
                    uri = write_results(tmp, rows)
                    write_run(tmp, {"counts": len(rows)})
                    done = time.perf_counter()
                dispatcher.shutdown()
                ok = sum(r["status"] == "succeeded" for r in rows)
                out.append({
                    "concepts": n, "succeeded": ok, "actors": actors,
                    "ms_per_concept": 1000 * (done - start) / n,
                    "plan_s": planned - start, "dispatch_s": dispatched - planned, "write_s": done - dispatched,
                    "peak_rss_gb": peak[0], "rss_growth_mb": (peak[0] * 2**30 - rss0) / 2**20,
                    "results_parquet_mb": Path(uri).stat().st_size / 2**20,
                })
    finally:
        ray.shutdown()
    return out


# -- the FLOP model ----------------------------------------------------------------------------
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
                added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
            x = torch.randn(1, 4, latent, latent)
            out = unet(x, torch.tensor([500]), cond, added_cond_kwargs=added).sample
            out.sum().backward()
    return float(counter.get_total_flops())


SDXL_TEXT = [SD15_TEXT,
             dict(SD15_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, hidden_act="gelu", projection_dim=1280)]


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


# -- the run -----------------------------------------------------------------------------------
VARIANTS = ["recipe", "latent-cache", "tinv", "tinv-k4", "channels-last", "compile", "threads-1", "bf16", "fp16",
            "xformers"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="training resolution of the SD 1.5-shaped model (512 too)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per variant (interleaved)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="SD 1.5 variants to time, comma-separated")
    p.add_argument("--sections", default="toy,generate,train,schedule,driver,projection",
                   help="comma-separated; matmul is always measured")
    p.add_argument("--driver-concepts", default="1000,10000", help="concept counts for the driver section")
    p.add_argument("--tinv-steps", type=int, default=TrainConfig().steps, help="tinv's steps per concept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one rep, 50 driver concepts (< 1 min)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/<device>.json; smoke: not written)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sections = set(args.sections.split(","))
    smoke = args.smoke
    result: dict[str, Any] = {"device": device_name(device), "device_type": device.type,
                              "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "command": "python -m jobs.benchmark " + " ".join(sys.argv[1:]), "smoke": smoke,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    out = args.out or (None if smoke else str(REPO / "benchmarks" / f"{slug(result['device'])}.json"))

    def log(section: str, *what: Any) -> None:  # each section is saved as soon as it is measured
        print("[benchmark]", section, *what, file=sys.stderr, flush=True)
        if out and section in result:
            save(result, Path(out))

    n, threads = (256 if smoke else 2048), torch.get_num_threads()
    rates = {("fp32", threads): matmul_rate(device, torch.float32, n)}  # (dtype, threads) → FLOP/s
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        rates["fp32", 1] = matmul_rate(device, torch.float32, n)
        torch.set_num_threads(threads)
    for half in native_half(device):
        rates[HALF_NAMES[half], threads] = matmul_rate(device, half, n)
    result["matmul"] = {"n": n, **{f"{d}_flops" + ("_1_thread" if t == 1 and threads > 1 else ""): r
                                   for (d, t), r in rates.items()}}
    log("matmul", result["matmul"])
    if "toy" in sections:
        from tinv.demo import default_model
        model = load_base_model(str(default_model()), device=device, precision="fp32")
        which = ["recipe", "latent-cache", "tinv", "tinv-k4"]
        variants = train_variants(model, model.resolution, args.tinv_steps, which)
        measure(variants, device, 3 if smoke else 20)
        result["toy_train"] = {"model": "shipped toy world", "resolution": model.resolution,
                               "variants": train_report(variants, rates)}
        log("toy_train")
    if "generate" in sections:
        from tinv.demo import default_model
        model, plain = (load_base_model(str(default_model()), device=device, precision="fp32") for _ in range(2))
        result["generate"] = generation(model, plain, concepts=4 if smoke else 48, steps=3 if smoke else 25,
                                        reps=1 if smoke else 3)
        log("generate", result["generate"]["speedup"])
    if "train" in sections:
        text, unet, vae = (SMOKE_TEXT, SMOKE_UNET, SMOKE_VAE) if smoke else (SD15_TEXT, SD15_UNET, SD15_VAE)
        size = 32 if smoke else args.size
        model = sd_shaped(text, unet, vae, device, torch.float32)
        which = args.variants.split(",")  # the smoke run leaves compile out: compiling alone takes minutes
        variants = train_variants(model, size, args.tinv_steps, [v for v in which if not (smoke and v == "compile")])
        log("train: timing", [v.name for v in variants], f"at {size} px")
        measure(variants, device, 1 if smoke else args.reps)
        timed = {v.name for v in variants}
        result["train"] = {"model": "SD 1.5-shaped (random weights)" if not smoke else "smoke shapes",
                           "resolution": size, "variants": train_report(variants, rates),
                           "not_run": {v: why_not(v, device, smoke) for v in which if v not in timed}}
        log("train")
        del model, variants
    if "schedule" in sections:
        result["schedule"] = schedules(smoke)
        log("schedule", {k: v for k, v in result["schedule"].items() if k != "curves"})
    if "driver" in sections:
        counts = [50] if smoke else [int(c) for c in args.driver_concepts.split(",")]
        result["driver"] = driver(counts)
        log("driver", result["driver"])
    if "projection" in sections and not smoke:
        result["projection"] = projection(samples_per_concept=args.tinv_steps * RECIPE["batch_size"])
        log("projection")
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Device: {result['device']}; `{result['command']}`", ""]
    if "matmul" in result:
        m = result["matmul"]
        lines.append("Dense matmul: " + ", ".join(f"{k.removesuffix('_flops').replace('_flops', '')} "
                                                  f"{v / 1e9:.0f} GFLOP/s" for k, v in m.items() if k != "n"))
        lines.append("")
    for key in ("train", "toy_train"):
        if key not in result:
            continue
        t = result[key]
        lines += [f"Training, {t['model']}, {t['resolution']} px:", "",
                  "| variant | s/step | samples/s | × recipe per sample | MFU | peak GB | concepts/h (own schedule) |",
                  "|---|---|---|---|---|---|---|"]
        for r in t["variants"]:
            mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "–"
            speed = f"{r['speedup_per_sample_vs_recipe']:.2f}" if r["speedup_per_sample_vs_recipe"] else "–"
            lines.append(f"| {r['variant']} | {r['seconds_per_step']:.3f} | {r['samples_per_s']:.3g} | {speed} | {mfu} "
                         f"| {r['peak_mem_gb']:.2f} | {r['concepts_per_hour']:.3g} |")
        lines.append("")
    if "generate" in result:
        g = result["generate"]
        lines.append(f"Generation (toy model, {g['setup']}): batched {g['batched']['images_per_s']:.1f} images/s, "
                     f"per-concept {g['per_concept']['images_per_s']:.1f} images/s: {g['speedup']:.2f}×")
        lines.append("")
    if "schedule" in result:
        lines += [*schedule_table(result["schedule"]), ""]
    for d in result.get("driver", []):
        lines.append(f"Driver, {d['concepts']} concepts: {d['ms_per_concept']:.2f} ms/concept, RSS +"
                     f"{d['rss_growth_mb']:.0f} MB, results.parquet {d['results_parquet_mb']:.2f} MB")
    return "\n".join(lines)


def schedule_table(schedule: dict[str, Any]) -> list[str]:
    """The README's samples-to-target table: one row per concept, the recipe's curve beside tinv's."""
    curves = {(c["concept"], c["schedule"]): c for c in schedule["curves"]}
    recipe, tinv = schedule["recipe"], schedule["tinv"]

    def reach(c: dict[str, Any]) -> str:
        return f"{c['samples_to_target']:,}" if c["samples_to_target"] is not None else "not reached"

    def stop(c: dict[str, Any]) -> tuple[str, float]:
        if c["stopped_at"] is None:
            return f"— (ran {c['steps'][-1] * c['samples_per_step']:,})", c["fidelity"][-1]
        return f"{c['stopped_at'] * c['samples_per_step']:,}", c["fidelity_at_stop"]

    lines = [f"| concept | kind | target | recipe: samples to target | recipe @ step {recipe['checkpoints'][-1]:,} "
             f"| tinv: samples to target | tinv @ step {tinv['checkpoints'][-1]:,} | DVAR stop (samples) "
             "| fidelity at stop |", "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(c["concept"] for c in schedule["curves"]):
        r, t = curves[name, "recipe"], curves[name, "tinv"]
        at, fid = stop(t)
        lines.append(f"| {name} | {t['kind']} | {t['target']:.2f} | {reach(r)} | {r['fidelity'][-1]:.2f} "
                     f"| {reach(t)} | {t['fidelity'][-1]:.2f} | {at} | {fid:.2f} |")
    dvar = tinv.get("dvar", {})
    lines.append(f"| **mean** | | | | {recipe['mean_fidelity'][-1]:.3f} | | {tinv['mean_fidelity'][-1]:.3f} "
                 f"| {dvar.get('mean_samples', 0):,.0f} | {dvar.get('mean_fidelity_at_stop', 0):.3f} |")
    for name, plan in (("tinv", tinv), ("recipe", recipe)):
        pairs = ", ".join(f"{k}: {m:.2f}" for k, m in zip(plan["checkpoints"], plan["mean_fidelity"]))
        lines += ["", f"Mean fidelity by step, {name}: {pairs}."]
    return lines


SECTION_KEYS = ("matmul", "train", "toy_train", "generate", "schedule", "driver", "projection")


def save(result: dict[str, Any], out: Path) -> None:
    """Write ``result`` into ``out``, keeping sections an earlier run (another command) measured.

    Each section records the command and time that measured it, so one file per device holds the
    default run, the 512 px run and the long toy-world schedule run side by side.
    """
    stamp = {"command": result["command"], "started": result["started"], "threads": result["threads"]}
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged |= {k: v for k, v in result.items() if k not in SECTION_KEYS}
    for key in SECTION_KEYS:
        if key in result:
            name = f"{key}_{result['train']['resolution']}px" if key == "train" and not result["smoke"] else key
            value = result[key]
            merged[name] = {**value, **stamp} if isinstance(value, dict) else {"runs": value, **stamp}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    print(f"[benchmark] wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    print(markdown(run(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
