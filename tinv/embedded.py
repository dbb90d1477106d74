"""Where the embedded default model and the shipped demo manifest are (paths only, nothing loads).

The embedded model is the toy-world model (a plain diffusers folder shipped as package data); the
code that builds the demo and the toy world's own tools live in :mod:`tinv.demo` and
:mod:`tinv.toyworld`, which the core never imports.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "toyworld"
"""The embedded default model: the toy-world model inside the package (no download)."""
DEMO_MANIFEST = "manifests/demo.parquet"
"""The shipped demo manifest, relative to the repository root (the job's working directory)."""
