"""The toy world: a procedural world of coloured shapes and a tiny text-to-image model of it.

No Stable Diffusion weights can be downloaded on our machines, so tinv ships its own small
model (``tinv/assets/toyworld``) trained on this world, with held-out concepts no word of the
world can reach, and a scorer that tells whether Textual Inversion learned them (the ``toyworld``
metric). Its design and measurements are in ``tinv/toyworld/README.md``.
"""

from tinv.embedded import EMBEDDED_MODEL

MODEL_DIR = EMBEDDED_MODEL
"""Where the shipped model (a diffusers folder) and its scorer live inside the package."""
SCORER_FILE = "scorer.safetensors"
