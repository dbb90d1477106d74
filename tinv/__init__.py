"""tinv: bulk personalization of text-to-image models (Textual Inversion, DreamBooth-LoRA, pivotal tuning).

Importing it starts nothing. The flow: :mod:`tinv.manifest` (what to learn) → :mod:`tinv.plan` (each concept's
settings, resolved once) → :mod:`tinv.training` (the packed trainer) over :mod:`tinv.families` (what differs
between base models) → :mod:`tinv.evaluation` (samples, metrics) → :mod:`tinv.files` (what the clients load,
``result.json``, the catalog) → :mod:`tinv.storage` (every byte through fsspec).
"""

from pathlib import Path

__version__ = "0.1.0"
EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "toyworld"
"""The embedded default model: the toy-world model shipped inside the package (no download), which the
no-argument demo trains on."""
