"""Manifests: one :class:`Manifest` per job (format, columns, row count, read once), one streaming
reader of its raw rows, and :class:`PrepareStage`, which turns raw rows into prepared rows.

A prepared row (``records.PREPARED``) has its id (derived where missing), its audio path resolved
against the manifest's folder and checked against the storage the job may read
(``input.allowed_prefixes``), its task fields defaulted, its keywords cleaned and bounded
(``keywords.py``), and the manifest's other columns carried through. Ray reads the same raw
batches in its tasks (``plan.py``); the jobs and the benchmark stream them through
:meth:`Manifest.batches` on one process.

Manifests are written by other people's scripts, so no line of one can fail the job. JSONL is read
by Quarry's own line reader (:func:`read_lines`), the same in Ray's tasks and here: lines end at
``\n`` only (a U+2028 inside a string is text), each line keeps its number, a byte-order mark is
dropped, and a line that is not valid UTF-8, not JSON, not a JSON object, nested too deep or longer
than ``input.max_line_bytes`` is one ``invalid_row`` naming its line number. The columns come from
the manifest's head; keys that first appear later are carried in one JSON text column,
:data:`OTHER_COLUMNS` (null on rows that have none), never dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from .config import ColumnsConfig, JobConfig, TaskConfig
from .errors import CannotRun
from .keywords import KeywordLimits, row_keywords
from .records import PREPARED, Status, carried_name, id_hashes, schema_of, stable_id
from .redact import redact_text
from .storage import has_scheme, normalize_uri, parent_uri, refusal, store_root, url_to_fs


class ManifestError(CannotRun, ValueError):
    """The manifest cannot be read at all (missing, wrong format, no audio column)."""


# A raw JSONL batch: one row per non-blank line, parsed per row (PrepareStage), never by the reader.
JSONL_LINE = "text"  # the line's bytes (binary: decoding is per row), null when over max_line_bytes
JSONL_NUMBER = "line"  # its 1-based line number in the file
JSONL_LENGTH = "length"  # its length in bytes
JSONL_SCHEMA = pa.schema([pa.field(JSONL_NUMBER, pa.int64()), pa.field(JSONL_LINE, pa.binary()),
                          pa.field(JSONL_LENGTH, pa.int64())])
OTHER_COLUMNS = "other_columns"
"""JSONL only: a JSON object of the row's keys that the manifest's head did not show (null when none)."""

_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_HEAD_BYTES = 1 << 20  # the head read for a text manifest's columns (JSONL: whole lines, at least one)
_READ_BYTES = 1 << 20  # one read of the line reader
_INDEX_ENTRIES = 8192  # line starts remembered for a JSONL manifest's read ranges, at most


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


@dataclass(frozen=True)
class LineRange:
    """A stretch of whole lines of a JSONL file, read by one task: bytes [start, end) (end None:
    to the end of the file), the first of them numbered ``first_line``."""

    start: int
    end: int | None
    first_line: int


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
    allowed_prefixes: tuple[str, ...] = ()  # where rows may read audio (input.allowed_prefixes)
    max_line_bytes: int = 16 * 2**20  # input.max_line_bytes
    line_index: tuple[tuple[int, int], ...] = ()  # JSONL: (byte offset, line number) of some line starts

    @classmethod
    def open(cls, uri: str, cfg: JobConfig) -> "Manifest":
        """Read the manifest's head and count its rows; refuse one without an audio column, or one
        that is not a regular file (a FIFO would hang the job)."""
        if not has_scheme(uri):
            uri = os.path.abspath(uri)
        fmt = detect_format(uri, cfg.input.format)
        max_line = cfg.input.max_line_bytes
        schema = _read_schema(uri, fmt, cfg.storage.options, max_line)
        empty_jsonl = fmt == "jsonl" and not schema.names  # 0 rows, fine
        if cfg.input.columns.audio not in schema.names and not empty_jsonl:
            raise ManifestError(f"manifest {redact_text(uri)} has no {cfg.input.columns.audio!r} column "
                                f"(columns: {schema.names})")
        n_rows, index = _count_rows(uri, fmt, cfg.storage.options)
        allowed = cfg.input.allowed_prefixes
        return cls(uri, fmt, schema, tuple(extra_fields(schema, fmt, cfg.input.columns)), n_rows,
                   dict(cfg.storage.options), tuple(allowed) if allowed is not None else (store_root(uri),),
                   max_line, index)

    @property
    def other_columns(self) -> str | None:
        """The name of the catch-all column (JSONL), or None."""
        return self.extras[-1].name if self.format == "jsonl" and self.extras else None

    def line_ranges(self, lines_per_range: int, max_ranges: int) -> list[LineRange]:
        """The JSONL file cut into ranges of about ``lines_per_range`` whole lines (at most
        ``max_ranges``), for reading in parallel tasks; one range for a compressed file."""
        if not self.line_index:
            return [LineRange(0, None, 1)]
        if self.n_rows:
            lines_per_range = max(lines_per_range, -(-self.n_rows // max_ranges))
        ranges: list[LineRange] = []
        start, first = self.line_index[0]
        for offset, number in self.line_index[1:]:
            if number - first >= lines_per_range:
                ranges.append(LineRange(start, offset, first))
                start, first = offset, number
        ranges.append(LineRange(start, None, first))
        return ranges

    def read_ranges(self, ranges: pa.Table) -> pa.Table:
        """The raw JSONL rows of a table of ranges (columns start, end, first_line): how Ray's
        read tasks call :meth:`read_range`."""
        return pa.concat_tables([self.read_range(LineRange(**r)) for r in ranges.to_pylist()] or
                                [JSONL_SCHEMA.empty_table()])

    def read_range(self, line_range: LineRange) -> pa.Table:
        """The raw JSONL rows of one range (:data:`JSONL_SCHEMA`)."""
        fs, path = url_to_fs(self.uri, self.storage_options)
        compressed = line_range.end is None and line_range.start == 0
        with fs.open(path, "rb", compression="infer" if compressed else None) as f:
            if line_range.start:
                f.seek(line_range.start)
            size = None if line_range.end is None else line_range.end - line_range.start
            return _lines_table(list(read_lines(f, self.max_line_bytes, line_range.first_line, size)))

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
            lines: list[tuple[int, bytes | None, int]] = []
            with fs.open(path, "rb", compression="infer") as f:
                for line in read_lines(f, self.max_line_bytes):
                    lines.append(line)
                    if len(lines) >= rows_per_batch:
                        yield _lines_table(lines)
                        lines = []
            if lines:
                yield _lines_table(lines)

    def raw_rows(self, batch: pa.Table) -> Iterator["RawRow"]:
        """Each row of a raw batch as a dict of its manifest columns (a JSONL line parsed here)."""
        for raw in batch.to_pylist():
            if self.format != "jsonl":
                yield RawRow(raw, json.dumps(raw, sort_keys=True, default=str), None)
                continue
            yield parse_line(raw[JSONL_NUMBER], raw[JSONL_LINE], raw[JSONL_LENGTH], self.max_line_bytes)


@dataclass(frozen=True)
class RawRow:
    values: dict[str, Any]  # the manifest's columns ({} when the line could not be parsed)
    origin: str  # the line as written (JSONL) or its values as JSON: an id of last resort
    problem: str | None  # why the row cannot be used, when it cannot
    line: int | None = None  # JSONL: its line number


# --- JSONL lines -------------------------------------------------------------------------------------


def read_lines(f: BinaryIO, max_line_bytes: int, first_line: int = 1,
               size: int | None = None) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes, length) of each non-blank line of a binary stream, up to ``size`` bytes
    (None: to its end). Lines end at ``\n`` only; a trailing ``\r`` is dropped. A line longer than
    ``max_line_bytes`` comes out with bytes None (it is skipped to its end, never held), so memory
    stays bounded whatever the file holds."""
    number, pending, length, over = first_line, bytearray(), 0, False
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
    numbers, texts, lengths = zip(*lines) if lines else ((), (), ())
    return pa.table([pa.array(numbers, pa.int64()), pa.array(texts, pa.binary()), pa.array(lengths, pa.int64())],
                    schema=JSONL_SCHEMA)


