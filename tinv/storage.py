"""Thin fsspec helpers: every byte tinv reads or writes goes through a URI here.

Local paths, ``file://``, ``s3://``, ``gs://``… all work the same way. Transient storage errors
are retried with exponential backoff; a missing object is not transient and fails at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from filelock import FileLock

T = TypeVar("T")
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def retry(fn: Callable[[], T], attempts: int = 4, delay_s: float = 0.5) -> T:
    """Call ``fn``; on a transient ``OSError`` wait ``delay_s * 2**i`` and try again."""
    for i in range(attempts):
        try:
            return fn()
        except PERMANENT:
            raise
        except OSError:
            if i == attempts - 1:
                raise
            time.sleep(delay_s * 2**i)
    raise AssertionError("unreachable")


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and the path inside it for ``uri``."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def is_local(uri: str) -> bool:
    """True for a plain path or a ``file://`` URI."""
    return "://" not in uri or uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (works for local paths and every fsspec protocol)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def resolve(uri: str, base_dir: str) -> str:
    """``uri`` if absolute (has a protocol or a leading ``/``), else relative to ``base_dir``."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return join(base_dir, uri)


def parent(uri: str) -> str:
    """The folder holding ``uri``."""
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri else "."


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole object at ``uri`` (retried on transient errors)."""
    fs, path = filesystem(uri, storage_options)
    return retry(lambda: fs.cat_file(path))


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``uri`` whole: readers never see a partial object.

    Object stores put whole objects already; on a local filesystem we write a temporary
    sibling and rename it into place.
    """
    fs, path = filesystem(uri, storage_options)
    if is_local(uri):
        fs.makedirs(parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        retry(lambda: fs.pipe_file(tmp, data))
        os.replace(tmp, path)
    else:
        retry(lambda: fs.pipe_file(path, data))


def local_copy(uri: str, cache_dir: str | Path, storage_options: dict[str, Any] | None = None) -> Path:
    """A local folder holding the tree at ``uri``: the folder itself if local, else a cached copy.

    The copy is made once per machine: concurrent callers wait on a file lock, the tree is
    downloaded into a temporary folder and renamed into place, so nobody sees half a copy.
    """
    fs, path = filesystem(uri, storage_options)
    if is_local(uri):
        return Path(path)
    target = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            tmp = Path(f"{target}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            retry(lambda: fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True))
            tmp.rename(target)
    return target
