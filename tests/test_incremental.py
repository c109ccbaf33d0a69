"""Nightly incremental mode: audio objects under a prefix, minus what completed runs already did."""

from __future__ import annotations

import shutil

from pipeline.config import load_config
from pipeline.discover import discover, list_audio
from pipeline.plan import run_job

from .conftest import EVAL_DIR, eval_rows
from .helpers import read_transcripts


def _night(archive, runs, date):
    found = discover(str(archive), str(runs / f"run_date={date}"), skip_done_in=str(runs))
    result = run_job(load_config(None, ["engine.name=fake"]), found.manifest_uri, str(runs / f"run_date={date}"))
    assert result.ok and result.summary.n_input == found.n_todo
    return found


def test_each_night_does_only_new_objects(ray_session, tmp_path):
    clips = eval_rows("en")[:5]
    archive, runs = tmp_path / "archive", tmp_path / "runs"
    (archive / "day1").mkdir(parents=True)
    for r in clips[:3]:
        shutil.copy(EVAL_DIR / r["audio"], archive / "day1")
    (archive / "day1" / "notes.txt").write_text("not audio, not listed")

    first = _night(archive, runs, "2026-11-21")
    assert (first.n_found, first.n_done_before, first.n_todo) == (3, 0, 3)
    assert len(list(list_audio(str(archive / "day1" / "*.flac")))) == 3  # globs work too

    (archive / "day2").mkdir()
    for r in clips[3:]:
        shutil.copy(EVAL_DIR / r["audio"], archive / "day2")
    second = _night(archive, runs, "2026-11-22")
    assert (second.n_found, second.n_done_before, second.n_todo) == (5, 3, 2)
    night1 = read_transcripts(runs / "run_date=2026-11-21")
    night2 = read_transcripts(runs / "run_date=2026-11-22")
    assert len(night1) == 3 and len(night2) == 2
    assert not set(night1["audio"]) & set(night2["audio"])
    assert {a.rsplit("/", 1)[-1] for a in night2["audio"]} == {r["audio"].rsplit("/", 1)[-1] for r in clips[3:]}

    third = _night(archive, runs, "2026-11-23")  # nothing new: an empty, successful run
    assert (third.n_found, third.n_done_before, third.n_todo) == (5, 5, 0)
    assert len(read_transcripts(runs / "run_date=2026-11-23")) == 0
