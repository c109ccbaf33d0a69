"""The Ray Data graph: the only module that knows Ray exists.

manifest read (Ray's readers, in tasks) -> PrepareStage -> DecodeStage (CPU tasks: decode, resample, cut long audio into
segments) -> InferenceStage (actor pool, one model replica per actor; it runs ScoreStage on its rows) -> streamed to
the driver: Assembler (segments back into recordings) -> TranscriptWriter -> summary.json.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from .assemble import Assembler, SubtitleWriter
from .claim import Claim, claim_output
from .config import EngineConfig, JobConfig
from .engines import preflight
from .errors import CannotRun
from .manifest import Manifest, PrepareStage
from .meter import EngineFigures, EngineMeter, busy_fraction
from .output import TranscriptWriter, tally_output
from .records import transcript_schema
from .scrub import redact_uri
from .stages import DecodeStage, InferenceStage, RedactStage
from .storage import is_process_local, join_uri, url_to_fs
from .summary import JobSummary, JobTally, RunFigures

log = logging.getLogger("quarry")

# Light stages (the manifest read, redaction) reserve no CPU: a reservation they barely use
# would idle the core a decode actor could have, and on a small machine an actor pool that takes
# every CPU would leave them pending forever. Their concurrency is capped instead (one task each
# per LIGHT_TASKS_PER_CORE cores), so they never flood the node with worker processes.
LIGHT_STAGE_CPUS = 0.0
LIGHT_TASKS_PER_CORE = 0.5
MAX_READ_BLOCKS = 4096
# The driver's CPU goes per block, not per row (Ray Data schedules each task, tracks each block and
# hands each to the sink), so a large job reads in blocks larger than an engine batch: as long as
# every decode slot still gets BLOCKS_PER_DECODE_SLOT blocks (to balance the slots and stream
# results early), up to MAX_ROWS_PER_BLOCK rows.
BLOCKS_PER_DECODE_SLOT = 32
MAX_ROWS_PER_BLOCK = 2048
# Each decode actor holds the block it decodes and the next one, so it never waits for Ray Data to
# hand it work.
DECODE_BLOCKS_PER_ACTOR = 2


@dataclass(frozen=True)
class RunResult:
    """What :func:`run_job` returns: the summary it wrote, and where."""

    summary: JobSummary
    summary_uri: str

    @property
    def ok(self) -> bool:
        return self.summary.ok


def ray_address(cfg: JobConfig) -> str | None:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS`` (set for a ``ray job submit``
    entrypoint); None starts a local Ray."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def init_ray(cfg: JobConfig) -> None:
    """Connect to the configured cluster, or start a local Ray that listens on 127.0.0.1 only."""
    address = ray_address(cfg)
    if not address:
        # Read by Ray when it is imported: with it, a local Ray binds its servers to loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    # One thread per worker process: decode actors are sized by their number, not their threads. An
    # engine on CPU sizes its model's threads to its machine itself (engines.common.machine_threads).
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        return
    # A local Ray's workers inherit the environment of the raylet this process starts, so the
    # variables go there rather than into a job runtime env: workers Ray prestarts then serve the
    # job at once (a runtime env would have every worker started anew, one at a time per core).
    with _environment(env):
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            object_store_memory=cfg.ray.object_store_memory_mb * 2**20 if cfg.ray.object_store_memory_mb else None,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in ("127.0.0.1", "::1"):
        ray.shutdown()  # it would serve the cluster network, with this job's credentials in its workers
        raise LocalRayExposed(
            f"local Ray advertises {node_ip}, not loopback: Ray was imported before quarry could set "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (set it in the environment, or run through `quarry run`)")


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment (for the processes it starts) while inside."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LocalRayExposed(CannotRun, RuntimeError):
    """A local Ray that would listen beyond loopback: the job stops before any work starts."""


def engine_replicas(e: EngineConfig) -> int:
    """``engine.replicas``, or by default one replica per ``gpus_per_replica`` GPUs in the cluster
    (1 on machines without GPUs). Call after Ray is initialised."""
    if e.replicas:
        return e.replicas
    if e.gpus_per_replica <= 0:
        return 1
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < e.gpus_per_replica:
        raise RuntimeError(f"engine.gpus_per_replica={e.gpus_per_replica} but the Ray cluster has {gpus:g} GPUs")
    return int(gpus // e.gpus_per_replica)


def cluster_cpus() -> float:
    """The CPUs of the Ray cluster (call after Ray is initialised)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def light_tasks(cpus: float) -> int:
    """How many tasks a light stage runs at once on a cluster of ``cpus`` CPUs."""
    return max(1, int(cpus * LIGHT_TASKS_PER_CORE))


