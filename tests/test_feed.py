"""The feed: the decode stage gives what a plain decode loop gives, its output columns are built
without per-row copies, read + prepare + decode run as one call to a decode actor (and a read that
cannot fuse does not wait for a CPU the actors hold), and the start-up log names each phase."""

from __future__ import annotations

import io
import logging
import shutil
import threading

import numpy as np
import pytest
import soundfile as sf
import soxr

from pipeline.config import load_config
from pipeline.manifest import Manifest, PrepareStage
from pipeline.plan import build_dataset, run_job
from pipeline.records import SAMPLE_RATE_HZ
from pipeline.stages import DecodeStage, samples_column

from .conftest import EVAL_DIR, eval_rows
from .helpers import write_jsonl

PHASES = ("manifest", "output", "ray", "plan", "actor start", "model load", "first rows")


def plain_decode(path) -> np.ndarray:
    """A plain decode (the work of benchmarks/bench_feed.py's raw loop), written independently of
    the pipeline: libsndfile, numpy's mean over the channels, soxr HQ to 16 kHz."""
    x, rate = sf.read(io.BytesIO(path.read_bytes()), dtype="float32", always_2d=True)
    mono = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    return soxr.resample(mono, rate, SAMPLE_RATE_HZ, quality="HQ") if rate != SAMPLE_RATE_HZ else mono


@pytest.fixture()
def mixed(tmp_path):
    """One eval clip as FLAC 16 kHz mono, MP3 44.1 kHz stereo and Opus 48 kHz, with a manifest."""
    clip = EVAL_DIR / eval_rows("en")[0]["audio"]
    samples, rate = sf.read(clip, dtype="float32")
    shutil.copy(clip, tmp_path / "a.flac")
    x44 = soxr.resample(samples, rate, 44100, quality="HQ")
    sf.write(tmp_path / "b.mp3", np.stack([x44, 0.5 * x44], axis=1), 44100, format="MP3", subtype="MPEG_LAYER_III")
    sf.write(tmp_path / "c.opus", soxr.resample(samples, rate, 48000, quality="HQ"), 48000, format="OGG",
             subtype="OPUS")
    names = ["a.flac", "b.mp3", "c.opus"]
    return write_jsonl(tmp_path / "m.jsonl", [{"id": n, "audio": n} for n in names]), names


def test_decode_stage_gives_the_plain_loops_samples_for_flac_stereo_mp3_and_opus(mixed, tmp_path):
    manifest_path, names = mixed
    cfg = load_config(None, ["engine.name=fake"])
    manifest = Manifest.open(str(manifest_path), cfg)
    prepared = PrepareStage(manifest, cfg.input.columns, cfg.task)(next(manifest.batches(8)))
    decode = DecodeStage(cfg.audio, cfg.segment, cfg.storage.options, manifest.extras, task=cfg.task)
    rows = [r for t in decode(prepared) for r in t.to_pylist()]
    assert [r["id"] for r in rows] == names and all(r["status"] == "ok" for r in rows)
    assert [(r["source_sample_rate"], r["source_channels"]) for r in rows] == [(16000, 1), (44100, 2), (48000, 1)]
    for row, name in zip(rows, names, strict=True):
        expected = plain_decode(tmp_path / name)
        got = np.frombuffer(row["samples"], np.float32)
        assert len(got) == len(expected), name
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)


def test_samples_column_holds_each_rows_float32_bytes_with_nulls_in_place():
    a, b = np.arange(5, dtype=np.float32), np.linspace(-1, 1, 7, dtype=np.float32)
    column = samples_column([a, None, b[::2], np.zeros(0, np.float32)])
    column.validate(full=True)
    assert column.to_pylist() == [a.tobytes(), None, b[::2].tobytes(), b""]
    assert samples_column([]).to_pylist() == []


def test_read_prepare_and_decode_run_as_one_call_in_a_pool_of_decode_actors(ray_session, mixed, capsys):
    manifest_path, _ = mixed
    cfg = load_config(None, ["engine.name=fake"])
    build_dataset(cfg, Manifest.open(str(manifest_path), cfg)).explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[ReadQuarryManifest->MapBatches(PrepareStage)->MapBatches(DecodeStage)]" in physical


def test_a_read_that_cannot_fuse_runs_beside_decode_actors_that_hold_every_cpu(ray_session, tmp_path, capsys):
    """12 rows in blocks of 4 are one run of the JSONL file (16 lines), so Ray splits the read's
    output and the read stays a stage of its own, while the decode actors reserve both CPUs of the
    test session: reserving a CPU, the read would wait for one forever."""
    clip = EVAL_DIR / eval_rows("en")[0]["audio"]
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": f"r{i:02d}", "audio": str(clip)} for i in range(12)])
    cfg = load_config(None, ["engine.name=fake", "engine.batch_size=4"])
    build_dataset(cfg, Manifest.open(str(manifest), cfg)).explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[ReadQuarryManifest]" in physical
    assert "ActorPoolMapOperator[MapBatches(PrepareStage)->MapBatches(DecodeStage)]" in physical

    done: list = []
    job = threading.Thread(target=lambda: done.append(run_job(cfg, str(manifest), str(tmp_path / "out"))), daemon=True)
    job.start()
    job.join(timeout=120)
    assert done, "the job did not finish in 120 s: its read is waiting for a CPU"
    assert done[0].summary.n_ok == 12


def test_start_up_log_names_each_phase_in_one_line(ray_session, mixed, tmp_path, caplog):
    manifest_path, names = mixed
    with caplog.at_level(logging.INFO, logger="quarry"):
        result = run_job(load_config(None, ["engine.name=fake"]), str(manifest_path), str(tmp_path / "out"))
    assert result.summary.n_ok == len(names)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up:")]
    phases, total = line.removeprefix("start-up: ").split(" (total ")
    assert [p.rsplit(" ", 2)[0] for p in phases.split(", ")] == list(PHASES)
    assert total.endswith(" s)")
