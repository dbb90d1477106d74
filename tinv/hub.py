"""Where a base model's files come from: a local folder, a per-node copy of a remote one, or the hub.

A hub id is fetched with diffusers' own file choice (``DiffusionPipeline.download``): one copy of each
weight (safetensors when the repo has it, never a ``.bin`` beside it; the fp16 variant when training
in half precision and the repo has one; no non-EMA or single-file checkpoints) and only the components
tinv loads (no safety checker, feature extractor or image encoder). A hub or bucket that times out is
retried with back-off, then reported as :class:`ModelUnavailableError` (worth another attempt); a repo
that does not exist, or is not reachable offline, is a :class:`ModelLayoutError` (invalid input).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tinv import storage
from tinv.errors import ModelLayoutError, ModelUnavailableError

T = TypeVar("T")
DEFAULT_CACHE = Path.home() / ".cache" / "tinv" / "models"
SKIPPED_COMPONENTS = {"safety_checker": None, "feature_extractor": None, "image_encoder": None}
"""Pipeline components tinv never loads, so never downloads (diffusers skips components passed in)."""
PERMANENT = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError",
             "RemoteEntryNotFoundError", "LocalEntryNotFoundError", "HFValidationError", "OfflineModeIsEnabled",
             "DisabledRepoError", "BadRequestError")
"""huggingface_hub errors that another try cannot mend (by name: diffusers wraps them in OSError)."""


def model_dir(
    uri: str, *, variant: str | None = None, cache_dir: str | Path = DEFAULT_CACHE,
    storage_options: dict[str, Any] | None = None, attempts: int = 4, delay_s: float = 2.0,
) -> Path:
    """A local diffusers folder for ``uri``: the folder itself, a per-node cached copy, or a hub snapshot."""
    if "://" in uri or Path(uri).exists():
        try:
            return storage.local_copy(uri, cache_dir, storage_options)
        except FileNotFoundError as e:
            raise ModelLayoutError(f"no model folder at {uri!r}") from e
        except OSError as e:
            raise ModelUnavailableError(f"could not copy the model {uri!r}: {e}") from e
    if uri.startswith((".", "/", "~")) or uri.count("/") != 1:
        raise ModelLayoutError(f"no model folder at {uri!r}")
    return Path(with_backoff(lambda: download(uri, variant), uri, attempts, delay_s))


def download(repo_id: str, variant: str | None = None) -> str:
    """The snapshot folder of ``repo_id`` with diffusers' choice of files (see the module docstring)."""
    from diffusers import DiffusionPipeline

    return str(DiffusionPipeline.download(repo_id, variant=variant, **SKIPPED_COMPONENTS))


def with_backoff(fetch: Callable[[], T], uri: str, attempts: int = 4, delay_s: float = 2.0) -> T:
    """``fetch()``, retried ``attempts`` times with exponential back-off while the failure is transient."""
    for i in range(attempts):
        try:
            return fetch()
        except Exception as e:  # noqa: BLE001 — the hub's errors are many; classified below
            if is_permanent(e):
                raise ModelLayoutError(f"{uri!r} is not a local folder and could not be fetched from the hub: "
                                       f"{e}") from e
            if i == attempts - 1:
                raise ModelUnavailableError(f"could not fetch {uri!r} from the hub after {attempts} tries: {e}") from e
            time.sleep(delay_s * 2**i)
    raise AssertionError("unreachable")


def is_permanent(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) says the repo cannot be had: missing, gated, offline."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ in PERMANENT:
            return True
        status = getattr(getattr(seen, "response", None), "status_code", None)
        if status in (401, 403, 404):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
