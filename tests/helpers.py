"""Small helpers the tests share: manifests and reading outputs back."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def read_transcripts(output: Path):
    return pq.read_table(output / "transcripts").to_pandas()


def read_summary(output: Path) -> dict:
    return json.loads((output / "summary.json").read_text())
