"""Probe: where does a FLUX-layout toy model decide a picture's shape, and does its prompt's shape word decide it?

Two readings of a model folder (``python -m lab.toyworld train --layout flux``), with the scorer beside it:

1. **Onset**: pictures of a blue square, noised to σ (``(1 − σ) z + σ ε``, the model's own latents), then drawn to
   σ = 0 by 20 Euler steps under ``a blue triangle`` at embedded guidance 3.5: the scorer's shape counts per σ. Up
   to the σ where squares remain, the noisy latent holds the shape; above it the model decides it, and a model
   that follows its prompt draws triangles there.
2. **Seen pairs**: ``a {colour} {shape}`` for two named colours and every shape (pairs the model saw in
   training), drawn by tinv's sampling at the family's steps and guidance: how many show the named shape.

Run from the repository root (about 2 min on 2 threads)::

    OMP_NUM_THREADS=2 python -m lab.probes.flux_shapes --model DIR --json lab/results/flux/shapes-DIR.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline

from lab.toyworld import nets
from lab.toyworld.flux import Denoiser
from lab.toyworld.scorer import find_scorer, pixels
from lab.toyworld.world import SHAPES, Item, render
from tinv.evaluation.sampling import SampleRequest, sample
from tinv.families.model import load_base_model

SIGMAS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)


@torch.no_grad()
def onset(folder: str, scorer, n: int = 24, steps: int = 20, guidance: float = 3.5) -> dict[float, dict[str, int]]:
    """Per starting σ, the shapes drawn from noised blue squares under ``a blue triangle``."""
    pipe = FluxPipeline.from_pretrained(folder)
    vae = pipe.vae
    rng = np.random.default_rng(0)
    x = pixels(np.stack([np.asarray(render(Item("square", "blue"), rng)) for _ in range(n)]))
    z = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    states, pooled, _ = pipe.encode_prompt(["a blue triangle"] * n, prompt_2=None,
                                           max_sequence_length=nets.MAX_TOKENS)
    denoiser, g = Denoiser(pipe.transformer), torch.full((n,), guidance)
    out = {}
    for start in SIGMAS:
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
        latents, sigmas = (1 - start) * z + start * noise, torch.linspace(start, 0, steps + 1)
        for a, b in zip(sigmas[:-1], sigmas[1:]):
            latents = latents + (b - a) * denoiser(latents, a.expand(n), states, pooled, g)
        images = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
        out[start] = dict(Counter(SHAPES[i] for i in scorer(images)["shape"].argmax(-1).tolist()))
    return out


def seen_pairs(folder: str, scorer, samples: int = 16) -> dict[str, dict[str, int]]:
    """Per ``a {colour} {shape}`` prompt (red and green, pairs of the training data), the shapes drawn."""
    model = load_base_model(folder)
    prompts = [f"a {colour} {shape}" for colour in ("red", "green") for shape in SHAPES]
    requests = [SampleRequest(0, p, seed) for p in prompts for seed in range(samples)]
    readings = scorer.predict(pixels(sample(model, [None], requests, words=["x"], batch_size=64)))
    return {p: dict(Counter(r.shape for r, q in zip(readings, requests) if q.prompt == p)) for p in prompts}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m lab.probes.flux_shapes")
    p.add_argument("--model", required=True, help="a FLUX-layout toy model folder with its scorer")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    scorer = find_scorer(args.model)
    found = {"onset": onset(args.model, scorer), "seen_pairs": seen_pairs(args.model, scorer)}
    for start, shapes in found["onset"].items():
        print(f"σ {start}: {shapes}")
    for prompt, shapes in found["seen_pairs"].items():
        print(f"{prompt}: {shapes.get(prompt.split()[-1], 0)} of {sum(shapes.values())} ({shapes})")
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
