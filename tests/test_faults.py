"""Never lose a row: storage faults, a killed engine actor, and a corpus of bad inputs.

The S3 tests run against the real moto server behind ``tests/faultproxy.py``, a reverse proxy that
injects throttling (503 SlowDown), 500s, connection resets and cut-off bodies, and refuses chosen
keys with 403. Jobs use the fake engine, whose text is a fingerprint of the decoded audio, so a
row that got someone else's audio, or none, shows.

Each job test prints one ``fault-report`` line (rows in / out, duplicates, lost, faults injected,
retries seen at the proxy); run with ``-s`` to see them.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline import storage
from pipeline.audio import AudioError, decode_audio, fetch_bytes
from pipeline.config import load_config
from pipeline.engines import fake
from pipeline.engines.fake import FakeEngine
from pipeline.plan import run_job
from pipeline.records import Status

from .badaudio import RATE, build_corpus, speech
from .faultproxy import FAULT_KINDS, FaultProxy
from .helpers import read_transcripts, write_jsonl

# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture()
def proxies(s3_server):
    """Start fault proxies in front of the test S3 server; all are stopped after the test."""
    started: list[FaultProxy] = []

    def start(**kwargs) -> FaultProxy:
        proxy = FaultProxy(s3_server, **kwargs).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def job_cfg(*extra: str, endpoint: str | None = None):
    """Fake-engine config; with ``endpoint``, storage goes there (the proxy) instead of AWS_ENDPOINT_URL."""
    overrides = ["engine.name=fake", "engine.batch_size=4", *extra]
    if endpoint:
        overrides.append(f"storage.options={{client_kwargs: {{endpoint_url: '{endpoint}'}}}}")
    return load_config(None, overrides)


def fingerprint(data: bytes) -> str:
    """The text the fake engine gives this audio when it is decoded on its own."""
    return FakeEngine.fingerprint(decode_audio(data).samples)


def clip_bytes(i: int, fmt: str = "WAV") -> bytes:
    """A distinct half second of real speech (a different slice for each ``i``)."""
    samples = speech()[i * 1_600 : i * 1_600 + RATE // 2]
    buffer = io.BytesIO()
    sf.write(buffer, samples, RATE, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def read_s3_transcripts(s3, bucket: str, prefix: str) -> pd.DataFrame:
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/transcripts/")["Contents"])
    assert keys and not [k for k in keys if "_tmp-" in k]
    tables = [pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=k)["Body"].read())) for k in keys]
    return pd.concat([t.to_pandas() for t in tables], ignore_index=True)


def row_accounting(ids_in: list[str], out: pd.DataFrame) -> dict[str, int]:
    """rows in / out, rows out more than once (by id), rows in that never came out."""
    counts = Counter(out["id"])
    return {
        "rows_in": len(ids_in),
        "rows_out": len(out),
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "lost": sum(1 for i in set(ids_in) if i not in counts),
    }


def retries_seen(proxy: FaultProxy) -> tuple[int, int]:
    """(faults followed by another request for the same thing, faults never retried)."""
    entries = proxy.entries()
    retried = unretried = 0
    for n, entry in enumerate(entries):
        if not entry.fault:
            continue
        again = any((e.method, e.path, e.query) == (entry.method, entry.path, entry.query) for e in entries[n + 1 :])
        retried += again
        unretried += not again
    return retried, unretried


def report(capsys, name: str, **counts) -> None:
    with capsys.disabled():
        print(f"\nfault-report {name}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


# --- (a) transient faults on reads: the job completes with every row ok --------------------------


def test_job_reading_through_throttling_5xx_and_resets_completes_with_every_row_ok(
    ray_session, s3_server, s3_bucket, proxies, capsys
):
    s3 = s3_client(s3_server)
    ids, expected = [], {}
    for i in range(16):
        fmt = "FLAC" if i % 2 else "WAV"
        data = clip_bytes(i, fmt)
        key = f"in/audio/clip-{i:02d}.{fmt.lower()}"
        s3.put_object(Bucket=s3_bucket, Key=key, Body=data)
        ids.append(f"clip-{i:02d}")
        expected[ids[-1]] = fingerprint(data)
    manifest = "".join(json.dumps({"id": i, "audio": f"audio/{i}.{'flac' if n % 2 else 'wav'}"}) + "\n" for n, i in enumerate(ids))
    s3.put_object(Bucket=s3_bucket, Key="in/manifest.jsonl", Body=manifest.encode())

    manifest_path = f"{s3_bucket}/in/manifest.jsonl"
    proxy = proxies(share=0.25, seed=7, max_consecutive=2, fail_first={manifest_path: 2})
    result = run_job(job_cfg(endpoint=proxy.url), f"s3://{manifest_path}", f"s3://{s3_bucket}/out")

    out = read_s3_transcripts(s3, s3_bucket, "out")
    accounting = row_accounting(ids, out)
    retried, unretried = retries_seen(proxy)
    audio_faults = sum(1 for e in proxy.entries() if e.fault and "/in/audio/" in e.path)
    manifest_faults = sum(1 for e in proxy.entries(manifest_path) if e.fault)
    report(capsys, "transient-reads", **accounting, requests=proxy.n_requests, faults_injected=proxy.n_faults,
           by_kind=dict(proxy.faults), audio_faults=audio_faults, manifest_faults=manifest_faults,
           retried_at_proxy=retried)

    assert accounting == {"rows_in": 16, "rows_out": 16, "duplicates": 0, "lost": 0}
    assert (out["status"] == "ok").all(), out.loc[out["status"] != "ok", ["id", "status", "error"]].to_dict("records")
    assert out.set_index("id")["text"].to_dict() == expected  # every row has its own audio's text
    s = result.summary.model_dump()
    assert s["n_input"] == s["n_ok"] == 16 and s["n_failed_by_reason"] == {}
    # the faults really happened, on the manifest and on the audio, in every kind, and were retried
    assert manifest_faults >= 2 and audio_faults >= 4
    assert set(proxy.faults) == set(FAULT_KINDS)
    assert unretried == 0 and retried == proxy.n_faults


# --- (b) the retry policy itself: transient faults retried, permanent ones answered at once ------


@pytest.fixture()
def one_object(s3_server, s3_bucket):
    s3 = s3_client(s3_server)
    data = clip_bytes(3)
    for key in ("a/good.wav", "a/denied.wav"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=data)
    return s3_bucket, data


def test_missing_object_and_access_denied_become_statuses_on_the_first_try(one_object, proxies, capsys):
    bucket, data = one_object
    proxy = proxies(deny=(f"{bucket}/a/denied.wav",))
    options = {"client_kwargs": {"endpoint_url": proxy.url}}
    retries_before = sum(storage.RETRY_COUNTS.values())
    started = time.perf_counter()
    with pytest.raises(AudioError) as missing:
        fetch_bytes(f"s3://{bucket}/a/missing.wav", options)
    with pytest.raises(AudioError) as denied:
        fetch_bytes(f"s3://{bucket}/a/denied.wav", options)
    elapsed = time.perf_counter() - started
    assert fetch_bytes(f"s3://{bucket}/a/good.wav", options) == data
    report(capsys, "permanent", missing_requests=len(proxy.entries(f"{bucket}/a/missing.wav")),
           denied_requests=len(proxy.entries(f"{bucket}/a/denied.wav")), seconds=round(elapsed, 2))

    assert missing.value.status is Status.MISSING_OBJECT
    assert denied.value.status is Status.ACCESS_DENIED
    # one request each: no retry layer (botocore, s3fs, ours) asked again
    assert [(e.method, e.outcome) for e in proxy.entries(f"{bucket}/a/missing.wav")] == [("HEAD", "forwarded")]
    assert [(e.method, e.outcome, e.status) for e in proxy.entries(f"{bucket}/a/denied.wav")] == [("HEAD", "denied", 403)]
    assert sum(storage.RETRY_COUNTS.values()) == retries_before


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_kind_of_transient_read_fault_is_retried_until_it_passes(one_object, proxies, kind):
    bucket, data = one_object
    proxy = proxies(share=1.0, kinds=(kind,), max_consecutive=1)  # every request fails once, then passes
    uri = f"s3://{bucket}/a/good.wav"
    assert fetch_bytes(uri, {"client_kwargs": {"endpoint_url": proxy.url}}) == data
    outcomes = [(e.method, e.outcome) for e in proxy.entries(f"{bucket}/a/good.wav")]
    cut_or_reset = "reset" if kind == "cut" else kind  # HEAD has no body to cut: it is reset instead
    assert outcomes == [("HEAD", cut_or_reset), ("HEAD", "forwarded"), ("GET", kind), ("GET", "forwarded")]


def test_without_retries_the_same_faults_lose_the_read(one_object, proxies):
    """The negative control: the proxy's faults are real; retries are what save the row."""
    bucket, data = one_object
    proxy = proxies(share=1.0, kinds=("internal",), max_consecutive=2)
    options = {"client_kwargs": {"endpoint_url": proxy.url}}
    with pytest.raises(AudioError) as caught:
        fetch_bytes(f"s3://{bucket}/a/good.wav", options, storage.NO_RETRY)
    assert caught.value.status is Status.FETCH_ERROR and "transient" in str(caught.value)
    assert "quarry-test-secret" not in str(caught.value)
    assert len(proxy.entries(f"{bucket}/a/good.wav")) == 1
    # the operation-level layer alone (no botocore retries) also gets there: the GET fails twice
    proxy2 = proxies(share=1.0, kinds=("internal",), methods=("GET",), max_consecutive=2)
    only_ours = storage.RetryPolicy(request_attempts=1, attempts=3, backoff_s=0.01)
    before = storage.RETRY_COUNTS["read"]
    assert fetch_bytes(f"s3://{bucket}/a/good.wav", {"client_kwargs": {"endpoint_url": proxy2.url}}, only_ours) == data
    assert storage.RETRY_COUNTS["read"] - before == 2
    gets = [e.outcome for e in proxy2.entries(f"{bucket}/a/good.wav") if e.method == "GET"]
    assert gets == ["internal", "internal", "forwarded"]


