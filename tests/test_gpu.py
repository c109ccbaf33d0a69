"""On a GPU machine (`pytest -m gpu`): the same pipeline with vLLM on CUDA, one replica per GPU.

Selected without a GPU, these fail loudly (conftest), never skip. They use the tiny Granite
checkpoint built here, so they need no hub; with the real weights on disk, point
QUARRY_GRANITE_PATH at them to check real text too.
"""

from __future__ import annotations

import os
import shutil

import pytest

from pipeline.config import load_config
from pipeline.plan import run_job

from .conftest import EVAL_DIR, eval_rows
from .helpers import read_summary, read_transcripts, write_jsonl
from .tiny_models import build_tiny_granite, require_vllm

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]


def test_pipeline_on_cuda_spreads_over_every_gpu(tmp_path, ray_session):
    require_vllm()
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    assert gpus >= 1, "Ray sees no GPU"
    model = os.environ.get("QUARRY_GRANITE_PATH") or str(build_tiny_granite(tmp_path / "granite"))
    rows = eval_rows("en")[:8]
    for r in rows:
        shutil.copy(EVAL_DIR / r["audio"], tmp_path)
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": r["id"], "audio": r["audio"].rsplit("/", 1)[-1], "reference": r["reference"], "language": "en"}
        for r in rows])
    cfg = load_config(None, ["engine.name=vllm", f"engine.model={model}", "engine.gpus_per_replica=1",
                             "engine.cpus_per_replica=0.5", "engine.vllm.gpu_memory_utilization=0.5",
                             "engine.vllm.enforce_eager=true"])
    result = run_job(cfg, str(manifest), str(tmp_path / "out"))
    out = read_transcripts(tmp_path / "out")
    assert sorted(out["id"]) == sorted(r["id"] for r in rows) and (out["status"] == "ok").all()
    assert read_summary(tmp_path / "out")["n_ok"] == len(rows) == result.summary.n_input
    if os.environ.get("QUARRY_GRANITE_PATH"):
        assert result.summary.scores.by_language["en"]["wer"].rate < 0.15
