"""The ready-made jobs in jobs/ (pipeline/jobs/, `quarry job`), end to end on the eval recordings.

* nightly-archive (offline whisper): two nights, the second transcribes only the new objects; the
  canary gate passes while the canary's WER holds and fails (exit 1, figures printed, last_good.json
  untouched) once its references are corrupted.
* call-center (offline whisper, real text): generated stereo calls, one speaker per channel, with
  and without cross-talk; campaign keywords joined from a CSV; analytics consistent with the audio.
* dataset-labeling (fake engine: the mechanics): filters, exports loaded back by lhotse and datasets,
  subtitles, a rerun that resumes.
* Each job README's `ray job submit` line, run against a Ray head started here (`ray start --head`
  with its job server on 127.0.0.1); its runtime env installs Quarry from the uploaded working
  directory, as on a plain Ray cluster.
* The job files themselves: cluster and local versions differ only in URIs and resources, and the
  READMEs and KubeRay RayJobs run the same commands.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.jobs import run_job_file
from pipeline.jobs.call_center import (analytics_schema, call_analytics, join_campaign_keywords, keyword_hits,
                                       read_campaigns)
from pipeline.jobs.nightly import canary_passes
from pipeline.jobs.spec import CallCenterJob, DatasetLabelingJob, JobError, NightlyArchiveJob, load_job

from .conftest import EVAL_DIR, REPO, eval_rows
from .helpers import read_transcripts, write_jsonl

RATE = 16_000
JOBS = ("nightly-archive", "call-center", "dataset-labeling")
VENV_BIN = Path(sys.executable).parent
# Ray sets this while it builds a job's pip environment: the node's copy of the uploaded working
# directory (pip expands ${VAR} in the requirements Ray writes).
WORKING_DIR_VAR = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"


def _eval(row_id: str) -> dict:
    return next(r for r in eval_rows() if r["id"] == row_id)


def _audio(row: dict) -> np.ndarray:
    samples, rate = sf.read(EVAL_DIR / row["audio"], dtype="float32")
    assert rate == RATE and samples.ndim == 1, row["id"]
    return samples


def _write_job(folder: Path, spec: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: `make test` installs the labeling extra", pytrace=False)


# --- The job files -----------------------------------------------------------------------------


URI_FIELDS = {"config", "audio", "output_root", "manifest", "output", "campaigns"}
RESOURCE_SECTIONS = {"ray", "engine", "storage"}  # and audio.decode_cpus


@pytest.mark.parametrize("name", JOBS)
def test_cluster_and_local_job_files_differ_only_in_uris_and_resources(name, monkeypatch):
    monkeypatch.delenv("QUARRY_OUTPUT_ROOT", raising=False)
    folder = REPO / "jobs" / name
    cluster, local = load_job(folder / "job.yaml"), load_job(folder / "job.local.yaml")
    assert type(cluster) is type(local) and cluster.kind == local.kind == name

    c, lo = cluster.model_dump(), local.model_dump()
    assert c.keys() == lo.keys()
    for key in c:
        if key in URI_FIELDS:
            continue
        if key == "canary":  # its manifest is a URI, its margin is not
            assert c[key]["max_wer_regression"] == lo[key]["max_wer_regression"]
            assert c[key]["manifest"].startswith("s3://") and Path(lo[key]["manifest"]).exists()
            continue
        assert c[key] == lo[key], f"{name}: {key} differs between job.yaml and job.local.yaml"
    data_fields = [k for k in ("audio", "manifest") if k in c]
    assert data_fields and all(c[k].startswith("s3://") for k in data_fields)
    assert all(Path(lo[k]).exists() for k in data_fields)  # the local inputs ship with the repo
    out_key = "output_root" if "output_root" in c else "output"
    assert c[out_key] == f"s3://bucket/quarry/{name}" and lo[out_key] == str(REPO / "out" / "jobs" / name)

    cluster_cfg = load_config(cluster.config).model_dump(mode="json")
    local_cfg = load_config(local.config).model_dump(mode="json")
    assert cluster_cfg["engine"]["name"] == "vllm" and cluster_cfg["engine"]["gpus_per_replica"] >= 1
    assert "granite" in cluster_cfg["engine"]["model"] and cluster_cfg["ray"]["address"] == "auto"
    assert local_cfg["engine"]["name"] == "whisper" and local_cfg["engine"]["model"] == "tiny.en"
    assert local_cfg["ray"]["address"] is None and local_cfg["engine"]["gpus_per_replica"] == 0
    for cfg in (cluster_cfg, local_cfg):
        for section in RESOURCE_SECTIONS:
            cfg.pop(section)
        cfg["audio"].pop("decode_cpus")
    assert cluster_cfg == local_cfg


def _readme_command(name: str, prefix: str) -> str:
    """The shell command in the job's README that starts with ``prefix``, continuation lines joined."""
    lines = (REPO / "jobs" / name / "README.md").read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
    assert start is not None, f"jobs/{name}/README.md has no line starting with {prefix!r}"
    command = [lines[start]]
    while command[-1].rstrip().endswith("\\"):
        start += 1
        command.append(lines[start])
    return "\n".join(command)


