"""The shipped demo on the toy world: its held-out concepts as a manifest of PNGs."""

from __future__ import annotations

from pathlib import Path

from tinv.manifest import write_manifest
from tinv.samples import png_bytes
from tinv.toyworld.concepts import CONCEPTS, Concept
from tinv.toyworld.fidelity import OBJECT_PROMPT, STYLE_PROMPT
from tinv.toyworld.world import SHAPES

DEMO_STEPS = 150


def eval_prompts(concept: Concept) -> list[str]:
    """Objects alone; styles applied to every shape word."""
    if concept.kind == "style":
        return [STYLE_PROMPT.format("{}", shape=s) for s in SHAPES]
    return [OBJECT_PROMPT]


def make_demo(folder: str | Path = "manifests", n_images: int = 6, seed: int = 0) -> Path:
    """Write ``{folder}/demo.parquet`` and ``{folder}/demo/{concept}/{i}.png``; return the manifest path."""
    folder = Path(folder)
    rows = []
    for k, concept in enumerate(CONCEPTS):
        images = []
        for i, picture in enumerate(concept.pictures(n_images, seed + k)):
            rel = f"demo/{concept.name}/{i}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(png_bytes(picture))
            images.append(rel)
        rows.append(
            {
                "concept_id": concept.name,
                "images": images,
                "initializer_token": concept.shape or "picture",
                "learnable_property": concept.learnable_property,
                "steps": DEMO_STEPS,
                "eval_prompts": eval_prompts(concept),
            }
        )
    manifest = folder / "demo.parquet"
    write_manifest(rows, str(manifest))
    return manifest
