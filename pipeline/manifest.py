"""Manifests: read JSONL / CSV / Parquet from any fsspec URL into Ray Data, resolve rows.

Reading is Ray Data's (streamed, in tasks). :class:`PrepareStage` turns each raw batch into
resolved utterance rows: ids derived where missing, relative audio paths resolved against the
manifest's folder, task fields defaulted, and extra columns carried through. A row without
audio is kept, with status ``invalid_row``.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .config import ColumnsConfig, JobConfig, TaskConfig
from .records import TRANSCRIPT_COLUMNS, Status
from .storage import arrow_filesystem, has_scheme, is_process_local, parent_uri, url_to_fs


class ManifestError(ValueError):
    """The manifest cannot be read at all (missing, wrong format, no audio column)."""


# Columns of a prepared row (the decode stage adds audio columns; extras follow).
PREPARED_FIELDS = (
    pa.field("id", pa.string()),
    pa.field("audio", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("reference", pa.string()),
    pa.field("language", pa.string()),
    pa.field("task", pa.string()),
    pa.field("target_language", pa.string()),
    pa.field("keywords", pa.list_(pa.string())),
)

_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def detect_format(uri: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = uri.rstrip("/").lower()
    for suffix in (".gz", ".zst", ".bz2"):
        name = name.removesuffix(suffix)
    fmt = _EXTENSIONS.get(posixpath.splitext(name)[1])
    if fmt is None:
        raise ManifestError(f"cannot tell the manifest format of {uri!r}; set input.format")
    return fmt


def stable_id(audio_uri: str) -> str:
    """A readable id that is stable across runs: file stem + hash of the full URI."""
    stem = posixpath.splitext(posixpath.basename(audio_uri.rstrip("/")))[0] or "audio"
    return f"{stem}-{hashlib.sha1(audio_uri.encode()).hexdigest()[:10]}"


def resolve_audio_uri(audio: str, manifest_dir: str) -> str:
    if has_scheme(audio) or os.path.isabs(audio):
        return audio
    return posixpath.normpath(posixpath.join(manifest_dir, audio)) if not has_scheme(manifest_dir) else (
        manifest_dir.rstrip("/") + "/" + audio
    )


def read_manifest_schema(uri: str, cfg: JobConfig) -> pa.Schema:
    """The manifest's columns, read from its head only (Parquet footer, first CSV/JSONL lines)."""
    fmt = detect_format(uri, cfg.input.format)
    try:
        fs, path = url_to_fs(uri, cfg.storage.options)
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                return pq.read_schema(f)
        with fs.open(path, "rb", compression="infer") as f:
            head = f.read(1 << 20)
    except FileNotFoundError as e:
        raise ManifestError(f"manifest not found: {uri}") from e
    except Exception as e:  # noqa: BLE001 - any storage/parse failure means "cannot run"
        raise ManifestError(f"cannot read manifest {uri}: {e}") from e
    lines = head.splitlines()
    if len(head) == 1 << 20 and len(lines) > 1:
        lines = lines[:-1]  # drop a possibly partial last line
    sample = b"\n".join(lines) + b"\n"
    try:
        if fmt == "csv":
            return pacsv.read_csv(pa.py_buffer(sample)).schema
        return pajson.read_json(pa.py_buffer(sample)).schema
    except Exception as e:  # noqa: BLE001
        raise ManifestError(f"manifest {uri} is not valid {fmt}: {e}") from e


def extra_fields(schema: pa.Schema, fmt: str, columns: ColumnsConfig) -> list[pa.Field]:
    """Carried-through columns: Parquet keeps its types; CSV and JSONL values travel as text."""
    mapped = set(columns.model_dump().values())
    fields = []
    for field in schema:
        if field.name in mapped:
            continue
        if field.name in TRANSCRIPT_COLUMNS:
            raise ManifestError(
                f"manifest column {field.name!r} clashes with an output column; rename it or map it in input.columns"
            )
        keep = fmt == "parquet" and not pa.types.is_null(field.type)
        fields.append(pa.field(field.name, field.type if keep else pa.string()))
    return fields