def test_writes_ride_out_transient_faults(s3_server, s3_bucket, proxies):
    proxy = proxies(share=1.0, kinds=("slowdown", "internal", "reset"), methods=("PUT",), max_consecutive=2)
    options = {"client_kwargs": {"endpoint_url": proxy.url}}
    storage.write_atomic(f"s3://{s3_bucket}/w/summary.json", b'{"ok": true}', options)
    assert s3_client(s3_server).get_object(Bucket=s3_bucket, Key="w/summary.json")["Body"].read() == b'{"ok": true}'
    puts = [e.outcome for e in proxy.entries(f"{s3_bucket}/w/summary.json") if e.method == "PUT"]
    assert puts[-1] == "forwarded" and len([p for p in puts if p != "forwarded"]) == 2


def test_permanent_and_unknown_errors_are_not_transient():
    from botocore.exceptions import ClientError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def translated(error: Exception, outer: Exception) -> Exception:
        outer.__cause__ = error
        return outer

    assert storage.is_transient(translated(client_error("SlowDown", 503), OSError(16, "Service Unavailable")))
    assert storage.is_transient(translated(client_error("BadGateway", 502), OSError(5, "bad gateway")))
    assert storage.is_transient(ConnectionResetError("reset"))
    assert not storage.is_transient(translated(client_error("AccessDenied", 403), PermissionError("denied")))
    assert not storage.is_transient(translated(client_error("NoSuchKey", 404), FileNotFoundError("gone")))
    assert not storage.is_transient(translated(client_error("InvalidRange", 416), OSError(22, "range")))
    assert not storage.is_transient(ValueError("a bug, not the network"))
    options = storage.storage_options_for("s3://b/k", {"client_kwargs": {"endpoint_url": "http://x"}})
    assert options["config_kwargs"]["retries"] == {"mode": "standard", "total_max_attempts": 8}
    assert storage.storage_options_for("/local/file.wav", {}) == {}


