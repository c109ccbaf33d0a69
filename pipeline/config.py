"""Job configuration: one validated object, every default in one place.

A config is YAML validated by pydantic with ``extra="forbid"`` at every level, so a typo in a
nightly job's file fails loudly with the key named instead of running with defaults.
``--set key.path=value`` overrides any key. Building a config has no side effects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .constants import MAX_KEYWORD_CHARS, MAX_KEYWORDS
from .errors import CannotRun
from .scrub import redact_mapping

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "local.yaml"


class ConfigError(CannotRun, ValueError):
    """The job configuration is invalid; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Ray cluster address ('auto', 'ray://host:10001'); null starts a local Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray; null = all cores.")
    object_store_memory_mb: int | None = Field(
        None, ge=64, description="Object store size for a local Ray; null = Ray's default."
    )


class ColumnsConfig(_Section):
    """Where each field lives in the manifest, for manifests with other column names."""

    audio: str = "audio"
    id: str = "id"
    reference: str = "reference"
    language: str = "language"
    task: str = "task"
    target_language: str = "target_language"
    keywords: str = "keywords"


class InputConfig(_Section):
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        "auto", description="Manifest format; auto picks by file extension."
    )
    columns: ColumnsConfig = ColumnsConfig()
    allowed_prefixes: list[str] | None = Field(
        None,
        description="URI prefixes audio may be read from (e.g. [s3://archive/calls/, s3://bucket/]); "
        "a row naming anything else gets status forbidden_uri. null = the manifest's own store: its "
        "bucket on an object store (s3://bucket), this machine's files for a local manifest.",
    )
    max_line_bytes: int = Field(
        16 * 2**20, ge=1024,
        description="Longest JSONL manifest line, in bytes; a longer one is skipped to its end and becomes "
        "an invalid_row. Bounds the memory one line takes (scoring a reference costs ~30x its size).",
    )


class AudioConfig(_Section):
    resample_quality: Literal["QQ", "LQ", "MQ", "HQ", "VHQ"] = Field(
        "HQ", description="soxr quality preset."
    )
    max_duration_s: float = Field(
        3600.0 * 12, gt=0,
        description="Longer recordings get status too_long. A decode actor holds the decoded recording "
        "(about 230 MB per hour at 16 kHz), so this bounds its memory.",
    )
    max_bytes: int = Field(
        2 * 2**30, ge=1,
        description="Largest audio object read, in bytes: its size is checked before it is fetched "
        "(status too_large). A decode actor holds the encoded bytes, so this bounds that memory.",
    )
    decode_budget_mb: float = Field(
        8192.0, gt=0,
        description="Most a recording may decode to, in MiB of float32 samples: frames x channels at its "
        "source rate, or its 16 kHz output (x channels with split), whichever is larger. Checked from "
        "the header before any sample is allocated and again while decoding (status too_large): a small "
        "file claiming hours of many-channel, high-rate audio is refused. The source passes through in "
        "blocks of at most 16 MiB; the output is held, so this bounds a decode actor's memory.",
    )
    read_timeout_s: float = Field(
        300.0, gt=0,
        description="Longest one attempt to read an audio object may take (its size check included); "
        "connects and socket reads time out sooner (at most 60 s). A timed-out attempt is retried as "
        "transient, then the row gets fetch_error.",
    )
    decode_cpus: float | None = Field(
        None, gt=0,
        description="CPUs Ray reserves per decode actor; null = sized to the cluster: one core each, so "
        "there are as many decode actors as the cluster has cores the engine replicas leave free (less "
        "than one core each where fewer are free).",
    )
    channels: Literal["mix", "split"] = Field(
        "mix", description="mix: downmix to mono; split: transcribe each channel on its own (stereo calls)."
    )
    channel_names: list[str] = Field(
        default_factory=list,
        description="Names of the channels in split mode, in order (e.g. [agent, customer]); "
        "unnamed channels are ch0, ch1, ...",
    )


class SegmentConfig(_Section):
    """How recordings longer than ``max_s`` are cut into segments (the unit of parallel work)."""

    max_s: float = Field(30.0, gt=1, description="Longest segment, seconds (Granite's safe window is 30 s).")
    min_s: float = Field(1.0, ge=0, description="Shorter segments are widened into the audio around them.")
    overlap_s: float = Field(1.0, ge=0, description="Overlap of fixed windows (speech with no pause to cut at).")
    vad: bool = Field(True, description="Cut at pauses found by Silero VAD; false: fixed windows only.")
    rows_per_batch: int = Field(8, ge=1, description="Segments per output batch of the decode stage.")


