"""Analysis: which recorded language drifts exceed issue 23's bound of +0.05 beyond their sampling noise?

A methods comparison (``python -m lab.toyworld methods --json``) reads each concept's drift as the rise, from
the base model to the personalized one, in the share of ``--samples`` bare-class-prompt samples showing the
concept's attribute. Each share is a binomial proportion, so a drift's standard error is at most
``sqrt(p1 (1 - p1) / n + p0 (1 - p0) / n)`` when the two draws, which share their seeds and prompts, are not
negatively correlated. Files recorded since the comparison kept the paired error (``drift_se``, from the
per-sample differences) use that; older ones keep only the shares, and get this bound. Per file, the concepts
whose drift is over the bound by more than ``--sigmas`` of that error ("over"), within it by less ("unclear"),
and the count of those under it. Run from the repository root:

    python -m lab.probes.drift_noise --samples 384 lab/results/preservation/*.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

BOUND = 0.05
"""Issue 23's goal: drift at most +0.05 on every concept with prior preservation."""


def standard_error(bare: float, base: float, n: int) -> float:
    """The drift's standard error if the two shares' samples were independent (an upper bound when they are not
    negatively correlated)."""
    return math.sqrt((bare * (1 - bare) + base * (1 - base)) / n)


def classify(rows: list[dict], n: int, sigmas: float) -> dict[str, list[str]]:
    """``over`` / ``unclear`` (each ``concept +drift ±se``) and ``within`` (concept names) for one run's rows: the
    row's paired ``drift_se`` where it was recorded, else the independent-samples bound."""
    out: dict[str, list[str]] = {"over": [], "unclear": [], "within": []}
    for r in rows:
        drift = r["bare_share"] - r["base_share"]
        se = r["drift_se"] if "drift_se" in r else standard_error(r["bare_share"], r["base_share"], n)
        if drift + sigmas * se <= BOUND:
            out["within"].append(r["concept"])
        else:
            out["over" if drift - sigmas * se > BOUND else "unclear"].append(f"{r['concept']} {drift:+.3f} ±{se:.3f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="methods comparison JSON files (rows with a prior)")
    p.add_argument("--samples", type=int, required=True, help="the comparison's --samples (per prompt set)")
    p.add_argument("--sigmas", type=float, default=2.0, help="how many standard errors count as beyond noise")
    args = p.parse_args()
    for f in args.files:
        rows = [r for r in json.loads(f.read_text()) if r.get("prior")]
        if not rows:
            continue
        c = classify(rows, args.samples, args.sigmas)
        print(f"{f.name}: over {c['over'] or 'none'}; unclear {c['unclear'] or 'none'}; "
              f"within {len(c['within'])} of {len(rows)}")


if __name__ == "__main__":
    main()