_BOM = "\ufeff"


def parse_line(number: int | None, data: bytes | None, length: int | None, max_line_bytes: int) -> "RawRow":
    """One JSONL line as a row: its JSON object, or the reason (with its line number) it is not
    one. Never raises: a line is one row's problem, never the job's."""
    where = f"line {number}" if number is not None else "line"
    if data is None:
        return RawRow({}, f"{where}: {length} bytes", f"manifest {where} is {length} bytes, longer than "
                      f"input.max_line_bytes ({max_line_bytes}); skipped", number)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        shown = data.decode("utf-8", "backslashreplace")  # \xff: never valid JSON if written on
        return RawRow({}, shown, f"manifest {where} is not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                      f"column {e.start + 1}): {redact_text(shown[:120])!r}", number)
    text = text.lstrip(_BOM)  # a byte-order mark: at the file's start, or where files were joined
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return RawRow({}, text, f"manifest {where} is not JSON ({e.msg}): {redact_text(text[:120])!r}", number)
    except (ValueError, RecursionError, MemoryError) as e:  # nesting too deep, a number too long, ...
        return RawRow({}, text, f"manifest {where} cannot be read as JSON ({type(e).__name__}: "
                      f"{str(e)[:80]}): {redact_text(text[:120])!r}", number)
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else "a JSON scalar"
        return RawRow({}, text, f"manifest {where} is {kind}, not a JSON object: {redact_text(text[:120])!r}", number)
    return RawRow(value, text, None, number)


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
    for number, data, length in lines:
        row = parse_line(number, data, length, max_line_bytes)
        names.update(dict.fromkeys(str(k) for k in row.values))
    if not names and lines:
        raise ManifestError(f"manifest {redact_text(uri)} has no JSON object in its first lines")
    return pa.schema([pa.field(n, pa.string()) for n in names])


