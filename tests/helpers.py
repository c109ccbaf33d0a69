"""Small helpers the tests share: manifests and reading outputs back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def read_transcripts(output: Path):
    return pq.read_table(output / "transcripts").to_pandas()


def read_summary(output: Path) -> dict:
    return json.loads((output / "summary.json").read_text())


def quarry_run(manifest, out, *sets: str, env: dict | None = None) -> subprocess.Popen:
    """``quarry run`` in its own process group (so a test can kill the driver and its local Ray
    together), with the fake engine and the given ``--set`` overrides; output is captured."""
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--manifest", str(manifest), "--output", str(out),
           "--set", "engine.name=fake", *[a for s in sets for a in ("--set", s)]]
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def searchable_files(*roots: Path) -> dict[Path, bytes]:
    """Every regular file under ``roots`` as bytes to search for a secret: Parquet files as their
    decoded rows (their pages are compressed, so their raw bytes would hide a string), the rest raw."""
    found: dict[Path, bytes] = {}
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            if path.suffix == ".parquet" and data[:4] == b"PAR1":
                data += json.dumps(pq.read_table(path).to_pylist(), default=str, ensure_ascii=False).encode()
            found[path] = data
    return found
