"""The engine loop's own logic, without Ray: several batches in one inference stage at once, the
model thread that serialises engines which cannot share, the busy clock (pipeline/meter.py), and
the thread that steps vLLM (engines/vllm_loop.py) over a stand-in for vLLM's engine core. The fake
engine stands in for the model; what these check is the scheduling. (Real vLLM: test_vllm_engine.py.)"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from pipeline import stages
from pipeline.config import EngineConfig
from pipeline.engines.fake import FakeEngine
from pipeline.meter import BusyClock, EngineFigures, busy_fraction
from pipeline.plan import tasks_in_flight
from pipeline.records import SAMPLE_RATE_HZ, null_row, schema_of
from pipeline.stages import DECODED_ROW, InferenceStage

HOLD_S = 0.05  # how long a call holds the model in these tests


def batch(tag: str, n: int) -> pa.Table:
    rows = []
    for i in range(n):
        samples = np.full(SAMPLE_RATE_HZ // 10 * (i + 1), i + len(tag), np.float32)
        rows.append({**null_row(*DECODED_ROW), "id": f"{tag}-{i}", "row_index": i, "status": "ok",
                     "audio": f"{tag}-{i}.wav", "task": "transcribe", "n_segments": 1, "segment_index": 0,
                     "start_s": 0.0, "samples": samples.tobytes()})
    return pa.Table.from_pylist(rows, schema=schema_of(DECODED_ROW, ()))


class Recorder(FakeEngine):
    """The fake engine, recording how many calls were inside it at once."""

    def __init__(self):
        super().__init__()
        self.inside = 0
        self.peak = 0

    def enter(self):
        self.inside += 1
        self.peak = max(self.peak, self.inside)

    def transcribe(self, requests):
        self.enter()
        time.sleep(HOLD_S)
        self.inside -= 1
        return super().transcribe(requests)


class Continuous(Recorder):
    """As an engine that schedules continuously (vLLM): calls are awaited and share the model."""

    async def transcribe_async(self, requests):
        self.enter()
        await asyncio.sleep(HOLD_S)
        self.inside -= 1
        return FakeEngine.transcribe(self, requests)


def run_batches(engine, n_batches: int):
    stage = InferenceStage(EngineConfig(name="fake"), ())
    stage.engine = engine
    reports: list[EngineFigures] = []
    stage._report = reports.append
    tables = [batch(f"b{k}", 3) for k in range(n_batches)]

    async def all_at_once():
        return await asyncio.gather(*(stage(t) for t in tables))

    started = time.perf_counter()
    outs = asyncio.run(all_at_once())
    return tables, outs, stage, reports, time.perf_counter() - started


def assert_own_results(tables, outs):
    for table, out in zip(tables, outs, strict=True):
        assert out.column("id").to_pylist() == table.column("id").to_pylist()
        for row, got in zip(table.to_pylist(), out.to_pylist(), strict=True):
            assert got["text"] == FakeEngine.fingerprint(np.frombuffer(row["samples"], np.float32))
            assert got["status"] == "ok" and "samples" not in got


def test_a_continuous_engine_gets_every_batch_in_flight_at_once():
    engine = Continuous()
    tables, outs, stage, reports, wall = run_batches(engine, 4)
    assert engine.peak == 4  # all four batches inside the engine together, as vLLM's running batch
    assert wall < 4 * HOLD_S  # so they took about one call's time, not four
    assert_own_results(tables, outs)
    figures = stage.clock.figures()
    assert figures.requests == 12 and reports[-1] == figures
    assert figures.busy_s == figures.wall_s  # never a moment without a request in the engine


def test_an_engine_that_cannot_share_runs_one_batch_at_a_time_with_the_next_ones_queued():
    engine = Recorder()
    tables, outs, stage, reports, wall = run_batches(engine, 4)
    assert engine.peak == 1  # the model thread serialises them ...
    assert wall >= 4 * HOLD_S
    assert_own_results(tables, outs)
    figures = stage.clock.figures()
    # ... and the next batch is always waiting: the model is busy from its first request to its last.
    assert figures.busy_s == figures.wall_s and figures.wall_s >= 4 * HOLD_S


def test_a_vllm_replica_keeps_twice_max_num_seqs_requests_in_flight_whatever_its_batches(monkeypatch):
    """A batch keeps its place until its last request ends, so a vLLM replica whose batches in
    flight would hold fewer than twice max_num_seqs requests gets more batches (and the blocks to
    fill them): vLLM's waiting queue then refills each sequence the step it finishes. Other engines
    get what max_batches_in_flight says."""
    e = EngineConfig(name="vllm", batch_size=2, max_batches_in_flight=1, vllm={"max_num_seqs": 3})
    assert e.batches_in_flight == 3  # 6 requests in batches of 2
    assert tasks_in_flight(e, block_rows=2) == 3
    monkeypatch.setattr(stages, "load_engine", lambda *_: Continuous())  # a stand-in for vLLM
    stage = InferenceStage(e, ())
    out = asyncio.run(stage(block := batch("q", 20)))
    assert stage.engine.peak == 3
    assert_own_results([block], [out])
    gpu = EngineConfig(name="vllm", batch_size=64, max_batches_in_flight=8, vllm={"max_num_seqs": 256})
    assert gpu.batches_in_flight == 8  # configs/granite-gpu.yaml already holds twice max_num_seqs
    assert EngineConfig(name="whisper", batch_size=2, max_batches_in_flight=1).batches_in_flight == 1


def test_busy_clock_counts_only_time_with_work_in_flight():
    now = [0.0]
    clock = BusyClock(clock=lambda: now[0])
    assert clock.figures().first_request_at is None
    clock.start(2)  # t=0: one batch in
    now[0] = 1.0
    clock.start(3)  # t=1: a second joins
    now[0] = 2.0
    clock.stop()
    now[0] = 3.0
    clock.stop()  # t=3: dry
    now[0] = 5.0
    clock.start(1)  # t=5: after 2 s without work
    now[0] = 6.0
    clock.stop()
    f = clock.figures()
    assert (f.wall_s, f.busy_s, f.requests) == (6.0, 4.0, 6)
    assert busy_fraction([f, EngineFigures(0.0, 0.0, 0.0, 4.0, 4.0, 1)]) == 0.8
    assert busy_fraction([]) is None


def test_sample_views_read_the_arrow_buffer_in_place_and_keep_nulls_empty():
    from pipeline.stages import sample_views

    clips = [np.arange(n, dtype=np.float32) for n in (3, 0, 5)]
    column = pa.chunked_array([pa.array([c.tobytes() for c in clips] + [None], pa.large_binary())])
    sliced = column.slice(1)  # an offset into the chunk, as Ray Data's batches have
    views = sample_views(sliced)
    assert [v.tolist() for v in views] == [[], [0.0, 1.0, 2.0, 3.0, 4.0], []]
    assert not views[1].flags.owndata  # a view, not a copy


class StepCore:
    """vLLM's ``LLMEngine`` as the engine loop uses it (``add_request``, ``step``), without a model:
    a request's input is how many steps it runs; "bad" is refused when added, as vLLM refuses an
    invalid prompt. Records the requests each step held."""

    def __init__(self, fail_on_step: int | None = None):
        self.live: dict[str, int] = {}
        self.steps: list[list[str]] = []
        self.fail_on_step = fail_on_step

    def add_request(self, request_id, steps, params):
        if steps == "bad":
            raise ValueError("prompt refused")
        self.live[request_id] = steps

    def step(self):
        self.steps.append(sorted(self.live))
        if len(self.steps) == self.fail_on_step:
            raise RuntimeError("device lost")
        outputs = []
        for rid in list(self.live):
            self.live[rid] -= 1
            outputs.append(SimpleNamespace(request_id=rid, finished=self.live[rid] == 0))
            if self.live[rid] == 0:
                del self.live[rid]
        return outputs


def test_engine_loop_runs_one_calls_requests_together_and_refuses_only_the_bad_one():
    from pipeline.engines.vllm_loop import EngineLoop

    core = StepCore()
    loop = EngineLoop(core)
    long_, bad, short = loop.submit([(3, None), ("bad", None), (1, None)])
    assert isinstance(bad.exception(timeout=5), ValueError)
    first, last = short.result(timeout=5), long_.result(timeout=5)
    assert first.request_id != last.request_id
    assert core.steps[0] == sorted([first.request_id, last.request_id])  # both in the first step
    assert core.steps[1:] == [[last.request_id]] * 2
    assert loop.peak_in_flight == 2


def test_engine_loop_fails_every_request_it_holds_and_every_later_one_when_a_step_fails():
    from pipeline.engines.base import EngineDead
    from pipeline.engines.vllm_loop import EngineLoop

    loop = EngineLoop(StepCore(fail_on_step=2))
    held = loop.submit([(5, None), (1, None), (5, None)])
    assert held[1].result(timeout=5).finished  # done on the first step, before the failure
    for future in (held[0], held[2]):
        error = future.exception(timeout=5)
        assert isinstance(error, EngineDead) and "device lost" in str(error)
    later = loop.submit([(1, None)])[0]
    assert isinstance(later.exception(timeout=5), EngineDead)


class Sizes(Continuous):
    """A continuous engine recording the size of each call and its longest clip."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    async def transcribe_async(self, requests):
        self.calls.append((len(requests), max(len(r.samples) for r in requests)))
        return await super().transcribe_async(requests)


def test_a_block_is_cut_into_engine_batches_longest_first_and_comes_back_as_one_table():
    """A block of many batches: at most max_batches_in_flight of them inside the engine at once,
    each of engine.batch_size rows, the longest clips first, and the block back whole, in its own
    row order, one chunk per column (a table of many chunks costs the driver per chunk)."""
    stage = InferenceStage(EngineConfig(name="fake", batch_size=8, max_batches_in_flight=2), ())
    stage.engine = engine = Sizes()
    block = batch("blk", 20)  # clip i holds i + 1 tenths of a second
    out = asyncio.run(stage(block))
    assert [n for n, _ in engine.calls] == [8, 8, 4]
    assert [longest for _, longest in engine.calls] == [SAMPLE_RATE_HZ // 10 * k for k in (20, 12, 4)]
    assert engine.peak == 2
    assert_own_results([block], [out])
    assert {out.column(name).num_chunks for name in out.column_names} == {1}
