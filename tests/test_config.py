import pytest

from pipeline.config import ConfigError, JobConfig, load_config


def test_embedded_default_selects_the_offline_cpu_engine_on_local_ray():
    cfg = load_config()
    assert cfg.ray.address is None
    assert (cfg.engine.name, cfg.engine.model) == ("whisper", "tiny.en")


def test_unknown_key_fails_with_the_key_named(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("engine:\n  name: whisper\n  beam_sise: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'engine\.beam_sise'"):
        load_config(path)


def test_unknown_key_in_set_override_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'output\.rows_per_fle'"):
        load_config(None, ["output.rows_per_fle=3"])


def test_set_overrides_any_key_with_yaml_typed_values():
    cfg = load_config(None, ["engine.name=fake", "engine.batch_size=16", "task.keywords=[a, b]", "engine.whisper.without_timestamps=false"])
    assert cfg.engine.name == "fake"
    assert cfg.engine.batch_size == 16
    assert cfg.task.keywords == ["a", "b"]
    assert cfg.engine.whisper.without_timestamps is False


def test_invalid_value_names_key_and_reason():
    with pytest.raises(ConfigError, match=r"'engine\.replicas'"):
        load_config(None, ["engine.replicas=0"])


def test_set_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["engine.name"])


def test_redacted_config_masks_secrets_in_storage_options():
    cfg = JobConfig.model_validate({"storage": {"options": {"key": "AKIA", "secret": "s3cr3t", "client_kwargs": {"aws_secret_access_key": "x"}}}})
    dumped = str(cfg.redacted())
    assert "s3cr3t" not in dumped and "'x'" not in dumped
    assert "***" in dumped


@pytest.mark.parametrize("name", ["local.yaml", "s3.yaml"])
def test_shipped_configs_validate(name):
    from pipeline.config import CONFIG_DIR

    load_config(CONFIG_DIR / name)


def test_engine_default_model_follows_the_engine_name():
    assert load_config(None).engine.model == "tiny.en"
    assert load_config(None, ["engine.name=vllm"]).engine.model == "ibm-granite/granite-4.0-1b-speech"
    assert load_config(None, ["engine.name=vllm", "engine.model=/models/x"]).engine.model == "/models/x"


def test_a_model_that_cannot_be_found_fails_before_ray_starts(tmp_path, monkeypatch):
    from pipeline.engines import EngineUnavailable
    from pipeline.plan import run_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav"}\n')
    with pytest.raises(EngineUnavailable, match="granite-4.0-1b-speech.*HF_HUB_OFFLINE"):
        run_job(load_config(None, ["engine.name=vllm"]), str(tmp_path / "m.jsonl"), str(tmp_path / "out"))
    with pytest.raises(EngineUnavailable, match="'large-v3'.*HF_HUB_OFFLINE"):
        run_job(load_config(None, ["engine.model=large-v3"]), str(tmp_path / "m.jsonl"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # it failed before claiming the output, so before Ray started


def test_progress_line_gives_share_done_and_eta(tmp_path):
    from pipeline.manifest import Manifest
    from pipeline.plan import progress_line
    from pipeline.summary import JobTally

    (tmp_path / "m.jsonl").write_text('{"audio": "a"}\n{"audio": "b"}\n{"audio": "c"}')  # no final newline
    (tmp_path / "m.csv").write_text("audio\na\nb\n")
    assert Manifest.open(str(tmp_path / "m.jsonl"), load_config(None)).n_rows == 3
    assert Manifest.open(str(tmp_path / "m.csv"), load_config(None)).n_rows == 2
    run = JobTally(n_input=25, audio_s=1800.0)
    line = progress_line(run, 100, 60.0, 2)
    assert line.startswith("25/100 rows (25%)") and "0.50 h of audio" in line and "RTFx 30.0" in line
    assert "ETA 00:03:00" in line and "2 long recordings" in line  # 75 rows left at 25 rows a minute
    assert "ETA ?" in progress_line(JobTally(), None, 5.0, 0)


def test_optional_features_are_off_by_default_and_leave_the_job_key_as_before():
    from pipeline.plan import job_key

    class _Manifest:
        uri, fingerprint = "m.jsonl", "abc"

    cfg = load_config()
    assert not (cfg.diarize.enabled or cfg.redact.enabled or cfg.output.words or cfg.task.detect_language)
    key = job_key(cfg, _Manifest())
    assert not {"diarize", "redact", "words"} & set(key)
    assert set(key["task"]) == {"language", "task", "target_language", "keywords", "max_keywords", "max_keyword_chars"}
    on = job_key(load_config(None, ["diarize.enabled=true", "redact.entities=[US_SSN]", "output.words=true",
                                    "task.detect_language=true"]), _Manifest())
    assert {"diarize", "redact", "words"} <= set(on) and on["task"]["detect_language"] is True


@pytest.mark.parametrize("sets, message", [
    (["redact.audio=true"], "redact.audio needs redact.entities"),
    (["redact.entities=[CREDIT_CARD]", "redact.audio=true"], "needs word times"),
    (["redact.entities=[CREDIT_CARD]", "redact.drop_text=true", "output.subtitles=[srt]"], "output.words"),
    (["diarize.enabled=true", "diarize.min_speakers=3"], "min_speakers"),
    (["redact.entities=[PASSPORT]"], "redact.entities"),
])
def test_inconsistent_feature_settings_are_refused_with_the_reason(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, sets)
