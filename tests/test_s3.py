"""Manifest and audio in a real S3-compatible server; results written back to the bucket."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq

from pipeline.config import load_config
from pipeline.plan import run_job

from .conftest import EVAL_DIR, eval_rows


def test_job_reads_manifest_and_audio_from_s3_and_writes_results_back(ray_session, s3_bucket, s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    rows = eval_rows("en")[:3]
    lines = []
    for r in rows:
        s3.upload_file(str(EVAL_DIR / r["audio"]), s3_bucket, f"in/{r['audio']}")
        lines.append({"id": r["id"], "audio": r["audio"], "reference": r["reference"], "language": "en"})
    # one absolute s3:// URI and one missing object beside the relative paths
    lines.append({"id": "absolute", "audio": f"s3://{s3_bucket}/in/{rows[0]['audio']}"})
    lines.append({"id": "missing", "audio": f"s3://{s3_bucket}/in/audio/nope.flac"})
    s3.put_object(Bucket=s3_bucket, Key="in/manifest.jsonl", Body="".join(json.dumps(x) + "\n" for x in lines).encode())

    cfg = load_config(None, ["engine.name=fake"])
    result = run_job(cfg, f"s3://{s3_bucket}/in/manifest.jsonl", f"s3://{s3_bucket}/out/run1")

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/run1/")["Contents"]]
    assert "out/run1/summary.json" in keys
    parts = [k for k in keys if k.startswith("out/run1/transcripts/") and k.endswith(".parquet")]
    assert parts and not [k for k in keys if "_tmp-" in k]
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=s3_bucket, Key=parts[0])["Body"].read()))
    status = dict(zip(table.column("id").to_pylist(), table.column("status").to_pylist()))
    assert status == {rows[0]["id"]: "ok", rows[1]["id"]: "ok", rows[2]["id"]: "ok", "absolute": "ok", "missing": "missing_object"}
    summary = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/run1/summary.json")["Body"].read())
    assert summary["n_input"] == 5 and summary["n_ok"] == 4
    assert result.summary.files[0].startswith(f"s3://{s3_bucket}/out/run1/transcripts/")
    # the test credentials never reach the outputs
    blob = json.dumps(summary) + table.to_pandas().to_json()
    assert "quarry-test-secret" not in blob and "quarry-test-key" not in blob
