"""What ends a job, and the exit codes that say so. Every module's "cannot run" error derives from
:class:`CannotRun`, so the CLI maps them to one exit code without knowing each module."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """``quarry run`` / ``quarry job`` exit status."""

    OK = 0  # the job completed, even with some failed rows (each carries its reason)
    FAILED = 1  # it ran, but failed rows exceeded output.max_failed_fraction, or a job's gate failed
    CANNOT_RUN = 2  # bad config, unreadable manifest, engine or model that cannot load, ...


class CannotRun(Exception):
    """The job cannot run at all; the message says why in one line."""
