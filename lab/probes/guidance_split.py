"""Probe: where a LoRA's language drift comes from, split by guidance and by adapter part.

Trains held-out concepts (``--concepts``, default the four styles) as ``--method`` (``lora`` or ``pivotal``)
with prior preservation (the other flags are the lab's TrainConfig and Recipe flags, as in ``python -m
lab.toyworld methods``), then draws each concept's bare class prompt(s) (``a <shape>``) from the base model and
through the concept's adapters (UNet and text encoders; the UNet's part alone; the text encoders' part alone),
at guidance 1 (no classifier-free guidance) and 5 (the comparison's), and prints the share of samples showing
the concept's attribute (its backdrop, its colour) with its fidelity beside it. Run from the repository root:

    OMP_NUM_THREADS=2 python -m lab.probes.guidance_split --lora-text-encoder \\
        --lora-text-encoder-learning-rate 3e-3 --lora-learning-rate 1e-3 --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lab.toyworld import MODEL_DIR, SCORER_FILE
from lab.toyworld.concepts import CONCEPTS
from lab.toyworld.fidelity import Draw, judge, learn, share
from lab.toyworld.flags import add_train_flags, train_config
from lab.toyworld.methods import bare_word, class_pictures, shows_attribute
from lab.toyworld.scorer import load_scorer
from tinv.families.model import load_base_model

PARTS = ("base", "both", "unet", "text")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=48, help="per concept and prompt set (a style: over its shapes)")
    p.add_argument("--json", default=None)
    p.add_argument("--method", default="lora", choices=["lora", "pivotal"])
    p.add_argument("--concepts", nargs="*", default=None, help="held-out concept names (default: the styles)")
    add_train_flags(p, {"steps": 200, "prior_loss_weight": 1.0})
    args = p.parse_args()
    cfg = train_config(args)
    named = {c.name: c for c in CONCEPTS}
    unknown = sorted(set(args.concepts or ()) - set(named))
    if unknown:
        raise SystemExit(f"unknown concepts {unknown}; choose from {sorted(named)}")
    styles = tuple(c for c in CONCEPTS if c.kind == "style")
    chosen = tuple(named[n] for n in args.concepts) if args.concepts else styles
    model = load_base_model(str(MODEL_DIR), precision="fp32")
    scorer = load_scorer(Path(MODEL_DIR) / SCORER_FILE)
    learned = learn(model, chosen, cfg, method=args.method, classes=class_pictures(model, chosen, cfg))
    out, per = [], len(PARTS) + 1  # draws per concept: the parts, then its own prompts (fidelity)
    for guidance in (1.0, 5.0):
        draws = []
        for i, c in enumerate(chosen):
            t, word = learned[c.name], bare_word(c)
            draws += [Draw(i, word=word), Draw(i, word=word, lora=t.lora, text_lora=t.text_lora),
                      Draw(i, word=word, lora=t.lora), Draw(i, word=word, text_lora=t.text_lora),
                      Draw(i, None if t.vectors is None else t.vectors[0], t.spec.placeholder_token, t.lora,
                           t.text_lora)]
        found = judge(model, scorer, chosen, draws, args.samples, cfg.seed, guidance=guidance, batch_size=64)
        for i, c in enumerate(chosen):
            got = found[per * i: per * (i + 1)]
            row = {"concept": c.name, "guidance": guidance, "fidelity": share(got[4])}
            row |= {part: float(np.mean([shows_attribute(c, j) for j in js])) for part, js in zip(PARTS, got)}
            out.append(row)
            print(f"guidance {guidance:g} {c.name}: attribute share " + ", ".join(f"{k} {row[k]:.2f}" for k in PARTS)
                  + f"; fidelity {row['fidelity']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: str(v) for k, v in vars(args).items()}, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