class WhisperOptions(_Section):
    """faster-whisper (CTranslate2) decoding options."""

    compute_type: str = Field("int8", description="CTranslate2 compute type (int8, float32, ...).")
    beam_size: int = Field(5, ge=1)
    without_timestamps: bool | Literal["auto"] = Field(
        "auto",
        description="Text-only decoding. auto: on for whole clips (better WER there), off for segments "
        "of longer recordings (a window holding several utterances loses sentences in text-only mode).",
    )
    cpu_threads: int = Field(
        0, ge=0, description="CTranslate2 threads per replica; 0 = every core this process may use (its CPU "
        "affinity). The threads are not a Ray reservation: with several replicas on one machine, set it.",
    )
    batch_size: int = Field(
        16, ge=1, description="Clips of at most 30 s that share their decoding settings are decoded by one "
        "CTranslate2 generate call, this many at a time (at most engine.batch_size reach one engine call).",
    )
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    vad_filter: bool = False


class VllmOptions(_Section):
    """vLLM engine options (pipeline/engines/vllm.py; the README's Engines section)."""

    max_model_len: int = Field(1024, ge=64, description="Prompt + output tokens; caps clip length.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences vLLM batches together.")
    dtype: str = Field("auto", description="Weights dtype: auto, bfloat16, float16, float32.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enforce_eager: bool = Field(False, description="Skip CUDA graphs / compilation (faster start).")
    cpu_kv_cache_gib: float = Field(2.0, gt=0, description="KV-cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    max_output_tokens_per_s: float = Field(
        8.0, gt=0, description="Output token budget per second of audio (greedy decoding)."
    )
    min_output_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")


class TransformersOptions(_Section):
    """Hugging Face transformers engine options (pipeline/engines/transformers.py; the README's
    Engines and Speculative decoding sections). Granite Speech checkpoints only."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs; auto: cuda when a GPU is visible to the replica, else cpu."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights and activations; auto: bfloat16 on cuda, float32 on cpu."
    )
    max_model_len: int = Field(
        1024, ge=64,
        description="Prompt + output tokens, as vllm's: a clip whose prompt (about 10 tokens per second of "
        "audio) leaves no room for output gets status too_long.",
    )
    max_output_tokens_per_s: float = Field(
        8.0, gt=0, description="Output token budget per second of audio (greedy decoding), as vllm's."
    )
    min_output_tokens: int = Field(32, ge=1, description="Smallest output budget of a clip, as vllm's.")
    speculative: Literal["off", "lossless", "thresholded"] = Field(
        "off",
        description="CTC-draft speculative decoding (IBM's): the encoder's character CTC head drafts the "
        "transcript and the language model verifies it in one pass. off: plain greedy decoding. lossless: "
        "a draft is kept only where it equals the model's own greedy choice token by token, end-of-text "
        "included, so the text is plain greedy's. thresholded: IBM's leaderboard rule (entropy and "
        "probability thresholds below); faster, not lossless.",
    )
    ctc_entropy_threshold: float = Field(
        0.7, ge=0,
        description="thresholded only: a draft whose largest per-frame CTC entropy (nats) is at most this is "
        "taken as is, unverified (IBM's leaderboard run: 0.7).",
    )
    verify_probability_threshold: float = Field(
        0.2, ge=0, le=1,
        description="thresholded only: a verified draft is kept when every token's probability under the "
        "language model is at least this (IBM's leaderboard run: 0.2).",
    )


DEFAULT_MODELS = {
    "whisper": "tiny.en",
    "vllm": "ibm-granite/granite-4.0-1b-speech",
    "transformers": "ibm-granite/granite-4.0-1b-speech",
    "fake": "fake",
}
"""The model each engine runs when ``engine.model`` is not given."""

DEFAULT_CPUS = {"whisper": 1.0, "vllm": 1.0, "transformers": 1.0, "fake": 0.0}
"""The CPUs each engine's replica reserves when ``engine.cpus_per_replica`` is not given: a core
for a model, none for the fake engine (a reserved core it does not use would idle a decode actor's)."""


VLLM_QUEUE_FACTOR = 2
"""A vLLM replica's batches in flight hold at least this many times ``vllm.max_num_seqs`` requests:
a batch keeps its place until its last request ends, so the batches hold fewer unfinished requests
than rows, and vLLM's waiting queue must still refill each sequence the step it finishes."""


class EngineConfig(_Section):
    name: Literal["whisper", "vllm", "transformers", "fake"] = Field("whisper", description="Which engine runs.")
    model: str | None = Field(
        None,
        validate_default=True,
        description="Model name or path; null = the engine's default (DEFAULT_MODELS). whisper: "
        "tiny.en / base (offline packages) or any CTranslate2 path or hub name; vllm, transformers: a hub "
        "name or a local checkpoint folder.",
    )
    replicas: int | None = Field(
        None, ge=1,
        description="Actors, one model replica each; null = one per gpus_per_replica GPUs in the "
        "cluster when gpus_per_replica > 0, else 1.",
    )
    cpus_per_replica: float = Field(
        None, ge=0, validate_default=True,
        description="CPUs Ray reserves per replica (a CPU engine's threads too); null = the engine's need "
        "(DEFAULT_CPUS: one core for the model engines, none for fake, which only hashes the audio).",
    )
    gpus_per_replica: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="Rows per engine call.")
    max_batches_in_flight: int = Field(
        4, ge=1,
        description="Batches each replica has with its engine at once (the blocks it holds, at least two, may queue "
        "more), so its model never waits for the next: vLLM takes "
        "all their requests into its running batch as they arrive (continuous batching across batches), and "
        "gets more batches when these hold fewer than VLLM_QUEUE_FACTOR x vllm.max_num_seqs requests; "
        "other engines run one at a time with the next ones already converted and queued.",
    )
    max_restarts: int = Field(
        8, ge=0,
        description="Times Ray may replace a replica whose engine died (or whose node was lost) before the job "
        "fails; each time its unfinished batch is redone.",
    )
    whisper: WhisperOptions = WhisperOptions()
    vllm: VllmOptions = VllmOptions()
    transformers: TransformersOptions = TransformersOptions()

    @field_validator("model")
    @classmethod
    def _default_model(cls, value: str | None, info) -> str:
        return value or DEFAULT_MODELS[info.data.get("name", "whisper")]

    @field_validator("cpus_per_replica", mode="before")
    @classmethod
    def _default_cpus(cls, value: float | None, info) -> float:
        return DEFAULT_CPUS[info.data.get("name", "whisper")] if value is None else value

    @property
    def batches_in_flight(self) -> int:
        """Batches a replica lets reach its engine at once: ``max_batches_in_flight``, and for vLLM
        at least enough for ``VLLM_QUEUE_FACTOR`` x ``vllm.max_num_seqs`` requests, whatever the
        batch size, so that its running batch is refilled as each request finishes, never drained."""
        if self.name != "vllm":
            return self.max_batches_in_flight
        return max(self.max_batches_in_flight, -(-VLLM_QUEUE_FACTOR * self.vllm.max_num_seqs // self.batch_size))


class TaskConfig(_Section):
    """Job-level defaults for the per-row task columns."""

    language: str | None = Field(None, description="Spoken language when a row gives none.")
    task: Literal["transcribe", "translate"] = "transcribe"
    target_language: str | None = None
    keywords: list[str] = Field(default_factory=list, description="Biasing keywords for every row.")
    max_keywords: int = Field(MAX_KEYWORDS, ge=0)
    max_keyword_chars: int = Field(MAX_KEYWORD_CHARS, ge=1)
    detect_language: bool = Field(
        False,
        description="Label rows that have no language (after task.language) with the language spoken "
        "in their first speech (VAD regions, leading silence skipped), in the decode stage, before the "
        "recording is cut: sets `language` and `language_probability`, so prompts and scoring follow it. "
        "A detected language the engine cannot do gives unsupported_task, as a given one does.",
    )
    language_id_model: str = Field(
        "base",
        description="The faster-whisper model that detects the language: a multilingual one (`base` "
        "installs offline; any CTranslate2 folder, or a hub name where the hub is reachable).",
    )
    language_id_s: float = Field(
        30.0, gt=1, le=30,
        description="Seconds of speech (from the first speech on) the language is detected on; Whisper "
        "looks at one 30 s window.",
    )


class ScoringConfig(_Section):
    normalizer: Literal["auto", "whisper_english", "whisper_basic", "none"] = Field(
        "auto",
        description="auto: Whisper English normaliser for en, the basic multilingual one otherwise "
        "(the Open ASR leaderboard's choice).",
    )
    cer_languages: list[str] = Field(
        default_factory=lambda: ["ja", "zh", "ko", "th"],
        description="Languages scored by character error rate.",
    )


class OutputConfig(_Section):
    subtitles: list[Literal["srt", "vtt"]] = Field(
        default_factory=list, description="Also write OUTPUT/subtitles/<id>.srt / .vtt per recording "
        "(cues built from words when the row has words)."
    )
    words: bool = Field(
        False,
        description="Word-level timestamps: a `words` list (word, start_s, end_s, probability, speaker) "
        "per recording and per segment, in recording time. whisper: faster-whisper's own word "
        "timestamps; vllm (Granite): the transcript force-aligned to the audio with the encoder's "
        "CTC head (pipeline/align/).",
    )
    rows_per_file: int = Field(10_000, ge=1, description="Parquet rows per output file (at most).")
    flush_interval_s: float = Field(
        60.0, gt=0, description="Commit pending rows at least this often: a crash loses at most this much work."
    )
    progress_interval_s: float = Field(10.0, gt=0, description="Seconds between progress lines in the log.")
    max_failed_fraction: float = Field(
        1.0, ge=0, le=1, description="Exit non-zero when failed rows exceed this share of input."
    )
    budget_min_rows: int = Field(
        200, ge=1,
        description="Stop a job early once at least this many rows are done and the failed share "
        "exceeds max_failed_fraction (completed rows are kept; a rerun resumes).",
    )


class DiarizeConfig(_Section):
    """Speaker diarization of mono recordings (pipeline/diarize/), in the decode stage, on the whole
    recording before it is cut: each segment and word gets a speaker (spk0, spk1, ... in order of
    first speech), the recording its speaker turns and talk time per speaker."""

    enabled: bool = Field(False, description="Diarize mono recordings (audio.channels: mix).")
    model: str = Field(
        "resemblyzer",
        description="resemblyzer: Resemblyzer's speaker encoder (weights inside its wheel, offline) on "
        "sliding windows + agglomerative clustering; anything else names a pyannote.audio pipeline (a hub "
        "name such as pyannote/speaker-diarization-3.1 with HF_TOKEN, or a local folder; pip install "
        "pyannote.audio).",
    )
    max_speakers: int = Field(2, ge=1, description="At most this many speakers per recording.")
    min_speakers: int = Field(1, ge=1, description="At least this many speakers (when there is speech).")
    threshold: float = Field(
        0.35, gt=0, lt=2,
        description="resemblyzer: cosine distance between window clusters above which they are "
        "different speakers (average linkage); below max_speakers the threshold decides the count.",
    )
    window_s: float = Field(1.6, ge=0.5, le=4.0, description="resemblyzer: window length, seconds (its encoder's 1.6 s).")
    hop_s: float = Field(0.4, gt=0, le=2.0, description="resemblyzer: window hop, seconds: the resolution of speaker changes.")
    min_turn_s: float = Field(
        0.5, ge=0, description="Speaker runs shorter than this inside speech are given to their neighbours."
    )


REDACTABLE = ("CREDIT_CARD", "PHONE_NUMBER", "EMAIL_ADDRESS", "US_SSN", "IBAN_CODE", "PERSON")


class RedactConfig(_Section):
    """PII redaction of transcripts (pipeline/redact/): Presidio's recognizers over the transcript
    with spoken numbers ("four one one one") normalised to digits first."""

    entities: list[Literal["CREDIT_CARD", "PHONE_NUMBER", "EMAIL_ADDRESS", "US_SSN", "IBAN_CODE", "PERSON"]] = Field(
        default_factory=list,
        description="Entity types to redact into `text_redacted` as [TYPE]; empty: no redaction. PERSON "
        "needs a spaCy NER model installed as a package (never downloaded); without one it is skipped "
        "with a warning.",
    )
    audio: bool = Field(
        False,
        description="Also write <output>/redacted_audio/<id>.flac: the recording with each redacted "
        "word's time silenced (needs word times: output.words or diarize).",
    )
    beep: bool = Field(False, description="With audio: a 1 kHz tone over the spans instead of silence.")
    drop_text: bool = Field(
        False,
        description="Leave raw text out of the output: `text` and segments' text are null, texts per "
        "channel / speaker / turn and words hold their redacted forms.",
    )
    spacy_model: str | None = Field(
        None,
        description="A spaCy pipeline installed as a package (e.g. en_core_web_lg) for PERSON; null: a "
        "blank English pipeline (pattern recognizers only). Never downloaded.",
    )
    score_threshold: float = Field(0.3, ge=0, le=1, description="Presidio results scoring below this are not redacted.")

    @property
    def enabled(self) -> bool:
        return bool(self.entities)


class StorageConfig(_Section):
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options (e.g. client_kwargs). Credentials belong in the "
        "standard AWS environment variables, not here.",
    )


class JobConfig(_Section):
    ray: RayConfig = RayConfig()
    input: InputConfig = InputConfig()
    audio: AudioConfig = AudioConfig()
    segment: SegmentConfig = SegmentConfig()
    engine: EngineConfig = EngineConfig()
    task: TaskConfig = TaskConfig()
    scoring: ScoringConfig = ScoringConfig()
    output: OutputConfig = OutputConfig()
    diarize: DiarizeConfig = DiarizeConfig()
    redact: RedactConfig = RedactConfig()
    storage: StorageConfig = StorageConfig()

    def reading_from(self, *prefixes: str) -> "JobConfig":
        """This config for a manifest Quarry wrote itself (``inputs.jsonl`` of ``--audio`` or the
        call-center job) whose audio comes from ``prefixes``: ``input.allowed_prefixes`` becomes
        them, unless the config sets it."""
        if self.input.allowed_prefixes is not None:
            return self
        return self.model_copy(update={"input": self.input.model_copy(update={"allowed_prefixes": list(prefixes)})})

    @model_validator(mode="after")
    def _consistent(self) -> "JobConfig":
        if self.diarize.enabled and self.audio.channels == "split":
            raise ValueError("diarize.enabled is for mono recordings: with audio.channels: split each "
                             "channel is already one speaker")
        if self.diarize.min_speakers > self.diarize.max_speakers:
            raise ValueError("diarize.min_speakers is above diarize.max_speakers")
        if self.redact.audio and not self.redact.enabled:
            raise ValueError("redact.audio needs redact.entities")
        if self.redact.audio and not self.word_times:
            raise ValueError("redact.audio needs word times: set output.words: true (or diarize.enabled)")
        if self.redact.drop_text and self.output.subtitles and not self.word_times:
            raise ValueError("redact.drop_text with output.subtitles needs output.words: true (cues are "
                             "then built from redacted words)")
        return self

    @property
    def word_times(self) -> bool:
        """Whether the engine produces word timestamps: asked for, or needed to give text to speakers."""
        return self.output.words or self.diarize.enabled

    def redacted(self) -> dict[str, Any]:
        """The resolved config as plain data, with every credential masked (:func:`redact.redact_mapping`:
        credential-shaped keys in any spelling and everything under them, credentials in URIs)."""
        return redact_mapping(self.model_dump(mode="json"))


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``engine.batch_size=16`` -> ("engine.batch_size", 16); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def read_yaml_mapping(source: Path, error: type[Exception], what: str, *, empty_ok: bool = False) -> dict[str, Any]:
    """The mapping a YAML file holds (``{}`` for an empty file where ``empty_ok``); anything else
    raises ``error`` naming ``what`` and the file."""
    try:
        data = yaml.safe_load(source.read_text())
    except FileNotFoundError as e:
        raise error(f"{what} not found: {source}") from e
    except yaml.YAMLError as e:
        raise error(f"{what} {source} is not valid YAML: {e}") from e
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {source} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a YAML config (the embedded default when ``path`` is None) and apply overrides."""
    source = Path(path) if path else DEFAULT_CONFIG
    data = read_yaml_mapping(source, ConfigError, "config file", empty_ok=True)
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from e


def _describe(error: ValidationError, source: Path) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{where}'")
        else:
            lines.append(f"'{where}': {item['msg']}")
    return f"invalid config ({source.name}): " + "; ".join(lines)
