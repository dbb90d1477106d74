"""What both jobs share: exit codes, :class:`JobExit`, the cluster settings, connecting to Ray, the
storage options, the actor factory and the ``main`` wrapper."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from jobs.dispatch import Dispatcher, InfrastructureError
from tinv import storage
from tinv.errors import InvalidInputError
from tinv.families.quantized import BASE_PRECISIONS

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INFRA = 0, 1, 2, 3
"""0 every concept done; 1 some failed (see the results); 2 invalid input, nothing done; 3 infrastructure."""
log = logging.getLogger("tinv.job")


class JobExit(Exception):
    """Stop the job with an exit status and a message for the log."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how the job's actors run."""

    ray_address: str | None = None
    """Ray cluster to join; None: ``$RAY_ADDRESS``, else a new local instance."""
    accelerator: str = field(default="auto", metadata={"choices": ("auto", "gpu", "cpu")})
    """auto: GPU actors if the cluster has GPUs now, else CPU actors; gpu on an autoscaling cluster that
    starts without GPU nodes (with --num-actors)."""
    num_actors: int | None = None
    """Actors to run; None: one per GPU, or min(2, CPUs) without GPUs."""
    cpus_per_actor: int | None = None
    """CPUs (torch threads) per actor; None: 1 with GPUs, else CPUs / actors."""
    precision: str = field(default="auto", metadata={"choices": ("auto", "fp32", "bf16", "fp16")})
    """Precision of the frozen denoiser and VAE (auto: bf16 on a GPU with bf16, fp16 on one without, fp32 on CPU;
    the text encoders stay fp32)."""
    base_precision: str = field(default="auto", metadata={"choices": BASE_PRECISIONS})
    """The frozen denoiser's weights: auto (in --precision), or quantized int8 (any device) or fp8 (GPUs of
    compute capability 8.9+) through torchao, for FLUX.1 on smaller GPUs (always with gradient checkpointing)."""
    attention: str = field(default="sdpa", metadata={"choices": ("sdpa", "xformers")})
    """Attention kernel: PyTorch SDPA, or xformers when installed."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's and text encoders' activations in the backward pass: less memory, slower steps."""
    storage_options: str | None = None
    """fsspec storage options as JSON (e.g. an S3 endpoint); only their names are ever recorded."""
    storage_retry_s: float = 600.0
    """Seconds storage may keep failing (refused, timeouts, 5xx) before the run counts it an outage (exit 3)."""
    take_over: bool = False
    """Take the output's lease from the run that holds it (only when that run is known to be dead)."""

    def parsed_storage_options(self) -> dict[str, Any] | None:
        return parse_storage_options(self.storage_options)

    def recorded(self) -> dict[str, Any]:
        """What a run record may keep: every field, the storage options by name only."""
        return {**dataclasses.asdict(self), "storage_options": sorted(self.parsed_storage_options() or {})}


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options`` JSON as a dict; a clear :class:`JobExit` (invalid input) when it is not one."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except ValueError as e:
        raise JobExit(EXIT_INVALID, f"invalid input: --storage-options is not JSON: {e}") from e
    if not isinstance(options, dict):
        raise JobExit(EXIT_INVALID, "invalid input: --storage-options must be a JSON object")
    return options


def local_abs(uri: str) -> str:
    """Local paths made absolute (actors and the driver may run in other folders); URIs as they are."""
    return uri if not storage.is_local(uri) else os.path.abspath(uri.removeprefix("file://"))


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``); otherwise start a local instance."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def actor_factory(
    cluster: ClusterConfig, make_setup: Callable[[int], Any], worker: type
) -> tuple[Callable[[], Any], int]:
    """A function making one actor (``worker`` with ``make_setup(threads)``), and how many to run."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if cluster.accelerator == "cpu":
        gpus = 0
    elif cluster.accelerator == "gpu" and not gpus:
        if not cluster.num_actors:
            raise JobExit(EXIT_INVALID, "invalid input: --accelerator gpu on a cluster with no GPU yet needs "
                                        "--num-actors")
        gpus = cluster.num_actors
    n = cluster.num_actors or (gpus if gpus else max(1, min(2, cpus)))
    per_actor = cluster.cpus_per_actor or (1 if gpus else max(1, cpus // n))
    options = {"num_gpus": 1, "num_cpus": per_actor} if gpus else {"num_cpus": per_actor}
    log.info("cluster: %d GPU(s), %d CPU(s): %d %s actor(s) with %s", gpus, cpus, n, worker.__name__, options)
    setup = make_setup(per_actor)
    remote = ray.remote(worker).options(max_concurrency=8, max_restarts=0, **options)
    return (lambda: remote.remote(setup)), n


def wait_for_model(dispatcher: Dispatcher, model_uri: str | None) -> dict[str, Any]:
    """The loaded model's info, once every actor has it (all the same model); the exit status by the
    load error's type: invalid input (a missing or malformed model) 2, anything else 3."""
    try:
        infos = dispatcher.wait_ready()
    except RayTaskError as e:  # an actor's info() raised the error its model load kept
        cause = e.cause if e.cause is not None else e
        code = EXIT_INVALID if isinstance(cause, InvalidInputError) else EXIT_INFRA
        raise JobExit(code, f"could not load the model {model_uri or '(embedded)'}: {cause}") from e
    except (RayActorError, InfrastructureError) as e:
        raise JobExit(EXIT_INFRA, f"could not load the model {model_uri or '(embedded)'}: {e}") from e
    if len({i["base_model_fingerprint"] for i in infos}) != 1:
        raise JobExit(EXIT_INFRA, f"actors loaded different models: {infos}")
    return infos[0]


def run_main(
    run: Callable[[argparse.Namespace], int], parse: Callable[[list[str] | None], argparse.Namespace],
    argv: list[str] | None = None,
) -> int:
    """Parse, run, and turn a :class:`JobExit` or a crash of the driver into its exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(parse(argv))
    except JobExit as e:
        print(f"[tinv] {e}", file=sys.stderr, flush=True)
        return e.code
    except Exception:  # a crash of the driver itself (cluster unreachable, a bug): not a data problem
        log.exception("the driver failed")
        return EXIT_INFRA
