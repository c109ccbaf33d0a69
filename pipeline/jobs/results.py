"""What the job runners return: the exit codes and the lines every result's summary shares."""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_GATE = 1  # the job ran, but the canary gate or the failed-row budget failed
EXIT_CANNOT_RUN = 2


def _job_lines(summary: dict[str, Any]) -> list[str]:
    s = summary
    failed = f" ({', '.join(f'{k} {v}' for k, v in s['n_failed_by_reason'].items())})" if s["n_failed"] else ""
    lines = [
        f"  rows: {s['n_input']} in, {s['n_ok']} ok, {s['n_failed']} failed{failed}",
        (f"  audio: {s['audio_s']:.1f} s; this run {s['this_run']['n_processed']} rows in {s['job_wall_s']:.1f} s "
         f"(RTFx {s['rtfx_job']}, engine RTFx {s['rtfx_inference']}); {s['engine']} / {s['model']}"),
    ]
    for language, metrics in s["scores"]["by_language"].items():
        for metric, t in metrics.items():
            if t["rate"] is not None:
                lines.append(f"  {metric.upper()} {language}: {t['rate']:.4f} over {t['n_scored']} rows")
    if s["status"] != "completed":
        lines.append(f"  FAILED ROW BUDGET: {s['n_failed']}/{s['n_input']} failed > max_failed_fraction "
                     f"{s['max_failed_fraction']}")
    return lines


class JobResult:
    """The ok / exit code / render pattern every job's result shares: a job is ok when its run
    completed (a kind may ask for more), and its summary ends with the verdict line.

    Subclasses are frozen dataclasses with a ``summary`` field and a ``_lines()`` method giving
    the rest of the summary; this class holds no fields, so their constructors stay as they are.
    """

    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.summary["status"] == "completed"

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_GATE

    def _lines(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> str:
        return "\n".join([*self._lines(), "result: ok" if self.ok else "result: FAILED (exit 1)"])
