"""The lab's training flags: every :class:`~tinv.settings.TrainConfig` field and every
:class:`~tinv.settings.Recipe` field (the objective's finer terms, which the product sets in code), with the lab's
defaults (:data:`lab.toyworld.CONFIG`: the ``toyworld`` preset, 500 steps) and ``--prior-preservation both``."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import asdict
from typing import Any

from jobs import cli
from lab.toyworld import CONFIG
from tinv.settings import PRIOR_PRESERVATIONS, Recipe, TrainConfig

TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
RECIPE_FIELDS = frozenset(f.name for f in dataclasses.fields(Recipe))


def add_train_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """Add TrainConfig's flags and Recipe's to ``parser``, each defaulting to :data:`lab.toyworld.CONFIG`'s value,
    or to ``defaults``'s (field name → value, of either class)."""
    defaults = defaults or {}
    unknown = sorted(set(defaults) - TRAIN_FIELDS - RECIPE_FIELDS)
    if unknown:
        raise ValueError(f"no training field {unknown}")
    train = {k: v for k, v in asdict(CONFIG).items() if k != "recipe"} | {
        k: v for k, v in defaults.items() if k in TRAIN_FIELDS}
    group = parser.add_argument_group("TrainConfig", "run-level training settings (the lab's defaults)")
    cli.add_fields(group, TrainConfig, skip=("recipe", "prior_preservation"), defaults=train)
    doc = cli.field_docs(TrainConfig)["prior_preservation"].replace("``", "")
    group.add_argument("--prior-preservation", dest="prior_preservation", choices=PRIOR_PRESERVATIONS,
                       default=train["prior_preservation"],
                       help=f"{doc} both: the two losses side by side (default: {train['prior_preservation']})")
    recipe = asdict(CONFIG.recipe) | {k: v for k, v in defaults.items() if k in RECIPE_FIELDS}
    cli.add_fields(parser.add_argument_group("Recipe", "the objective's finer terms (the lab's defaults: the toyworld "
                                                       "preset)"), Recipe, defaults=recipe)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the parsed flags (:func:`add_train_flags`), its Recipe built from theirs."""
    return cli.build(TrainConfig, args, recipe=cli.build(Recipe, args))
