"""cluster.yaml passes Ray's own autoscaler validation and says what the runbook promises."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import ray
import yaml
from jobtools import REPO
from ray.autoscaler._private.util import prepare_config, validate_config


def test_cluster_yaml_is_valid_for_the_ray_autoscaler():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)

    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    assert "InstanceMarketOptions" not in head["node_config"]  # on-demand head
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    assert all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in workers)

    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["not_a_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
