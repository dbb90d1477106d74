"""The base-model fingerprint (format 2): which model a learned file belongs to, computed from its files.

sha256 over the format version and the sha256 of every file that loading a model folder reads: each
component's configs and tokenizer files, the weight files chosen for it (safetensors over ``.bin``, the
fp16 variant when asked for and present; shards with their index) and the folder's
``tinv_templates.json``. So a fine-tune that swaps the UNet under the same text encoder has another
fingerprint, and a copy of the same files anywhere has the same one. File digests are kept per node
(keyed by path, size and modification time), so a model is hashed once per node; a serving system can
compute the same value with ``python -m tinv.families.fingerprint DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from filelock import FileLock

FINGERPRINT_VERSION = 2
FOLDER_FILES = ("tinv_templates.json",)
"""Files of the model folder itself that shape what is learned."""
WEIGHTS = re.compile(r"^(?P<base>[\w]+?)(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-\d{5}-of-\d{5})?"
                     r"\.(?P<ext>safetensors|bin)$")
SHARD_INDEX = re.compile(r"^[\w]+\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$")
DIGEST_CACHE = Path.home() / ".cache" / "tinv" / "file-digests.json"


def weight_choice(folder: Path, variant: str | None) -> tuple[str | None, bool]:
    """``(variant, use_safetensors)`` to load ``folder`` with: safetensors over ``.bin``, ``variant`` only
    where the folder has it. The loader passes exactly these to ``from_pretrained``."""
    found = {(m["variant"], m["ext"]) for f in folder.iterdir() if (m := WEIGHTS.match(f.name))}
    for want in ((variant, "safetensors"), (None, "safetensors"), (variant, "bin"), (None, "bin")):
        if want in found:
            return want[0], want[1] == "safetensors"
    return None, False


def component_files(folder: Path, variant: str | None) -> list[Path]:
    """The files of one component folder that loading it reads."""
    chosen_variant, safetensors = weight_choice(folder, variant)
    ext = "safetensors" if safetensors else "bin"
    out = []
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        weights, index = WEIGHTS.match(f.name), SHARD_INDEX.match(f.name)
        if weights or index:
            if (weights or index)["variant"] == chosen_variant and (weights or index)["ext"] == ext:
                out.append(f)
        elif not f.name.startswith("."):
            out.append(f)
    return out


def file_digest(path: Path, cache: dict[str, str]) -> str:
    """sha256 of ``path``, from ``cache`` when the file is unchanged since it was hashed."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        cache[key] = h.hexdigest()
    return cache[key]


def model_fingerprint(path: Path, parts: tuple[str, ...], variant: str | None = None,
                      cache_file: Path | None = DIGEST_CACHE) -> str:
    """The fingerprint of the model folder ``path`` with the components ``parts`` (see the module)."""
    path = Path(path)
    cache: dict[str, str] = {}
    if cache_file is not None and cache_file.exists():
        cache = json.loads(cache_file.read_text())
    known = len(cache)
    files = {f"{part}/{f.name}": file_digest(f, cache) for part in parts for f in component_files(path / part, variant)}
    files |= {name: file_digest(path / name, cache) for name in FOLDER_FILES if (path / name).is_file()}
    if cache_file is not None and len(cache) > known:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{cache_file}.lock"):
            merged = json.loads(cache_file.read_text()) if cache_file.exists() else {}
            cache_file.write_text(json.dumps(merged | cache))
    blob = json.dumps({"version": FINGERPRINT_VERSION, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    from tinv.families import family_of

    p = argparse.ArgumentParser(prog="python -m tinv.families.fingerprint", description="a model folder's fingerprint")
    p.add_argument("folder")
    p.add_argument("--variant", default=None, help="the weight variant the model was loaded with (e.g. fp16)")
    args = p.parse_args(argv)
    print(model_fingerprint(Path(args.folder), family_of(Path(args.folder), args.folder).parts, args.variant))


if __name__ == "__main__":
    main()
