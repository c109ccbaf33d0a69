"""Manifests: one :class:`Manifest` per job (format, columns, row count, read once), one streaming
reader of its raw rows, and :class:`PrepareStage`, which turns raw rows into prepared rows.

A prepared row (``records.PREPARED``) has its id (derived where missing), its audio path resolved
against the manifest's folder and checked against the storage the job may read
(``input.allowed_prefixes``), its task fields defaulted, its keywords cleaned and bounded
(``keywords.py``), and the manifest's other columns carried through. Ray reads the same raw
batches in its tasks (``plan.py``); the jobs and the benchmark stream them through
:meth:`Manifest.batches` on one process.

Manifests are written by other people's scripts, so no line of one can fail the job. JSONL lines
are read as bytes by one bounded reader (:func:`read_lines`): lines end at ``\n`` only (a U+2028
inside a string is text), a line longer than ``input.max_line_bytes`` is skipped to its end and
never held, and each is decoded and parsed per row (:func:`parse_line`): a byte-order mark is
dropped, and a line that is not valid UTF-8, not JSON, not a JSON object or nested too deep is one
``invalid_row`` naming its line number. The columns come from the manifest's head; keys that first
appear later are carried in one JSON text column, :data:`OTHER_COLUMNS` (null on rows that have
none), never dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .config import ColumnsConfig, JobConfig, TaskConfig
from .errors import CannotRun
from .keywords import KeywordLimits, row_keywords
from .records import PREPARED, RowSet, Status, carried_name, schema_of, stable_id
from .scrub import redact_text
from .storage import has_scheme, normalize_uri, parent_uri, refusal, store_root, url_to_fs


class ManifestError(CannotRun, ValueError):
    """The manifest cannot be read at all (missing, wrong format, no audio column)."""


# A raw JSONL batch: its rows' positions (ROW_INDEX), then per non-blank line:
JSONL_LINE = "text"  # the line's bytes (binary: decoding is per row), null when over max_line_bytes
JSONL_LENGTH = "length"  # its length in bytes
OTHER_COLUMNS = "other_columns"
"""JSONL only: a JSON object of the row's keys that the manifest's head did not show (null when none)."""

_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_HEAD_BYTES = 1 << 20  # the head read for a text manifest's columns (JSONL: whole lines, at least one)
_READ_BYTES = 1 << 20  # one read of the line reader


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
    """An audio cell as the URI that is read: absolute, or joined onto the manifest's folder, with
    ``.`` and ``..`` segments resolved (so the URI checked against the allowed storage is the one
    that is read)."""
    if has_scheme(audio):
        return normalize_uri(audio)
    if os.path.isabs(audio):
        return posixpath.normpath(audio)
    return posixpath.normpath(posixpath.join(manifest_dir, audio)) if not has_scheme(manifest_dir) else (
        normalize_uri(manifest_dir.rstrip("/") + "/" + audio)
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
    allowed_prefixes: tuple[str, ...] = ()  # where rows may read audio (input.allowed_prefixes)
    max_line_bytes: int = 16 * 2**20  # input.max_line_bytes

    @classmethod
    def open(cls, uri: str, cfg: JobConfig) -> "Manifest":
        """Read the manifest's head, then one streamed pass (rows, line offsets, content hash);
        refuse one without an audio column, or one that is not a regular file (a FIFO would hang
        the job)."""
        if not has_scheme(uri):
            uri = os.path.abspath(uri)
        fmt = detect_format(uri, cfg.input.format)
        opts = dict(cfg.storage.options)
        max_line = cfg.input.max_line_bytes
        schema = _read_schema(uri, fmt, opts, max_line)
        empty_jsonl = fmt == "jsonl" and not schema.names  # 0 rows, fine
        if cfg.input.columns.audio not in schema.names and not empty_jsonl:
            raise ManifestError(f"manifest {redact_text(uri)} has no {cfg.input.columns.audio!r} column "
                                f"(columns: {schema.names})")
        extras = tuple(extra_fields(schema, fmt, cfg.input.columns))
        allowed = cfg.input.allowed_prefixes
        allowed = tuple(allowed) if allowed is not None else (store_root(uri),)
        try:
            fs, path = url_to_fs(uri, opts)
            return cls(uri, fmt, schema, extras, storage_options=opts, allowed_prefixes=allowed,
                       max_line_bytes=max_line, **_scan(fs, path, fmt))
        except ManifestError:
            raise
        except Exception as e:  # noqa: BLE001 - any storage failure here means "cannot run"
            raise ManifestError(f"cannot read manifest {redact_text(uri)}: {redact_text(str(e))}") from e

    def for_workers(self) -> "Manifest":
        """This manifest without its index of runs (line offsets, row-group sizes): what a read
        task or a stage needs to read and parse its own run. Every read task carries the manifest
        it reads, and the index grows with the file (50 KB at 100,000 lines)."""
        return replace(self, offsets=None, row_groups=())

    @property
    def other_columns(self) -> str | None:
        """The name of the catch-all column (JSONL), or None."""
        return self.extras[-1].name if self.format == "jsonl" and self.extras else None

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
        lines: list[tuple[int, bytes | None, int]] = []
        size = None if rng.end is None else rng.end - (rng.start or 0)
        with fs.open(path, "rb", compression="infer") as f:
            if rng.start:
                f.seek(rng.start)
            for line in read_lines(f, self.max_line_bytes, rng.first_row, size):
                lines.append(line)
                if len(lines) >= rows_per_batch:
                    yield _lines_table(lines)
                    lines = []
        if lines:
            yield _lines_table(lines)

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
            yield parse_line(row_index, raw[JSONL_LINE], raw[JSONL_LENGTH], self.max_line_bytes)


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


# --- JSONL lines -------------------------------------------------------------------------------------


def read_lines(f: BinaryIO, max_line_bytes: int, first_row: int = 0,
               size: int | None = None) -> Iterator[tuple[int, bytes | None, int]]:
    """(position, bytes, length) of each non-blank line of a binary stream, up to ``size`` bytes
    (None: to its end), the first line at position ``first_row`` (0-based; blank lines count).
    Lines end at ``\n`` only; a trailing ``\r`` is dropped. A line longer than ``max_line_bytes``
    comes out with bytes None (it is skipped to its end, never held), so memory stays bounded
    whatever the file holds."""
    number, pending, length, over = first_row, bytearray(), 0, False
    left = size
    while left is None or left > 0:
        chunk = f.read(_READ_BYTES if left is None else min(_READ_BYTES, left))
        if not chunk:
            break
        if left is not None:
            left -= len(chunk)
        at = 0
        while True:
            cut = chunk.find(b"\n", at)
            piece = chunk[at:] if cut < 0 else chunk[at:cut]
            length += len(piece)
            if not over:
                pending += piece
                if len(pending) > max_line_bytes:
                    over, pending = True, bytearray()
            if cut < 0:
                break
            line = _finished(number, pending, length, over)
            if line is not None:
                yield line
            number, pending, length, over, at = number + 1, bytearray(), 0, False, cut + 1
    line = _finished(number, pending, length, over)
    if line is not None:
        yield line


def _finished(number: int, pending: bytearray, length: int, over: bool) -> tuple[int, bytes | None, int] | None:
    if over:
        return number, None, length
    data = bytes(pending).rstrip(b"\r")
    return (number, data, length) if data.strip() else None  # blank lines are not rows


def _lines_table(lines: list[tuple[int, bytes | None, int]]) -> pa.Table:
    positions, texts, lengths = zip(*lines) if lines else ((), (), ())
    return pa.table([pa.array(positions, pa.int64()), pa.array(texts, pa.binary()), pa.array(lengths, pa.int64())],
                    schema=JSONL_SCHEMA)


JSONL_SCHEMA = pa.schema([pa.field(ROW_INDEX, pa.int64()), pa.field(JSONL_LINE, pa.binary()),
                          pa.field(JSONL_LENGTH, pa.int64())])


_BOM = "\ufeff"


def parse_line(row_index: int, data: bytes | None, length: int | None, max_line_bytes: int) -> "RawRow":
    """One JSONL line (at 0-based ``row_index``) as a row: its JSON object, or the reason (naming
    its 1-based line number) it is not one. Never raises: a line is one row's problem, never the
    job's."""
    where = f"line {row_index + 1}"
    if data is None:
        return RawRow(row_index, {}, f"{where}: {length} bytes", f"manifest {where} is {length} bytes, longer "
                      f"than input.max_line_bytes ({max_line_bytes}); skipped")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        shown = data.decode("utf-8", "backslashreplace")  # \xff: never valid JSON if written on
        return RawRow(row_index, {}, shown, f"manifest {where} is not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                      f"column {e.start + 1}): {redact_text(shown[:120])!r}")
    text = text.lstrip(_BOM)  # a byte-order mark: at the file's start, or where files were joined
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return RawRow(row_index, {}, text, f"manifest {where} is not JSON ({e.msg}): {redact_text(text[:120])!r}")
    except (ValueError, RecursionError, MemoryError) as e:  # nesting too deep, a number too long, ...
        return RawRow(row_index, {}, text, f"manifest {where} cannot be read as JSON ({type(e).__name__}: "
                      f"{str(e)[:80]}): {redact_text(text[:120])!r}")
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else "a JSON scalar"
        return RawRow(row_index, {}, text,
                      f"manifest {where} is {kind}, not a JSON object: {redact_text(text[:120])!r}")
    return RawRow(row_index, value, text, None)


