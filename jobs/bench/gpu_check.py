"""The prepared GPU check: ``python -m jobs.bench.gpu_check`` (about 5 minutes on one H100/H200 per section;
``--sections flux`` runs the FLUX.1 section alone, within 8 minutes on one H200).

For the SD 1.5 (512 px) and SDXL (1024 px) shapes with random weights, on the model tinv trains (UNet in
bf16, text encoders in fp32): seconds per step, samples per second, utilisation against this run's own
bf16 matmul rate, and peak GPU memory, for K ∈ {1, 2, 4, 8} concepts per step, with and without gradient
checkpointing, with SDPA and (when installed) xformers. Then the CUDA-only paths once each: fp16 with the
per-slot dynamic loss scale, and the out-of-memory back-off on a batch too big for the device. A
configuration that runs out of memory is recorded as such; the budget (``--budget-s``) skips what is left
rather than overrun. The FLUX.1 section (:func:`flux_runs`) times the full-size [dev] shape. ``--smoke`` runs
every path on CPU with tiny shapes (the test suite does). It is a measurement to run when a GPU is lent, not a
test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from jobs.bench.flops import flops_per_sample
from jobs.bench.flux import FULL, T5_TOKENS, flux_shaped
from jobs.bench.flux import SMOKE as FLUX_SMOKE
from jobs.bench.flux import flops_per_sample as flops_per_flux_sample
from jobs.bench.measure import device_name, matmul_rate, native_half, slug, sync
from jobs.bench.shapes import (
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    SDXL_TEXT,
    SDXL_UNET,
    SMOKE_SDXL_TEXT,
    SMOKE_SDXL_UNET,
    SMOKE_TEXT,
    SMOKE_UNET,
    SMOKE_VAE,
    sd_shaped,
    sdxl_shaped,
)
from jobs.bench.training import checkpointing, switch, tinv_trainer
from tinv.errors import UnsupportedPrecisionError
from tinv.families.model import BaseModel, set_attention
from tinv.families.quantized import check_base_precision, quantize_denoiser
from tinv.training.loop import GuardedStep

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"sd15": (SD15_TEXT, SD15_UNET, 512), "sdxl": (SDXL_TEXT, SDXL_UNET, 1024)}
SMOKE = {"sd15": (SMOKE_TEXT, SMOKE_UNET, 32), "sdxl": (SMOKE_SDXL_TEXT, SMOKE_SDXL_UNET, 32)}


def build(name: str, smoke: bool, device: torch.device, dtype: torch.dtype) -> tuple[BaseModel, int, float]:
    """The model, its resolution, and its FLOPs per training sample (counted on the meta device)."""
    text, unet, size = (SMOKE if smoke else SHAPES)[name]
    vae = SMOKE_VAE if smoke else SD15_VAE
    model = sdxl_shaped(text, unet, vae, device, dtype) if name == "sdxl" else sd_shaped(text, unet, vae, device, dtype)
    latent = size // 2 ** (len(vae["block_out_channels"]) - 1)
    return model, size, flops_per_sample(unet, text if name == "sdxl" else [text], latent)


def time_steps(model: BaseModel, size: int, k: int, steps: int, method: str = "ti", batch_size: int = 4,
               train_t5: bool = False) -> dict[str, Any]:
    """One warm-up step, then ``steps`` timed steps of K concepts (``batch_size`` samples each)."""
    images = torch.rand(4, 3, size, size) * 2 - 1
    cuda, trainer = model.device.type == "cuda", None
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
    try:  # admission too: a concept's adapters and encodings can be what runs out
        trainer = tinv_trainer(model, images, k, size, 500, method, batch_size=batch_size, train_t5=train_t5)
        trainer.step()
        sync(model.device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        sync(model.device)
    except torch.OutOfMemoryError:
        return {"out_of_memory": True}
    finally:
        del trainer
        if cuda:
            torch.cuda.empty_cache()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(model.device) / 2**30 if cuda else None
    return {"out_of_memory": False, "seconds_per_step": seconds, "samples_per_s": batch_size * k / seconds,
            "peak_gb": peak}


def paths(model: BaseModel, size: int, smoke: bool) -> dict[str, Any]:
    """The CUDA-only paths, once: fp16 with per-slot loss scales; the out-of-memory back-off."""
    out: dict[str, Any] = {}
    images = torch.rand(4, 3, size, size) * 2 - 1
    unet_dtype = model.dtype
    switch(model, [model.denoiser], torch.float16)()
    trainer = tinv_trainer(model, images, 2, size, 500)
    losses = [trainer.step()[0] for _ in range(5)]
    out["fp16"] = {"losses_finite": all(v == v and abs(v) != float("inf") for d in losses for v in d.values()),
                   "loss_scales": [trainer.slots[s].loss_scale for s in trainer.active]}
    switch(model, [model.denoiser], unet_dtype)()
    big = 16  # 64 samples: more than an SDXL step at 1024 px fits on one GPU without checkpointing
    trainer = tinv_trainer(model, images, big, size, 500)
    step = GuardedStep(trainer)
    forward = model.denoiser.forward
    simulated = mock.patch.object(model.denoiser, "forward",
                                  side_effect=lambda x, *a, **k: _small_only(forward, x, *a, **k))
    with simulated if smoke else contextlib.nullcontext():  # smoke: a CPU has no device memory to run out of
        try:
            stepped, failed = step()
            out["oom_backoff"] = {"slots": big, "stepped": len(stepped), "failed": len(failed),
                                  "group_size_after": step.group_size, "simulated": smoke}
        except torch.OutOfMemoryError as e:
            out["oom_backoff"] = {"slots": big, "error": str(e)[:300], "simulated": smoke}
    del trainer
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _small_only(forward: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    if len(sample) > 16:
        raise torch.OutOfMemoryError("simulated: more than 16 samples")
    return forward(sample, *args, **kwargs)


def flux_runs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, matmul: float,
              save: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Full-size FLUX.1 [dev] shape at 1 024 px (random weights): LoRA at K ∈ {1, 2, 4}, one sample per concept,
    with and without gradient checkpointing, the frozen transformer in bf16, int8 and (where the GPU has it) fp8;
    then pivotal with T5 vectors once (T5 stays on the GPU for their gradient). Peak memory per configuration;
    its own budget (``--flux-budget-s``). A configuration (or a base) that fails is recorded with its error and the
    rest go on; ``save`` is called after every row, so a check cut short keeps what it measured. ``mfu`` is given
    for LoRA rows only: the FLOP model counts the transformer, not the T5 backward a T5-vector row adds."""
    shapes, size, tokens = (FLUX_SMOKE, 32, 32) if args.smoke else (FULL, 1024, T5_TOKENS)
    started, runs = time.monotonic(), []
    flops = flops_per_flux_sample(shapes, size, tokens)
    for base in ["auto", "int8"] + (["fp8"] if fp8_ready(device) else []):
        configs = [(ckpt, k, "lora") for ckpt in (False, True) for k in ((1, 2) if args.smoke else (1, 2, 4))]
        configs += [(True, 1, "pivotal-t5")] if base == "auto" else []
        rows = [{"shape": "flux1-dev", "resolution": size, "t5_tokens": tokens, "base_precision": base,
                 "checkpointing": ckpt, "k": k, "method": method} for ckpt, k, method in configs]
        model, failed = None, None
        if time.monotonic() - started <= args.flux_budget_s:
            try:
                model = flux_shaped(shapes, device, dtype, tokens)
                quantize_denoiser(model.denoiser, base, device)
            except Exception as e:  # noqa: BLE001 — recorded, and the next base still runs
                failed = f"building the base: {type(e).__name__}: {e}"[:500]
        for row in rows:
            if model is None:
                runs.append({**row, **({"error": failed} if failed else {"skipped": "over the time budget"})})
            elif time.monotonic() - started > args.flux_budget_s:
                runs.append({**row, "skipped": "over the time budget"})
            else:
                runs.append({**row, **flux_row(model, size, row, flops, matmul, args.smoke)})
            print("[gpu-check]", json.dumps(runs[-1]), file=sys.stderr, flush=True)
            save(runs)
        del model
        gc.collect()  # the adapters' routers hold the transformer in a reference cycle
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return runs


