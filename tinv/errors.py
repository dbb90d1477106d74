"""The few error types that decide what happens next: retry a concept, fail it alone, or stop the job.

``retryable`` says whether another attempt (on any actor) may succeed; the jobs map
:class:`InvalidInputError` to exit 2 and :class:`TransientError` that outlived its retries to exit 3.
Each carries its message as its ``str``; a concept's result records the message, the type's name and
``retryable`` (:class:`jobs.dispatch.ConceptResult`).
"""

from __future__ import annotations

from typing import Any, ClassVar


class TinvError(Exception):
    """Base of tinv's errors."""

    retryable: ClassVar[bool] = False


class InvalidInputError(TinvError, ValueError):
    """The input cannot work as given (manifest, flags, model folder): nothing is retried, the job exits 2."""


class ModelLayoutError(InvalidInputError):
    """The model is missing, or is not a diffusers SD/SDXL layout."""


class UnsupportedPrecisionError(InvalidInputError):
    """A precision the machine cannot run (fp8 without an fp8 GPU) or a library it needs is missing."""


class InitializerError(InvalidInputError):
    """An initializer file (``--init``) that is not one, or that belongs to another base model."""


class TransientError(TinvError, OSError):
    """Storage or the hub kept failing after its own retries: another attempt may succeed."""

    retryable = True


class StorageUnavailableError(TransientError):
    """Storage kept failing transiently (connection refused or closed, timeouts, 5xx, SlowDown) for the whole retry
    window: an outage of the infrastructure, never a concept's fault (it costs the concept no attempt)."""


class ModelUnavailableError(TransientError):
    """The model could not be fetched (the hub or the bucket timed out); the job exits 3 if it never loads."""


class AttemptsExhaustedError(TinvError):
    """A concept (or a class set) was lost or failed transiently on every attempt it was allowed."""


class ConceptError(TinvError):
    """One concept failed; the others go on. ``concept_id`` names it."""

    def __init__(self, concept_id: str, reason: str, uri: str | None = None) -> None:
        self.concept_id, self.reason, self.uri = concept_id, reason, uri
        where = f" ({uri})" if uri else ""
        super().__init__(f"concept {concept_id!r}: {reason}{where}")

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the fields across processes (Ray pickles errors)
        return type(self), (self.concept_id, self.reason, self.uri)


class ConceptDataError(ConceptError, ValueError):
    """The concept's data is unusable (bad image, missing URI, token clash): not retried."""


class ConceptDivergedError(ConceptError):
    """The concept's loss or vectors became non-finite: the same seed would diverge again, so not retried."""


class ConceptCrashedError(ConceptError):
    """Computing the concept raised (its neighbours stepped without it); it may succeed on another attempt."""

    retryable = True


class ClassPicturesError(ConceptError):
    """The class pictures a concept's prior preservation needs could not be drawn (the class's error says why)."""


class LostResultError(ConceptError):
    """A concept's ``result.json`` was not on storage as the run wrote it when the run finished (another writer,
    or someone, replaced or removed it)."""


class ConceptOutOfMemoryError(ConceptError):
    """The concept did not fit in accelerator memory even alone in a batch."""
