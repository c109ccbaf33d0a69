"""What every job runner returns: the summary of its run, a verdict and an exit code."""

from __future__ import annotations

from ..errors import ExitCode
from ..summary import JobSummary


class JobResult:
    """The ok / exit code / render pattern every job's result shares: a job is ok when its run
    completed (a kind may ask for more), and its rendering ends with the verdict line.

    Subclasses are frozen dataclasses with a ``summary`` field and a ``_lines()`` method giving
    the rest of the rendering; this class holds no fields, so their constructors stay as they are.
    """

    summary: JobSummary

    @property
    def ok(self) -> bool:
        return self.summary.ok

    @property
    def exit_code(self) -> int:
        return ExitCode.OK if self.ok else ExitCode.FAILED

    def _lines(self) -> list[str]:
        raise NotImplementedError

    def summary_lines(self) -> list[str]:
        """The run's summary, indented under the job's own first line."""
        return [f"  {line}" for line in self.summary.lines()]

    def render(self) -> str:
        return "\n".join([*self._lines(), "result: ok" if self.ok else "result: FAILED (exit 1)"])
