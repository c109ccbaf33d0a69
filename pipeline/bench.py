"""``quarry bench``: engine alone vs the whole pipeline, side by side in one run.

For each batch size, the engine alone transcribes the manifest's clips (decoded up front, one
replica, no Ray): that is the floor. Then the full pipeline runs the same manifest for each replica
count. The table shows RTFx of both and the pipeline's overhead (job wall / engine-only wall).
Use it to size a cluster: on a GPU with real weights, the engine row says what one replica does.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

from .config import JobConfig
from .records import OK


@dataclass(frozen=True)
class BenchRow:
    batch_size: int
    replicas: int | None  # None = engine alone
    audio_s: float
    wall_s: float
    n_rows: int
    n_ok: int

    @property
    def rtfx(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s else float("nan")


def _manifest_requests(cfg: JobConfig, manifest_uri: str):
    """Decode the manifest's clips on this process (bench inputs are small by design): the rows
    the pipeline would send, read and prepared by the pipeline's own manifest reader."""
    from .audio import AudioError, load_audio
    from .engines import EngineRequest
    from .manifest import Manifest, PrepareStage

    manifest = Manifest.open(manifest_uri, cfg)
    prepare = PrepareStage(manifest, cfg.input.columns, cfg.task)
    requests = []
    for batch in manifest.batches():
        for row in prepare.rows(batch):
            if row["status"] != OK:
                continue
            try:
                audio = load_audio(row["audio"], cfg.storage.options)
            except AudioError:
                continue
            requests.append(EngineRequest(id=row["id"], samples=audio.samples, language=row["language"],
                                          task=row["task"], target_language=row["target_language"],
                                          keywords=tuple(row["keywords"])))
    return requests


def engine_alone(cfg: JobConfig, requests, batch_size: int) -> BenchRow:
    from .engines import load_engine

    engine = load_engine(cfg.engine, cfg.task)
    engine.transcribe(requests[:1])  # warm-up: first-call costs are start-up, not throughput
    started = time.perf_counter()
    n_ok = 0
    for i in range(0, len(requests), batch_size):
        n_ok += sum(r.status == "ok" for r in engine.transcribe(requests[i : i + batch_size]))
    wall = time.perf_counter() - started
    return BenchRow(batch_size, None, sum(r.duration_s for r in requests), wall, len(requests), n_ok)


def pipeline_run(cfg: JobConfig, manifest_uri: str) -> BenchRow:
    from .plan import run_job

    with tempfile.TemporaryDirectory(prefix="quarry-bench-") as out:
        s = run_job(cfg, manifest_uri, out, overwrite=True).summary
    return BenchRow(cfg.engine.batch_size, cfg.engine.replicas, s.audio_s, s.job_wall_s, s.n_input, s.n_ok)


def run_bench(cfg: JobConfig, manifest_uri: str, batch_sizes: list[int], replicas: list[int]) -> list[BenchRow]:
    requests = _manifest_requests(cfg, manifest_uri)
    if not requests:
        raise ValueError(f"no decodable audio in {manifest_uri}")
    rows = []
    for batch in batch_sizes:
        rows.append(engine_alone(cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"batch_size": batch})}), requests, batch))
        for n in replicas:
            engine = cfg.engine.model_copy(update={"batch_size": batch, "replicas": n})
            rows.append(pipeline_run(cfg.model_copy(update={"engine": engine}), manifest_uri))
    return rows


def format_table(rows: list[BenchRow]) -> str:
    engine_wall = {r.batch_size: r.wall_s for r in rows if r.replicas is None}
    lines = [f"{'what':<22}{'batch':>6}{'rows':>6}{'ok':>5}{'audio_s':>10}{'wall_s':>9}{'RTFx':>8}{'wall/engine':>13}"]
    for r in rows:
        what = "engine alone (1 rep.)" if r.replicas is None else f"pipeline, {r.replicas} replica(s)"
        ratio = r.wall_s / engine_wall[r.batch_size] if r.batch_size in engine_wall else float("nan")
        lines.append(f"{what:<22}{r.batch_size:>6}{r.n_rows:>6}{r.n_ok:>5}{r.audio_s:>10.1f}{r.wall_s:>9.2f}{r.rtfx:>8.2f}{ratio:>13.2f}")
    return "\n".join(lines)
