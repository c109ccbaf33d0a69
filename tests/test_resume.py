"""A job process killed mid-run (SIGKILL to its whole process group: driver, local Ray, actors)
and then rerun to the same output: every input row comes out exactly once, and the rerun redoes
only what had not been committed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from .conftest import EVAL_DIR, REPO, eval_rows
from .helpers import read_summary, read_transcripts, write_jsonl

N_ROWS = 120


def _quarry(manifest, out, *extra):
    # slow-engine ids make the fake engine take 0.25 s a row, so the job is killable mid-run;
    # small parts and a 1 s flush make commits frequent.
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--manifest", str(manifest), "--output", str(out),
           "--set", "engine.name=fake", "--set", "engine.batch_size=2", "--set", "output.rows_per_file=4",
           "--set", "output.flush_interval_s=1", "--set", "ray.num_cpus=2", *extra]
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_killed_job_rerun_gives_every_row_exactly_once(tmp_path):
    clips = eval_rows("en")[:6]
    for r in clips:
        shutil.copy(EVAL_DIR / r["audio"], tmp_path)
    ids = [f"slow-engine-{i:03d}" for i in range(N_ROWS)]
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": i, "audio": clips[n % len(clips)]["audio"].rsplit("/", 1)[-1]} for n, i in enumerate(ids)
    ])
    out = tmp_path / "out"

    first = _quarry(manifest, out)
    deadline = time.monotonic() + 120
    parts = out / "transcripts"
    while time.monotonic() < deadline and not list(parts.glob("part-*.parquet")):
        assert first.poll() is None, f"job ended before it could be killed:\n{first.stdout.read()}"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # at the first commit: the driver and its local Ray, a crash
    first.wait()
    committed = sum(pq.read_metadata(p).num_rows for p in parts.glob("part-*.parquet"))
    assert 0 < committed < N_ROWS, committed
    assert not (out / "summary.json").exists()

    second = _quarry(manifest, out)
    log, _ = second.communicate(timeout=300)
    assert second.returncode == 0, log
    rows = read_transcripts(out)
    assert sorted(rows["id"]) == ids  # exactly the input ids: none lost, none twice
    assert (rows["status"] == "ok").all()
    summary = read_summary(out)
    run = summary["this_run"]
    assert summary["n_input"] == N_ROWS and summary["n_ok"] == N_ROWS
    assert run["attempt"] == 2 and run["n_committed_before"] == committed
    assert run["n_processed"] == N_ROWS - committed  # the rerun redid nothing already committed
    print(f"\nresume after kill: {N_ROWS} rows in, {committed} committed before the kill, "
          f"{run['n_processed']} processed by the rerun ({run['n_processed'] / N_ROWS:.0%} of the job), "
          f"{len(rows)} rows out, {len(rows) - rows['id'].nunique()} duplicates, "
          f"{N_ROWS - rows['id'].nunique()} lost")
