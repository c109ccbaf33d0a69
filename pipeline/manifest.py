"""Manifests: one :class:`Manifest` per job (format, columns, row count, read once), one streaming
reader of its raw rows, and :class:`PrepareStage`, which turns raw rows into prepared rows.

A prepared row (``records.PREPARED``) has its id (derived where missing), its audio path resolved
against the manifest's folder, its task fields defaulted, and the manifest's other columns carried
through. A row without audio, or a JSONL line that is not a JSON object, is kept with status
``invalid_row``. Ray reads the same raw batches in its tasks (``plan.py``); the jobs and the
benchmark stream them through :meth:`Manifest.batches` on one process.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .config import ColumnsConfig, JobConfig, TaskConfig
from .errors import CannotRun
from .records import PREPARED, Status, carried_name, id_hashes, schema_of, stable_id
from .storage import has_scheme, parent_uri, url_to_fs


class ManifestError(CannotRun, ValueError):
    """The manifest cannot be read at all (missing, wrong format, no audio column)."""


JSONL_LINE = "text"  # the column a raw JSONL batch holds: one line of text per row, parsed per row

_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_HEAD_BYTES = 1 << 20  # the head read for a text manifest's columns


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


def resolve_audio_uri(audio: str, manifest_dir: str) -> str:
    if has_scheme(audio) or os.path.isabs(audio):
        return audio
    return posixpath.normpath(posixpath.join(manifest_dir, audio)) if not has_scheme(manifest_dir) else (
        manifest_dir.rstrip("/") + "/" + audio
    )


@dataclass(frozen=True)
class Manifest:
    """One job's manifest, described once (:meth:`open`): what every stage and report needs to
    know about it without reading it again."""

    uri: str  # absolute: workers may run elsewhere, audio paths are resolved against its folder
    format: str  # jsonl | csv | parquet
    schema: pa.Schema  # its columns, from its head (Parquet: the footer's types)
    extras: tuple[pa.Field, ...]  # the columns carried through to the output
    n_rows: int | None  # rows, when they can be told cheaply (progress, ETA, read blocks)
    storage_options: dict[str, Any]

    @classmethod
    def open(cls, uri: str, cfg: JobConfig) -> "Manifest":
        """Read the manifest's head and count its rows; refuse one without an audio column."""
        if not has_scheme(uri):
            uri = os.path.abspath(uri)
        fmt = detect_format(uri, cfg.input.format)
        schema = _read_schema(uri, fmt, cfg.storage.options)
        empty_jsonl = fmt == "jsonl" and not schema.names  # 0 rows, fine
        if cfg.input.columns.audio not in schema.names and not empty_jsonl:
            raise ManifestError(f"manifest {uri} has no {cfg.input.columns.audio!r} column (columns: {schema.names})")
        return cls(uri, fmt, schema, tuple(extra_fields(schema, fmt, cfg.input.columns)),
                   _count_rows(uri, fmt, cfg.storage.options), dict(cfg.storage.options))

    @property
    def directory(self) -> str:
        return parent_uri(self.uri)

    def csv_options(self) -> pacsv.ConvertOptions:
        """A CSV has no types: every column is read as text, so "007" stays "007"."""
        return pacsv.ConvertOptions(column_types={n: pa.string() for n in self.schema.names},
                                    strings_can_be_null=True)

    def batches(self, rows_per_batch: int = 4096) -> Iterator[pa.Table]:
        """The raw rows in batches, streamed (never the whole file), in the shape Ray's readers give
        them (plan.py): Parquet with its types, CSV as text, JSONL as one line of text per row."""
        fs, path = url_to_fs(self.uri, self.storage_options)
        if self.format == "parquet":
            with fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=rows_per_batch):
                    yield pa.Table.from_batches([batch])
        elif self.format == "csv":
            with fs.open(path, "rb", compression="infer") as f:
                for batch in pacsv.open_csv(f, convert_options=self.csv_options()):
                    yield pa.Table.from_batches([batch])
        else:
            lines: list[str] = []
            with fs.open(path, "rt", compression="infer", encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        lines.append(line.rstrip("\n"))
                    if len(lines) >= rows_per_batch:
                        yield pa.table({JSONL_LINE: lines})
                        lines = []
            if lines:
                yield pa.table({JSONL_LINE: lines})

    def raw_rows(self, batch: pa.Table) -> Iterator["RawRow"]:
        """Each row of a raw batch as a dict of its manifest columns (a JSONL line parsed here)."""
        for raw in batch.to_pylist():
            if self.format != "jsonl":
                yield RawRow(raw, json.dumps(raw, sort_keys=True, default=str), None)
                continue
            line = raw[JSONL_LINE]
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                yield RawRow({}, line, f"manifest line is not JSON ({e.msg}): {line[:120]!r}")
                continue
            if not isinstance(value, dict):
                yield RawRow({}, line, f"manifest line is not a JSON object: {line[:120]!r}")
                continue
            yield RawRow(value, line, None)


@dataclass(frozen=True)
class RawRow:
    values: dict[str, Any]  # the manifest's columns ({} when the line could not be parsed)
    origin: str  # the line as written (JSONL) or its values as JSON: an id of last resort
    problem: str | None  # why the row cannot be used, when it cannot


def _read_schema(uri: str, fmt: str, storage_options: dict[str, Any]) -> pa.Schema:
    """The manifest's columns, read from its head only (Parquet footer, first CSV/JSONL lines)."""
    try:
        fs, path = url_to_fs(uri, storage_options)
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                return pq.read_schema(f)
        with fs.open(path, "rb", compression="infer") as f:
            head = f.read(_HEAD_BYTES)
    except FileNotFoundError as e:
        raise ManifestError(f"manifest not found: {uri}") from e
    except Exception as e:  # noqa: BLE001 - any storage/parse failure means "cannot run"
        raise ManifestError(f"cannot read manifest {uri}: {e}") from e
    lines = head.splitlines()
    if len(head) == _HEAD_BYTES and len(lines) > 1:
        lines = lines[:-1]  # drop a possibly partial last line
    if fmt == "jsonl":
        return _jsonl_columns(lines, uri)
    try:
        return pacsv.read_csv(pa.py_buffer(b"\n".join(lines) + b"\n")).schema
    except Exception as e:  # noqa: BLE001
        raise ManifestError(f"manifest {uri} is not valid CSV: {e}") from e


def _jsonl_columns(lines: list[bytes], uri: str) -> pa.Schema:
    """Keys seen in the first lines, in order; malformed lines are left to PrepareStage."""
    names: dict[str, None] = {}
    for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            names.update(dict.fromkeys(value))
    if not names and any(line.strip() for line in lines):
        raise ManifestError(f"manifest {uri} has no JSON object in its first lines")
    return pa.schema([pa.field(n, pa.string()) for n in names])


def _count_rows(uri: str, fmt: str, storage_options: dict[str, Any]) -> int | None:
    """Parquet from its footer, JSONL / CSV by counting lines in one streamed pass (no parsing).
    None when it cannot be told cheaply."""
    try:
        fs, path = url_to_fs(uri, storage_options)
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        lines, last = 0, b"\n"
        with fs.open(path, "rb", compression="infer") as f:
            while chunk := f.read(1 << 22):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        lines += last != b"\n"  # a last line without its newline
        return max(0, lines - (fmt == "csv"))  # the CSV header is not a row
    except Exception:  # noqa: BLE001 - progress without an ETA is fine
        return None


def extra_fields(schema: pa.Schema, fmt: str, columns: ColumnsConfig) -> list[pa.Field]:
    """Carried-through columns: Parquet keeps its types; CSV and JSONL values travel as text.

    A column whose name is taken by a column of the row (``duration_s``, ``text``, ...) is carried
    as ``input_<name>`` rather than dropped.
    """
    mapped = set(columns.model_dump().values())
    fields = []
    for field in schema:
        if field.name in mapped:
            continue
        keep = fmt == "parquet" and not pa.types.is_null(field.type)
        fields.append(pa.field(carried_name(field.name), field.type if keep else pa.string(), metadata={"source": field.name}))
    return fields


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
    """Raw manifest batch -> prepared rows (reads the manifest's columns, adds ``records.PREPARED``
    and the carried-through extras)."""

    def __init__(self, manifest: Manifest, columns: ColumnsConfig, task: TaskConfig,
                 committed: Callable[[], np.ndarray] | None = None):
        """``committed``: gives the sorted uint64 id hashes (:func:`records.id_hashes`) of rows an
        earlier attempt already committed, fetched once per worker on first use; those rows are
        left out (resume)."""
        self.manifest = manifest
        self.columns = columns
        self.task = task
        self.committed = committed
        self._skip: np.ndarray | None = None
        self.schema = schema_of(PREPARED, manifest.extras)

    def rows(self, batch: pa.Table) -> list[dict[str, Any]]:
        c = self.columns
        rows = []
        for raw in self.manifest.raw_rows(batch):
            values = raw.values
            audio = _text(values.get(c.audio))
            row: dict[str, Any] = {
                "id": _text(values.get(c.id)),
                "audio": resolve_audio_uri(audio, self.manifest.directory) if audio else None,
                "status": Status.OK.value,
                "error": None,
                "reference": _text(values.get(c.reference)),
                "language": _text(values.get(c.language)) or self.task.language,
                "task": _text(values.get(c.task)) or self.task.task,
                "target_language": _text(values.get(c.target_language)) or self.task.target_language,
                "keywords": self.task.keywords + parse_keywords(values.get(c.keywords)),
            }
            if raw.problem or row["audio"] is None:
                row["status"], row["error"] = Status.INVALID_ROW.value, raw.problem or f"row has no {c.audio!r} value"
            if row["id"] is None:
                row["id"] = stable_id(row["audio"] or raw.origin)
            for field in self.manifest.extras:
                value = values.get(field.metadata[b"source"].decode())
                row[field.name] = _carried(value) if pa.types.is_string(field.type) else value
            rows.append(row)
        if self.committed is not None and rows:
            rows = [row for row, done in zip(rows, self._is_committed([r["id"] for r in rows])) if not done]
        return rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.rows(batch), schema=self.schema)

    def _is_committed(self, ids: list[str]) -> np.ndarray:
        if self._skip is None:
            self._skip = self.committed()
        if not len(self._skip):
            return np.zeros(len(ids), dtype=bool)
        hashes = id_hashes(ids)
        at = np.minimum(np.searchsorted(self._skip, hashes), len(self._skip) - 1)
        return self._skip[at] == hashes
