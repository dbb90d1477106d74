"""The dispatcher alone, with scripted fake actors on the real cluster: hangs, deaths, bounded retries."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray

from jobs.dispatch import ConceptResult, DispatchConfig, Dispatcher, InfrastructureError, Request, Task
from tinv.manifest import ConceptSpec


class FakeTrainer:
    """Behaves per concept id: ``hang-once``/``die-once`` misbehave on their first attempt,
    ``hang`` always hangs, ``flaky`` reports a transient error once, the rest succeed."""

    def info(self) -> dict:
        return {"worker": f"fake:{os.getpid()}", "base_model_fingerprint": "x"}

    def train(self, requests: list[Request]) -> list[ConceptResult]:
        out = []
        for request in requests:
            cid, attempt = request.spec.concept_id, request.attempt
            if cid == "hang" or (cid == "hang-once" and attempt == 1):
                time.sleep(3600)
            if cid == "die-once" and attempt == 1:
                os._exit(1)
            if cid == "raise-once" and attempt == 1:
                raise RuntimeError("a bug in the call, the actor lives")
            retryable = cid == "flaky" and attempt == 1
            out.append(ConceptResult(cid, "failed" if retryable else "succeeded", attempts=attempt,
                                     worker=f"fake:{os.getpid()}", retryable=retryable,
                                     error="transient: x" if retryable else None))
        return out


@pytest.fixture
def connected(ray_cluster, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address=ray_cluster["address"], log_to_driver=False)
    yield
    ray.shutdown()


def dispatch(
    ids: list[str], num_actors: int = 2, concepts_per_actor: int = 1, **cfg
) -> tuple[dict[str, dict], Dispatcher]:
    got: dict[str, dict] = {}
    remote = ray.remote(FakeTrainer).options(num_cpus=0, max_concurrency=4)
    config = DispatchConfig(num_actors=num_actors, concepts_per_actor=concepts_per_actor, concept_timeout_s=4,
                            load_timeout_s=60, **cfg)
    dispatcher = Dispatcher(lambda: remote.remote(), config, lambda r: got.__setitem__(r.concept_id, r))
    dispatcher.wait_ready()
    try:
        dispatcher.run([Task(ConceptSpec(c, ("x.png",)), "fp") for c in ids])
    finally:
        dispatcher.shutdown()
    return got, dispatcher


def test_hung_and_dead_actors_are_replaced_and_their_concepts_retried(connected):
    ids = ["ok-1", "hang-once", "die-once", "flaky", "ok-2", "hang"]
    got, dispatcher = dispatch(ids, max_attempts=2)
    assert sorted(got) == sorted(ids)
    assert {c: got[c].status for c in ids} == {c: "failed" if c == "hang" else "succeeded" for c in ids}
    # each misbehaved at least once; a loss shared with another concept costs one more hand-out, not an attempt
    assert all(got[c].attempts >= 2 for c in ("hang-once", "die-once", "flaky", "hang"))
    assert "gave up after 2 failed attempts" in got["hang"].error and "hung" in got["hang"].error
    assert dispatcher.replaced >= 2  # at least: the actor that died, and the one where hang gave up


def test_a_concept_lost_with_a_hanging_neighbour_is_not_charged_for_it(connected):
    """One call holds both; its hang is nobody's in particular, so both rerun alone and only hang fails."""
    got, dispatcher = dispatch(["hang", "ok-1"], num_actors=1, concepts_per_actor=2, calls_in_flight=1,
                               max_attempts=1)
    assert {c: got[c].status for c in got} == {"hang": "failed", "ok-1": "succeeded"}
    assert got["ok-1"].attempts == 2 and got["hang"].attempts == 2
    assert "gave up after 1 failed attempts" in got["hang"].error
    assert dispatcher.replaced == 2  # the shared hang, then hang's own


def test_a_call_that_raises_is_retried_without_replacing_its_live_actor(connected):
    got, dispatcher = dispatch(["raise-once", "ok-1"], max_attempts=2)
    assert {c: got[c].status for c in got} == {"raise-once": "succeeded", "ok-1": "succeeded"}
    assert got["raise-once"].attempts == 2 and dispatcher.replaced == 0


def test_actors_that_keep_dying_end_in_an_infrastructure_error(connected):
    with pytest.raises(InfrastructureError):
        dispatch(["hang"], max_attempts=5, max_replacements=1)