def free_cpus(cfg: JobConfig, replicas: int, cpus: float) -> float:
    """The cluster's CPUs that the engine replicas leave to decode."""
    return max(0.0, cpus - replicas * cfg.engine.cpus_per_replica)


def decode_cpus(cfg: JobConfig, replicas: int, cpus: float) -> float:
    """CPUs per decode actor: ``audio.decode_cpus``, or one core each out of what the engine
    replicas leave free (less where under a core is free, so that decode still runs)."""
    if cfg.audio.decode_cpus:
        return cfg.audio.decode_cpus
    free = free_cpus(cfg, replicas, cpus)
    return 1.0 if free >= 1 else max(free, 0.25)


def decode_slots(cfg: JobConfig, replicas: int, cpus: float) -> int:
    """Decode actors: as many as the CPUs the engine replicas leave free hold at
    :func:`decode_cpus` each (at least one)."""
    return max(1, int(free_cpus(cfg, replicas, cpus) // decode_cpus(cfg, replicas, cpus)))


def rows_per_block(batch_size: int, n_rows: int, decode_slots: int) -> int:
    """Rows a read block holds: what one decode call works through, and (for clips short enough
    that a block stays under Ray Data's block size) what one inference task and the driver get as
    one unit. At least an engine batch and ``n_rows / MAX_READ_BLOCKS``; more for a large job, up
    to ``MAX_ROWS_PER_BLOCK``, while each of the ``decode_slots`` still gets
    ``BLOCKS_PER_DECODE_SLOT`` blocks."""
    even = n_rows // (BLOCKS_PER_DECODE_SLOT * max(1, decode_slots))
    return max(batch_size, min(MAX_ROWS_PER_BLOCK, even), -(-n_rows // MAX_READ_BLOCKS))


def tasks_in_flight(e: EngineConfig, block_rows: int) -> int:
    """Blocks (Ray Data tasks) each replica holds at once: enough for ``engine.batches_in_flight``
    batches of ``engine.batch_size`` rows (the stage lets that many batches at a time reach the
    engine), and never fewer than two, so that the next block is already there when one finishes."""
    return max(2, -(-e.batches_in_flight * e.batch_size // block_rows))


def read_manifest(manifest: Manifest, block_rows: int, cpus: float = LIGHT_STAGE_CPUS,
                  layout: tuple[int, bool] | None = None):
    """A Ray Dataset of the manifest's raw rows, read through the manifest's own reader
    (:meth:`Manifest.read`, so every row carries its position), streamed in blocks of
    ``block_rows`` rows (:func:`rows_per_block`): a block is what one decode call works through and
    what moves on downstream as one unit.

    Where the manifest splits into runs of about a block each (a plain JSONL file: every 16th line's
    offset is known), each read is of one run and reserves ``cpus``: the decode stage's, so that
    Ray Data fuses the read into a decode call (reading costs little beside decoding). Otherwise
    (CSV, compressed, Parquet with few row groups) Ray splits the readers' output into blocks, so
    the reads cannot fuse: they run as tasks of their own, light ones (no CPU reserved, as the
    decode actors may hold every CPU; at most :func:`light_tasks` at once). ``layout``:
    :func:`read_blocks`'s answer, where the caller has it already."""
    import ray.data

    fs, _ = url_to_fs(manifest.uri, manifest.storage_options)
    if is_process_local(fs):
        # memory:// lives in this process only; workers cannot see it. The table is already in
        # this process's memory, so handing it to Ray costs nothing extra.
        tables = list(manifest.batches(block_rows))
        return ray.data.from_arrow(tables) if tables else ray.data.from_items([])
    blocks, fused = layout or read_blocks(manifest, block_rows)
    source = _manifest_source(manifest, block_rows)
    if fused:
        return ray.data.read_datasource(source, num_cpus=cpus, override_num_blocks=blocks)
    return ray.data.read_datasource(source, num_cpus=LIGHT_STAGE_CPUS, concurrency=light_tasks(cluster_cpus()),
                                    override_num_blocks=blocks)


def read_blocks(manifest: Manifest, block_rows: int) -> tuple[int, bool]:
    """(blocks, fused): how many blocks :func:`read_manifest` reads the manifest in, and whether
    each is a run of its own (so that the read fuses into the decode stage)."""
    blocks = max(1, min(MAX_READ_BLOCKS, -(-manifest.n_rows // block_rows)))
    runs = len(manifest.ranges(blocks))
    return (runs, True) if 2 * runs >= blocks else (blocks, False)


def _manifest_source(manifest: Manifest, rows_per_block: int):
    """Ray Data's view of a :class:`Manifest`: read tasks over runs of rows (byte ranges of a
    plain JSONL file, groups of Parquet row groups, or the whole file), each streaming blocks.
    (Made when called: Ray is imported only after :func:`init_ray` has set its environment.)"""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    slim = manifest.for_workers()

    def reader(rng):
        return lambda: slim.read(rng, rows_per_block)

    class Source(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            return [ReadTask(reader(rng), BlockMetadata(num_rows=rng.n_rows, size_bytes=None, exec_stats=None,
                                                        task_exec_stats=None, input_files=[manifest.uri]))
                    for rng in manifest.ranges(max(1, parallelism))]

        def get_name(self) -> str:
            return "QuarryManifest"

    return Source()


def actor_startup(replicas: list[EngineFigures], executed_at: float, first_rows_at: float) -> dict[str, float]:
    """The start-up of the first engine replica to be ready, as phases that add up to the time from
    ``executed_at`` (the dataset started) to ``first_rows_at`` (wall-clock seconds): ``actor start``
    (process, imports), ``model load`` (the engine's constructor and its warm-up) and ``first rows``
    (the first batch through decode, inference and scoring after that). Empty where no replica
    reported."""
    if not replicas:
        return {}
    first = min(replicas, key=lambda r: r.ready_at)
    began = min(max(first.began_at, executed_at), first_rows_at)  # clocks of other nodes may differ a little
    ready = min(max(first.ready_at, began), first_rows_at)
    return {"actor start": began - executed_at, "model load": ready - began, "first rows": first_rows_at - ready}


def build_dataset(cfg: JobConfig, manifest: Manifest, committed_ref: Any = None, meter: Any = None):
    """The lazy Ray Dataset of rows for the driver (``stages.scored_schema``).
    ``committed_ref``: a Ray object ref to the positions (``records.RowSet``) of rows an earlier
    attempt committed. ``meter``: an :class:`EngineMeter` actor the replicas report to."""
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    # Ray Data's own per-operator progress is for people at a terminal; unattended runs get
    # quarry's periodic progress lines instead.
    ctx.enable_progress_bars = sys.stderr.isatty()
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # e.g. "progress bars disabled"

    committed = None
    if committed_ref is not None:
        import ray

        committed = functools.partial(ray.get, committed_ref)
    extras = manifest.extras
    e = cfg.engine
    replicas = engine_replicas(e)
    cpus = cluster_cpus()
    light = light_tasks(cpus)
    # Read, prepare and decode reserve the same CPUs, so Ray Data fuses them into one call to a
    # decode actor (why actors, not tasks: docs/design.md). Ray Data's defaults for the actors are
    # those its tasks had: an actor that dies is replaced and its calls are redone, without limit.
    per_decode = decode_cpus(cfg, replicas, cpus)
    slots = decode_slots(cfg, replicas, cpus)
    block_rows = rows_per_block(e.batch_size, manifest.n_rows, slots)
    layout = read_blocks(manifest, block_rows)
    actors = min(slots, layout[0])  # a small job starts no idle actor
    ds = read_manifest(manifest, block_rows, per_decode, layout)
    ds = ds.map_batches(
        PrepareStage(manifest.for_workers(), cfg.input.columns, cfg.task, committed),
        batch_format="pyarrow", batch_size=None, num_cpus=per_decode,
    )
    ds = ds.map_batches(
        DecodeStage, fn_constructor_args=(cfg.audio, cfg.segment, cfg.storage.options, extras),
        fn_constructor_kwargs={"task": cfg.task, "diarize": cfg.diarize},
        compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=DECODE_BLOCKS_PER_ACTOR),
        batch_format="pyarrow", batch_size=None, num_cpus=per_decode,  # a block each (a batch size stops fusion)
    )
    report = functools.partial(_report, meter) if meter is not None else None
    # Whole blocks, several at once per actor (max_concurrency: its threads), their engine batches
    # each awaited by the asynchronous InferenceStage, as ray.data.llm does for vLLM.
    in_flight = tasks_in_flight(e, block_rows)
    ds = ds.map_batches(
        InferenceStage,
        fn_constructor_kwargs={"engine": e, "extras": extras, "task": cfg.task, "words": cfg.word_times,
                               "report": report, "scoring": cfg.scoring},
        compute=ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=in_flight),
        batch_format="pyarrow", batch_size=None,
        num_cpus=e.cpus_per_replica, num_gpus=e.gpus_per_replica or None,
        max_concurrency=in_flight, max_restarts=e.max_restarts, max_task_retries=-1,
    )
    if cfg.redact.enabled:  # recordings whole in one row; stitched ones on the driver (assemble.py)
        ds = ds.map_batches(RedactStage(cfg.redact, extras), batch_format="pyarrow", batch_size=e.batch_size,
                            num_cpus=LIGHT_STAGE_CPUS, concurrency=light)
    return ds


def _report(meter: Any, figures: EngineFigures) -> None:
    """An InferenceStage's ``report``: send its replica's figures, without waiting."""
    meter.put.remote(f"{socket.gethostname()}:{os.getpid()}", figures)


def meter_figures(meter: Any) -> list[EngineFigures]:
    """Every replica's latest figures (none if the meter cannot be read: they are for people, the
    job's rows do not depend on them)."""
    import ray

    try:
        return ray.get(meter.figures.remote(), timeout=30)
    except Exception as e:  # noqa: BLE001
        log.warning("engine meter unreadable: %s", e)
        return []


def engine_figures(meter: Any, started: float) -> dict[str, float | None]:
    """``RunFigures``' engine fields from the meter: when the first request reached an engine
    (seconds after ``started``, a ``time.time()``) and the busy fraction from then on."""
    replicas = [r for r in meter_figures(meter) if r.first_request_at is not None]
    if not replicas:
        return {}
    fraction = busy_fraction(replicas)
    return {"engine_start_s": round(min(r.first_request_at for r in replicas) - started, 3),
            "engine_busy_fraction": round(fraction, 4) if fraction is not None else None}


class RedactedAudio:
    """``redact.audio``: a Ray task per finished recording re-reads its audio and writes the copy
    with the redacted words' time silenced (pipeline/redact/audio.py); the driver only hands out
    the spans. At most ``MAX_IN_FLIGHT`` tasks wait at once; :meth:`wait` collects them all."""

    MAX_IN_FLIGHT = 16
    CPUS = 0.25  # a copy re-decodes its recording: a share of a core, so that 16 in flight stay bounded

    def __init__(self, cfg: JobConfig, output_uri: str):
        import ray

        from .redact.audio import write_redacted_audio

        self._task = ray.remote(num_cpus=self.CPUS)(write_redacted_audio)
        self._ray = ray
        self.cfg = cfg
        self.output_uri = output_uri
        self._refs: list = []
        self.failed = 0

    def submit(self, recordings) -> None:
        if not recordings.num_rows:
            return
        table = recordings.select(["id", "audio", "status", "redactions"]).to_pylist()
        for row in table:
            if row["status"] != "ok":
                continue
            spans = [(r["start_s"], r["end_s"]) for r in row["redactions"] or () if r["start_s"] is not None]
            self._refs.append(self._task.remote(row["audio"], row["id"], spans, self.output_uri,
                                                self.cfg.storage.options, self.cfg.audio.channels == "split",
                                                self.cfg.redact.beep))
            if len(self._refs) > self.MAX_IN_FLIGHT:
                done, self._refs = self._ray.wait(self._refs, num_returns=len(self._refs) - self.MAX_IN_FLIGHT)
                self._collect(done)

    def _collect(self, refs) -> None:
        for ref in refs:
            try:
                self._ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a QA copy that failed is logged and counted, not fatal
                self.failed += 1
                log.error("redacted audio copy failed: %s", e)

    def wait(self) -> None:
        self._collect(self._refs)
        self._refs = []


def startup_line(phases: dict[str, float]) -> str:
    """The start-up phases in one line, then their total: ``manifest`` (count and fingerprint),
    ``output`` (resume check), ``ray`` (start or join), ``plan`` (the Ray Data graph), ``actor
    start``, ``model load``, ``first rows`` (see :func:`actor_startup`)."""
    return ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + f" (total {sum(phases.values()):.1f} s)"


def progress_line(run: JobTally, todo: int | None, elapsed_s: float, long_in_flight: int) -> str:
    """One line for unattended logs: rows done (of how many), failures, audio hours, RTFx, ETA."""
    done = f"{run.n_input}/{todo} rows ({run.n_input / todo:.0%})" if todo else f"{run.n_input} rows"
    eta = "?"
    if todo and run.n_input:
        left_s = (todo - run.n_input) * elapsed_s / run.n_input
        eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, left_s)))
    rtfx = run.audio_s / elapsed_s if elapsed_s else 0.0
    return (f"{done}, {run.n_failed} failed, {run.audio_s / 3600:.2f} h of audio, RTFx {rtfx:.1f}, "
            f"ETA {eta}, {long_in_flight} long recordings in progress")


def job_key(cfg: JobConfig, manifest: Manifest) -> dict[str, Any]:
    """What makes two runs the same job (a rerun may resume): the manifest's content and every
    setting that changes a row's result. Resources (replicas, batch sizes, Ray) may differ between
    attempts."""
    c = cfg.model_dump(mode="json")
    return {
        # _quarry_job.json is an output: no user-info or presigned token in it
        "manifest": {"uri": redact_uri(manifest.uri), "content": manifest.fingerprint},
        "input": c["input"],
        "audio": {k: c["audio"][k] for k in ("resample_quality", "max_duration_s", "channels", "channel_names")},
        "segment": {k: c["segment"][k] for k in ("max_s", "min_s", "overlap_s", "vad")},
        "engine": {k: c["engine"][k] for k in ("name", "model", "whisper", "vllm", "transformers")},
        "task": _without_defaults(c["task"], ("detect_language", "language_id_model", "language_id_s")),
        "scoring": c["scoring"],
        # Optional features enter the key only when on, so outputs written before they existed still resume.
        **({"words": True} if c["output"]["words"] else {}),
        **({"diarize": c["diarize"]} if c["diarize"]["enabled"] else {}),
        **({"redact": c["redact"]} if c["redact"]["entities"] else {}),
    }


def _without_defaults(section: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``section`` less the keys in ``names`` while language ID is off (their defaults then change nothing)."""
    return section if section.get("detect_language") else {k: v for k, v in section.items() if k not in names}


def preflight_features(cfg: JobConfig) -> None:
    """Load the optional features' models once on the driver, so one that cannot load fails the
    job before Ray starts, with its own message (each is small: Resemblyzer 17 MB, whisper base,
    Presidio's recognizers)."""
    if cfg.diarize.enabled or cfg.task.detect_language:
        import numpy as np

        from .speech import highpassed

        highpassed(np.zeros(160, np.float32))
    if cfg.diarize.enabled:
        from .diarize import preflight as diarize_preflight

        diarize_preflight(cfg.diarize)
    if cfg.task.detect_language:
        from .langid import preflight as langid_preflight

        langid_preflight(cfg.task.language_id_model)
    if cfg.redact.enabled:
        from .redact import load_redactor

        load_redactor(cfg.redact)


def run_job(cfg: JobConfig, manifest_uri: str, output_uri: str, *, overwrite: bool = False,
            claim: Claim | None = None) -> RunResult:
    """Run one job end to end and write its outputs; resume when OUTPUT holds an interrupted
    attempt of the same job. ``claim``: the caller's claim on OUTPUT (taken here otherwise).
    Raises only when the job cannot run."""
    started = time.time()
    clock = time.perf_counter()
    cpu = time.process_time()
    if not ray_address(cfg):
        preflight(cfg.engine)  # a local Ray's workers see this machine's files: fail before starting it
        preflight_features(cfg)
    manifest = Manifest.open(manifest_uri, cfg)  # its head, rows and fingerprint, read once, before anything starts
    phases = {"manifest": time.perf_counter() - clock}
    with nullcontext(claim) if claim else claim_output(output_uri, cfg.storage.options) as held:
        return _run(cfg, manifest, output_uri, overwrite, held, started, clock, cpu, phases)


def _run(cfg: JobConfig, manifest: Manifest, output_uri: str, overwrite: bool, claim: Claim, started: float,
         clock: float, cpu: float, phases: dict[str, float]) -> RunResult:
    mark = time.perf_counter()
    schema = transcript_schema(manifest.extras)
    writer = TranscriptWriter(output_uri, schema, cfg.storage.options, cfg.output.rows_per_file,
                              cfg.output.flush_interval_s, claim)
    resume = writer.prepare(overwrite, job_key(cfg, manifest), manifest.n_rows)
    if resume.committed_rows or resume.healed_rows:
        log.info("resuming %s: attempt %d, %d rows already committed in %d files, %d with a transient status to redo",
                 output_uri, resume.attempt, resume.committed_rows, resume.committed_files, resume.healed_rows)
    phases["output"], mark = time.perf_counter() - mark, time.perf_counter()
    init_ray(cfg)
    import ray

    phases["ray"], mark = time.perf_counter() - mark, time.perf_counter()

    committed_ref = ray.put(resume.committed) if resume.committed_rows else None
    meter = ray.remote(num_cpus=0)(EngineMeter).remote()
    ds = build_dataset(cfg, manifest, committed_ref, meter)
    assembler = Assembler(schema, cfg.scoring, SubtitleWriter(output_uri, cfg.output.subtitles, cfg.storage.options),
                          redact=cfg.redact)
    audio_writer = RedactedAudio(cfg, output_uri) if cfg.redact.audio else None
    run = JobTally()  # this attempt's rows, for progress and throughput
    todo = max(0, manifest.n_rows - resume.committed_rows)
    last_log = clock
    budget = cfg.output
    stopped_early = False
    phases["plan"], mark = time.perf_counter() - mark, time.perf_counter()
    executed_at = time.time()  # Ray Data starts the graph at the first batch asked for
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if "first rows" not in phases:  # actors started, models loaded, the first batch through
            phases.update(actor_startup(meter_figures(meter), executed_at, time.time())
                          or {"first rows": time.perf_counter() - mark})
            log.info("start-up: %s", startup_line(phases))
        recordings, segments = assembler.add(batch)
        run.add(writer.write(recordings, segments))
        if audio_writer:
            audio_writer.submit(recordings)
        if run.n_input >= budget.budget_min_rows and run.failed_fraction() > budget.max_failed_fraction:
            log.error("stopping: %d of %d rows failed (%s), over max_failed_fraction %g; what completed is kept",
                      run.n_failed, run.n_input, dict(run.by_status), budget.max_failed_fraction)
            stopped_early = True
            break
        if time.perf_counter() - last_log > cfg.output.progress_interval_s:
            last_log = time.perf_counter()
            log.info("progress: %s", progress_line(run, todo, last_log - clock, assembler.pending))
    if not stopped_early:
        recordings, segments = assembler.close()
        run.add(writer.write(recordings, segments))
        if audio_writer:
            audio_writer.submit(recordings)
    if audio_writer:
        audio_writer.wait()
    writer.close()
    claim.check()
    wall = time.perf_counter() - clock
    summary = JobSummary.build(
        tally_output(writer),
        job_wall_s=wall,
        started_at=started,
        engine=cfg.engine.name,
        model=cfg.engine.model,
        config=cfg.redacted(),
        files=[join_uri(output_uri, "transcripts", p.rsplit("/", 1)[-1]) for p in writer.committed_parts()],
        max_failed_fraction=cfg.output.max_failed_fraction,
        this_run=RunFigures(attempt=resume.attempt, n_committed_before=resume.committed_rows,
                            n_processed=run.n_input, audio_s=round(run.audio_s, 3),
                            inference_s=round(run.inference_s, 3), job_wall_s=round(wall, 3),
                            driver_cpu_s=round(time.process_time() - cpu, 3),
                            **engine_figures(meter, started)),
        stopped_early=stopped_early,
    )
    return RunResult(summary, summary.write(output_uri, cfg.storage.options))