def read_manifest(uri: str, cfg: JobConfig):
    """A Ray Dataset of the manifest's raw rows, read in Ray tasks (streamed)."""
    import ray.data

    fmt = detect_format(uri, cfg.input.format)
    schema = read_manifest_schema(uri, cfg)
    if cfg.input.columns.audio not in schema.names:
        raise ManifestError(f"manifest {uri} has no {cfg.input.columns.audio!r} column (columns: {schema.names})")
    fs, path = url_to_fs(uri, cfg.storage.options)
    remote = {"num_cpus": 0.25}
    if is_process_local(fs):
        # memory:// lives in this process only; workers cannot see it. The table is already in
        # this process's memory, so handing it to Ray costs nothing extra.
        with fs.open(path, "rb") as f:
            data = pa.py_buffer(f.read())
        table = {
            "parquet": lambda: pq.read_table(pa.BufferReader(data)),
            "csv": lambda: pacsv.read_csv(pa.BufferReader(data), convert_options=_csv_as_text(schema)),
            "jsonl": lambda: pajson.read_json(pa.BufferReader(data)),
        }[fmt]()
        return ray.data.from_arrow(table)
    kwargs: dict[str, Any] = {"filesystem": None if fs.protocol in ("file", ("file", "local")) else arrow_filesystem(fs)}
    read_path = path if kwargs["filesystem"] is not None else os.path.abspath(path)
    if fmt == "parquet":
        return ray.data.read_parquet(read_path, ray_remote_args=remote, **kwargs)
    if fmt == "csv":
        return ray.data.read_csv(read_path, ray_remote_args=remote, convert_options=_csv_as_text(schema), **kwargs)
    return ray.data.read_json(read_path, lines=True, ray_remote_args=remote, file_extensions=None, **kwargs)


def _csv_as_text(schema: pa.Schema) -> pacsv.ConvertOptions:
    # A CSV has no types: read every column as text so "007" stays "007".
    return pacsv.ConvertOptions(column_types={n: pa.string() for n in schema.names}, strings_can_be_null=True)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from pandas-made files
        return None
    if isinstance(value, str):
        return value.strip() or None
    return str(value)


def _carried(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def parse_keywords(value: Any) -> list[str]:
    """A keywords cell: a list, or a comma-separated string. Sanitising happens in prompts."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(k).strip() for k in items if k is not None and str(k).strip()]


class PrepareStage:
    """Raw manifest batch -> resolved utterance rows with the prepared schema."""

    def __init__(self, manifest_uri: str, columns: ColumnsConfig, task: TaskConfig, extras: list[pa.Field]):
        self.manifest_dir = parent_uri(manifest_uri)
        self.columns = columns
        self.task = task
        self.extras = extras
        self.schema = pa.schema(list(PREPARED_FIELDS) + list(extras))

    def __call__(self, batch: pa.Table) -> pa.Table:
        c = self.columns
        rows = []
        for raw in batch.to_pylist():
            audio = _text(raw.get(c.audio))
            row: dict[str, Any] = {
                "id": _text(raw.get(c.id)),
                "audio": resolve_audio_uri(audio, self.manifest_dir) if audio else None,
                "status": Status.OK.value,
                "error": None,
                "reference": _text(raw.get(c.reference)),
                "language": _text(raw.get(c.language)) or self.task.language,
                "task": _text(raw.get(c.task)) or self.task.task,
                "target_language": _text(raw.get(c.target_language)) or self.task.target_language,
                "keywords": self.task.keywords + parse_keywords(raw.get(c.keywords)),
            }
            if row["audio"] is None:
                row["status"], row["error"] = Status.INVALID_ROW.value, f"row has no {c.audio!r} value"
            if row["id"] is None:
                row["id"] = stable_id(row["audio"] or json.dumps(raw, sort_keys=True, default=str))
            for field in self.extras:
                value = raw.get(field.name)
                row[field.name] = _carried(value) if pa.types.is_string(field.type) else value
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=self.schema)
