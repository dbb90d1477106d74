"""Write a manifest from a folder of images: ``python -m jobs.manifest DIR --output m.parquet``.

One concept per sub-folder of ``DIR`` (its name, made safe, is the concept id; the token is
``<concept_id>``). Its images are the files with an image extension, in name order. A caption beside an
image, in a ``.txt`` file of the same stem (kohya's and A1111's layout), becomes its training caption;
``{}`` in it marks where the concept's token goes, and a caption without one gets the token in front
(``{}, <caption>``, as A1111's ``[name], [filewords]``). Every problem found is listed at once and
nothing is written. ``DIR`` and ``--output`` may be any fsspec URI.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from typing import Any

from jobs.common import EXIT_INVALID, EXIT_OK, JobExit, local_abs, parse_storage_options, run_main
from tinv import storage
from tinv.manifest import CONCEPT_ID, PROPERTIES, ManifestError, manifest_table, specs_from_table, write_manifest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.manifest", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a folder holding one sub-folder of images per concept")
    p.add_argument("--output", required=True, help="the manifest to write (e.g. DIR/manifest.parquet)")
    p.add_argument("--property", default="object", choices=PROPERTIES, help="learnable_property of every concept")
    p.add_argument("--initializer-token", default=None, help="initializer word of every concept (default: by property)")
    p.add_argument("--storage-options", default=None, help="fsspec storage options as JSON")
    return p.parse_args(argv)


def concept_id(name: str) -> str:
    """A folder name as a concept id: characters outside ``[A-Za-z0-9._-]`` become ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:128]


def caption_of(text: str) -> str:
    """A sidecar caption with the token marked: as written when it holds ``{}``, else ``{}, `` in front."""
    text = " ".join(text.split())
    return text if "{}" in text else f"{{}}, {text}"


def scan(folder: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, str]]:
    """Sub-folder → {file name → path} for every file one level below ``folder``."""
    fs, root = storage.filesystem(folder, storage_options)
    root = root.rstrip("/")
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for path in fs.find(root):
        parts = path[len(root) + 1:].split("/")
        if len(parts) == 2:
            found[parts[0]][parts[1]] = path
    return found


def concept_rows(folder: str, manifest: str, args: argparse.Namespace, storage_options: dict | None) -> list[dict]:
    """The manifest rows for ``folder``; raises :class:`JobExit` with every problem found."""
    problems, rows, ids = [], [], {}
    base = storage.parent(manifest).rstrip("/") + "/"
    for sub, files in sorted(scan(folder, storage_options).items()):
        images = sorted(n for n in files if n.lower().endswith(IMAGE_EXTENSIONS))
        if not images:
            continue
        cid = concept_id(sub)
        if not CONCEPT_ID.fullmatch(cid):
            problems.append(f"{sub!r}: cannot make a concept id from the folder name")
            continue
        if cid.lower() in ids:
            problems.append(f"{sub!r} and {ids[cid.lower()]!r} both make the concept id {cid!r}")
            continue
        ids[cid.lower()] = sub
        stems = {n.rsplit(".", 1)[0]: n for n in files if n.endswith(".txt")}
        sidecars = [stems.get(n.rsplit(".", 1)[0]) for n in images]
        row: dict[str, Any] = {"concept_id": cid, "learnable_property": args.property,
                               "images": [_relative(f"{folder.rstrip('/')}/{sub}/{n}", base) for n in images]}
        if args.initializer_token:
            row["initializer_token"] = args.initializer_token
        if any(sidecars):
            missing = [n for n, s in zip(images, sidecars) if s is None]
            if missing:
                problems.append(f"{sub!r}: {len(missing)} of {len(images)} images have no caption file "
                                f"({', '.join(missing[:3])}…); give every image a .txt or none")
                continue
            row["captions"] = [caption_of(storage.read_bytes(files[s], storage_options).decode()) for s in sidecars]
        rows.append(row)
    if not rows and not problems:
        problems.append(f"no sub-folder of {folder} holds images ({', '.join(IMAGE_EXTENSIONS)})")
    if problems:
        raise JobExit(EXIT_INVALID, "invalid input:\n" + "\n".join(f"  - {p}" for p in problems))
    return rows


def _relative(uri: str, base: str) -> str:
    """``uri`` relative to the manifest's folder when it lies under it (so the folder can move), else as is."""
    return uri.removeprefix(base) if uri.startswith(base) else uri


def run(args: argparse.Namespace) -> int:
    storage_options = parse_storage_options(args.storage_options)
    folder, manifest = local_abs(args.folder), local_abs(args.output)
    rows = concept_rows(folder, manifest, args, storage_options)
    try:  # validated as the jobs will validate it, before anything is written
        specs = specs_from_table(manifest_table(rows), base_dir=storage.parent(manifest), uri=manifest)
    except ManifestError as e:
        raise JobExit(EXIT_INVALID, f"invalid input: {e}") from e
    write_manifest(rows, manifest, storage_options)
    captioned = sum(bool(s.captions) for s in specs)
    print(f"[tinv] wrote {manifest}: {len(specs)} concepts ({captioned} captioned), "
          f"{sum(len(s.images) for s in specs)} images", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_main(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
