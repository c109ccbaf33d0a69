"""Manifests: one :class:`Manifest` per job (format, columns, row count, read once), one streaming
reader of its raw rows, and :class:`PrepareStage`, which turns raw rows into prepared rows.

A prepared row (``records.PREPARED``) has its id (derived where missing), its audio path resolved
against the manifest's folder, its task fields defaulted, and the manifest's other columns carried
through. A row without audio, or a JSONL line that is not a JSON object, is kept with status
``invalid_row``. Ray reads the same raw batches in its tasks (``plan.py``); the jobs and the
benchmark stream them through :meth:`Manifest.batches` on one process.
"""

from __future__ import annotations

import hashlib
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
from .records import PREPARED, RowSet, Status, carried_name, schema_of, stable_id
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


ROW_INDEX = "row_index"  # the raw batches' position column (records.KEY's row_index)
OFFSET_EVERY = 16  # the counting pass keeps the byte offset of every 16th line of a plain JSONL file
_COMPRESSED = (".gz", ".zst", ".bz2", ".xz")


@dataclass(frozen=True)
class ReadRange:
    """A run of manifest rows that one reader can stream on its own."""

    first_row: int
    n_rows: int
    start: int | None = None  # byte offsets (plain JSONL); None: from the start / to the end
    end: int | None = None
    row_groups: tuple[int, ...] | None = None  # Parquet row groups; None: all


