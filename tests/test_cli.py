"""The job CLIs are generated from the config dataclasses: every field settable, each default written once."""

from __future__ import annotations

import dataclasses

import pytest

from jobs import evaluate, train
from jobs.common import ClusterConfig
from jobs.dispatch import DispatchConfig
from tinv import cli
from tinv.config import TrainConfig
from tinv.samples import SampleConfig


def test_every_train_config_field_is_a_flag_with_its_docstring_as_help(capsys):
    flags = ["--weight-decay", "0.1", "--flip-p", "0.2", "--dvar-every", "3", "--adam-betas", "0.8", "0.9",
             "--no-early-stop", "--resolution", "64", "--concepts-per-actor", "2", "--loss-scale", "64",
             "--metrics", "clip=/m", "--sample-batch-size", "4", "--max-attempts", "5", "--calls-in-flight", "3"]
    args = train.parse_args(flags)
    cfg = cli.build(TrainConfig, args)
    assert (cfg.weight_decay, cfg.flip_p, cfg.dvar_every, cfg.adam_betas, cfg.early_stop) == (0.1, 0.2, 3, (0.8, 0.9),
                                                                                              False)
    assert (cfg.resolution, cfg.concepts_per_actor, cfg.loss_scale) == (64, 2, 64.0)
    assert cli.build(SampleConfig, args) == SampleConfig(metrics=("clip=/m",), sample_batch_size=4)
    dispatch = cli.build(DispatchConfig, args, num_actors=1, concepts_per_actor=cfg.concepts_per_actor)
    assert (dispatch.max_attempts, dispatch.calls_in_flight, dispatch.concepts_per_actor) == (5, 3, 2)
    # no flag given: exactly the dataclasses' own defaults, nothing restated in the CLI
    bare = train.parse_args([])
    assert cli.build(TrainConfig, bare) == TrainConfig() and cli.build(SampleConfig, bare) == SampleConfig()
    assert cli.build(ClusterConfig, bare) == ClusterConfig()
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for cls in (TrainConfig, SampleConfig, ClusterConfig):
        for f in dataclasses.fields(cls):
            assert f"--{f.name.replace('_', '-')}" in help_text, f.name
    assert "AdamW weight decay on the new vectors. (default: 0.0)" in help_text
    with pytest.raises(SystemExit):
        train.parse_args(["--precision", "fp8"])  # choices come from the field


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
    docs = cli.field_docs(TrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert docs["dvar_threshold"] == "... is below this fraction of the variance of all of them."