def _count_rows(uri: str, fmt: str, storage_options: dict[str, Any]) -> tuple[int | None, tuple[tuple[int, int], ...]]:
    """(rows, line index): Parquet from its footer, JSONL / CSV by counting lines in one streamed
    pass (no parsing). Rows are None when they cannot be told cheaply. For an uncompressed JSONL
    file the pass also notes where some lines start (at most :data:`_INDEX_ENTRIES`, evenly
    spaced), so that Ray tasks can read it in ranges of whole lines."""
    try:
        fs, path = url_to_fs(uri, storage_options)
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows, ()
        indexed = fmt == "jsonl" and infer_compression(path) is None
        index: list[tuple[int, int]] = [(0, 1)]
        stride, lines, offset, last = 1, 0, 0, b"\n"
        with fs.open(path, "rb", compression="infer") as f:
            while chunk := f.read(1 << 22):
                if indexed:
                    ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
                    numbers = lines + 2 + np.arange(len(ends))  # the line that starts after each newline
                    keep = (numbers - 1) % stride == 0
                    index.extend(zip((offset + ends[keep] + 1).tolist(), numbers[keep].tolist()))
                    while len(index) > _INDEX_ENTRIES:
                        stride *= 2
                        index = [e for e in index if (e[1] - 1) % stride == 0]
                lines += chunk.count(b"\n")
                offset += len(chunk)
                last = chunk[-1:]
        lines += last != b"\n"  # a last line without its newline
        index = [e for e in index if e[0] < offset] or [(0, 1)]
        return max(0, lines - (fmt == "csv")), tuple(index) if indexed else ()  # the CSV header is not a row
    except Exception:  # noqa: BLE001 - progress without an ETA is fine
        return None, ()


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
    """The id of a row with no usable audio and no id: its line number (JSONL) and a hash of what
    it held, never its text (which may be anything)."""
    digest = hashlib.sha1(raw.origin.encode("utf-8", "backslashreplace")).hexdigest()[:10]
    return f"line{raw.line}-{digest}" if raw.line is not None else f"row-{digest}"


def _carried(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


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
        self.limits = KeywordLimits.of(task)
        self._known = set(columns.model_dump().values()) | {f.metadata[b"source"].decode() for f in manifest.extras}
        self.committed = committed
        self._skip: np.ndarray | None = None
        self.schema = schema_of(PREPARED, manifest.extras)

    def rows(self, batch: pa.Table) -> list[dict[str, Any]]:
        rows = []
        for raw in self.manifest.raw_rows(batch):
            try:
                rows.append(self._row(raw))
            except Exception as e:  # noqa: BLE001 - one line is one row's problem, never the job's
                where = f"line {raw.line}: " if raw.line is not None else ""
                row = {name: None for name in self.schema.names}
                row.update(id=_fallback_id(raw), status=Status.INVALID_ROW.value, keywords=[],
                           error=redact_text(f"{where}cannot prepare the row: {type(e).__name__}: {e}"[:500]))
                rows.append(row)
        if self.committed is not None and rows:
            rows = [row for row, done in zip(rows, self._is_committed([r["id"] for r in rows])) if not done]
        return rows

    def _row(self, raw: RawRow) -> dict[str, Any]:
        c = self.columns
        manifest = self.manifest
        values = raw.values
        cell = values.get(c.audio)
        audio = _text(cell) if isinstance(cell, str) or cell is None else None
        row: dict[str, Any] = {
            "id": _text(values.get(c.id)),
            "audio": resolve_audio_uri(audio, manifest.directory) if audio else None,
            "status": Status.OK.value,
            "error": None,
            "reference": _text(values.get(c.reference)),
            "language": _text(values.get(c.language)) or self.task.language,
            "task": _text(values.get(c.task)) or self.task.task,
            "target_language": _text(values.get(c.target_language)) or self.task.target_language,
            "keywords": row_keywords(self.task.keywords, values.get(c.keywords), self.limits),
        }
        where = f"line {raw.line}: " if raw.line is not None else ""
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

    def _is_committed(self, ids: list[str]) -> np.ndarray:
        if self._skip is None:
            self._skip = self.committed()
        if not len(self._skip):
            return np.zeros(len(ids), dtype=bool)
        hashes = id_hashes(ids)
        at = np.minimum(np.searchsorted(self._skip, hashes), len(self._skip) - 1)
        return self._skip[at] == hashes
