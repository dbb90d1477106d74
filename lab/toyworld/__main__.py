"""``python -m lab.toyworld train --out DIR`` | ``… fidelity [--model DIR]`` | ``… methods [--model DIR]`` |
``… corpus --out DIR`` | ``… starts --init URI`` | ``… framing``."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from lab.toyworld import MODEL_DIR, SCORER_FILE
from lab.toyworld.flags import add_train_flags, train_config
from tinv.evaluation.metrics import METRICS_FILE

FIDELITY_STEPS = 200
"""TI steps per concept in the fidelity table (the toy world's concepts are there by then)."""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lab.toyworld")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the toy model and its scorer from a seed")
    t.add_argument("--out", required=True, help="folder for the diffusers model")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None, help="denoiser + text encoder steps")
    t.add_argument("--threads", type=int, default=1, help="torch threads (one when anything else shares the cores)")
    t.add_argument("--layout", choices=["sd", "flux"], default="sd",
                   help="sd: the shipped Stable-Diffusion-layout model; flux: a FLUX.1 [dev]-layout one "
                        "(lab.toyworld.flux)")
    f = sub.add_parser("fidelity", help="floor / best words / TI per held-out concept")
    f.add_argument("--model", default=str(MODEL_DIR))
    f.add_argument("--samples", type=int, default=96,
                   help="samples per concept and prompt (a style spreads them over the 6 shape words: 16 each)")
    f.add_argument("--json", default=None, help="also write the table as JSON here")
    f.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="the frozen UNet's")
    f.add_argument("--text-encoder-precision", default="fp32", choices=["fp32", "same"],
                   help="fp32 (tinv's policy) or the UNet's precision (the measurement that chose the policy)")
    add_train_flags(f, {"steps": FIDELITY_STEPS})  # --seed also seeds pictures and samples
    m = sub.add_parser("methods", help="ti / lora / pivotal (with and without prior preservation) per held-out "
                                       "concept: fidelity, language drift, bytes, seconds")
    m.add_argument("--model", default=str(MODEL_DIR))
    m.add_argument("--samples", type=int, default=96, help="samples per concept and prompt set, as for fidelity")
    m.add_argument("--json", default=None, help="also write the rows as JSON here")
    m.add_argument("--runs", nargs="*", default=None, metavar="RUN",
                   help="columns to learn and draw, e.g. ti lora lora+prior (default: every one of methods.RUNS)")
    m.add_argument("--toy-lora-rates", action=argparse.BooleanOptionalAction, default=True,
                   help="each method's toy-world LoRA learning rate (lab.toyworld.methods.TOY_LORA_LEARNING_RATES) "
                        "instead of --lora-learning-rate")
    add_train_flags(m, {"steps": FIDELITY_STEPS})
    r = sub.add_parser("run-table", help="strict fidelity per held-out concept and method of a jobs.train run of "
                                         "python -m lab.toyworld.demo DIR --methods …'s manifest")
    r.add_argument("--run", required=True, help="the run's output folder (its results.parquet)")
    r.add_argument("--model", default=None, help="the run's model folder: also reads its samples' colours and "
                                                 "backdrops with the scorer beside it, and the base model's from "
                                                 "the initializer words (the attribute table)")
    r.add_argument("--samples", type=int, default=16, help="the run's --samples-per-prompt (the base model's "
                                                             "draws per prompt)")
    r.add_argument("--json", default=None, help="also write the rows as JSON here")
    c = sub.add_parser("corpus", help="write a manifest of toy concepts disjoint from the held-out ones (to train "
                                      "with jobs.train and fit a learned start on)")
    c.add_argument("--out", required=True, help="folder for corpus.parquet and its pictures")
    c.add_argument("--concepts", type=int, default=320)
    c.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("starts", help="word / cross / learned starts per held-out concept: fidelity at 0 steps, "
                                      "samples to target, fidelity at the DVAR stop")
    s.add_argument("--init", required=True, help="the initializer jobs.fit_init wrote (folder or file)")
    s.add_argument("--model", default=str(MODEL_DIR))
    s.add_argument("--samples", type=int, default=32, help="samples per concept and checkpoint (as the schedule "
                                                           "benchmark)")
    s.add_argument("--json", default=None, help="also write the curves and the summary as JSON here")
    s.add_argument("--night", default=None, help="the jobs.train run the initializer was fitted on: adds the cost "
                                                 "side (its time, the fit's, the break-even)")
    fr = sub.add_parser("framing", help="tall pictures (centre crop / aspect buckets) and busy ones (without / with "
                                        "masks) per held-out concept: fidelity")
    fr.add_argument("--model", default=str(MODEL_DIR))
    fr.add_argument("--samples", type=int, default=96, help="samples per concept and prompt set, as for fidelity")
    fr.add_argument("--json", default=None, help="also write the rows as JSON here")
    fr.add_argument("--step-cost", action="store_true", help="only time a packed step of square, mixed and tall "
                                                             "concepts (one UNet pass per latent size)")
    add_train_flags(fr, {"steps": FIDELITY_STEPS})
    args = p.parse_args(argv)
    {"train": train, "fidelity": fidelity, "methods": methods, "run-table": run_table, "corpus": corpus,
     "starts": starts, "framing": framing}[args.command](args)


