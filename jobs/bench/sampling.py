"""The train job's sampling throughput: finished concepts drawn one call each from copies, or together from the
trainer's live slots.

Before (the train job's former path): each finished concept's vectors and LoRA were copied out of the trainer and
drawn by :meth:`~tinv.evaluation.evaluate.Evaluator.run` alone, its LoRA loaded as an adapter for that call. After
(the trainer actor now, ``jobs/actor.py``): the finished concepts stay in their slots and are drawn together,
``evaluator.run(concepts, live=… trainer.draw(slots, …))``, from their live vectors and adapters, in batches that
mix them. The K concepts mix the methods (``ti``, ``pivotal``, ``lora``); every concept gets the evaluation's
default object prompts × ``samples_per_prompt`` seeds; no metric is scored (drawing alone is timed).
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

import numpy as np
import torch

from jobs.bench.measure import Variant, measure
from tinv.evaluation.evaluate import EvalConcept, Evaluator
from tinv.evaluation.sampling import SampleConfig
from tinv.families.model import BaseModel
from tinv.manifest import ConceptSpec
from tinv.settings import TrainConfig
from tinv.training.concept import ConceptData
from tinv.training.trainer import PackedTrainer

MIX = ("ti", "pivotal", "lora")
"""The methods of the K concepts, in turn."""


def trained(model: BaseModel, k: int) -> PackedTrainer:
    """A trainer holding ``k`` concepts of mixed methods on random pictures, after one training step (so the
    adapters are no longer zero)."""
    torch.manual_seed(0)
    trainer = PackedTrainer(model, TrainConfig(concepts_per_actor=k, early_stop=False))
    images = torch.rand(4, 3, trainer.resolution, trainer.resolution) * 2 - 1
    for s in range(k):
        method = MIX[s % len(MIX)]
        token = f"bench{s}" if method == "lora" else f"<bench{s}>"
        spec = ConceptSpec(f"c{s}", ("bench:0",), placeholder_token=token, method=method, seed=s)
        trainer.admit(s, ConceptData(spec, images))
    trainer.step()
    return trainer


def copied(trainer: PackedTrainer, s: int) -> EvalConcept:
    """Slot ``s``'s concept as the former path drew it: its vectors and LoRA state copied out of the trainer."""
    slot = trainer.slots[s]
    spec = slot.spec
    vectors = [row[: spec.num_vectors].detach().cpu().clone() for row in trainer.vectors[s]] \
        if slot.settings.trains_vectors else None
    lora, text = trainer.lora_states(s)
    return EvalConcept(spec.concept_id, spec.placeholder_token, vectors, spec.learnable_property, spec.eval_prompts,
                       None, lora=lora, text_lora=text)


def train_sampling(model: BaseModel, label: str, k: int, steps: int, reps: int) -> dict[str, Any]:
    """Images/s of drawing ``k`` finished concepts' samples, before and after, timed A, B, A, B… (``reps`` each)."""
    trainer = trained(model, k)
    evaluator = Evaluator(model, SampleConfig(sample_steps=steps))
    slots = list(range(k))
    per_concept = evaluator.images_per_concept()
    group = max(1, -(-evaluator.cfg.sample_batch_size // per_concept))  # as the actor groups finished concepts
    copies = [copied(trainer, s) for s in slots]  # both paths copy at emit: not timed
    drawn: dict[str, list[np.ndarray]] = {"before": [], "after": []}

    def before() -> None:
        drawn["before"] = [evaluator.run([c])[0].images for c in copies]

    def after() -> None:
        out = []
        for i in range(0, k, group):
            mine = slots[i : i + group]
            concepts = [EvalConcept(c.concept_id, c.token, None, c.learnable_property, c.prompts) for c in
                        copies[i : i + group]]
            out += [e.images for e in evaluator.run(
                concepts, live=lambda requests, mine=mine, **how: trainer.draw(mine, requests, **how))]
        drawn["after"] = out

    n = k * per_concept
    ways = [Variant("before", "Evaluator.run per concept, from its copied vectors and LoRA", before, n, per_concept),
            Variant("after", "Evaluator.run(live=trainer.draw) over the finished concepts' slots", after, n,
                    per_concept)]
    measure(ways, model.device, reps, count_flops=False)
    runs = {}
    for v in ways:
        seconds = statistics.median(v.times)
        runs[v.name] = {"images_per_s": n / seconds, "seconds": seconds, "times": v.times, "peak_mem_gb": v.peak_gb}
    difference = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(*drawn.values()))
    return {"model": label, "resolution": model.resolution, "concepts": k,
            "methods": dict(Counter(MIX[s % len(MIX)] for s in slots)), "images_per_concept": per_concept,
            "sample_steps": steps, "sample_batch_size": evaluator.cfg.sample_batch_size, "concepts_per_call": group,
            "guidance": evaluator.cfg.drawing(model)["guidance"],
            "scheduler": evaluator.cfg.scheduler or model.family.sampling(model).scheduler, "reps": reps, **runs,
            "speedup": runs["after"]["images_per_s"] / runs["before"]["images_per_s"],
            "max_pixel_difference": difference}