def _read_schema(uri: str, fmt: str, storage_options: dict[str, Any], max_line_bytes: int) -> pa.Schema:
    """The manifest's columns, read from its head only (Parquet footer, first CSV/JSONL lines)."""
    try:
        fs, path = url_to_fs(uri, storage_options)
        info = fs.info(path)
        if info.get("type") not in ("file", None):
            raise ManifestError(f"manifest {redact_text(uri)} is not a regular file ({info.get('type')})")
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                return pq.read_schema(f)
        with fs.open(path, "rb", compression="infer") as f:
            if fmt == "jsonl":
                return _jsonl_columns(_head_lines(f, max_line_bytes), uri, max_line_bytes)
            head = f.read(_HEAD_BYTES)
    except FileNotFoundError as e:
        raise ManifestError(f"manifest not found: {redact_text(uri)}") from e
    except ManifestError:
        raise
    except Exception as e:  # noqa: BLE001 - any storage/parse failure means "cannot run"
        raise ManifestError(f"cannot read manifest {redact_text(uri)}: {redact_text(str(e))}") from e
    lines = head.splitlines()
    if len(head) == _HEAD_BYTES and len(lines) > 1:
        lines = lines[:-1]  # drop a possibly partial last line
    try:
        return pacsv.read_csv(pa.py_buffer(b"\n".join(lines) + b"\n")).schema
    except Exception as e:  # noqa: BLE001
        raise ManifestError(f"manifest {redact_text(uri)} is not valid CSV: {e}") from e