def flux_row(model: BaseModel, size: int, row: dict, flops: float, matmul: float, smoke: bool) -> dict[str, Any]:
    """One FLUX configuration's timing and peak memory, or its error."""
    method = row["method"]
    try:
        checkpointing(model, row["checkpointing"])
        got = time_steps(model, size, row["k"], 1 if smoke else 3, method.removesuffix("-t5"), batch_size=1,
                         train_t5=method.endswith("-t5"))
    except Exception as e:  # noqa: BLE001 — recorded, and the next configuration still runs
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    if not got["out_of_memory"] and method == "lora":
        got["mfu"] = flops * got["samples_per_s"] / matmul
    return got


def fp8_ready(device: torch.device) -> bool:
    try:
        check_base_precision("fp8", device)
    except UnsupportedPrecisionError:
        return False
    return True


def check_device(smoke: bool) -> torch.device:
    """The GPU, or the CPU for the smoke form (or where there is no GPU)."""
    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


def run(args: argparse.Namespace, save: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    """Every section, ``save`` called with the result so far after each row."""
    device = check_device(args.smoke)
    dtype = torch.bfloat16 if torch.bfloat16 in native_half(device) and not args.smoke else torch.float32
    started = time.monotonic()
    result: dict[str, Any] = {"device": device_name(device), "torch": torch.__version__, "smoke": args.smoke,
                              "unet_dtype": str(dtype), "text_encoder_dtype": "torch.float32",
                              "matmul_flops": matmul_rate(device, dtype, 256 if args.smoke else 8192),
                              "runs": [], "paths": {}}
    if "flux" in args.sections:
        result["flux"] = flux_runs(args, device, dtype, result["matmul_flops"],
                                   lambda rows: save({**result, "flux": rows}))
    if "sd" not in args.sections:
        result["seconds"] = time.monotonic() - started
        return result
    started = time.monotonic()  # the SD section's budget is its own, whatever FLUX took
    attentions = ["sdpa"] + (["xformers"] if device.type == "cuda" and importlib.util.find_spec("xformers") else [])
    ks = (1, 2) if args.smoke else (1, 2, 4, 8)
    for name in ("sd15", "sdxl"):
        model, size, flops = build(name, args.smoke, device, dtype)
        for attention in attentions:
            set_attention([model.denoiser], attention)
            for ckpt in (False, True):
                checkpointing(model, ckpt)
                for k in ks:
                    row = {"shape": name, "resolution": size, "attention": attention, "checkpointing": ckpt, "k": k}
                    if time.monotonic() - started > args.budget_s:
                        result["runs"].append({**row, "skipped": "over the time budget"})
                        continue
                    got = time_steps(model, size, k, 1 if args.smoke else 3)
                    if not got["out_of_memory"]:
                        got["mfu"] = flops * got["samples_per_s"] / result["matmul_flops"]
                    result["runs"].append({**row, **got})
                    print("[gpu-check]", json.dumps(result["runs"][-1]), file=sys.stderr, flush=True)
                    save(result)
        set_attention([model.denoiser], "sdpa")
        checkpointing(model, False)
        if name == "sdxl":
            result["paths"] = paths(model, size, args.smoke)
        del model
    result["seconds"] = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, every path once (the test suite)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the configurations left after this long")
    p.add_argument("--flux-budget-s", type=float, default=360.0, help="the same, for the FLUX section")
    p.add_argument("--sections", default="sd,flux", help="sd (SD 1.5 and SDXL shapes), flux, or both")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/gpu-check-<device>.json)")
    args = p.parse_args(argv)
    out = Path(args.out or REPO / "benchmarks" / f"gpu-check-{slug(device_name(check_device(args.smoke)))}.json")
    result = run(args, lambda partial: out.write_text(json.dumps({**partial, "partial": True}, indent=2) + "\n"))
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["runs"] + result.get("flux", []):
        print(json.dumps(r))
    print(json.dumps(result["paths"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
