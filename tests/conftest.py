"""Shared fixtures: the eval recordings (tests/data/eval), one local Ray per session, a real S3 server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .paths import EVAL_DIR, REPO  # the eval recordings' one location (tests/data/eval)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# S3 settings must be in the environment before Ray starts, so its workers inherit them.
S3_PORT = _free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
os.environ.update(
    AWS_ACCESS_KEY_ID="quarry-test-key",
    AWS_SECRET_ACCESS_KEY="quarry-test-secret-do-not-log",
    AWS_ENDPOINT_URL=S3_ENDPOINT,
    AWS_DEFAULT_REGION="us-east-1",
    HF_HUB_OFFLINE="1",
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    RAY_USAGE_STATS_ENABLED="0",
)
os.environ.setdefault("QUARRY_CACHE_DIR", str(REPO / ".cache" / "quarry"))


def pytest_runtest_setup(item):
    """A test marked ``gpu`` fails loudly when run without a CUDA GPU (deselect with -m 'not gpu')."""
    if item.get_closest_marker("gpu") is None:
        return
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        pytest.fail("this test needs a CUDA GPU and none is visible; deselect it with -m 'not gpu'", pytrace=False)


def eval_rows(language: str | None = None) -> list[dict]:
    if not (EVAL_DIR / "manifest.jsonl").exists():
        raise FileNotFoundError(f"the eval recordings are missing: {EVAL_DIR} (tests/data/eval in the repository)")
    rows = [json.loads(line) for line in (EVAL_DIR / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if language is None or r["language"] == language]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (start-up costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto_server) on 127.0.0.1; yields its endpoint URL."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server is not installed: make setup installs moto[server]")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(S3_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", S3_PORT), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    yield S3_ENDPOINT
    proc.terminate()
    proc.wait(10)


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket on the test S3 server; yields its name."""
    import boto3

    name = "quarry-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    yield name