@dataclass(frozen=True, eq=False)
class Manifest:
    """One job's manifest, described once (:meth:`open`): what every stage and report needs to
    know about it without reading it again.

    Every row has a position (``row_index``): its line in a JSONL file (0-based, blank lines
    counted), its record in a CSV or Parquet file. Position and content fingerprint together are
    the row's identity across attempts, whatever its id says."""

    uri: str  # absolute: workers may run elsewhere, audio paths are resolved against its folder
    format: str  # jsonl | csv | parquet
    schema: pa.Schema  # its columns, from its head (Parquet: the footer's types)
    extras: tuple[pa.Field, ...]  # the columns carried through to the output
    n_rows: int  # rows (JSONL: lines); positions are below this
    fingerprint: str  # the content's identity: the store's ETag, or size and SHA-256
    storage_options: dict[str, Any]
    offsets: np.ndarray | None = None  # plain JSONL: byte offset of lines 0, 16, 32, ...
    row_groups: tuple[int, ...] = ()  # Parquet: rows per row group

    @classmethod
    def open(cls, uri: str, cfg: JobConfig) -> "Manifest":
        """Read the manifest's head, then one streamed pass (rows, line offsets, content hash);
        refuse one without an audio column."""
        if not has_scheme(uri):
            uri = os.path.abspath(uri)
        fmt = detect_format(uri, cfg.input.format)
        opts = dict(cfg.storage.options)
        schema = _read_schema(uri, fmt, opts)
        empty_jsonl = fmt == "jsonl" and not schema.names  # 0 rows, fine
        if cfg.input.columns.audio not in schema.names and not empty_jsonl:
            raise ManifestError(f"manifest {uri} has no {cfg.input.columns.audio!r} column (columns: {schema.names})")
        extras = tuple(extra_fields(schema, fmt, cfg.input.columns))
        try:
            fs, path = url_to_fs(uri, opts)
            return cls(uri, fmt, schema, extras, storage_options=opts, **_scan(fs, path, fmt))
        except ManifestError:
            raise
        except Exception as e:  # noqa: BLE001 - any storage failure here means "cannot run"
            raise ManifestError(f"cannot read manifest {uri}: {e}") from e

    @property
    def directory(self) -> str:
        return parent_uri(self.uri)

    def csv_options(self) -> pacsv.ConvertOptions:
        """A CSV has no types: every column is read as text, so "007" stays "007"."""
        return pacsv.ConvertOptions(column_types={n: pa.string() for n in self.schema.names},
                                    strings_can_be_null=True)

    def ranges(self, max_ranges: int) -> list[ReadRange]:
        """At most ``max_ranges`` runs of rows that tile the manifest, for parallel readers. A
        compressed or CSV file is one run (it cannot be entered in the middle)."""
        if self.offsets is not None and len(self.offsets) > 1 and max_ranges > 1:
            step = -(-len(self.offsets) // max_ranges)
            marks = list(range(0, len(self.offsets), step))
            return [ReadRange(first_row=m * OFFSET_EVERY,
                              n_rows=min(self.n_rows, n * OFFSET_EVERY) - m * OFFSET_EVERY if n else
                              self.n_rows - m * OFFSET_EVERY,
                              start=int(self.offsets[m]), end=int(self.offsets[n]) if n else None)
                    for m, n in zip(marks, [*marks[1:], None])]
        if self.row_groups and max_ranges > 1:
            step = -(-len(self.row_groups) // max_ranges)
            out, first = [], 0
            for g in range(0, len(self.row_groups), step):
                groups = tuple(range(g, min(g + step, len(self.row_groups))))
                n = sum(self.row_groups[i] for i in groups)
                out.append(ReadRange(first_row=first, n_rows=n, row_groups=groups))
                first += n
            return out
        return [ReadRange(first_row=0, n_rows=self.n_rows)]

    def read(self, rng: ReadRange, rows_per_batch: int = 4096) -> Iterator[pa.Table]:
        """The raw rows of ``rng`` in batches, streamed: Parquet with its types, CSV as text, JSONL
        as one line of text per row; each batch with its rows' ``row_index``. The one reader of
        manifests: Ray's read tasks (plan.py), the jobs and the benchmark all read through it."""
        fs, path = url_to_fs(self.uri, self.storage_options)
        if self.format == "parquet":
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                first = rng.first_row
                for batch in parquet.iter_batches(batch_size=rows_per_batch, row_groups=rng.row_groups):
                    yield _positioned(pa.Table.from_batches([batch]), first)
                    first += batch.num_rows
        elif self.format == "csv":
            with fs.open(path, "rb", compression="infer") as f:
                first = rng.first_row
                for batch in pacsv.open_csv(f, convert_options=self.csv_options()):
                    yield _positioned(pa.Table.from_batches([batch]), first)
                    first += batch.num_rows
        else:
            yield from self._read_jsonl(fs, path, rng, rows_per_batch)

    def _read_jsonl(self, fs, path: str, rng: ReadRange, rows_per_batch: int) -> Iterator[pa.Table]:
        lines: list[str] = []
        positions: list[int] = []
        with fs.open(path, "rb", compression="infer") as f:
            if rng.start:
                f.seek(rng.start)
            at, row = rng.start or 0, rng.first_row
            for raw in f:
                if rng.end is not None and at >= rng.end:
                    break
                at += len(raw)
                if raw.strip():
                    lines.append(_jsonl_text(raw))
                    positions.append(row)
                row += 1
                if len(lines) >= rows_per_batch:
                    yield pa.table({ROW_INDEX: pa.array(positions, pa.int64()), JSONL_LINE: lines})
                    lines, positions = [], []
        if lines:
            yield pa.table({ROW_INDEX: pa.array(positions, pa.int64()), JSONL_LINE: lines})

    def batches(self, rows_per_batch: int = 4096) -> Iterator[pa.Table]:
        """Every raw row, in order, streamed on this process (never the whole file)."""
        for rng in self.ranges(1):
            yield from self.read(rng, rows_per_batch)

    def raw_rows(self, batch: pa.Table) -> Iterator["RawRow"]:
        """Each row of a raw batch as a dict of its manifest columns (a JSONL line parsed here)."""
        for raw in batch.to_pylist():
            row_index = raw.pop(ROW_INDEX)
            if self.format != "jsonl":
                yield RawRow(row_index, raw, json.dumps(raw, sort_keys=True, default=str), None)
                continue
            line = raw[JSONL_LINE]
            where = f"line {row_index + 1}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                yield RawRow(row_index, {}, line, f"manifest {where} is not JSON ({e.msg}): {line[:120]!r}")
                continue
            if not isinstance(value, dict):
                yield RawRow(row_index, {}, line, f"manifest {where} is not a JSON object: {line[:120]!r}")
                continue
            yield RawRow(row_index, value, line, None)


def _jsonl_text(raw: bytes) -> str:
    """One JSONL line's text (without its line break)."""
    return raw.decode("utf-8", errors="replace").rstrip("\r\n")


def _positioned(table: pa.Table, first_row: int) -> pa.Table:
    return table.add_column(0, ROW_INDEX, pa.array(np.arange(first_row, first_row + table.num_rows), pa.int64()))


def _scan(fs, path: str, fmt: str) -> dict[str, Any]:
    """One streamed pass over the manifest: rows, line offsets (plain JSONL) and a content
    fingerprint (the store's ETag when it has one, else size and SHA-256)."""
    info = fs.info(path)
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    digest = hashlib.sha256()
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        if not etag:
            with fs.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        return {"n_rows": meta.num_rows, "row_groups": row_groups,
                "fingerprint": f"etag:{etag}" if etag else f"size:{info.get('size')}:sha256:{digest.hexdigest()}"}
    plain = fmt == "jsonl" and not path.lower().endswith(_COMPRESSED)
    offsets: list[np.ndarray] = [np.zeros(1, np.int64)] if plain else []
    lines, at, last = 0, 0, b"\n"
    with fs.open(path, "rb", compression="infer") as f:
        while chunk := f.read(1 << 22):
            if not etag:
                digest.update(chunk)
            if plain:  # the starts of lines OFFSET_EVERY, 2 * OFFSET_EVERY, ... (after their newlines)
                ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + at + 1
                numbers = np.arange(lines + 1, lines + 1 + len(ends))
                offsets.append(ends[numbers % OFFSET_EVERY == 0])
            lines += chunk.count(b"\n")
            at += len(chunk)
            last = chunk[-1:]
    n_rows = max(0, lines + (last != b"\n") - (fmt == "csv"))  # a last line without its newline; the CSV header
    fingerprint = f"etag:{etag}" if etag else f"size:{at}:sha256:{digest.hexdigest()}"
    if not plain:
        return {"n_rows": n_rows, "fingerprint": fingerprint}
    marks = np.concatenate(offsets)
    return {"n_rows": n_rows, "fingerprint": fingerprint, "offsets": marks[marks < at] if at else marks[:0]}


@dataclass(frozen=True)
class RawRow:
    row_index: int  # its position in the manifest
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
                 committed: Callable[[], RowSet] | None = None):
        """``committed``: gives the positions of rows an earlier attempt already committed,
        fetched once per worker on first use; those rows are left out (resume)."""
        self.manifest = manifest
        self.columns = columns
        self.task = task
        self.committed = committed
        self._skip: RowSet | None = None
        self.schema = schema_of(PREPARED, manifest.extras)

    def rows(self, batch: pa.Table) -> list[dict[str, Any]]:
        c = self.columns
        rows = []
        for raw in self.manifest.raw_rows(batch):
            values = raw.values
            audio = _text(values.get(c.audio))
            row: dict[str, Any] = {
                "id": _text(values.get(c.id)),
                "row_index": raw.row_index,
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
            if self._skip is None:
                self._skip = self.committed()
            done = self._skip.contains([r["row_index"] for r in rows])
            rows = [row for row, skip in zip(rows, done) if not skip]
        return rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.rows(batch), schema=self.schema)
