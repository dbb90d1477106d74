"""The toy world, our laboratory: a procedural world of coloured shapes and a tiny text-to-image model of it.

No Stable Diffusion weights can be downloaded on our machines, so tinv ships its own small model
(``tinv/assets/toyworld``, the no-argument demo's) trained on this world, with held-out concepts no word of the
world can reach, and a scorer that tells whether they were learned (the product's ``toyworld`` metric plug-in,
:mod:`tinv.evaluation.toyworld`). This package trains the world's model and runs the studies; it runs from the
repository (``python -m lab.toyworld …``) and reaches tinv only through its public interfaces. Its design and
measurements are in ``lab/README.md``.
"""

from tinv import EMBEDDED_MODEL
from tinv.evaluation.toyworld import SCORER_FILE  # noqa: F401 — the lab names it here
from tinv.settings import PRESETS, TrainConfig

MODEL_DIR = EMBEDDED_MODEL
"""Where the shipped model (a diffusers folder) and its scorer live inside the package."""
STEPS = 500
"""The lab's step cap per concept (the product's default when its studies were measured; it is 3 000 now)."""
CONFIG = TrainConfig(steps=STEPS, recipe=PRESETS["toyworld"])
"""The lab's training settings wherever it takes defaults: the ``toyworld`` preset (:data:`tinv.settings.PRESETS`,
the values chosen here, which the demo trains with too) and :data:`STEPS`, the settings every recorded study
ran under, so that their results do not move with the product's defaults."""