# --- (c) an engine actor killed mid-run ----------------------------------------------------------


def _inference_actors() -> dict[str, dict]:
    """This Ray session's InferenceStage actors (from its GCS, so never another session's)."""
    import ray._private.state as ray_state  # the public state API needs the dashboard

    return {k: v for k, v in ray_state.actors().items() if "InferenceStage" in v["ActorClassName"]}


def _process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_engine_actor_killed_mid_run_is_restarted_and_every_row_comes_out_once(ray_session, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    n_rows = 12  # one engine task of 12 x fake.SLOW_S seconds: long enough to kill it mid-task
    rows, expected = [], {}
    for i in range(n_rows):
        data = clip_bytes(i)
        (folder / f"c{i:02d}.wav").write_bytes(data)
        rows.append({"id": f"slow-engine-{i:02d}", "audio": f"c{i:02d}.wav"})
        expected[rows[-1]["id"]] = fingerprint(data)
    manifest = write_jsonl(folder / "m.jsonl", rows)
    assert n_rows * fake.SLOW_S >= 2.0

    outcome: dict = {}

    def job() -> None:
        try:
            outcome["result"] = run_job(job_cfg(), str(manifest), str(tmp_path / "out"))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = e

    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    killed: dict | None = None
    deadline = time.monotonic() + 60
    while runner.is_alive() and killed is None and time.monotonic() < deadline:
        for actor_id, actor in _inference_actors().items():
            title = _process_title(actor["Pid"]) if actor["State"] == "ALIVE" else ""
            # the actor's process title names the method it runs: ".submit" = a batch in flight
            if re.match(r"ray::MapWorker\(MapBatches\(InferenceStage\)\)\.submit", title):
                time.sleep(0.5)  # well into the task (it takes ~3 s)
                title = _process_title(actor["Pid"])
                assert ".submit" in title, f"the task ended before the kill: {title!r}"
                os.kill(actor["Pid"], signal.SIGKILL)
                killed = {"id": actor_id, "pid": actor["Pid"], "title": title}
                break
        time.sleep(0.05)
    runner.join(90)
    assert not runner.is_alive(), "the job did not finish after its actor was killed"
    if "error" in outcome:
        raise outcome["error"]
    assert killed is not None, "no InferenceStage actor was seen running a batch"

    restarts = {k: (v["NumRestarts"], v["Pid"]) for k, v in _inference_actors().items()}
    out = read_transcripts(tmp_path / "out")
    accounting = row_accounting([r["id"] for r in rows], out)
    report(capsys, "actor-killed", **accounting, killed_pid=killed["pid"], restarts=restarts.get(killed["id"], (None,))[0])

    assert restarts[killed["id"]][0] >= 1  # Ray restarted that actor (a new process) ...
    assert restarts[killed["id"]][1] != killed["pid"]
    assert accounting == {"rows_in": n_rows, "rows_out": n_rows, "duplicates": 0, "lost": 0}  # ... and retried its batch
    assert (out["status"] == "ok").all()
    assert out.set_index("id")["text"].to_dict() == expected
    s = outcome["result"].summary.model_dump()
    assert s["n_input"] == s["n_ok"] == n_rows


# --- (d) a corpus of bad inputs with good rows, through S3 ---------------------------------------

# What each extra row (beyond tests/badaudio.py's corpus, whose cases carry their own expected
# status) must end in, and why.
DENIED_KEY = "restricted/denied.wav"  # the proxy answers 403 AccessDenied for it
LONG_S, MAX_DURATION_S = 40, 30


@pytest.fixture(scope="module")
def corpus_job(ray_session, s3_server, tmp_path_factory):
    """Run the corpus job once (through the proxy, no random faults); tests read its results."""
    bucket = "quarry-faults-corpus"
    s3 = s3_client(s3_server)
    s3.create_bucket(Bucket=bucket)
    rows: list[dict] = []
    expected: dict[str, str] = {}  # id -> status
    good_text: dict[str, str] = {}  # id -> text when decoded alone
    for n, (case, data) in enumerate(build_corpus()):
        key = f"corpus/audio/{case.file_name}"
        if data is not None:
            s3.put_object(Bucket=bucket, Key=key, Body=data)
        row_id = f"case-{n:02d}"
        rows.append({"id": row_id, "audio": f"audio/{case.file_name}", "kind": case.description})
        expected[row_id] = case.status.value
        if case.status is Status.OK:
            good_text[row_id] = fingerprint(data)
    (wav_case, wav), (flac_case, flac) = build_corpus()[:2]
    assert (wav_case.file_name, flac_case.file_name) == ("speech_16k.wav", "speech.flac")
    long_wav = io.BytesIO()
    sf.write(long_wav, np.zeros(LONG_S * RATE, np.float32), RATE, format="WAV", subtype="PCM_16")
    for key, data in ((DENIED_KEY, wav), ("audio/long.wav", long_wav.getvalue())):
        s3.put_object(Bucket=bucket, Key=f"corpus/{key}", Body=data)
    extra = [
        ({"id": "denied", "audio": DENIED_KEY}, "access_denied", "the store refuses the read (403)"),
        ({"id": "too-long", "audio": "audio/long.wav"}, "too_long", f"{LONG_S} s, over audio.max_duration_s"),
        ({"id": "absolute-uri", "audio": f"s3://{bucket}/corpus/audio/speech.flac"}, "ok", "an absolute s3:// URI"),
        ({"id": "no-audio", "reference": "x"}, "invalid_row", "a row with no audio"),
        ({"id": "unsupported", "audio": "audio/speech.flac", "language": "xx"}, "unsupported_task", "language the engine lacks"),
        ({"id": "fail-engine-1", "audio": "audio/speech.flac"}, "inference_error", "the engine raises on it"),
        ({"id": "dup", "audio": "audio/speech_16k.wav"}, "ok", "first of two rows with one id"),
        ({"id": "dup", "audio": "audio/speech.flac"}, "duplicate_id", "second row with the same id"),
        ({"audio": "audio/speech_vorbis.ogg"}, "ok", "first of two rows with one audio and no id (same derived id)"),
        ({"audio": "audio/speech_vorbis.ogg"}, "duplicate_id", "second row with one audio and no id"),
    ]
    for row, status, why in extra:
        rows.append({**row, "kind": why})
    good_text["absolute-uri"] = fingerprint(flac)
    local = tmp_path_factory.mktemp("corpus")
    write_jsonl(local / "m.jsonl", rows)
    body = (local / "m.jsonl").read_bytes() + b'{"id": "broken-json", "audio": \n'  # a malformed line
    s3.put_object(Bucket=bucket, Key="corpus/manifest.jsonl", Body=body)

    proxy = FaultProxy(s3_server, deny=(f"{bucket}/corpus/{DENIED_KEY}",)).start()
    try:
        cfg = job_cfg(f"audio.max_duration_s={MAX_DURATION_S}", endpoint=proxy.url)
        result = run_job(cfg, f"s3://{bucket}/corpus/manifest.jsonl", f"s3://{bucket}/out")
    finally:
        proxy.stop()
    out = read_s3_transcripts(s3, bucket, "out")
    return {"rows": rows, "expected": expected, "extra": extra, "good_text": good_text, "out": out,
            "summary": result.summary.model_dump(), "proxy": proxy, "bucket": bucket, "wav_text": fingerprint(wav)}


def test_corpus_of_bad_inputs_each_row_gets_its_status_and_good_rows_are_untouched(corpus_job, capsys):
    rows, out, s = corpus_job["rows"], corpus_job["out"], corpus_job["summary"]
    proxy, bucket = corpus_job["proxy"], corpus_job["bucket"]
    given_ids = [r["id"] for r in rows if "id" in r]
    n_in = len(rows) + 1  # and the malformed line
    cases = {r["kind"] for r in rows} | {"a malformed manifest line"}
    accounting = row_accounting(given_ids, out)
    report(capsys, "corpus", **{**accounting, "rows_in": n_in, "rows_out": len(out)}, distinct_cases=len(cases),
           by_status=dict(Counter(out["status"])))
    assert len(cases) >= 15

    # every manifest line comes out; nothing is lost (the duplicate id comes out twice, as in)
    assert len(out) == n_in and accounting["lost"] == 0
    broken = out[~out["id"].isin(given_ids) & ~out["audio"].fillna("").str.endswith("/speech_vorbis.ogg")]
    assert len(broken) == 1 and broken["status"].item() == "invalid_row" and "not JSON" in broken["error"].item()
    assert (out["id"] == "dup").sum() == 2

    # each corpus file and each extra row ends in its status, with a reason when it failed
    single = out[out["id"] != "dup"].set_index("id")
    expected = dict(corpus_job["expected"])
    expected.update({row["id"]: status for row, status, _ in corpus_job["extra"] if row.get("id") not in (None, "dup")})
    assert single.loc[list(expected), "status"].to_dict() == expected
    failed = out[out["status"] != "ok"]
    assert failed["error"].notna().all() and (failed["error"].str.len() > 0).all()
    blob = out.astype(str).to_csv()
    assert "quarry-test-secret" not in blob and "quarry-test-key" not in blob

    # good rows: the same text as their audio decoded on its own, whatever their neighbours were
    for row_id, text in corpus_job["good_text"].items():
        assert single.loc[row_id, "text"] == text, row_id
    assert set(out.loc[out["id"] == "dup", "text"]) >= {corpus_job["wav_text"]}

    # permanent faults answered at once: one request each for the refused and the missing object
    assert [e.outcome for e in proxy.entries(f"{bucket}/corpus/{DENIED_KEY}")] == ["denied"]
    assert [e.method for e in proxy.entries(f"{bucket}/corpus/audio/missing.wav")] == ["HEAD"]

    # the summary reconciles, reason by reason
    assert s["n_input"] == n_in
    assert s["n_input"] == s["n_ok"] + sum(s["n_failed_by_reason"].values())
    assert s["n_failed_by_reason"] == dict(Counter(out.loc[out["status"] != "ok", "status"]))
    assert s["n_ok"] == (out["status"] == "ok").sum()


def test_corpus_rows_sharing_an_id_come_out_once_each_and_all_but_one_are_duplicate_id(corpus_job):
    """Given or derived (same audio, no id): the first row to reach the writer is transcribed, the
    other keeps its place with status duplicate_id (which of the two is first is not fixed)."""
    out = corpus_job["out"]
    derived = out[out["audio"].fillna("").str.endswith("/speech_vorbis.ogg") & ~out["id"].str.startswith("case-")]
    for rows in (out[out["id"] == "dup"], derived):
        assert sorted(rows["status"]) == ["duplicate_id", "ok"]
        assert rows["id"].nunique() == 1
        assert "already appeared" in rows.loc[rows["status"] == "duplicate_id", "error"].item()
    assert corpus_job["summary"]["n_failed_by_reason"].get("duplicate_id") == 2
