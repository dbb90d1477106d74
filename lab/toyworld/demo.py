"""The shipped demo's manifest: the toy world's held-out concepts, written by ``python -m lab.toyworld.demo``.

``make_demo`` writes ``manifests/demo.parquet`` and its 32 px PNGs: every held-out concept of the
toy world (combinations, unnamed colours, unnamed styles), a few pictures each, with tokens that
are not words of the world; one of them (:data:`DEMO_METHODS`) by pivotal tuning, the rest by TI.
"""

from __future__ import annotations

from pathlib import Path

from lab.toyworld.concepts import CONCEPTS, Concept
from lab.toyworld.fidelity import token
from lab.toyworld.world import EVAL_PROMPTS, OBJECT_PROMPT
from tinv.evaluation.sampling import png_bytes
from tinv.manifest import write_manifest

DEMO_STEPS = 150
DEMO_IMAGES = 6
DEMO_METHODS = {"black-triangle": "pivotal"}
"""Concepts the demo trains with another method than ``ti``: pivotal tuning (its token and a LoRA)."""


def eval_prompts(concept: Concept) -> list[str]:
    """Objects alone; styles applied to every shape word."""
    return list(EVAL_PROMPTS["style"]) if concept.kind == "style" else [OBJECT_PROMPT]


def demo_rows(folder: str | Path, n_images: int = DEMO_IMAGES, seed: int = 0) -> list[dict]:
    """Write each concept's pictures under ``{folder}/demo/{concept}/`` and return the manifest rows."""
    return concept_rows(CONCEPTS, folder, "demo", n_images, seed, DEMO_STEPS, DEMO_METHODS)


def concept_rows(
    concepts: tuple[Concept, ...], folder: str | Path, subdir: str, n_images: int, seed: int,
    steps: int | None = None, methods: dict[str, str] | None = None,
) -> list[dict]:
    """Write concept k's pictures (drawn from ``seed + k``) under ``{folder}/{subdir}/{concept}/`` and return
    the manifest rows (relative image URIs; a style's captions; ``steps`` and ``methods`` when given)."""
    folder, methods = Path(folder), methods or {}
    rows = []
    for k, concept in enumerate(concepts):
        images = []
        for i, picture in enumerate(concept.pictures(n_images, seed + k)):
            rel = f"{subdir}/{concept.name}/{i}.png"  # relative: resolves against the manifest's folder
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(png_bytes(picture))
            images.append(rel)
        captions = concept.captions(n_images, seed + k)
        rows.append(
            {
                "concept_id": concept.name,
                "images": images,
                "placeholder_token": token(concept),
                "initializer_token": concept.initializer,
                "learnable_property": concept.learnable_property,
                **({"steps": steps} if steps else {}),
                "eval_prompts": eval_prompts(concept),
                **({"captions": list(captions)} if captions else {}),
                **({"method": methods[concept.name]} if concept.name in methods else {}),
            }
        )
    return rows


def make_demo(folder: str | Path = "manifests", n_images: int = DEMO_IMAGES, seed: int = 0) -> Path:
    """Write ``{folder}/demo.parquet`` and ``{folder}/demo/{concept}/{i}.png``; return the manifest path."""
    manifest = Path(folder) / "demo.parquet"
    write_manifest(demo_rows(folder, n_images, seed), str(manifest))
    return manifest


def make_methods(folder: str | Path, methods: tuple[str, ...], steps: int, n_images: int = DEMO_IMAGES,
                 seed: int = 0) -> Path:
    """Write ``{folder}/methods.parquet``: every held-out concept once per method (``{concept}-{method}``, token
    ``<{concept}-{method}>``: a run's tokens are distinct; the same pictures), for ``jobs.train`` to learn each by
    each method in one run."""
    rows = concept_rows(CONCEPTS, folder, "methods", n_images, seed, steps)
    manifest = Path(folder) / "methods.parquet"
    write_manifest([{**row, "concept_id": f"{row['concept_id']}-{m}", "placeholder_token": f"<{row['concept_id']}-{m}>",
                     "method": m} for m in methods for row in rows], str(manifest))
    return manifest


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m lab.toyworld.demo")
    p.add_argument("folder", nargs="?", default="manifests")
    p.add_argument("--methods", nargs="*", default=None,
                   help="instead of the demo: every held-out concept once per method, methods.parquet")
    p.add_argument("--steps", type=int, default=DEMO_STEPS)
    args = p.parse_args()
    print(make_methods(args.folder, tuple(args.methods), args.steps) if args.methods else make_demo(args.folder))
