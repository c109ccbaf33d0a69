"""A job's local Ray listens on loopback only, and secrets given to a job reach no log or output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import psutil

from .conftest import EVAL_DIR, REPO, eval_rows
from .helpers import write_jsonl

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def test_local_ray_listens_on_loopback_only_and_logs_no_secret(tmp_path):
    clip = eval_rows("en")[0]
    shutil.copy(EVAL_DIR / clip["audio"], tmp_path)
    name = clip["audio"].rsplit("/", 1)[-1]
    # slow-engine rows keep the job alive long enough to look at its sockets
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": f"slow-engine-{i}", "audio": name} for i in range(40)])
    secret = "quarry-sec-7f3a9-do-not-log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # quarry sets it itself
    env.update(AWS_SECRET_ACCESS_KEY=secret, AWS_SESSION_TOKEN=secret)
    cmd = [sys.executable, "-m", "pipeline.cli", "-v", "run", "--manifest", str(manifest), "--output",
           str(tmp_path / "out"), "--set", "engine.name=fake", "--set", "engine.batch_size=1",
           "--set", f"storage.options={{client_kwargs: {{region_name: us-east-1}}, secret: {secret}}}"]
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
    assert job.returncode == 0, log[-3000:]
    assert any(name.startswith(("gcs", "raylet")) for name in seen.values()), seen  # we did see Ray's servers
    exposed = {addr: name for addr, name in seen.items() if addr[0] not in LOOPBACK}
    assert not exposed, f"listening beyond loopback: {exposed}"
    outputs = [log, (tmp_path / "out" / "summary.json").read_text(), (tmp_path / "out" / "_quarry_job.json").read_text()]
    outputs += [p.read_bytes().decode("latin-1") for p in (tmp_path / "out").rglob("*.parquet")]
    assert all(secret not in blob for blob in outputs)
    assert json.loads(outputs[1])["config"]["storage"]["options"]["secret"] == "***"
