"""A small CNN that reads shape, colour, style and backdrop off a toy-world picture.

Trained on the generator's exact labels, half of them passed through the toy model's VAE, so
the soft edges of decoded samples (stars and diamonds blur) do not fool it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lab.toyworld.world import (
    BACKDROPS,
    COLOURS,
    DESCRIBED,
    LIGHT,
    SHAPES,
    STYLES,
    Item,
    contrasts,
    described_backdrop,
    described_rgb,
    render,
)
from tinv.evaluation.toyworld import HEADS, SCORER_FILE, Scorer, load_scorer, pixels

assert HEADS == {"shape": SHAPES, "colour": (*COLOURS, DESCRIBED), "style": STYLES,
                 "backdrop": (LIGHT, *BACKDROPS, DESCRIBED)}, "the product's scorer labels are the world's"


def labelled_set(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` pictures drawn evenly over every shape, colour and style (``other`` and held-out ones included).

    Half stand on a light tint (where every style is drawn), half evenly on the dark backdrops,
    which carry plain shapes in a colour that stands out on them, as in the world.
    """
    rng = np.random.default_rng(seed)

    def pick(options: tuple[str, ...]) -> str:
        return options[rng.integers(len(options))]

    def item() -> Item:
        backdrop = LIGHT if rng.random() < 0.5 else pick(HEADS["backdrop"][1:])  # half light: room for every style
        style = pick(STYLES) if backdrop == LIGHT else "plain"
        while True:
            colour = pick(HEADS["colour"])
            rgb = described_rgb(rng) if colour == DESCRIBED else None
            if contrasts(rgb or COLOURS[colour], backdrop):
                break
        ground = described_backdrop(rng, rgb or COLOURS[colour]) if backdrop == DESCRIBED else None
        return Item(pick(SHAPES), colour, style, rgb, backdrop, ground)

    items = [item() for _ in range(n)]
    x = pixels(np.stack([np.asarray(render(it, rng)) for it in items]))
    y = {k: torch.tensor([v.index(getattr(it, k)) for it in items]) for k, v in HEADS.items()}
    return x, y


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """What the toy model's VAE makes of ``x`` (mean latent, decoded)."""
    return torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample.clamp(-1, 1) for c in x.split(512)])


@dataclass
class ScorerReport:
    fresh: dict[str, float]
    reconstructed: dict[str, float]


def accuracy(scorer: Scorer, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        logits = scorer.eval()(x)
    return {k: (logits[k].argmax(-1) == y[k]).float().mean().item() for k in HEADS}


def train_scorer(vae, n: int = 24_000, epochs: int = 8, seed: int = 0) -> Scorer:
    """Fit on ``n`` fresh pictures plus their VAE reconstructions."""
    torch.manual_seed(seed)
    x, y = labelled_set(n, seed)
    x = torch.cat([x, reconstruct(vae, x)])
    y = {k: torch.cat([v, v]) for k, v in y.items()}
    scorer = Scorer()
    opt = torch.optim.AdamW(scorer.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * len(x) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    scorer.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=gen)
        logits = scorer(x[idx])
        loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in HEADS)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return scorer.eval()


def evaluate_scorer(scorer: Scorer, vae, n: int = 2000, seed: int = 12345) -> ScorerReport:
    """Accuracy per head on fresh pictures and on their VAE reconstructions (unseen seed)."""
    x, y = labelled_set(n, seed)
    return ScorerReport(accuracy(scorer, x, y), accuracy(scorer, reconstruct(vae, x), y))


def find_scorer(model_dir: str | Path) -> Scorer | None:
    """The scorer shipped beside a toy-world model, or None for any other model."""
    path = Path(model_dir) / SCORER_FILE
    return load_scorer(path) if path.is_file() else None


def save_scorer(scorer: Scorer, path: str | Path) -> None:
    save_file(scorer.state_dict(), str(path))


