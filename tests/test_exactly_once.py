"""Exactly once at archive scale, with real parts: reruns that heal transient failures (the real S3
server behind the fault proxy, read back with DuckDB), one writer per output (two real drivers,
local and S3), repeated ids across a crash (a real SIGKILL), an engine that dies in its actor, a
lost Ray node (a two-node cluster on this machine), and a job identity that covers the manifest's
content and every result-affecting setting.

Each scenario prints one ``fault-report`` line (rows in / out, duplicates, lost, rows redone).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from pipeline.claim import OutputBusy, claim_output
from pipeline.config import load_config
from pipeline.output import OutputExistsError
from pipeline.plan import run_job

from .conftest import EVAL_DIR, eval_rows
from .helpers import quarry_run, read_summary, read_transcripts, write_jsonl


def _clips(folder: Path, n: int = 6) -> list[str]:
    names = []
    for r in eval_rows("en")[:n]:
        shutil.copy(EVAL_DIR / r["audio"], folder)
        names.append(r["audio"].rsplit("/", 1)[-1])
    return names


def _report(name: str, rows_in: int, rows, redone: int) -> None:
    keys = rows["row_index"]
    print(f"\nfault-report {name}: rows_in={rows_in}, rows_out={len(rows)}, duplicates={len(rows) - keys.nunique()}, "
          f"lost={rows_in - keys.nunique()}, rows_redone={redone}")


def _wait_for_first_commit(proc, out: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not list((out / "transcripts").glob("part-*.parquet")):
        assert proc.poll() is None, f"job ended before its first commit:\n{proc.stdout.read()}"
        time.sleep(0.2)
    assert list((out / "transcripts").glob("part-*.parquet")), "no commit in time"


# --- a rerun heals transient failures ------------------------------------------------------------


def test_rerun_heals_rows_that_failed_past_the_retries(ray_session, s3_bucket, s3_server, tmp_path):
    import boto3

    from .test_faults import FaultProxy

    client = boto3.client("s3", endpoint_url=s3_server)
    names = _clips(tmp_path)
    rows = []
    for i in range(12):
        key = f"audio/{i:02d}-{names[i % len(names)]}"
        client.upload_file(str(tmp_path / names[i % len(names)]), s3_bucket, key)
        rows.append({"id": f"clip-{i:02d}", "audio": key.removeprefix("audio/")})
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    client.put_object(Bucket=s3_bucket, Key="audio/m.jsonl", Body=body)
    broken = {f"{s3_bucket}/audio/{rows[i]['audio']}": 10_000 for i in (1, 5, 6, 11)}  # every request fails
    out = f"s3://{s3_bucket}/out"
    no_request_retries = "{total_max_attempts: 1}"

    with FaultProxy(s3_server, fail_first=broken, kinds=("internal", "reset")) as proxy:
        opts = f"storage.options={{client_kwargs: {{endpoint_url: '{proxy.url}'}}, config_kwargs: {{retries: {no_request_retries}}}}}"
        first = run_job(load_config(None, ["engine.name=fake", "engine.batch_size=4", opts]),
                        f"s3://{s3_bucket}/audio/m.jsonl", out)
    assert first.summary.n_failed_by_reason == {"fetch_error": 4}

    second = run_job(load_config(None, ["engine.name=fake", "engine.batch_size=4"]), f"s3://{s3_bucket}/audio/m.jsonl", out)
    assert second.ok and second.summary.this_run.n_processed == 4  # only the failed rows were redone
    assert second.summary.n_input == second.summary.n_ok == 12

    # Any Parquet reader, with no Quarry code: one row per input row, the latest answer.
    import s3fs

    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}))  # no httpfs download here
    got = con.execute(f"SELECT id, status FROM read_parquet('s3://{s3_bucket}/out/transcripts/*.parquet') "
                      "ORDER BY id").fetchall()
    assert got == [(r["id"], "ok") for r in rows]
    summary = json.loads(client.get_object(Bucket=s3_bucket, Key="out/summary.json")["Body"].read())
    assert summary["n_input"] == summary["n_ok"] + sum(summary["n_failed_by_reason"].values()) == 12
    print(f"\nfault-report rerun-heals: rows_in=12, rows_out={len(got)}, duplicates={len(got) - len(set(got))}, "
          f"lost={12 - len({g[0] for g in got})}, rows_redone={second.summary.this_run.n_processed}")


def test_a_job_stopped_by_its_failure_budget_completes_on_rerun_without_redoing_good_rows(ray_session, tmp_path):
    names = _clips(tmp_path)
    rows = [{"id": f"r{i:02d}", "audio": names[i % len(names)]} for i in range(10)]
    rows += [{"id": f"fail-engine-{i}", "audio": names[0]} for i in range(4)]  # inference_error: transient
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    fault = tmp_path / "fault"
    fault.touch()
    sets = ["engine.name=fake", f"engine.model=fail-while:{fault}", "engine.batch_size=2",
            "output.max_failed_fraction=0.1", "output.budget_min_rows=1"]
    first = run_job(load_config(None, sets), str(manifest), str(tmp_path / "out"))
    assert not first.ok and first.summary.n_failed_by_reason.get("inference_error")
    fault.unlink()  # the fault goes away; the same command is run again
    second = run_job(load_config(None, sets), str(manifest), str(tmp_path / "out"))
    out = read_transcripts(tmp_path / "out")
    _report("budget-rerun", len(rows), out, second.summary.this_run.n_processed)
    assert second.ok and sorted(out["row_index"]) == list(range(len(rows)))
    assert (out["status"] == "ok").all()
    assert second.summary.this_run.n_processed == len(rows) - first.summary.n_ok  # the good rows were kept


# --- one writer per output -----------------------------------------------------------------------


def test_the_claim_refuses_a_second_driver_and_frees_the_output_when_released(tmp_path, s3_bucket):
    for output in (str(tmp_path / "out"), f"s3://{s3_bucket}/out"):
        with claim_output(output):
            with pytest.raises(OutputBusy, match=f"pid {os.getpid()}"):
                claim_output(output)
        with claim_output(output):  # released: free again
            pass


def _put_lease(bucket: str, **state) -> None:
    import boto3

    from .conftest import S3_ENDPOINT

    boto3.client("s3", endpoint_url=S3_ENDPOINT).put_object(
        Bucket=bucket, Key="out/_quarry_lock.json", Body=json.dumps({"pid": 1, "host": "elsewhere", **state}).encode())


def test_an_expired_s3_lease_is_taken_over_and_a_live_one_is_not(s3_bucket):
    output = f"s3://{s3_bucket}/out"
    _put_lease(s3_bucket, since="earlier", expires_at=time.time() + 60)
    with pytest.raises(OutputBusy, match="pid 1 on elsewhere"):
        claim_output(output)
    _put_lease(s3_bucket, since="earlier", expires_at=time.time() - 1)  # its driver died an hour ago
    with claim_output(output) as claim:
        assert claim.holder["pid"] == os.getpid()


def test_a_driver_whose_lease_was_taken_over_stops_committing(s3_bucket):
    from pipeline.claim import ClaimLost

    claim = claim_output(f"s3://{s3_bucket}/out", lease_s=0.6)
    claim.check()
    _put_lease(s3_bucket, since="now", expires_at=time.time() + 60)  # another driver took over
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not claim._lost.is_set():
        time.sleep(0.1)
    with pytest.raises(ClaimLost):
        claim.check()
    claim.release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_started_together_on_one_output_never_interleave(tmp_path, s3_bucket, s3_server, where):
    names = _clips(tmp_path)
    rows = [{"id": f"slow-engine-{i:03d}", "audio": names[i % len(names)]} for i in range(24)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out" if where == "local" else f"s3://{s3_bucket}/out"
    sets = ("engine.batch_size=4", "output.rows_per_file=4", "ray.num_cpus=2")
    a = quarry_run(manifest, out, *sets)
    time.sleep(0.5)
    b = quarry_run(manifest, out, *sets)
    logs = [p.communicate(timeout=400)[0] for p in (a, b)]
    codes = sorted(p.returncode for p in (a, b))
    assert codes == [0, 2], logs
    refused = logs[[a.returncode, b.returncode].index(2)]
    assert "being written by another driver" in refused and "pid" in refused, refused
    if where == "local":
        got = read_transcripts(out)
    else:
        import pyarrow.fs as pafs

        s3 = pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http",
                               access_key="quarry-test-key", secret_key="quarry-test-secret-do-not-log")
        got = pq.read_table(f"{s3_bucket}/out/transcripts", filesystem=s3).to_pandas()
    _report(f"two-drivers-{where}", len(rows), got, 0)
    assert sorted(got["row_index"]) == list(range(len(rows))) and (got["status"] == "ok").all()


# --- row identity --------------------------------------------------------------------------------


def test_repeated_ids_survive_a_kill_at_the_first_commit_and_a_rerun(tmp_path):
    names = _clips(tmp_path)
    rows = [{"id": f"slow-engine-{i % 20:03d}", "audio": names[i % len(names)]} for i in range(60)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    sets = ("engine.batch_size=2", "output.rows_per_file=4", "output.flush_interval_s=1", "ray.num_cpus=2")
    first = quarry_run(manifest, out, *sets)
    _wait_for_first_commit(first, out)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    committed = sum(pq.read_metadata(p).num_rows for p in (out / "transcripts").glob("part-*.parquet"))
    second = quarry_run(manifest, out, *sets)
    log, _ = second.communicate(timeout=400)
    assert second.returncode == 0, log
    got = read_transcripts(out)
    summary = read_summary(out)
    _report("repeated-ids-kill", len(rows), got, summary["this_run"]["n_processed"])
    assert sorted(got["row_index"]) == list(range(len(rows)))  # every manifest row, once
    assert (got["status"] == "ok").sum() == 20 and (got["status"] == "duplicate_id").sum() == 40
    assert got.loc[got["status"] == "ok", "id"].nunique() == 20  # each id transcribed once
    assert summary["this_run"]["n_processed"] == len(rows) - committed


# --- an engine that dies, a node that is lost ----------------------------------------------------


def test_an_engine_that_dies_is_replaced_and_its_batch_redone(tmp_path):
    names = _clips(tmp_path)
    rows = [{"id": f"row-{i:02d}", "audio": names[i % len(names)]} for i in range(16)]
    rows[5]["id"] = "die-engine-05"
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    marker = tmp_path / "died"
    proc = quarry_run(manifest, tmp_path / "out", f"engine.model=die-once:{marker}", "engine.batch_size=4",
                      "ray.num_cpus=2")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert marker.exists()  # it did die
    got = read_transcripts(tmp_path / "out")
    _report("engine-died", len(rows), got, 0)
    assert sorted(got["row_index"]) == list(range(16)) and (got["status"] == "ok").all()


def test_a_lost_worker_node_costs_only_its_in_flight_work(tmp_path):
    from ray.cluster_utils import Cluster

    names = _clips(tmp_path)
    rows = [{"id": f"slow-engine-{i:03d}", "audio": names[i % len(names)]} for i in range(48)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        # Two replicas of 1 CPU and a head of 1 CPU: at least one replica lives on the worker node.
        proc = quarry_run(manifest, out, "engine.batch_size=2", "engine.replicas=2", "engine.cpus_per_replica=1",
                          "output.rows_per_file=4", "output.flush_interval_s=1", env=env)
        _wait_for_first_commit(proc, out, timeout_s=180)
        cluster.remove_node(worker, allow_graceful=False)  # a spot node gone, with its actors and objects
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        log, _ = proc.communicate(timeout=600)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, log
    got = read_transcripts(out)
    _report("node-lost", len(rows), got, 0)
    assert sorted(got["row_index"]) == list(range(len(rows))) and (got["status"] == "ok").all()


# --- the job's identity --------------------------------------------------------------------------


def test_a_rerun_resumes_only_the_same_content_and_settings_and_says_what_differs(ray_session, tmp_path):
    names = _clips(tmp_path, 3)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": f"r{i}", "audio": n} for i, n in enumerate(names)])
    cfg = load_config(None, ["engine.name=fake"])
    run_job(cfg, str(manifest), str(tmp_path / "out"))
    with pytest.raises(OutputExistsError, match=r"segment\.max_s: 30\.0 -> 20\.0"):
        run_job(load_config(None, ["engine.name=fake", "segment.max_s=20"]), str(manifest), str(tmp_path / "out"))
    with pytest.raises(OutputExistsError, match=r"audio\.channels"):
        run_job(load_config(None, ["engine.name=fake", "audio.channels=split"]), str(manifest), str(tmp_path / "out"))
    write_jsonl(manifest, [{"id": f"r{i}", "audio": n} for i, n in enumerate(reversed(names))])  # same path
    with pytest.raises(OutputExistsError, match=r"manifest\.content"):
        run_job(cfg, str(manifest), str(tmp_path / "out"))


# --- nightly partitions --------------------------------------------------------------------------


def test_a_partition_that_stopped_early_counts_its_committed_rows_as_done(ray_session, tmp_path):
    from pipeline.discover import discover

    names = _clips(tmp_path)
    archive, runs = tmp_path / "archive", tmp_path / "runs"
    archive.mkdir()
    for n in names[:4]:
        shutil.copy(tmp_path / n, archive)
    (archive / "zz-broken.wav").write_bytes(b"RIFF not really audio")  # decode_error: a final answer
    night1 = runs / "run_date=2026-11-21"
    found = discover(str(archive), str(night1), skip_done_in=str(runs))
    first = run_job(load_config(None, ["engine.name=fake", "engine.batch_size=1", "output.rows_per_file=1",
                                       "output.max_failed_fraction=0", "output.budget_min_rows=1"]),
                    found.manifest_uri, str(night1))
    assert not first.ok  # the run stopped on its failure budget: its summary says failed, not completed
    committed = read_transcripts(night1)
    final = committed[committed["status"].isin(["ok", "decode_error"])]
    assert len(final) >= 1
    second = discover(str(archive), str(runs / "run_date=2026-11-22"), skip_done_in=str(runs))
    assert second.n_done_before == len(final)  # what it committed is done, whatever its summary says


def test_a_rerun_never_leaves_an_earlier_attempts_summary_in_place(ray_session, tmp_path):
    from pipeline.manifest import Manifest
    from pipeline.output import TranscriptWriter
    from pipeline.plan import job_key
    from pipeline.records import transcript_schema

    names = _clips(tmp_path, 2)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "fail-engine-1", "audio": names[0]},
                                                  {"id": "ok-1", "audio": names[1]}])
    cfg = load_config(None, ["engine.name=fake"])
    run_job(cfg, str(manifest), str(tmp_path / "out"))
    assert (tmp_path / "out" / "summary.json").exists()
    opened = Manifest.open(str(manifest), cfg)
    writer = TranscriptWriter(str(tmp_path / "out"), transcript_schema(opened.extras), {}, 100)
    resume = writer.prepare(False, job_key(cfg, opened), opened.n_rows)  # a second attempt starts...
    assert not (tmp_path / "out" / "summary.json").exists()  # ...and the first one's summary is gone
    assert resume.attempt == 2 and resume.healed_rows == 1 and resume.committed_rows == 1
