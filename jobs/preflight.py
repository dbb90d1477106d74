"""What the train job checks before any GPU works, so that a run that cannot finish fails at once (exit 2).

- The output is a folder tinv can write: not a file, and a probe object written there and deleted.
- A local model folder is one tinv trains, whole, with every JSON config readable (the file named when not); a
  hub id or a remote folder is checked by the actors as they load it (the same error, the same exit code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.common import EXIT_INFRA, EXIT_INVALID, JobExit
from tinv import storage
from tinv.errors import InvalidInputError, TransientError
from tinv.families import family_of

PROBE = ".tinv-write-probe"


def check_output(output: str, run_id: str, storage_options: dict[str, Any] | None = None) -> None:
    """:class:`JobExit` (2) when ``output`` is a file or cannot be written; (3) when storage is down."""
    fs, path = storage.filesystem(output, storage_options)
    try:
        if storage.retry(lambda: fs.isfile(path), what=f"checking {output}"):
            raise JobExit(EXIT_INVALID, f"invalid input: --output {output} is a file; it must be a folder")
        probe = storage.join(output, f"{PROBE}-{run_id}")
        storage.write_bytes(probe, b"tinv", storage_options)
        storage.remove(probe, storage_options)
    except TransientError as e:
        raise JobExit(EXIT_INFRA, f"storage is unavailable: {e}") from e
    except (OSError, NotImplementedError) as e:  # permanent: permission, read-only, a file on the way
        raise JobExit(EXIT_INVALID, f"invalid input: cannot write to --output {output}: {type(e).__name__}: "
                                    f"{e}") from e


def check_model(model: str | None) -> None:
    """:class:`JobExit` (2) when ``model`` is a local folder tinv cannot load (missing part, malformed config)."""
    if model and "://" not in model and Path(model).exists():
        try:
            family_of(Path(model), model)
        except InvalidInputError as e:
            raise JobExit(EXIT_INVALID, f"invalid input: could not load the model {model}: {e}") from e