def starts(args: argparse.Namespace) -> None:
    from lab.toyworld.fast_start import cost, markdown, start_curves, summary
    from lab.toyworld.scorer import load_scorer

    began = time.perf_counter()
    curves = start_curves(args.model, load_scorer(Path(args.model) / SCORER_FILE), args.init, samples=args.samples,
                          steps=25, batch_size=64)
    print(markdown(curves))
    costs = None
    if args.night:
        night = Path(args.night)
        steps = [json.loads(p.read_text())["steps"] for p in night.glob("concepts/*/result.json")]
        fit = json.loads((Path(args.init) / "fit.json").read_text())
        costs = cost(json.loads((night / "run.json").read_text()), steps, fit, summary(curves))
        print(json.dumps(costs, indent=1))
    if args.json:
        record = {"init": args.init, "samples_per_checkpoint": args.samples, "summary": summary(curves),
                  "cost": costs, "seconds": round(time.perf_counter() - began, 1),
                  "curves": [asdict(c) | {"samples_to_target": c.samples_to_target} for c in curves]}
        Path(args.json).write_text(json.dumps(record, indent=1))


def framing(args: argparse.Namespace) -> None:
    from lab.toyworld.framing import compare, markdown, step_cost
    from lab.toyworld.scorer import load_scorer

    if args.step_cost:
        print(json.dumps(step_cost(args.model), indent=1))
        return
    cfg = train_config(args)
    began = time.perf_counter()
    rows = compare(args.model, load_scorer(Path(args.model) / SCORER_FILE), cfg, samples=args.samples, seed=cfg.seed,
                   batch_size=64)
    print(markdown(rows))
    if args.json:
        record = {"samples": args.samples, "train": asdict(cfg), "seconds": round(time.perf_counter() - began, 1),
                  "rows": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(record, indent=1))


def corpus(args: argparse.Namespace) -> None:
    from lab.toyworld.corpus import write_corpus

    print(write_corpus(args.out, args.concepts, args.seed))


def train(args: argparse.Namespace) -> None:
    from diffusers import AutoencoderKL

    from lab.toyworld.fit import FitConfig, train_model
    from lab.toyworld.scorer import evaluate_scorer, save_scorer, train_scorer

    steps = {"steps": args.steps} if args.steps else {}
    steps["threads"] = args.threads
    start = time.perf_counter()
    if args.layout == "flux":
        from lab.toyworld.flux import FluxFitConfig, train_flux_model

        out = train_flux_model(args.out, FluxFitConfig(seed=args.seed, **steps))
    else:
        out = train_model(args.out, FitConfig(seed=args.seed, **steps))
    (out / METRICS_FILE).write_text(json.dumps(["toyworld"]))  # every evaluation of it reads the toy-world metric
    vae = AutoencoderKL.from_pretrained(out / "vae")
    scorer = train_scorer(vae, seed=args.seed)
    save_scorer(scorer, out / SCORER_FILE)
    report = {"scorer_accuracy": asdict(evaluate_scorer(scorer, vae)), "seconds": time.perf_counter() - start}
    (out / "toyworld_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def fidelity(args: argparse.Namespace) -> None:
    import torch

    from lab.toyworld.fidelity import fidelity_table, markdown
    from lab.toyworld.scorer import load_scorer
    from tinv.families.model import PRECISIONS

    scorer = load_scorer(Path(args.model) / SCORER_FILE)
    cfg = train_config(args)
    text = torch.float32 if args.text_encoder_precision == "fp32" else PRECISIONS[args.precision]
    rows = fidelity_table(args.model, scorer, cfg, samples=args.samples, seed=cfg.seed, precision=args.precision,
                          text_encoder_dtype=text)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


def methods(args: argparse.Namespace) -> None:
    from lab.toyworld.methods import RUNS, TOY_LORA_LEARNING_RATES, column, compare, markdown
    from lab.toyworld.scorer import load_scorer

    cfg = train_config(args)
    rates = TOY_LORA_LEARNING_RATES if args.toy_lora_rates else None
    named = {column(*run).replace(" ", ""): run for run in RUNS}
    unknown = sorted(set(args.runs or ()) - set(named))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {sorted(named)}")
    runs = tuple(named[r] for r in args.runs) if args.runs else RUNS
    rows = compare(args.model, load_scorer(Path(args.model) / SCORER_FILE), cfg, samples=args.samples, seed=cfg.seed,
                   runs=runs, lora_learning_rates=rates, batch_size=64)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"drift": r.drift} for r in rows], indent=1))


def run_table(args: argparse.Namespace) -> None:
    from lab.toyworld.concepts import CONCEPTS
    from lab.toyworld.methods import base_attribute, run_markdown
    from lab.toyworld.methods import run_table as table
    from lab.toyworld.scorer import load_scorer
    from tinv.families.model import load_base_model

    scorer = load_scorer(Path(args.model) / SCORER_FILE) if args.model else None
    rows = table(args.run, scorer)
    print(run_markdown(rows))
    if scorer is not None:
        base = base_attribute(load_base_model(args.model), scorer, args.samples)
        rows += [{"concept": c.name, "kind": c.kind, "method": "base", "attribute": base[c.name]} for c in CONCEPTS]
        print("\nShare of samples showing the concept's colour (object) or backdrop (style), any shape:\n")
        print(run_markdown(rows, "attribute"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
