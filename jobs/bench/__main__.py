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
from jobs.bench.flux import REDUCED, flux_projection, flux_shaped, flux_variants, int8_copy
from jobs.bench.flux import SMOKE as FLUX_SMOKE
from jobs.bench.flux import VARIANTS as FLUX_VARIANTS
from jobs.bench.generate import generation
from jobs.bench.measure import dense_rates, device_name, measure, slug
from jobs.bench.recipe import RECIPE
from jobs.bench.report import markdown, save
from jobs.bench.sampling import train_sampling
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
from tinv import EMBEDDED_MODEL
from tinv.families.model import load_base_model

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("toy", "methods", "preservation", "generate", "train-sampling", "train", "flux", "driver", "writes",
            "fingerprint", "projection")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.bench", description=PACKAGE_DOC.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="training resolution of the SD 1.5-shaped model (512 too)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per variant (interleaved)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="SD 1.5 variants to time, comma-separated")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated; matmul is always measured (the toy world's schedule sections: "
                        "python -m lab.bench.schedule)")
    p.add_argument("--sampling-size", type=int, default=64,
                   help="image size of the SD 1.5-shaped model in the train-sampling section")
    p.add_argument("--sampling-steps", type=int, default=4, help="denoising steps per image in train-sampling")
    p.add_argument("--flux-size", type=int, default=256, help="training resolution of the FLUX-shaped model")
    p.add_argument("--flux-t5-tokens", type=int, default=128,
                   help="T5 tokens per prompt in the FLUX section ([dev] uses 512; fewer keep the CPU run short)")
    p.add_argument("--flux-variants", default=",".join(FLUX_VARIANTS), help="FLUX variants, comma-separated")
    p.add_argument("--driver-concepts", default="1000,10000", help="concept counts for the driver section")
    p.add_argument("--tinv-steps", type=int, default=500, help="tinv's steps per concept, as the projection assumes "
                   "(500, the recorded figures'; the product caps a concept at 3 000 and early stopping ends most "
                   "well before)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one rep, 50 driver concepts (< 1 min)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/<device>.json; smoke: not written)")
    p.add_argument("--render", default=None, metavar="JSON", help="print the tables of a recorded file and exit")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    register_cpu_attention_flops()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sections = set(args.sections.split(",")) - {""}
    if sections - set(SECTIONS):
        raise SystemExit(f"unknown sections {sorted(sections - set(SECTIONS))}: these are {', '.join(SECTIONS)} "
                         "(the toy world's schedule sections are python -m lab.bench.schedule)")
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

    result["matmul"], rates = dense_rates(device, smoke)
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
    if "train-sampling" in sections:  # the toy model, then SD 1.5's shape at a small size (few denoising steps)
        runs = [train_sampling(load_base_model(str(EMBEDDED_MODEL), device=device, precision="fp32"),
                               "shipped toy world", k=3 if smoke else 8, steps=2 if smoke else args.sampling_steps,
                               reps=1 if smoke else 5)]
        text, unet, vae = (SMOKE_TEXT, SMOKE_UNET, SMOKE_VAE) if smoke else (SD15_TEXT, SD15_UNET, SD15_VAE)
        latent = 8 if smoke else args.sampling_size // 8
        model = sd_shaped(text, dict(unet, sample_size=latent), vae, device, torch.float32)
        runs.append(train_sampling(model, "smoke shapes" if smoke else "SD 1.5-shaped (random weights)",
                                   k=3 if smoke else 4, steps=2 if smoke else args.sampling_steps,
                                   reps=1 if smoke else 2))
        result["train_sampling"] = {"runs": runs}
        log("train_sampling", [(r["model"], round(r["speedup"], 2)) for r in runs])
        del model
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
    if "flux" in sections:
        shapes, size, tokens = (FLUX_SMOKE, 32, 32) if smoke else (REDUCED, args.flux_size, args.flux_t5_tokens)
        model, int8 = flux_shaped(shapes, device, torch.float32, tokens), int8_copy(shapes, device, tokens)
        which = args.flux_variants.split(",")
        variants = flux_variants(model, int8, size, args.tinv_steps, which)
        log("flux: timing", [v.name for v in variants], f"at {size} px")
        measure(variants, device, 1 if smoke else args.reps)
        timed = {v.name for v in variants}
        result["flux"] = {"model": "smoke shapes" if smoke else "FLUX.1 [dev] widths, 1 double + 2 single blocks, "
                          "T5 XXL with 2 layers (random weights)", "resolution": size, "t5_tokens": tokens,
                          "variants": train_report(variants, rates),
                          "not_run": {v: why_not(v, device, smoke) for v in which if v not in timed}}
        if not smoke:
            result["flux"]["projection"] = flux_projection(args.tinv_steps)
        log("flux")
        del model, int8, variants
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
