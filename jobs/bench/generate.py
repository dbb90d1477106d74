"""Generation throughput: tinv's sampler batched across concepts against a pipeline call per concept."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

import torch

from jobs.bench.measure import Variant, measure
from tinv.evaluation.sampling import SampleConfig, SampleRequest, pipeline, sample
from tinv.families.model import BaseModel


def generation(model: BaseModel, plain: BaseModel, concepts: int, steps: int, reps: int) -> dict[str, Any]:
    """Images/s: tinv's batched sampler across concepts vs load_textual_inversion + a call per concept.

    The workload is tinv's default evaluation: every object eval prompt of the model, ``samples_per_prompt``
    seeds each, drawn in batches of ``SampleConfig.sample_batch_size``; the per-concept way draws each
    concept's images in one pipeline call. ``plain`` is a second load of the same model for the
    per-concept way (diffusers resizes its text encoder there; tinv's slot tokens must not share it).
    """
    cfg = SampleConfig(sample_steps=steps)
    how = cfg.drawing(model)
    torch.manual_seed(0)
    table = model.text_encoders[0].get_input_embeddings().weight.detach().float()
    vectors = [[table[torch.randint(len(table), (1,))] + 0.1 * torch.randn(1, table.shape[1])]
               for _ in range(concepts)]
    pairs = [(p, k) for p in model.eval_prompts["object"] for k in range(cfg.samples_per_prompt)]
    requests = [SampleRequest(c, p, k) for c in range(concepts) for p, k in pairs]
    pipe, plain_pipe = pipeline(model, cfg.scheduler), pipeline(plain, cfg.scheduler, text_encoders=True)

    def batched() -> None:
        sample(model, vectors, requests, pipe=pipe, **how)

    def per_concept_way() -> None:
        for c, row in enumerate(vectors):
            token = f"<gen{c}>"
            plain_pipe.load_textual_inversion({token: row[0][0]})
            plain_pipe([p.format(token) for p, _ in pairs], num_inference_steps=how["steps"],
                       guidance_scale=how["guidance"], generator=[torch.Generator().manual_seed(k) for _, k in pairs],
                       output_type="np")
            plain_pipe.unload_textual_inversion(token)

    n = len(requests)
    ways = [Variant("batched", "tinv.evaluation.sampling.sample, batches mixing concepts", batched, n, len(pairs)),
            Variant("per_concept", "load_textual_inversion + a pipeline call per concept", per_concept_way, n,
                    len(pairs))]
    measure(ways, model.device, reps, count_flops=False)
    out: dict[str, Any] = {}
    for v in ways:
        seconds = statistics.median(v.times)
        out[v.name] = {"images_per_s": n / seconds, "seconds": seconds, "peak_mem_gb": v.peak_gb}
    out["speedup"] = out["batched"]["images_per_s"] / out["per_concept"]["images_per_s"]
    drawing = {k: v for k, v in asdict(cfg).items() if k != "metrics"}  # none are scored here
    out["setup"] = {"concepts": concepts, "images_per_concept": len(pairs), **drawing,
                    "resolution": model.resolution}
    return out
