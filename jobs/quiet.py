"""Quiet job logs: ``ray job logs`` of a run shows the job's progress lines, warnings that mean something, and
errors; not the dependencies' notices and progress bars repeated by every process (driver and actors).

:func:`quiet` runs when the ``jobs`` package is imported, which is the first thing a Ray worker does with a
tinv actor or task, before diffusers is imported and prints its notices.
"""

from __future__ import annotations

import logging

NOTICES = ("requires torchvision (not installed); falling back to",)
"""transformers' notice, once per process, that diffusers' pipelines name image processors whose torchvision
backend is absent: tinv never uses an image processor of a pipeline, the PIL one transformers takes is fine."""


class DropNotices(logging.Filter):
    """Drops the records whose message holds one of :data:`NOTICES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in NOTICES)


def quiet() -> None:
    """In this process: drop :data:`NOTICES` and the weight-loading progress bars of transformers and diffusers
    (one bar per component per actor). Their warnings and errors are kept."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    transformers_logging.get_logger("transformers")  # makes the library's handler, which the filter goes on
    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, DropNotices) for f in handler.filters):
            handler.addFilter(DropNotices())
