"""How busy each engine replica kept its model: the figure that says whether the pipeline fed it.

A replica's :class:`BusyClock` counts the time from its first request to its last result, and how
much of it had at least one request in the engine. The inference stage reports its replica's
:class:`EngineFigures` now and then (plan.py carries them to the driver); :func:`busy_fraction`
sums them over replicas for the job's summary. Plain Python: no Ray, no engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineFigures:
    """One replica's figures so far, times in wall-clock seconds (``time.time()``): ``began_at``, its
    process began loading the engine; ``ready_at``, the engine was loaded and warmed up;
    ``first_request_at``, its first request reached the engine (None before); ``wall_s``, from then
    to its latest result; ``busy_s``, the part of ``wall_s`` with requests in the engine."""

    began_at: float
    ready_at: float
    first_request_at: float | None = None
    wall_s: float = 0.0
    busy_s: float = 0.0
    requests: int = 0


class BusyClock:
    """Time with work in flight over wall time, from the first request on (one replica; call from
    one thread, e.g. the stage's event loop). ``began_at`` / ``ready_at``: the replica's start-up."""

    def __init__(self, began_at: float = 0.0, ready_at: float = 0.0, clock=time.perf_counter):
        self._clock = clock
        self._began_at, self._ready_at = began_at, ready_at
        self._in_flight = 0
        self._first: float | None = None
        self._first_wall = 0.0
        self._since = 0.0  # when in-flight last went from 0 to 1
        self._last = 0.0  # the latest result
        self._busy = 0.0
        self.requests = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start(self, n_requests: int) -> None:
        now = self._clock()
        if self._first is None:
            self._first, self._first_wall = now, time.time()
        if self._in_flight == 0:
            self._since = now
        self._in_flight += 1
        self.requests += n_requests

    def stop(self) -> None:
        now = self._clock()
        self._in_flight -= 1
        if self._in_flight == 0:
            self._busy += now - self._since
        self._last = now

    def figures(self) -> EngineFigures:
        if self._first is None:
            return EngineFigures(self._began_at, self._ready_at)
        now = self._clock()
        busy = self._busy + (now - self._since if self._in_flight else 0.0)
        end = now if self._in_flight else self._last
        return EngineFigures(self._began_at, self._ready_at, self._first_wall, end - self._first, busy, self.requests)


def busy_fraction(replicas: list[EngineFigures]) -> float | None:
    """Time with requests in the engine over time from first request to last result, summed over
    replicas (a replica that idles waiting for input lowers it)."""
    wall = sum(r.wall_s for r in replicas)
    return sum(r.busy_s for r in replicas) / wall if wall > 0 else None


class EngineMeter:
    """Each replica's latest :class:`EngineFigures`, keyed by its process: a restarted replica is a
    new entry, its predecessor's figures stay. plan.py runs it as a zero-CPU Ray actor (defined
    here, in a light module, so that its worker imports little)."""

    def __init__(self) -> None:
        self.replicas: dict[str, EngineFigures] = {}

    def put(self, replica: str, figures: EngineFigures) -> None:
        self.replicas[replica] = figures

    def figures(self) -> list[EngineFigures]:
        return list(self.replicas.values())
