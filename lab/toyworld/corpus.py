"""A night's worth of toy concepts to fit a learned start on, disjoint from the 12 held-out ones.

Three families, the shapes of the held-out kinds (:data:`~lab.toyworld.concepts.CONCEPTS`) in other
places of the world, so a start fitted on them must generalise to the held-out concepts, not recall them:

- **combinations** other than the held-out four: every other named colour × shape pair, plain and in one
  random rendering;
- **described colours** × shapes: objects in a random colour of the described continuum (never within
  :data:`~lab.toyworld.world.HOLE` of a canonical colour, so never an unnamed one);
- **described backdrops**: styles on a random dark tone of the backdrop continuum (never within ``HOLE``
  of an unnamed backdrop), captioned as the held-out styles are.

:func:`write_corpus` writes their pictures and a manifest that ``jobs.train`` trains like any night's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lab.toyworld.concepts import CONCEPTS, Concept
from lab.toyworld.demo import concept_rows
from lab.toyworld.world import (
    COMBINATIONS,
    DESCRIBED,
    NAMED_COLOURS,
    NAMED_STYLES,
    SHAPES,
    described_backdrop,
    described_rgb,
)
from tinv.manifest import write_manifest

CORPUS_SEED = 1000
"""Corpus concept k's pictures are drawn from ``CORPUS_SEED + k``, away from the held-out concepts' seeds."""


def corpus(n: int = 320, seed: int = 0) -> tuple[Concept, ...]:
    """``n`` concepts: the 64 other combinations (32 pairs, plain and rendered), then described colours and
    described backdrops in turn."""
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in NAMED_COLOURS for s in SHAPES if (c, s) not in COMBINATIONS]
    renderings = list(NAMED_STYLES)
    out = [Concept(f"{c}-{s}", "combination", s, c) for c, s in pairs]
    out += [Concept(f"{c}-{s}-{r}", "combination", s, c, rendering=r)
            for c, s in pairs for r in [renderings[rng.integers(len(renderings))]]]
    while len(out) < n:
        if len(out) % 2:
            rgb = described_rgb(rng)
            shape = SHAPES[rng.integers(len(SHAPES))]
            out.append(Concept(f"rgb{rgb[0]}-{rgb[1]}-{rgb[2]}-{shape}", "described", shape, DESCRIBED, rgb=rgb))
        else:
            tone = described_backdrop(rng, (255, 255, 255))
            out.append(Concept(f"tone{tone[0]}-{tone[1]}-{tone[2]}", "style", backdrop=DESCRIBED, backdrop_rgb=tone))
    names = [c.name for c in out[:n]]
    assert len(set(names)) == n and not set(names) & {c.name for c in CONCEPTS}, "corpus names must be unique"
    return tuple(out[:n])


def write_corpus(folder: str | Path, n: int = 320, seed: int = 0, n_images: int = 6) -> Path:
    """``{folder}/corpus.parquet`` and its pictures under ``{folder}/corpus/``; returns the manifest path."""
    manifest = Path(folder) / "corpus.parquet"
    rows = concept_rows(corpus(n, seed), folder, "corpus", n_images, CORPUS_SEED + seed)
    write_manifest(rows, str(manifest))
    return manifest
