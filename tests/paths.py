"""Where the tests' files live: defined once, inside the repository (a clone needs nothing beside it)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The real-speech evaluation clips, with each clip's source and license in manifest.jsonl
# (tests/data/eval/README.md).
EVAL_DIR = REPO / "tests" / "data" / "eval"