def _head_lines(f: BinaryIO, max_line_bytes: int) -> list[tuple[int, bytes | None, int]]:
    """Whole lines from the start until about :data:`_HEAD_BYTES` are read (a long first line is
    read whole, up to ``max_line_bytes``)."""
    lines, read = [], 0
    for line in read_lines(f, max_line_bytes):
        lines.append(line)
        read += line[2] + 1
        if read >= _HEAD_BYTES:
            break
    return lines


def _jsonl_columns(lines: list[tuple[int, bytes | None, int]], uri: str, max_line_bytes: int) -> pa.Schema:
    """Keys seen in the first lines, in order; malformed lines are left to PrepareStage."""
    names: dict[str, None] = {}
    for position, data, length in lines:
        row = parse_line(position, data, length, max_line_bytes)
        names.update(dict.fromkeys(str(k) for k in row.values))
    if not names and lines:
        raise ManifestError(f"manifest {redact_text(uri)} has no JSON object in its first lines")
    return pa.schema([pa.field(n, pa.string()) for n in names])


def extra_fields(schema: pa.Schema, fmt: str, columns: ColumnsConfig) -> list[pa.Field]:
    """Carried-through columns: Parquet keeps its types; CSV and JSONL values travel as text.

    A column whose name is taken by a column of the row (``duration_s``, ``text``, ...) is carried
    as ``input_<name>`` rather than dropped. A JSONL manifest gets one more, last:
    :data:`OTHER_COLUMNS`, for keys that first appear after the head.
    """
    mapped = set(columns.model_dump().values())
    fields = []
    for field in schema:
        if field.name in mapped:
            continue
        keep = fmt == "parquet" and not pa.types.is_null(field.type)
        fields.append(pa.field(carried_name(field.name), field.type if keep else pa.string(), metadata={"source": field.name}))
    if fmt == "jsonl":  # JSON lines may hold keys the head did not show: carried, never dropped
        taken = {f.name for f in fields}
        name = OTHER_COLUMNS
        while name in taken:
            name = "input_" + name
        fields.append(pa.field(name, pa.string(), metadata={"source": ""}))
    return fields


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from pandas-made files
        return None
    if isinstance(value, str):
        return value.strip() or None
    return str(value)


