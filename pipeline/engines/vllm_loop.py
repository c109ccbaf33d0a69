"""A vLLM engine that never waits for the caller: one thread owns ``LLMEngine`` and steps it while
requests keep arriving, so requests of many batches share the model's running batch.

``LLM.generate`` adds a list of prompts and steps the engine until every one is done: the model
then idles while the caller forms its next list, and runs half-empty while the last long clips of
a list finish. Here callers :meth:`EngineLoop.submit` rendered prompts at any time, from any
thread, and get one future per request, resolved with vLLM's ``RequestOutput`` the step it
finishes. This is what vLLM's ``AsyncLLM`` does with its engine core in another process; keeping
the engine in this process (as ``LLM`` does with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` on CPU)
avoids a second process per replica and its start-up, while the caller still renders the next
prompts (feature extraction) while the model runs.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from .base import EngineDead

log = logging.getLogger("quarry")


class EngineLoop:
    """Steps ``engine`` (a vLLM v1 ``LLMEngine``) on a daemon thread while requests are unfinished.

    A request that vLLM refuses when it is added (validation: ``ValueError``) fails its own future
    only. A failing ``step`` fails every unfinished request and every later one with
    :class:`EngineDead`: the engine cannot be trusted after that, and its replica is replaced.
    """

    def __init__(self, engine: Any, on_start: Callable[[], None] | None = None):
        self._engine = engine
        self._on_start = on_start  # run first on the loop's thread (per-thread settings: OpenMP threads)
        self._inbox: queue.SimpleQueue[list[tuple[str, Any, Any, Future]]] = queue.SimpleQueue()
        self._pending: dict[str, Future] = {}
        self._ids = itertools.count()
        self._failure: BaseException | None = None
        self.peak_in_flight = 0
        """The most requests the engine held at once (requests of several calls share a step)."""
        self._thread = threading.Thread(target=self._run, name="quarry-vllm-loop", daemon=True)
        self._thread.start()

    def submit(self, work: list[tuple[Any, Any]]) -> list[Future]:
        """Queue rendered prompts (``EngineInput``) with their ``SamplingParams``, all joining the
        same step; returns one future per prompt at once."""
        futures = [Future() for _ in work]
        if not work:
            return futures
        if self._failure is not None:
            for future in futures:
                future.set_exception(self._failure)
            return futures
        self._inbox.put([(f"q{next(self._ids)}", inp, params, future)
                         for (inp, params), future in zip(work, futures, strict=True)])
        return futures

    def _add_all(self, work: list[tuple[str, Any, Any, Future]]) -> None:
        for item in work:
            self._add(*item)

    def _add(self, request_id: str, engine_input: Any, params: Any, future: Future) -> None:
        if self._failure is not None:
            future.set_exception(self._failure)
            return
        try:
            self._engine.add_request(request_id, engine_input, params)
        except ValueError as e:  # this request only (vLLM validates each as it is added)
            future.set_exception(e)
            return
        self._pending[request_id] = future
        self.peak_in_flight = max(self.peak_in_flight, len(self._pending))

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            if not self._pending:
                self._add_all(self._inbox.get())  # idle: sleep until work arrives
            while True:  # everything that arrived while the last step ran joins the next one
                try:
                    self._add_all(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if not self._pending:
                continue
            try:
                outputs = self._engine.step()
            except BaseException as e:  # noqa: BLE001 - the engine failed: so does all it held
                log.error("vLLM engine step failed: %s: %s", type(e).__name__, e)
                self._failure = EngineDead(f"vLLM engine step failed: {type(e).__name__}: {e}")
                self._failure.__cause__ = e
                pending, self._pending = self._pending, {}
                for future in pending.values():
                    future.set_exception(self._failure)
                continue
            for output in outputs:
                if output.finished:
                    future = self._pending.pop(output.request_id, None)
                    if future is not None:
                        future.set_result(output)
