"""Write the shipped demo manifest and images: ``python -m jobs.make_demo [FOLDER]``."""

from __future__ import annotations

import sys

from tinv.demo import make_demo

if __name__ == "__main__":
    print(make_demo(sys.argv[1] if len(sys.argv) > 1 else "manifests"))
