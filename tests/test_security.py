"""A job's local Ray listens on loopback only, and secrets given to a job reach no log or output.

The job test plants a distinct secret in each place a user could put one (the environment, a
config file's storage options under every credential spelling, a ``--set`` override, user-info and
presigned tokens in the manifest's URIs) and greps every file the job wrote (its output and its
Ray session folder) and every line it printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from .conftest import EVAL_DIR, REPO, eval_rows
from .helpers import searchable_files, write_jsonl

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def planted(place: str) -> str:
    return f"QSEC-{place}-7f3a9-do-not-log"


SECRET_PLACES = ("env-aws-secret", "env-session-token", "config-key", "config-secret", "config-token",
                 "config-account-key", "config-connection-string", "config-camel-account-key", "config-sas-token",
                 "config-nested-credentials", "config-authorization-header", "config-client-kwargs-secret",
                 "set-override-password", "uri-userinfo", "uri-presigned-signature", "uri-presigned-token")


def test_local_ray_listens_on_loopback_only_and_logs_no_secret(tmp_path):
    clip = eval_rows("en")[0]
    shutil.copy(EVAL_DIR / clip["audio"], tmp_path)
    name = clip["audio"].rsplit("/", 1)[-1]
    # slow-engine rows keep the job alive long enough to look at its sockets
    rows = [{"id": f"slow-engine-{i}", "audio": name} for i in range(40)]
    rows += [{"id": "userinfo", "audio": f"https://ada:{planted('uri-userinfo')}@storage.example.com/a.wav"},
             {"id": "presigned", "audio": "s3://other-bucket/a.wav?X-Amz-Credential=AKIAQ%2F20260101"
              f"&X-Amz-Signature={planted('uri-presigned-signature')}&X-Amz-Security-Token={planted('uri-presigned-token')}"}]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    options = {
        "client_kwargs": {"region_name": "us-east-1", "aws_secret_access_key": planted("config-client-kwargs-secret")},
        "key": planted("config-key"), "secret": planted("config-secret"), "token": planted("config-token"),
        "account_key": planted("config-account-key"), "connection_string": planted("config-connection-string"),
        "accountKey": planted("config-camel-account-key"), "sasToken": planted("config-sas-token"),
        "credentials": {"anything": {"deep": [planted("config-nested-credentials")]}},
        "headers": {"Authorization": f"Bearer {planted('config-authorization-header')}"},
    }
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"storage": {"options": options}}))
    ray_tmp = Path(tempfile.mkdtemp(prefix="qs", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # quarry sets it itself
    env.update(AWS_SECRET_ACCESS_KEY=planted("env-aws-secret"), AWS_SESSION_TOKEN=planted("env-session-token"),
               RAY_TMPDIR=str(ray_tmp))
    cmd = [sys.executable, "-m", "pipeline.cli", "-v", "run", "--manifest", str(manifest), "--output",
           str(tmp_path / "out"), "--config", str(config), "--set", "engine.name=fake", "--set", "engine.batch_size=1",
           "--set", f"storage.options.password={planted('set-override-password')}"]
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[tuple[str, int], str] = {}
    deadline = time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline:
        try:
            tree = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for proc in tree:
            try:
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        seen[(conn.laddr.ip, conn.laddr.port)] = proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.3)
    log, _ = job.communicate(timeout=300)
    try:
        assert job.returncode == 0, log[-3000:]
        assert any(name.startswith(("gcs", "raylet")) for name in seen.values()), seen  # we did see Ray's servers
        exposed = {addr: name for addr, name in seen.items() if addr[0] not in LOOPBACK}
        assert not exposed, f"listening beyond loopback: {exposed}"
        written = searchable_files(tmp_path / "out", ray_tmp)
        assert any(p.suffix in (".log", ".out", ".err") for p in written)  # Ray's own logs are read too
        for place in SECRET_PLACES:
            assert planted(place) not in log, f"{place} printed"
            leaked = [str(p) for p, data in written.items() if planted(place).encode() in data]
            assert not leaked, f"{place} written to {leaked}"
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        redacted = summary["config"]["storage"]["options"]
        assert redacted["secret"] == redacted["accountKey"] == redacted["credentials"] == "***"
        assert redacted["headers"]["Authorization"] == "***" and redacted["client_kwargs"]["region_name"] == "us-east-1"
        assert summary["n_failed_by_reason"] == {"forbidden_uri": 2}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --- Redaction ------------------------------------------------------------------------------------


def test_config_redaction_masks_every_credential_spelling_and_everything_under_it():
    from pipeline.config import JobConfig

    options = {
        "key": "s-key", "secret": "s-secret", "token": "s-token", "session_token": "s-session",
        "account_key": "s-account", "connection_string": "s-conn", "accountKey": "s-camel", "sasToken": "s-sas",
        "SecretAccessKey": "s-pascal", "x-api-key": "s-kebab", "password": "s-password",
        "headers": {"Authorization": "Basic s-basic", "X-Trace": "Bearer s-bearer", "Accept": "audio/wav"},
        "credentials": {"user": "s-nested-user", "list": ["s-nested-list"]},
        "client_kwargs": {"aws_secret_access_key": "s-ck", "endpoint_url": "https://u:s-url@minio.local:9000/?sig=s-q",
                          "region_name": "eu-west-1"},
    }
    cfg = JobConfig.model_validate({"storage": {"options": options}, "task": {"keywords": ["secret", "token"]}})
    redacted = cfg.redacted()
    assert "s-" not in json.dumps(redacted["storage"])
    kept = redacted["storage"]["options"]
    assert kept["client_kwargs"]["region_name"] == "eu-west-1" and kept["headers"]["Accept"] == "audio/wav"
    assert kept["client_kwargs"]["endpoint_url"] == "https://***@minio.local:9000/?sig=***"
    # settings whose names only contain a secret-looking word are kept, and so are keywords
    assert redacted["engine"]["vllm"]["max_output_tokens_per_s"] == 8.0
    assert redacted["task"]["keywords"] == ["secret", "token"] and redacted["task"]["max_keywords"] == 50


def test_redact_uri_masks_user_info_and_query_tokens_and_keeps_the_object():
    from pipeline.scrub import redact_uri

    presigned = ("https://b.s3.amazonaws.com/calls/a.wav?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1"
                 "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-Signature=abc&X-Amz-Security-Token=tok")
    assert redact_uri(presigned) == (
        "https://b.s3.amazonaws.com/calls/a.wav?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
        "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-Signature=***&X-Amz-Security-Token=***")
    assert redact_uri("https://user:pw@host:8443/a.wav") == "https://***@host:8443/a.wav"
    assert redact_uri("https://ghp_tokenonly@host/a.wav") == "https://***@host/a.wav"
    assert redact_uri("https://acct.blob.core.windows.net/c/a.wav?sv=2024&sig=xyz") == (
        "https://acct.blob.core.windows.net/c/a.wav?sv=2024&sig=***")
    for plain in ("s3://bucket/a.wav", "/data/a b.wav", "memory://x/y.wav", None):
        assert redact_uri(plain) == plain  # unchanged: ids derived from them do not move


def test_redact_text_masks_uris_in_messages_and_registered_secrets():
    from pipeline.scrub import redact_text, register_secret

    register_secret("hunter2-registered-secret", "short")
    message = "403 reading 'https://u:pw@h/a.wav?token=t0k': denied; key hunter2-registered-secret; short"
    assert redact_text(message) == "403 reading 'https://***@h/a.wav?token=***': denied; key ***; short"


def test_log_scrubber_masks_credentials_in_messages_and_tracebacks(caplog):
    import logging

    from pipeline.scrub import install_log_scrubber, register_secret

    install_log_scrubber()
    register_secret("scrub-me-registered-42")
    log = logging.getLogger("quarry.test")
    with caplog.at_level(logging.INFO, logger="quarry.test"):
        log.info("fetching %s with %s", "https://a:pw-in-url@h/x.wav?sig=s1", "scrub-me-registered-42")
        try:
            raise RuntimeError("boom at https://b:pw-in-trace@h/y.wav")
        except RuntimeError:
            log.exception("failed")
    text = caplog.text
    assert "pw-in-url" not in text and "s1" not in text and "scrub-me-registered-42" not in text
    assert "pw-in-trace" not in text and "https://***@h/y.wav" in text


# --- What a job may read ----------------------------------------------------------------------------


def _prepare(manifest_uri: str, audio_cells: list, allowed: list[str] | None = None):
    import pyarrow as pa

    from pipeline.config import load_config
    from pipeline.manifest import JSONL_SCHEMA, Manifest, PrepareStage, extra_fields
    from pipeline.storage import store_root

    cfg = load_config(None, ["engine.name=fake"])
    schema = pa.schema([pa.field("id", pa.string()), pa.field("audio", pa.string())])
    manifest = Manifest(manifest_uri, "jsonl", schema, tuple(extra_fields(schema, "jsonl", cfg.input.columns)),
                        n_rows=len(audio_cells), fingerprint="test", storage_options={},
                        allowed_prefixes=tuple(allowed) if allowed is not None else (store_root(manifest_uri),))
    lines = [json.dumps({"id": str(n), "audio": a}).encode() for n, a in enumerate(audio_cells)]
    batch = pa.table([pa.array(range(len(lines)), pa.int64()), pa.array(lines, pa.binary()),
                      pa.array([len(x) for x in lines], pa.int64())], schema=JSONL_SCHEMA)
    return {r["id"]: r for r in PrepareStage(manifest, cfg.input.columns, cfg.task).rows(batch)}


def test_a_manifest_on_s3_reads_its_own_bucket_only():
    cells = ["audio/a.wav", "../other/b.wav", "s3://bucket/c.wav", "s3a://bucket/d.wav", "file:///etc/passwd",
             "/etc/passwd", "s3://bucket-evil/e.wav", "s3://other-bucket/f.wav", "../../../other-bucket/g.wav",
             "http://169.254.169.254/latest/meta-data/", "https://user:pw@evil.example/h.wav?sig=tok",
             "zip://inner.wav::s3://bucket/archive.zip", "memory://bucket/i.wav", "gs://bucket/j.wav"]
    rows = _prepare("s3://bucket/manifests/m.jsonl", cells)
    statuses = {cells[int(i)]: r["status"] for i, r in rows.items()}
    assert [c for c, s in statuses.items() if s == "ok"] == cells[:4] + ["../../../other-bucket/g.wav"]
    assert rows["1"]["audio"] == "s3://bucket/other/b.wav"  # dots resolved: what is checked is what is read
    assert rows["8"]["audio"] == "s3://bucket/other-bucket/g.wav"  # .. never climbs out of the bucket
    for i in range(4, len(cells)):
        if i == 8:
            continue
        assert rows[str(i)]["status"] == "forbidden_uri", cells[i]
        assert "line" in rows[str(i)]["error"]
    assert "pw" not in rows["10"]["error"] and "tok" not in rows["10"]["error"]
    assert "chained" in rows["11"]["error"]


def test_allowed_prefixes_match_whole_path_segments_and_links_are_followed(tmp_path):
    from pipeline.storage import refusal

    allowed = ["s3://archive/calls/", str(tmp_path / "audio")]
    assert refusal("s3://archive/calls/2026/a.wav", allowed) is None
    assert refusal("s3://archive/calls-private/a.wav", allowed)  # a prefix is whole segments
    assert refusal("s3://archive/other/a.wav", allowed)
    (tmp_path / "audio").mkdir()
    (tmp_path / "secret.wav").write_bytes(b"x")
    (tmp_path / "audio" / "ok.wav").write_bytes(b"x")
    os.symlink(tmp_path / "secret.wav", tmp_path / "audio" / "escape.wav")
    assert refusal(str(tmp_path / "audio" / "ok.wav"), allowed) is None
    assert "link" in refusal(str(tmp_path / "audio" / "escape.wav"), allowed)
    assert refusal(str(tmp_path / "audio-2" / "x.wav"), allowed)
    assert refusal(f"file://{tmp_path}/audio/ok.wav", allowed) is None


def test_audio_written_by_discover_may_come_from_the_listed_prefix_only():
    from pipeline.config import load_config
    from pipeline.discover import listing_root

    assert listing_root("s3://archive/calls/2026-11-*/*.wav") == "s3://archive/calls/"
    assert listing_root("s3://archive/calls/") == "s3://archive/calls/"
    cfg = load_config(None).reading_from("s3://archive/calls/")
    assert cfg.input.allowed_prefixes == ["s3://archive/calls/"]
    fixed = load_config(None, ["input.allowed_prefixes=[s3://mine/]"]).reading_from("s3://archive/calls/")
    assert fixed.input.allowed_prefixes == ["s3://mine/"]  # a configured list wins


# --- Clusters are not left open ---------------------------------------------------------------------


def test_local_ray_that_would_not_bind_to_loopback_stops_the_job(monkeypatch):
    import pytest
    import ray

    from pipeline import plan
    from pipeline.config import load_config

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.1.2.3")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(plan.LocalRayExposed, match="10.1.2.3"):
        plan.init_ray(load_config(None, ["engine.name=fake"]))
    assert calls == ["init", "shutdown"]


def test_kuberay_examples_require_a_token_for_the_job_api():
    """Pods hold S3 credentials: a cluster that serves its job API (arbitrary code) on the pod
    network must demand a token; the README says how to reach it (port-forward and the token)."""
    paths = sorted((REPO / "jobs").glob("*/rayjob.yaml"))
    assert len(paths) == 3
    for path in paths:
        spec = yaml.safe_load(path.read_text())["spec"]["rayClusterSpec"]
        assert spec.get("authOptions", {}).get("mode") == "token", f"{path}: token auth is off"
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), path
        readme = (path.parent / "README.md").read_text()
        assert "kubectl port-forward" in readme and "RAY_AUTH_TOKEN" in readme, f"{path.parent}/README.md"
