"""Plain facts every layer shares, in plain Python (no pyarrow, no pydantic): the sample rate,
the row statuses, and the keyword-biasing limits' defaults.

``records.py`` (columns and schemas) and ``config.py`` (the job config) re-export or use them; they
live here so that an engine and what it imports stay light: the transformers engine and its GPU
benchmark (benchmarks/bench_engine.py) run where only torch, torchaudio, transformers and numpy
are installed.
"""

from __future__ import annotations

from enum import Enum

SAMPLE_RATE_HZ = 16_000
"""Audio leaves the decode stage, and reaches every engine, as 16 kHz mono float32."""

MAX_KEYWORDS = 50
"""Default of ``task.max_keywords``: biasing keywords kept per row."""
MAX_KEYWORD_CHARS = 64
"""Default of ``task.max_keyword_chars``: longest keyword, in characters."""


class Status(str, Enum):
    """Per-row outcome. Everything but ``OK`` is a failure reason counted in the summary."""

    OK = "ok"
    INVALID_ROW = "invalid_row"  # manifest row unusable (not a JSON object, bad UTF-8, no audio URI, ...)
    FORBIDDEN_URI = "forbidden_uri"  # audio outside input.allowed_prefixes, or not a regular file (FIFO, device)
    DUPLICATE_ID = "duplicate_id"  # an earlier row of the job has the same id
    MISSING_OBJECT = "missing_object"  # audio object does not exist
    ACCESS_DENIED = "access_denied"  # storage refused the read
    FETCH_ERROR = "fetch_error"  # storage failed after retries (timeouts included)
    TOO_LARGE = "too_large"  # object over audio.max_bytes, or decodes to more than audio.decode_budget_mb
    DECODE_ERROR = "decode_error"  # bytes are not decodable audio (or truncated)
    EMPTY_AUDIO = "empty_audio"  # decodes to zero samples
    INVALID_AUDIO = "invalid_audio"  # decodes, but samples are NaN / Inf
    TOO_LONG = "too_long"  # longer than the engine or config accepts
    UNSUPPORTED_TASK = "unsupported_task"  # language / task pair the model cannot do
    INFERENCE_ERROR = "inference_error"  # the engine failed on this row

    def __str__(self) -> str:
        return self.value


OK = Status.OK.value
