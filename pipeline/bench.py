"""``quarry bench``: engine alone vs the whole pipeline, side by side in one run.

For each batch size, the engine alone transcribes the manifest's clips (decoded up front, one
replica, no Ray): that is the floor. Then the full pipeline runs the same manifest for each replica
count. The table shows RTFx of both and the pipeline's overhead (job wall / engine-only wall).
Use it to size a cluster: on a GPU with real weights, the engine row says what one replica does.

``--engines whisper,transformers`` repeats all of it for each engine on the same decoded clips
(each ``NAME`` or ``NAME=MODEL``; options come from each engine's own config section), so engines
compare side by side. An engine that speculates (transformers) notes its draft acceptance.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

from .config import DEFAULT_MODELS, EngineConfig, JobConfig
from .records import OK


@dataclass(frozen=True)
class BenchRow:
    engine: str
    batch_size: int
    replicas: int | None  # None = engine alone
    audio_s: float
    wall_s: float
    n_rows: int
    n_ok: int
    note: str = ""

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
    drafts = getattr(engine, "drafts", None)
    before = (drafts.accepted, drafts.rows) if drafts is not None else (0, 0)
    started = time.perf_counter()
    n_ok = 0
    for i in range(0, len(requests), batch_size):
        n_ok += sum(r.status == "ok" for r in engine.transcribe(requests[i : i + batch_size]))
    wall = time.perf_counter() - started
    note = ""
    if drafts is not None and drafts.rows > before[1]:
        note = f"drafts {drafts.accepted - before[0]}/{drafts.rows - before[1]} accepted"
    return BenchRow(cfg.engine.name, batch_size, None, sum(r.duration_s for r in requests), wall, len(requests),
                    n_ok, note)


def pipeline_run(cfg: JobConfig, manifest_uri: str) -> BenchRow:
    from .plan import run_job

    with tempfile.TemporaryDirectory(prefix="quarry-bench-") as out:
        s = run_job(cfg, manifest_uri, out, overwrite=True).summary
    return BenchRow(cfg.engine.name, cfg.engine.batch_size, cfg.engine.replicas, s.audio_s, s.job_wall_s, s.n_input,
                    s.n_ok)


def engine_configs(cfg: JobConfig, engines: list[str] | None) -> list[EngineConfig]:
    """The engines to measure: the configured one, or each of ``engines`` (``NAME`` or
    ``NAME=MODEL``; without a model, the configured one when NAME is the configured engine, else
    NAME's default), with the config's resources and per-engine options."""
    if not engines:
        return [cfg.engine]
    out = []
    for spec in engines:
        name, _, model = spec.partition("=")
        name = name.strip()
        if name not in DEFAULT_MODELS:
            raise ValueError(f"unknown engine {name!r} in --engines (engines: {', '.join(DEFAULT_MODELS)})")
        model = model.strip() or (cfg.engine.model if name == cfg.engine.name else DEFAULT_MODELS.get(name))
        out.append(EngineConfig.model_validate({**cfg.engine.model_dump(), "name": name, "model": model}))
    return out


def run_bench(cfg: JobConfig, manifest_uri: str, batch_sizes: list[int], replicas: list[int],
              engines: list[str] | None = None) -> list[BenchRow]:
    requests = _manifest_requests(cfg, manifest_uri)
    if not requests:
        raise ValueError(f"no decodable audio in {manifest_uri}")
    rows = []
    for engine_cfg in engine_configs(cfg, engines):
        for batch in batch_sizes:
            alone = engine_cfg.model_copy(update={"batch_size": batch})
            rows.append(engine_alone(cfg.model_copy(update={"engine": alone}), requests, batch))
            for n in replicas:
                engine = engine_cfg.model_copy(update={"batch_size": batch, "replicas": n})
                rows.append(pipeline_run(cfg.model_copy(update={"engine": engine}), manifest_uri))
    return rows


def format_table(rows: list[BenchRow]) -> str:
    engine_wall = {(r.engine, r.batch_size): r.wall_s for r in rows if r.replicas is None}
    width = max([len("engine")] + [len(r.engine) for r in rows]) + 2
    lines = [f"{'engine':<{width}}{'what':<22}{'batch':>6}{'rows':>6}{'ok':>5}{'audio_s':>10}{'wall_s':>9}{'RTFx':>8}"
             f"{'wall/engine':>13}  note"]
    for r in rows:
        what = "engine alone (1 rep.)" if r.replicas is None else f"pipeline, {r.replicas} replica(s)"
        alone = engine_wall.get((r.engine, r.batch_size))
        ratio = r.wall_s / alone if alone else float("nan")
        lines.append(f"{r.engine:<{width}}{what:<22}{r.batch_size:>6}{r.n_rows:>6}{r.n_ok:>5}{r.audio_s:>10.1f}"
                     f"{r.wall_s:>9.2f}{r.rtfx:>8.2f}{ratio:>13.2f}  {r.note}".rstrip())
    return "\n".join(lines)
