"""``python -m jobs.bench``: run the sections asked for, save them, print the tables (see the package doc)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from jobs.bench import __doc__ as PACKAGE_DOC
from jobs.bench.driver import driver
from jobs.bench.fingerprint import fingerprint_cost
from jobs.bench.flops import projection, register_cpu_attention_flops
from jobs.bench.generate import generation
from jobs.bench.measure import HALF_NAMES, device_name, matmul_rate, measure, native_half, slug
from jobs.bench.recipe import RECIPE
from jobs.bench.report import markdown, save
from jobs.bench.schedule import method_schedules, schedules
from jobs.bench.shapes import SD15_TEXT, SD15_UNET, SD15_VAE, SMOKE_TEXT, SMOKE_UNET, SMOKE_VAE, sd_shaped
from jobs.bench.training import (
    METHOD_VARIANTS,
    PRESERVATION_VARIANTS,
    VARIANTS,
    train_report,
    train_variants,
    why_not,
)
from jobs.bench.writes import slow_storage
from tinv.config import METHODS, TrainConfig
from tinv.embedded import EMBEDDED_MODEL
from tinv.models import load_base_model

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.bench", description=PACKAGE_DOC.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="training resolution of the SD 1.5-shaped model (512 too)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per variant (interleaved)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="SD 1.5 variants to time, comma-separated")
    p.add_argument("--sections", default="toy,methods,preservation,generate,train,schedule,schedule_methods,driver,"
                                         "writes,fingerprint,projection",
                   help="comma-separated; matmul is always measured")
    p.add_argument("--driver-concepts", default="1000,10000", help="concept counts for the driver section")
    p.add_argument("--tinv-steps", type=int, default=TrainConfig().steps, help="tinv's steps per concept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one rep, 50 driver concepts (< 1 min)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/<device>.json; smoke: not written)")
    p.add_argument("--render", default=None, metavar="JSON", help="print the tables of a recorded file and exit")
    return p.parse_args(argv)


def matmul_rates(device: torch.device, smoke: bool) -> tuple[dict[str, Any], dict[tuple[str, int], float]]:
    """The dense matmul rate per precision and thread count: the section, and ``(dtype, threads) → FLOP/s``."""
    n, threads = (256 if smoke else 2048), torch.get_num_threads()
    rates = {("fp32", threads): matmul_rate(device, torch.float32, n)}
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        rates["fp32", 1] = matmul_rate(device, torch.float32, n)
        torch.set_num_threads(threads)
    for half in native_half(device):
        rates[HALF_NAMES[half], threads] = matmul_rate(device, half, n)
    section = {"n": n, **{f"{d}_flops" + ("_1_thread" if t == 1 and threads > 1 else ""): r
                          for (d, t), r in rates.items()}}
    return section, rates


def run(args: argparse.Namespace) -> dict[str, Any]:
    register_cpu_attention_flops()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sections = set(args.sections.split(","))
    smoke = args.smoke
    result: dict[str, Any] = {"device": device_name(device), "device_type": device.type,
                              "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "command": "python -m jobs.bench " + " ".join(sys.argv[1:]), "smoke": smoke,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    out = args.out or (None if smoke else str(REPO / "benchmarks" / f"{slug(result['device'])}.json"))

    def log(section: str, *what: Any) -> None:  # each section is saved as soon as it is measured
        print("[benchmark]", section, *what, file=sys.stderr, flush=True)
        if out and section in result:
            save(result, Path(out))

    result["matmul"], rates = matmul_rates(device, smoke)
    log("matmul", result["matmul"])
    if "toy" in sections:
        model = load_base_model(str(EMBEDDED_MODEL), device=device, precision="fp32")
        which = ["recipe", "latent-cache", "tinv", "tinv-k4"]
        variants = train_variants(model, model.resolution, args.tinv_steps, which)
        measure(variants, device, 3 if smoke else 20)
        result["toy_train"] = {"model": "shipped toy world", "resolution": model.resolution,
                               "variants": train_report(variants, rates)}
        log("toy_train")
    # ti, lora and pivotal side by side, K=1 and K=4; pivotal with each prior preservation: toy model, SD 1.5's shape
    for section, names in (("methods", METHOD_VARIANTS), ("preservation", PRESERVATION_VARIANTS)):
        if section not in sections:
            continue
        for key, model, size in (
            (f"{section}_toy", load_base_model(str(EMBEDDED_MODEL), device=device, precision="fp32"), None),
            (f"{section}_sd15", None, 32 if smoke else args.size),
        ):
            if model is None:
                text, unet, vae = (SMOKE_TEXT, SMOKE_UNET, SMOKE_VAE) if smoke else (SD15_TEXT, SD15_UNET, SD15_VAE)
                model = sd_shaped(text, unet, vae, device, torch.float32)
            size = size or model.resolution
            variants = train_variants(model, size, args.tinv_steps, names)
            measure(variants, device, 3 if smoke else (20 if key.endswith("_toy") else args.reps))
            result[key] = {"model": "shipped toy world" if key.endswith("_toy") else
                           ("SD 1.5-shaped (random weights)" if not smoke else "smoke shapes"),
                           "resolution": size, "variants": train_report(variants, rates)}
            log(key)
    if "generate" in sections:
        model, plain = (load_base_model(str(EMBEDDED_MODEL), device=device, precision="fp32") for _ in range(2))
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
    if "schedule_methods" in sections:
        result["schedule_methods"] = method_schedules(smoke)
        log("schedule_methods", {m: result["schedule_methods"][m] for m in METHODS})
    if "driver" in sections:
        counts = [50] if smoke else [int(c) for c in args.driver_concepts.split(",")]
        result["driver"] = driver(counts)
        log("driver", result["driver"])
    if "writes" in sections:
        result["writes"] = slow_storage(0.01, 2, 6, 1) if smoke else slow_storage()
        log("writes", result["writes"]["ratio_slow_to_fast"])
    if "fingerprint" in sections:
        result["fingerprint"] = fingerprint_cost(smoke)
        log("fingerprint", result["fingerprint"])
    if "projection" in sections and not smoke:
        result["projection"] = projection(samples_per_concept=args.tinv_steps * RECIPE["batch_size"])
        log("projection")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(markdown(json.loads(Path(args.render).read_text()) if args.render else run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
