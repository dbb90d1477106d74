"""The job CLIs: a user's surface generated from the config dataclasses, every default written once, on its field."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from jobs import cli, evaluate, train
from jobs.common import ClusterConfig
from jobs.dispatch import DispatchConfig
from tinv.evaluation.sampling import SampleConfig
from tinv.files.catalog import PublishConfig
from tinv.settings import PRESETS, Recipe, TrainConfig

GROUPS = ["data", "method", "schedule", "evaluation and publishing", "cluster"]


def flags_of(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """Group title → its flags' actions (the help flag left out)."""
    return {g.title: [a for a in g._group_actions if a.option_strings and a.dest != "help"]
            for g in parser._action_groups if g.title not in ("positional arguments", "options")}


def test_the_train_job_has_a_users_surface_in_groups_with_plain_one_line_help(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    groups = flags_of(argparse_parser())
    assert list(groups) == GROUPS
    actions = [a for group in groups.values() for a in group]
    assert 20 <= len(actions) <= 37, len(actions)  # 35 before FLUX's --train-t5 and --base-precision
    for action in actions:
        assert action.help and "\n" not in action.help and "``" not in action.help and ":class:" not in action.help
        assert len(action.help) < 260, action.help
    assert "Bulk personalization" in text and "Textual Inversion on a Ray" not in text and "``" not in text
    for research in ("--min-timestep-fraction", "--style-timestep-power", "--style-batch-size", "--dvar-window",
                     "--blank-prompt-preservation", "--blank-prompt-loss-weight", "--lora-text-encoder-learning-rate",
                     "--loss-scale", "--demo"):
        assert research not in text, research
        with pytest.raises(SystemExit):
            train.parse_args([research, "1"])
    with pytest.raises(SystemExit):
        train.parse_args(["--prior-preservation", "both"])  # a lab setting (Recipe), not a user's choice


def argparse_parser() -> argparse.ArgumentParser:
    """The train job's parser, as ``parse_args`` builds it."""
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def keep(self, *args, **kwargs):
        captured["parser"] = self
        return real(self, [])

    argparse.ArgumentParser.parse_args = keep
    try:
        train.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured["parser"]


def test_flags_build_the_configs_and_an_unset_one_keeps_its_fields_default():
    args = train.parse_args(["--learning-rate", "0.1", "--no-early-stop", "--resolution", "64",
                             "--concepts-per-actor", "2", "--lora-targets", "to_q", "to_v", "--metrics", "clip=/m",
                             "--max-attempts", "5", "--precision", "bf16", "--publish-if", "fidelity>=0.5"])
    cfg = cli.build(TrainConfig, args)
    assert (cfg.learning_rate, cfg.early_stop, cfg.resolution, cfg.concepts_per_actor) == (0.1, False, 64, 2)
    assert cfg.lora_targets == ("to_q", "to_v") and cfg.recipe == Recipe()
    assert cli.build(SampleConfig, args) == SampleConfig(metrics=("clip=/m",))
    assert cli.build(PublishConfig, args).publish_if == ("fidelity>=0.5",)
    assert cli.build(ClusterConfig, args).precision == "bf16"
    dispatch = cli.build(DispatchConfig, args, num_actors=1, concepts_per_actor=cfg.concepts_per_actor)
    assert (dispatch.max_attempts, dispatch.concepts_per_actor, dispatch.calls_in_flight) == (5, 2, 2)
    bare = train.parse_args([])  # no flag: exactly the dataclasses' own defaults, nothing restated in the CLI
    for cls in (TrainConfig, SampleConfig, PublishConfig, ClusterConfig):
        assert cli.build(cls, bare) == cls()
    with pytest.raises(SystemExit):
        train.parse_args(["--precision", "fp8"])  # choices come from the field


def test_product_defaults_follow_the_recipes_and_the_demo_keeps_the_toy_worlds_preset():
    recipe = TrainConfig().recipe
    assert recipe == PRESETS["recipes"]
    assert (recipe.min_timestep_fraction, recipe.style_timestep_power, recipe.style_batch_size) == (0.0, 1.0, None)
    assert TrainConfig().steps == 3000 and TrainConfig().early_stop
    demo = train.read_inputs(train.parse_args(["--output", "/tmp/unused"]))  # no manifest: the shipped demo
    assert demo.train.recipe == PRESETS["toyworld"] != recipe
    toy = PRESETS["toyworld"]
    assert (toy.min_timestep_fraction, toy.style_timestep_power, toy.style_batch_size) == (0.5, 4.0, 8)


def test_evaluate_takes_what_it_is_not_told_from_the_run():
    args = evaluate.parse_args(["--run", "r", "--guidance", "7"])
    assert cli.values(args, SampleConfig) == {"guidance": 7.0}
    recorded = {"samples_per_prompt": 1, "sample_steps": 9, "guidance": 5.0, "metrics": ["clip=/m"]}
    assert evaluate.sample_config(args, recorded) == SampleConfig(samples_per_prompt=1, sample_steps=9, guidance=7.0,
                                                                  metrics=("clip=/m",))
    assert evaluate.sample_config(evaluate.parse_args(["--run", "r"]), None) == SampleConfig()
    dispatch = cli.build(DispatchConfig, args, num_actors=1)
    assert (dispatch.concepts_per_actor, dispatch.calls_in_flight) == (8, 1)  # evaluate's own defaults


def test_field_docs_are_read_from_the_source():
    docs = cli.field_docs(Recipe)
    assert set(docs) == {f.name for f in dataclasses.fields(Recipe)}
    assert docs["dvar_threshold"] == "... is below this fraction of the variance of all of them."
