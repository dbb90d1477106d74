"""Probe: do the prior-preservation class pictures show each held-out concept's attribute more often than
the base model draws it?

Draws every class set the method comparison trains on (:func:`tinv.toyworld.methods.class_pictures`, the job's
own class pictures, ``--class-images`` per prompt), reads them with the toy world's scorer and prints, per
concept, the share showing its attribute (its colour, its backdrop) beside the base model's share read by a
recorded comparison (``--rows``, a ``python -m tinv.toyworld methods --json`` file). Run from the repository root:

    OMP_NUM_THREADS=2 python benchmarks/toyworld/class_share.py \\
        --rows benchmarks/toyworld/rates/pivotal-prior-384-samples.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tinv import cli
from tinv.config import TrainConfig
from tinv.models import load_base_model
from tinv.toyworld import MODEL_DIR, SCORER_FILE
from tinv.toyworld.concepts import CONCEPTS
from tinv.toyworld.fidelity import Judged
from tinv.toyworld.methods import class_pictures, shows_attribute
from tinv.toyworld.scorer import load_scorer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", required=True, help="a methods comparison's JSON: its base_share per concept")
    cli.add_fields(p, TrainConfig)
    args = p.parse_args()
    cfg = cli.build(TrainConfig, args)
    base = {r["concept"]: r["base_share"] for r in json.loads(Path(args.rows).read_text())}
    model = load_base_model(str(MODEL_DIR), precision="fp32")
    scorer = load_scorer(Path(MODEL_DIR) / SCORER_FILE)
    sets = class_pictures(model, CONCEPTS, cfg)
    for c in CONCEPTS:
        _, pictures, _ = sets[c.name]
        shown = np.mean([shows_attribute(c, Judged(None, False, False, it)) for it in scorer.predict(pictures)])
        print(f"{c.name}: class pictures {shown:.3f} of {len(pictures)}, base model {base[c.name]:.3f}", flush=True)


if __name__ == "__main__":
    main()
