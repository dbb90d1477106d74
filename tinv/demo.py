"""The shipped demo: a few procedural concepts (coloured shapes) and the embedded default model.

``make_demo`` writes ``manifests/demo.parquet`` and its 32 px PNGs; ``default_model`` builds the
embedded default model (for now the seeded tiny SD1 model) once per machine into a cache folder.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from filelock import FileLock
from PIL import Image, ImageDraw

from tinv.manifest import write_manifest
from tinv.tiny import save_tiny_model

DEMO_MANIFEST = "manifests/demo.parquet"
DEFAULT_MODEL_KIND, DEFAULT_MODEL_SEED = "sd1", 0
CACHE = Path.home() / ".cache" / "tinv"
DEMO_STEPS = 30
CONCEPTS = {
    # concept_id: (shape, RGB colour, initializer, property)
    "red-ball": ("ellipse", (220, 40, 40), "ball", "object"),
    "blue-cube": ("rectangle", (40, 70, 220), "cube", "object"),
    "green-toy": ("triangle", (40, 180, 60), "toy", "object"),
    "stripes": ("stripes", (240, 200, 30), "painting", "style"),
}


def shape_image(shape: str, colour: tuple[int, int, int], variant: int, size: int = 32) -> bytes:
    """A PNG of one coloured shape on a light background; ``variant`` moves and scales it."""
    img = Image.new("RGB", (size, size), (235 - 10 * variant, 235, 225 + 5 * variant))
    draw = ImageDraw.Draw(img)
    pad = 3 + 2 * variant
    box = (pad, pad + variant, size - pad + variant, size - pad)
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
    else:
        for x in range(variant, size, 6):
            draw.rectangle((x, 0, x + 2, size), fill=colour)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def make_demo(folder: str | Path = "manifests", n_images: int = 4) -> Path:
    """Write ``{folder}/demo.parquet`` and ``{folder}/demo/{concept}/{i}.png``; return the manifest path."""
    folder = Path(folder)
    rows = []
    for concept_id, (shape, colour, initializer, prop) in CONCEPTS.items():
        images = []
        for i in range(n_images):
            rel = f"demo/{concept_id}/{i}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(shape_image(shape, colour, i))
            images.append(rel)  # relative: resolves against the manifest's folder
        rows.append(
            {
                "concept_id": concept_id,
                "images": images,
                "initializer_token": initializer,
                "learnable_property": prop,
                "steps": DEMO_STEPS,
            }
        )
    manifest = folder / "demo.parquet"
    write_manifest(rows, str(manifest))
    return manifest


def default_model(cache_dir: str | Path = CACHE) -> Path:
    """The embedded default model's folder, built once per machine (seeded, so identical everywhere)."""
    target = Path(cache_dir) / f"default-model-tiny-{DEFAULT_MODEL_KIND}-seed{DEFAULT_MODEL_SEED}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "model_index.json").exists():
            tmp = Path(f"{target}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            save_tiny_model(tmp, DEFAULT_MODEL_KIND, seed=DEFAULT_MODEL_SEED)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    return target
