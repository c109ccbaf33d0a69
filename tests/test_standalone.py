"""A clone stands on its own: `make test-fast` and `make demo` pass in a copy of the tracked files alone.

The repository's tracked files (`git ls-files`) are copied into an empty temporary folder with
nothing beside it (no `shared/`, no checkout), and `make test-fast`, then `make demo`, run there. The point checked is
that no file outside the repository is needed: data, configs and fixtures all travel with a clone.

To keep CI's time sane the copy reuses the virtualenv this test runs in instead of building its own:
`VENV=` is derived at run time from `sys.prefix`, `make -o $(VENV)/.base` keeps make from
reinstalling into it (which would point its editable install at the short-lived copy), and
`PYTHONPATH` puts the copy's own code first. Quarry's cache starts empty in the copy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .paths import REPO
from .test_packaging import _copy_tracked_files


@pytest.mark.slow
def test_make_test_fast_and_demo_pass_in_a_copy_of_the_tracked_files_alone(tmp_path):
    if sys.prefix == sys.base_prefix:
        pytest.fail("run the tests from the project's virtualenv (make test): this test reuses it", pytrace=False)
    clone = tmp_path / "quarry"
    _copy_tracked_files(clone, require_git=True)
    assert sorted(p.name for p in clone.parent.iterdir()) == ["quarry"]  # nothing beside it: no shared/ either
    assert (clone / "tests" / "data" / "eval" / "manifest.jsonl").is_file()

    venv = Path(sys.prefix)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "QUARRY_CACHE_DIR", "RAY_ADDRESS", "VIRTUAL_ENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
           and not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(clone)
    make = ["make", "-o", f"{venv}/.base", f"VENV={venv}", f"PYTHON={sys.executable}"]
    done = subprocess.run([*make, "test-fast"], cwd=clone, env=env, capture_output=True, text=True, timeout=3000)

    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "pytest -q -m" in done.stdout and re.search(r"\b\d+ passed\b", log), log[-6000:]

    demo = subprocess.run([*make, "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-4000:]
    assert (clone / "out" / "demo" / "summary.json").is_file() and any((clone / "out" / "demo" / "transcripts").glob("*.parquet"))
