"""The entry points users submit with ``ray job submit`` (train, evaluate, manifest, fit_init, bench)."""

from jobs.quiet import quiet

quiet()
