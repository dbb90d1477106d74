"""Probe: do the prior-preservation class pictures show each held-out concept's attribute more often than
the base model draws it?

Draws every class set the method comparison trains on (:func:`lab.toyworld.methods.class_pictures`, the job's
own class pictures, ``--class-images`` per prompt), reads them with the toy world's scorer and prints, per
concept, the share showing its attribute (its colour, its backdrop) beside the base model's share read by a
recorded comparison (``--rows``, a ``python -m lab.toyworld methods --json`` file). Run from the repository root:

    OMP_NUM_THREADS=2 python -m lab.probes.class_share --rows lab/results/rates/pivotal-prior-384-samples.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lab.toyworld import MODEL_DIR, SCORER_FILE
from lab.toyworld.concepts import CONCEPTS
from lab.toyworld.fidelity import Judged
from lab.toyworld.flags import add_train_flags, train_config
from lab.toyworld.methods import class_pictures, shows_attribute
from lab.toyworld.scorer import load_scorer
from tinv.families.model import load_base_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", required=True, help="a methods comparison's JSON: its base_share per concept")
    add_train_flags(p)
    args = p.parse_args()
    cfg = train_config(args)
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