def _fallback_id(raw: RawRow) -> str:
    """The id of a row with no usable audio and no id: its position and a hash of what it held,
    never its text (which may be anything)."""
    digest = hashlib.sha1(raw.origin.encode("utf-8", "backslashreplace")).hexdigest()[:10]
    return f"row{raw.row_index}-{digest}"


def _carried(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


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
        self.limits = KeywordLimits.of(task)
        self._known = set(columns.model_dump().values()) | {f.metadata[b"source"].decode() for f in manifest.extras}
        self.committed = committed
        self._skip: RowSet | None = None
        self.schema = schema_of(PREPARED, manifest.extras)

    def rows(self, batch: pa.Table) -> list[dict[str, Any]]:
        rows = []
        for raw in self.manifest.raw_rows(batch):
            try:
                rows.append(self._row(raw))
            except Exception as e:  # noqa: BLE001 - one line is one row's problem, never the job's
                row = {name: None for name in self.schema.names}
                row.update(id=_fallback_id(raw), row_index=raw.row_index, status=Status.INVALID_ROW.value,
                           keywords=[], error=redact_text(f"{self._where(raw)}cannot prepare the row: "
                                                          f"{type(e).__name__}: {e}"[:500]))
                rows.append(row)
        if self.committed is not None and rows:
            if self._skip is None:
                self._skip = self.committed()
            done = self._skip.contains([r["row_index"] for r in rows])
            rows = [row for row, skip in zip(rows, done) if not skip]
        return rows

    def _where(self, raw: RawRow) -> str:
        return f"line {raw.row_index + 1}: " if self.manifest.format == "jsonl" else f"row {raw.row_index}: "

    def _row(self, raw: RawRow) -> dict[str, Any]:
        c = self.columns
        manifest = self.manifest
        values = raw.values
        cell = values.get(c.audio)
        audio = _text(cell) if isinstance(cell, str) or cell is None else None
        row: dict[str, Any] = {
            "id": _text(values.get(c.id)),
            "row_index": raw.row_index,
            "audio": resolve_audio_uri(audio, manifest.directory) if audio else None,
            "status": Status.OK.value,
            "error": None,
            "reference": _text(values.get(c.reference)),
            "language": _text(values.get(c.language)) or self.task.language,
            "task": _text(values.get(c.task)) or self.task.task,
            "target_language": _text(values.get(c.target_language)) or self.task.target_language,
            "keywords": row_keywords(self.task.keywords, values.get(c.keywords), self.limits),
        }
        where = self._where(raw)
        if raw.problem:
            row["status"], row["error"] = Status.INVALID_ROW.value, raw.problem
        elif row["audio"] is None:
            why = "is not a string" if cell is not None and not isinstance(cell, str) else "has no value"
            row["status"], row["error"] = Status.INVALID_ROW.value, f"{where}the {c.audio!r} column {why}"
        else:
            reason = refusal(row["audio"], manifest.allowed_prefixes)
            if reason:
                row["status"] = Status.FORBIDDEN_URI.value
                row["error"] = redact_text(f"{where}{row['audio']}: {reason}")
        if row["id"] is None:
            row["id"] = stable_id(row["audio"]) if row["audio"] else _fallback_id(raw)
        for field in manifest.extras:
            if field.name == manifest.other_columns:
                late = {k: v for k, v in values.items() if k not in self._known}
                row[field.name] = json.dumps(late, ensure_ascii=False, default=str) if late else None
                continue
            value = values.get(field.metadata[b"source"].decode())
            row[field.name] = _carried(value) if pa.types.is_string(field.type) else value
        return row

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.rows(batch), schema=self.schema)