def _entrypoint(command: str) -> str:
    return " ".join(command.split(" -- ", 1)[1].split())


@pytest.mark.parametrize("name", JOBS)
def test_readme_and_rayjob_run_the_same_commands(name):
    readme = (REPO / "jobs" / name / "README.md").read_text()
    assert f".venv/bin/quarry job jobs/{name}/job.local.yaml" in readme

    local_submit = _readme_command(name, "RAY_AUTH_MODE=token ray job submit")
    assert "--address http://127.0.0.1:8265 --working-dir ." in local_submit
    runtime_env = json.loads(re.search(r"--runtime-env-json '([^']+)'", local_submit).group(1))
    assert runtime_env["env_vars"]["QUARRY_OUTPUT_ROOT"] == "/tmp/quarry-jobs"
    # Quarry is installed from the uploaded working directory, so any Ray cluster of the pinned
    # version runs the line (tests/test_packaging.py checks the version), not only Quarry's image.
    assert runtime_env["pip"] == [f"{WORKING_DIR_VAR}[whisper]"]
    assert _entrypoint(local_submit) == f"quarry job jobs/{name}/job.local.yaml"

    cluster_submit = _readme_command(name, "ray job submit --address http://HEAD:8265")
    assert _entrypoint(cluster_submit) == f"quarry job jobs/{name}/job.yaml"
    cluster_env = json.loads(re.search(r"--runtime-env-json '([^']+)'", cluster_submit).group(1))
    assert cluster_env["pip"] == [f"{WORKING_DIR_VAR}[gpu]"]  # the same line, with the GPU engine

    rayjob = yaml.safe_load((REPO / "jobs" / name / "rayjob.yaml").read_text())
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["entrypoint"] == _entrypoint(cluster_submit)  # the same command as ray job submit
    assert spec["shutdownAfterJobFinishes"] is True
    rayjob_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert rayjob_env["env_vars"] == cluster_env["env_vars"] and rayjob_env["working_dir"].startswith("s3://")
    assert "pip" not in rayjob_env  # the RayJob's image has Quarry installed (Dockerfile, `make image`)
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (gpu_group,) = cluster["workerGroupSpecs"]
    (worker,) = gpu_group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_bad_job_files_are_refused_with_the_reason(tmp_path, monkeypatch):
    base = {"kind": "call-center", "config": "c.yaml", "manifest": "m.jsonl", "output": "out", "campaigns": "x.csv"}
    with pytest.raises(JobError, match="unknown key 'campain_column'"):
        load_job(_write_job(tmp_path / "a", {**base, "campain_column": "c"}))
    with pytest.raises(JobError, match="'kind' must be one of"):
        load_job(_write_job(tmp_path / "b", {**base, "kind": "nightly"}))
    with pytest.raises(JobError, match="QUARRY_TEST_UNSET_ROOT is not set"):
        load_job(_write_job(tmp_path / "c", {**base, "output": "${QUARRY_TEST_UNSET_ROOT}/x"}))
    with pytest.raises(JobError, match="'canary.max_wer_regression'"):
        load_job(_write_job(tmp_path / "d", {"kind": "nightly-archive", "config": "c", "audio": "a",
                                             "output_root": "o", "canary": {"manifest": "m",
                                                                            "max_wer_regression": "lots"}}))

    monkeypatch.setenv("QUARRY_TEST_ROOT", "s3://elsewhere")
    job = load_job(_write_job(tmp_path / "e", {**base, "output": "${QUARRY_TEST_ROOT:-out}/calls"}))
    assert isinstance(job, CallCenterJob)
    assert job.output == "s3://elsewhere/calls"  # URIs are kept as they are
    assert job.manifest == str(tmp_path / "e" / "m.jsonl")  # paths resolve against the job's folder

    runner = CliRunner()
    labeling = _write_job(tmp_path / "f", {"kind": "dataset-labeling", "config": "c.yaml", "manifest": "m.jsonl",
                                           "output": "out"})
    assert isinstance(load_job(labeling), DatasetLabelingJob)
    result = runner.invoke(main, ["job", str(labeling), "--date", "2026-11-23"])
    assert result.exit_code == 2 and "--date applies to nightly-archive jobs only" in result.output
    nightly = _write_job(tmp_path / "g", {"kind": "nightly-archive", "config": "c.yaml", "audio": "a",
                                          "output_root": "o"})
    assert isinstance(load_job(nightly), NightlyArchiveJob)
    result = runner.invoke(main, ["job", str(nightly), "--date", "23/11/2026"])
    assert result.exit_code == 2 and "--date must be YYYY-MM-DD" in result.output
    result = runner.invoke(main, ["job", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "job file not found" in result.output


# --- call-center pieces without Ray ------------------------------------------------------------


def test_keyword_hits_are_case_insensitive_whole_words_and_phrases():
    text = "Refund please. I want a REFUND, not refunds; the Fast Track plan,\nfast   track it. Airplane."
    hits = {h["keyword"]: h["count"] for h in keyword_hits(text, ["refund", "fast track", "plan", "lane"])}
    assert hits == {"refund": 2, "fast track": 2, "plan": 1, "lane": 0}


def test_campaign_keywords_join_streams_the_manifest_and_names_unknown_campaigns(tmp_path):
    (tmp_path / "campaigns.csv").write_text(
        'campaign,keywords\nretention,"refund; cancel"\nretention,Cancel,upgrade\nsupport,"router, reboot"\n,orphan\n')
    campaigns = read_campaigns(str(tmp_path / "campaigns.csv"))
    # ';' and ',' both separate (unquoted too); a campaign on two lines gets both; duplicates (any case) once
    assert campaigns == {"retention": ["refund", "cancel", "upgrade"], "support": ["router", "reboot"]}

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "calls.csv").write_text(
        "id,audio,campaign,keywords,agent_id\n"
        "c1,a/1.wav,retention,,007\n"
        "c2,/abs/2.wav,Support,modem,12\n"
        "c3,3.wav,winback,,3\n"
        "c4,4.wav,,,4\n")
    cfg = load_config(None)
    uri, n_rows, unknown = join_campaign_keywords(str(tmp_path / "m" / "calls.csv"), str(tmp_path / "out"),
                                                  campaigns, "campaign", cfg)
    rows = [json.loads(line) for line in Path(uri).read_text().splitlines()]
    assert n_rows == 4 and [r["id"] for r in rows] == ["c1", "c2", "c3", "c4"]
    assert rows[0]["keywords"] == ["refund", "cancel", "upgrade"]
    assert rows[1]["keywords"] == ["modem", "router", "reboot"]  # the row's own first; campaign matched any case
    assert rows[2]["keywords"] == [] and rows[3]["keywords"] == []
    assert unknown == {"winback": 1, "(none)": 1}
    assert rows[0]["audio"] == str(tmp_path / "m" / "a" / "1.wav") and rows[1]["audio"] == "/abs/2.wav"
    assert rows[0]["agent_id"] == "007"  # CSV values stay text, as the pipeline reads them
    with pytest.raises(JobError, match="no 'team' column"):
        join_campaign_keywords(str(tmp_path / "m" / "calls.csv"), str(tmp_path / "out2"), campaigns, "team", cfg)


def test_call_analytics_figures_from_a_transcript_row():
    row = {"id": "c", "audio": "a.wav", "status": "ok", "duration_s": 30.0, "overlap_s": 2.0, "channel_texts": [
        {"channel": "agent", "text": "one two three four five six", "speaking_s": 12.0},
        {"channel": "customer", "text": "refund now refund", "speaking_s": 6.0},
    ]}
    out = call_analytics(row, "retention", ["refund", "cancel"], ["agent", "customer"])
    assert (out["talk_s_agent"], out["words_agent"], out["wpm_agent"]) == (12.0, 6, 30.0)
    assert (out["talk_s_customer"], out["words_customer"], out["wpm_customer"]) == (6.0, 3, 30.0)
    assert out["speech_s"] == 16.0 and out["silence_s"] == 14.0 and out["silence_share"] == pytest.approx(14 / 30)
    assert out["keyword_hits"] == [{"keyword": "refund", "count": 2}, {"keyword": "cancel", "count": 0}]
    assert out["keyword_hits_total"] == 2
    failed = call_analytics({**row, "status": "decode_error", "channel_texts": None}, "x", ["refund"], ["agent"])
    assert failed["status"] == "decode_error" and "keyword_hits" not in failed and "talk_s_agent" not in failed


# --- nightly-archive ---------------------------------------------------------------------------


def test_canary_gate_compares_with_the_last_good_run_plus_the_margin():
    last = {"rate": 0.10}
    assert canary_passes(0.37, 0, None, 0.01)  # a first run passes and becomes the last good one
    assert canary_passes(0.05, 0, last, 0.01)
    assert canary_passes(0.10 + 0.01, 0, last, 0.01)  # at the limit
    assert not canary_passes(0.1101, 0, last, 0.01)
    assert not canary_passes(0.05, 0, last, -0.06)  # a negative margin asks for an improvement
    assert not canary_passes(0.0, 1, None, 0.01)  # a canary row that failed fails the gate


ARCHIVE_NIGHT1 = ["librivox_en_sense_sensibility-0880", "librivox_en_sense_sensibility-0930", "pocketsphinx_goforward"]
ARCHIVE_NIGHT2 = ["fleurs_en_004", "librivox_en_sense_sensibility-0890"]
CANARY = ["picovoice_en", "librispeech_61-70968-0000"]


@pytest.mark.slow
def test_nightly_archive_is_incremental_and_its_canary_gate_fails_a_wer_regression(ray_session, tmp_path):
    archive = tmp_path / "archive"
    (archive / "2026-11-21").mkdir(parents=True)
    for rid in ARCHIVE_NIGHT1:
        shutil.copy(EVAL_DIR / _eval(rid)["audio"], archive / "2026-11-21")
    canary_rows = [{"id": f"canary-{rid}", "audio": str(EVAL_DIR / _eval(rid)["audio"]),
                    "reference": _eval(rid)["reference"], "language": "en"} for rid in CANARY]
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    write_jsonl(job_dir / "canary.jsonl", canary_rows)
    job = _write_job(job_dir, {
        "kind": "nightly-archive", "config": str(REPO / "jobs" / "nightly-archive" / "config.local.yaml"),
        "audio": "../archive", "output_root": "../runs",
        "canary": {"manifest": "canary.jsonl", "max_wer_regression": 0.01},
    })
    runs, last_good = tmp_path / "runs", tmp_path / "runs" / "canary" / "last_good.json"

    first = run_job_file(job, run_date="2026-11-21", echo=None)
    assert first.exit_code == 0 and first.canary.passed and first.canary.last_good is None
    assert (first.n_found, first.n_done_before, first.n_todo) == (3, 0, 3)
    assert first.summary.n_ok == 3
    assert first.canary.rate < 0.2  # tiny.en on two clean clips
    assert json.loads(last_good.read_text())["run_date"] == "2026-11-21"
    assert json.loads(last_good.read_text())["rate"] == first.canary.rate

    (archive / "2026-11-22").mkdir()
    for rid in ARCHIVE_NIGHT2:
        shutil.copy(EVAL_DIR / _eval(rid)["audio"], archive / "2026-11-22")
    second = run_job_file(job, run_date="2026-11-22", echo=None)
    assert (second.n_found, second.n_done_before, second.n_todo) == (5, 3, 2)
    night1 = read_transcripts(runs / "run_date=2026-11-21")
    night2 = read_transcripts(runs / "run_date=2026-11-22")
    assert {Path(a).parent.name for a in night1["audio"]} == {"2026-11-21"}
    assert {Path(a).parent.name for a in night2["audio"]} == {"2026-11-22"} and len(night2) == 2
    assert (night2["status"] == "ok").all() and night2["text"].str.len().min() > 0
    assert second.exit_code == 0 and second.canary.passed
    assert second.canary.last_good["run_date"] == "2026-11-21"
    assert second.canary.rate == pytest.approx(first.canary.rate, abs=0.01)
    assert json.loads(last_good.read_text())["run_date"] == "2026-11-22"  # a good run is recorded

    # A regression: the canary's references no longer match what is said.
    recorded = last_good.read_bytes()
    wrong = _eval("fleurs_en_005")["reference"]
    write_jsonl(job_dir / "canary.jsonl", [{**r, "reference": wrong} for r in canary_rows])
    result = CliRunner().invoke(main, ["job", str(job), "--date", "2026-11-23"])
    assert result.exit_code == 1, result.output
    canary_summary = json.loads((runs / "canary" / "run_date=2026-11-23" / "summary.json").read_text())
    regressed = canary_summary["scores"]["overall"]["wer"]["rate"]
    assert regressed > second.canary.rate + 0.01
    assert "FAILED" in result.output and "canary gate failed" in result.output
    for figure in (regressed, second.canary.rate, 0.01, second.canary.rate + 0.01):
        assert f"{figure:.4f}" in result.output  # the figures, printed
    assert last_good.read_bytes() == recorded  # a failed run is not the last good one
    assert "0 new" in result.output  # and the archive had nothing new that night


# --- call-center -------------------------------------------------------------------------------


# id: (agent clip, customer clip, customer starts this many seconds after the agent stops (negative:
# before), campaign)
CALLS = {
    "call-a": ("fleurs_en_002", "librispeech_2412-153948-0000", -2.0, "retention"),
    "call-b": ("fleurs_en_005", "fleurs_en_004", 1.0, "support"),
}
TAIL_S = 0.5


def _stereo_call(agent: np.ndarray, customer: np.ndarray, gap_s: float) -> np.ndarray:
    start = len(agent) + int(gap_s * RATE)
    stereo = np.zeros((start + len(customer) + int(TAIL_S * RATE), 2), np.float32)
    stereo[: len(agent), 0] = agent
    stereo[start : start + len(customer), 1] = customer
    return stereo


@pytest.mark.slow
def test_call_center_joins_campaign_keywords_and_writes_consistent_analytics(ray_session, tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    lines = ["id,audio,campaign,language"]
    for call_id, (agent, customer, gap_s, campaign) in CALLS.items():
        stereo = _stereo_call(_audio(_eval(agent)), _audio(_eval(customer)), gap_s)
        sf.write(calls / f"{call_id}.wav", stereo, RATE, subtype="PCM_16")
        lines.append(f"{call_id},{call_id}.wav,{campaign},en")
    (calls / "calls.csv").write_text("\n".join(lines) + "\n")
    # "narrative" is spoken by call-a's customer, "town" by its agent, "infection" by call-b's agent
    (tmp_path / "campaigns.csv").write_text(
        'campaign,keywords\nretention,narrative;town\nretention,refund\nsupport,"infection, dinosaurs"\n')
    job = _write_job(tmp_path, {
        "kind": "call-center", "config": str(REPO / "jobs" / "call-center" / "config.local.yaml"),
        "manifest": "calls/calls.csv", "output": "out", "campaigns": "campaigns.csv",
    })
    printed: list[str] = []

    result = run_job_file(job, overrides=["engine.replicas=2", "engine.cpus_per_replica=0.75"], echo=printed.append)

    out = tmp_path / "out"
    assert result.exit_code == 0 and result.summary.n_ok == 2
    inputs = {r["id"]: r for r in map(json.loads, (out / "inputs.jsonl").read_text().splitlines())}
    assert inputs["call-a"]["keywords"] == ["narrative", "town", "refund"]
    assert inputs["call-b"]["keywords"] == ["infection", "dinosaurs"]

    parts = sorted((out / "analytics").glob("part-*.parquet"))
    assert [p.name for p in parts] == sorted(p.name for p in (out / "transcripts").glob("part-*.parquet"))
    table = pq.read_table(out / "analytics")
    assert table.schema.names == analytics_schema(["agent", "customer"]).names
    rows = {r["id"]: r for r in table.to_pylist()}
    transcripts = read_transcripts(out).set_index("id")
    assert set(rows) == set(CALLS)
    for call_id, (agent, customer, gap_s, campaign) in CALLS.items():
        row = rows[call_id]
        speaking = {ct["channel"]: ct for ct in transcripts.loc[call_id, "channel_texts"]}
        assert row["status"] == "ok" and row["campaign"] == campaign
        for channel, clip in (("agent", agent), ("customer", customer)):
            assert row[f"talk_s_{channel}"] == speaking[channel]["speaking_s"]
            assert row[f"talk_s_{channel}"] == pytest.approx(_eval(clip)["duration_s"], abs=2.0), (call_id, channel)
            assert row[f"words_{channel}"] == len(speaking[channel]["text"].split()) > 3
            assert row[f"wpm_{channel}"] == pytest.approx(row[f"words_{channel}"] / (row[f"talk_s_{channel}"] / 60))
            assert 60 < row[f"wpm_{channel}"] < 300  # read speech
        assert row["overlap_s"] == transcripts.loc[call_id, "overlap_s"]
        assert row["overlap_s"] == pytest.approx(max(-gap_s, 0.0), abs=1.0)
        speech = row["talk_s_agent"] + row["talk_s_customer"] - row["overlap_s"]
        assert row["silence_s"] == pytest.approx(row["duration_s"] - speech)
        assert row["silence_share"] == pytest.approx(row["silence_s"] / row["duration_s"])
        assert row["duration_s"] == pytest.approx(transcripts.loc[call_id, "duration_s"])
    assert rows["call-b"]["silence_s"] >= gap_s + TAIL_S - 0.5  # the pause between the speakers, and the tail
    hits = {call_id: {h["keyword"]: h["count"] for h in row["keyword_hits"]} for call_id, row in rows.items()}
    assert set(hits["call-a"]) == {"narrative", "town", "refund"} and set(hits["call-b"]) == {"infection", "dinosaurs"}
    assert hits["call-a"]["narrative"] >= 1 and hits["call-a"]["town"] >= 1 and hits["call-a"]["refund"] == 0
    assert hits["call-b"]["infection"] >= 1
    assert rows["call-a"]["keyword_hits_total"] == sum(hits["call-a"].values())
    assert "narrative" in "\n".join(printed) and "call-center" in printed[-1]


# --- dataset-labeling --------------------------------------------------------------------------


LABEL_CLIPS = ["fleurs_en_003", "fleurs_en_004", "librivox_en_sense_sensibility-0880",
               "mfa_spontaneous_cold_corpus",  # 25.7 s: over max_duration_s
               "fleurs_de_001"]  # German: not in languages
EXPORTED = {"fleurs_en_003", "fleurs_en_004", "librivox_en_sense_sensibility-0880"}


def test_dataset_labeling_filters_exports_that_load_back_and_subtitles(ray_session, tmp_path):
    lhotse, datasets = _require("lhotse"), _require("datasets")
    rows = [{"id": rid, "audio": str(EVAL_DIR / _eval(rid)["audio"]), "reference": _eval(rid)["reference"],
             "language": _eval(rid)["language"]} for rid in LABEL_CLIPS]
    write_jsonl(tmp_path / "manifest.jsonl", rows)
    assert _eval("mfa_spontaneous_cold_corpus")["duration_s"] > 20 > max(_eval(r)["duration_s"] for r in EXPORTED)
    job = _write_job(tmp_path, {
        "kind": "dataset-labeling", "config": str(REPO / "jobs" / "dataset-labeling" / "config.local.yaml"),
        "manifest": "manifest.jsonl", "output": "out",
        "filters": {"min_avg_logprob": -0.5, "max_duration_s": 20.0, "languages": ["en"]},
        "exports": ["lhotse", "nemo", "hf"], "subtitles": ["srt", "vtt"],
    })

    result = run_job_file(job, overrides=["engine.name=fake"], echo=None)

    out = tmp_path / "out"
    assert result.exit_code == 0 and result.summary.n_ok == len(LABEL_CLIPS)
    assert set(read_transcripts(out)["id"]) == set(LABEL_CLIPS)  # every row labelled; the filters are for exports
    assert {fmt: r.count for fmt, r in result.exports.items()} == {"lhotse": 3, "nemo": 3, "hf": 3}

    cuts = lhotse.CutSet.from_jsonl(out / "exports" / "cuts.jsonl.gz")
    assert {cut.id for cut in cuts} == EXPORTED
    for cut in cuts:
        assert cut.supervisions[0].text and cut.supervisions[0].custom["avg_logprob"] >= -0.5
        assert cut.load_audio().shape[-1] == round(cut.duration * cut.sampling_rate)
    with open(out / "exports" / "nemo_manifest.jsonl") as f:
        nemo = [json.loads(line) for line in f]
    assert {Path(e["audio_filepath"]).stem for e in nemo} == EXPORTED
    assert all(e["lang"] == "en" and e["duration"] <= 20 for e in nemo)
    hf = datasets.load_dataset("parquet", data_files=str(out / "exports" / "hf.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(hf.features["audio"], datasets.Audio) and set(hf["id"]) == EXPORTED

    subtitles = sorted(p.name for p in (out / "subtitles").iterdir())
    assert len(subtitles) == 2 * len(LABEL_CLIPS)
    assert {name.rsplit(".", 1)[1] for name in subtitles} == {"srt", "vtt"}
    assert all(any(name.startswith(rid) for name in subtitles) for rid in LABEL_CLIPS)

    again = run_job_file(job, overrides=["engine.name=fake"], echo=None)  # a rerun resumes
    assert again.summary.this_run.n_processed == 0 and again.summary.n_ok == len(LABEL_CLIPS)
    with gzip.open(out / "exports" / "cuts.jsonl.gz", "rt") as f:
        assert len(f.readlines()) == 3


# --- ray job submit, as each README documents it --------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with its job server on 127.0.0.1, started with the README's `ray start` line
    (other ports; its own temp dir; --block, so that this process owns it and stops exactly it)."""
    gcs_port, dashboard_port = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="qj", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "QUARRY_OUTPUT_ROOT")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `source .venv/bin/activate`
        RAY_AUTH_TOKEN=secrets.token_hex(32),  # this head's own token; the README uses ~/.ray/auth_token
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    start = _readme_command("nightly-archive", "RAY_AUTH_MODE=token ray start --head")
    assert "--port 6379" in start and "--dashboard-port 8265" in start
    start = start.replace("--port 6379", f"--port {gcs_port}").replace("--dashboard-port 8265",
                                                                        f"--dashboard-port {dashboard_port}")
    words = shlex.split(start)
    while "=" in words[0]:  # leading VAR=value words: the command's environment
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    assert words[:3] == ["ray", "start", "--head"]
    # Ray's other fixed ports, free ones here: this session's own local Ray (and anyone else's) holds
    # the defaults, and a job agent that cannot bind its port leaves the head unable to run jobs.
    for option in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                   "--metrics-export-port", "--ray-client-server-port"):
        words += [option, str(_free_port())]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log_file:
        head = subprocess.Popen([*words, "--temp-dir", temp_dir, "--block"], cwd=REPO, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering (401 without a token): the job server is up
                break
            except OSError:
                pass
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"the Ray head did not start its job server:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        # The job server answers before the node's agent that runs jobs has registered ("No
        # available agent to submit job"): wait until a trivial job runs.
        while True:
            probe = subprocess.run(["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}", "--",
                                    "true"], check=False, cwd=temp_dir, env=env, capture_output=True, text=True,
                                   timeout=120)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"the Ray head runs no job:\n{probe.stdout[-2000:]}{probe.stderr[-2000:]}")
            time.sleep(2)
        yield {"gcs_port": gcs_port, "dashboard_port": dashboard_port, "env": env, "temp_dir": Path(temp_dir)}
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of this head's process group still there
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", JOBS)
def test_the_documented_ray_job_submit_runs_the_job_on_a_ray_head(name, ray_head, tmp_path):
    command = _readme_command(name, "RAY_AUTH_MODE=token ray job submit")
    assert "http://127.0.0.1:8265" in command and "/tmp/quarry-jobs" in command
    command = command.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{ray_head['dashboard_port']}")
    command = command.replace("/tmp/quarry-jobs", str(tmp_path))

    done = subprocess.run(["bash", "-c", command], check=False, cwd=REPO, env=ray_head["env"], capture_output=True,
                          text=True, timeout=480)

    log = done.stdout + done.stderr
    assert done.returncode == 0 and re.search(r"Job 'raysubmit_\w+' succeeded", log), log[-4000:]
    out = tmp_path / name
    if name == "nightly-archive":
        (run,) = out.glob("run_date=*")
        summary = json.loads((run / "summary.json").read_text())
        assert summary["n_ok"] == 7  # data/demo/audio
        assert json.loads((out / "canary" / "last_good.json").read_text())["rate"] < 0.1
    elif name == "call-center":
        summary = json.loads((out / "summary.json").read_text())
        analytics = {r["id"]: r for r in pq.read_table(out / "analytics").to_pylist()}
        assert set(analytics) == {"call-0001", "call-0002"}
        assert all(r["keyword_hits_total"] >= 1 and r["talk_s_agent"] > 3 for r in analytics.values())
    else:
        summary = json.loads((out / "summary.json").read_text())
        assert summary["n_ok"] == 7
        assert len(list((out / "exports").iterdir())) == 3 and any((out / "subtitles").glob("*.vtt"))
    # The job's driver joined the head it was submitted to (no Ray of its own) and read its inputs
    # from the copy of the working directory that Ray unpacked for the job.
    assert summary["config"]["ray"]["address"].endswith(f":{ray_head['gcs_port']}")
    transcripts = read_transcripts(run if name == "nightly-archive" else out)
    assert all("runtime_resources/working_dir_files" in a for a in transcripts["audio"])
    # Quarry itself was installed by pip from that copy (the runtime env's "pip" entry): Ray builds
    # the environment once per head, the first job's setup log says so.
    setup_logs = "\n".join(p.read_text(errors="replace")
                           for p in ray_head["temp_dir"].glob("session_*/logs/runtime_env_setup-*.log"))
    assert re.search(r"Successfully installed .*quarry-speech-", setup_logs), setup_logs[-4000:]
