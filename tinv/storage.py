"""Thin fsspec helpers: every byte tinv reads or writes goes through a URI here.

Local paths, ``file://``, ``s3://``, ``gs://``… all work the same way. Every storage error is classified once
(:func:`is_transient`): an outage of the store (connection refused, reset or closed, a timeout, a 5xx, SlowDown,
throttling: whatever botocore, aiohttp, gcsfs or the OS raise for it) is retried with exponential back-off and
full jitter for a bounded window (:data:`RETRY_WINDOW_S`, the run's ``--storage-retry-s``), then raised as
:class:`~tinv.errors.StorageUnavailableError` (infrastructure: exit 3, never a concept's fault). A permanent one
(not found, not a file, a directory, a symlink loop, permission, a name too long, read-only) is raised at once,
as the OS error it is.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from filelock import FileLock

from tinv.errors import StorageUnavailableError

T = TypeVar("T")
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
                    errno.ENAMETOOLONG, errno.EROFS, errno.EEXIST, errno.EINVAL}
"""What no retry mends: the object is missing, is not a file, loops, or may not be written."""
TRANSIENT_NAMES = {"ConnectionError", "HTTPClientError", "ClientConnectionError", "ServerDisconnectedError",
                   "ServerTimeoutError", "ClientPayloadError", "TimeoutError", "ConnectTimeout", "ReadTimeout",
                   "ProtocolError", "IncompleteRead", "RemoteDisconnected"}
"""Exception classes (anywhere in an error's class hierarchy, by name: botocore's, aiohttp's, urllib3's,
http.client's and the builtins) that mean the store could not be reached or answered partly."""
TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                   "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded"}
"""Error codes of an answer that says "later" (S3's, and the HTTP statuses 429 and 5xx)."""
RETRY_WINDOW_S = 600.0
"""How long a transient storage error is retried before it is an outage (the run's ``--storage-retry-s``, set in
each process with :func:`set_retry_window`)."""
BACKOFF_S = (0.5, 30.0)
"""The first back-off and the longest one; each is drawn uniformly below ``first × 2**i`` (full jitter)."""


def set_retry_window(seconds: float) -> None:
    """This process's retry window (the driver and every actor set the run's)."""
    global RETRY_WINDOW_S
    RETRY_WINDOW_S = float(seconds)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) says the store is unreachable or busy, not that the request
    is wrong: worth retrying. Permanent errors (:data:`PERMANENT`, :data:`PERMANENT_ERRNOS`) never are; a bare
    ``OSError`` without a permanent errno (what s3fs makes of an unknown S3 answer) is."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, PERMANENT) or getattr(seen, "errno", None) in PERMANENT_ERRNOS:
            return False
        if isinstance(seen, StorageUnavailableError) or TRANSIENT_NAMES & {c.__name__ for c in type(seen).__mro__}:
            return True
        status = _status(seen)
        if status is not None:
            return status == 429 or status >= 500 or _code(seen) in TRANSIENT_CODES
        if _code(seen) in TRANSIENT_CODES:
            return True
        seen = seen.__cause__ or seen.__context__
    return type(error) is OSError or (isinstance(error, OSError) and not isinstance(error, PERMANENT))


def _status(error: BaseException) -> int | None:
    """An HTTP error's status: botocore's response metadata, gcsfs' ``code``, aiohttp's ``status``."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = getattr(error, "code", None) if type(error).__name__ == "HttpError" else getattr(error, "status", None)
    return code if isinstance(code, int) else None


def _code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def retry(fn: Callable[[], T], window_s: float | None = None, what: str = "storage") -> T:
    """Call ``fn``; on a transient error (:func:`is_transient`) wait an exponential back-off with full jitter
    and try again, for at most ``window_s`` (default :data:`RETRY_WINDOW_S`), then raise
    :class:`StorageUnavailableError`; a permanent error is raised at once."""
    window = RETRY_WINDOW_S if window_s is None else window_s
    began, attempt = time.monotonic(), 0
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 — classified here, once, for every store
            if not is_transient(e):
                raise
            elapsed = time.monotonic() - began
            if elapsed >= window:
                raise StorageUnavailableError(f"{what} unavailable for {elapsed:.0f} s (the retry window is "
                                              f"{window:.0f} s): {type(e).__name__}: {e}") from e
            pause = random.uniform(0, min(BACKOFF_S[1], BACKOFF_S[0] * 2**attempt))
            time.sleep(min(pause, max(0.0, window - elapsed)))
            attempt += 1


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
    """The whole object at ``uri`` (transient errors retried in the window)."""
    fs, path = filesystem(uri, storage_options)
    return retry(lambda: fs.cat_file(path), what=f"reading {uri}")


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``uri`` whole: readers never see a partial object.

    Object stores put whole objects already; on a local filesystem we write a temporary
    sibling and rename it into place.
    """
    fs, path = filesystem(uri, storage_options)
    if is_local(uri):
        fs.makedirs(parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        retry(lambda: fs.pipe_file(tmp, data), what=f"writing {uri}")
        os.replace(tmp, path)
    else:
        retry(lambda: fs.pipe_file(path, data), what=f"writing {uri}")


def remove(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the object at ``uri``; one that is not there is fine."""
    fs, path = filesystem(uri, storage_options)
    try:
        retry(lambda: fs.rm_file(path), what=f"removing {uri}")
    except FileNotFoundError:
        pass


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
            retry(lambda: fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True), what=f"copying {uri}")
            tmp.rename(target)
    return target
