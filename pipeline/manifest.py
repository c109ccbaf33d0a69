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

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .config import ColumnsConfig, JobConfig, TaskConfig
from .records import INTERNAL_COLUMNS, TRANSCRIPT_COLUMNS, Status
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

JSONL_LINE = "text"  # the column Ray's read_text gives each JSONL line

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
    if fmt == "jsonl":
        return _jsonl_columns(lines, uri)
    try:
        return pacsv.read_csv(pa.py_buffer(sample)).schema
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


def count_rows(uri: str, cfg: JobConfig) -> int | None:
    """Rows in the manifest, for progress and ETA: Parquet from its footer, JSONL / CSV by counting
    lines in one streamed pass (no parsing). None when it cannot be told cheaply."""
    fmt = detect_format(uri, cfg.input.format)
    try:
        fs, path = url_to_fs(uri, cfg.storage.options)
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

    A column whose name is taken by an output column (``duration_s``, ``text``, ...) is carried
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


def carried_name(name: str) -> str:
    """A manifest column's name in the output: ``input_<name>`` where it clashes with an output column."""
    return f"input_{name}" if name in TRANSCRIPT_COLUMNS or name in INTERNAL_COLUMNS else name


MAX_READ_BLOCKS = 4096


def read_block_rows(cfg: JobConfig) -> int:
    """Manifest rows per read block: about one engine batch. A block is what one decode task
    works through, in order, and what moves on downstream as one unit, so blocks of about a batch
    keep decode parallel and results streaming to the driver (Ray's default puts a whole small
    manifest into a handful of blocks)."""
    return cfg.engine.batch_size


def checked_schema(uri: str, cfg: JobConfig) -> pa.Schema:
    """The manifest's columns (:func:`read_manifest_schema`), refused when it has no audio column."""
    schema = read_manifest_schema(uri, cfg)
    empty_jsonl = detect_format(uri, cfg.input.format) == "jsonl" and not schema.names  # 0 rows, fine
    if cfg.input.columns.audio not in schema.names and not empty_jsonl:
        raise ManifestError(f"manifest {uri} has no {cfg.input.columns.audio!r} column (columns: {schema.names})")
    return schema


def read_manifest(uri: str, cfg: JobConfig, n_rows: int | None = None, schema: pa.Schema | None = None):
    """A Ray Dataset of the manifest's raw rows, read in Ray tasks (streamed). ``n_rows`` (when
    known) sizes the read blocks (:func:`read_block_rows`), up to MAX_READ_BLOCKS blocks;
    ``schema``: the manifest's :func:`checked_schema`, when the caller has it already."""
    import ray.data

    fmt = detect_format(uri, cfg.input.format)
    schema = checked_schema(uri, cfg) if schema is None else schema
    fs, path = url_to_fs(uri, cfg.storage.options)
    remote = {"num_cpus": 0.25}  # light: never starve the actor pool
    if is_process_local(fs):
        # memory:// lives in this process only; workers cannot see it. The table is already in
        # this process's memory, so handing it to Ray costs nothing extra.
        with fs.open(path, "rb") as f:
            data = pa.py_buffer(f.read())
        table = {
            "parquet": lambda: pq.read_table(pa.BufferReader(data)),
            "csv": lambda: pacsv.read_csv(pa.BufferReader(data), convert_options=_csv_as_text(schema)),
            "jsonl": lambda: pa.table({JSONL_LINE: [ln for ln in data.to_pybytes().decode().splitlines() if ln.strip()]}),
        }[fmt]()
        return ray.data.from_arrow(table)
    kwargs: dict[str, Any] = {"filesystem": None if fs.protocol in ("file", ("file", "local")) else arrow_filesystem(fs)}
    read_path = path if kwargs["filesystem"] is not None else os.path.abspath(path)
    if n_rows:
        kwargs["override_num_blocks"] = min(MAX_READ_BLOCKS, max(1, -(-n_rows // read_block_rows(cfg))))
    if fmt == "parquet":
        return ray.data.read_parquet(read_path, **remote, **kwargs)
    if fmt == "csv":  # a CSV file is one block at most (its header cannot be split off)
        kwargs.pop("override_num_blocks", None)
        return ray.data.read_csv(read_path, **remote, convert_options=_csv_as_text(schema), **kwargs)
    # JSONL is read as text and parsed per row (PrepareStage): a malformed line becomes one
    # invalid_row instead of failing the read, and no type inference can split the schema.
    return ray.data.read_text(read_path, **remote, **kwargs)


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


def _parse_line(raw: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    line = raw[JSONL_LINE]
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return {}, f"manifest line is not JSON ({e.msg}): {line[:120]!r}"
    if not isinstance(value, dict):
        return {}, f"manifest line is not a JSON object: {line[:120]!r}"
    return value, None


class PrepareStage:
    """Raw manifest batch -> resolved utterance rows with the prepared schema."""

    def __init__(self, manifest_uri: str, fmt: str, columns: ColumnsConfig, task: TaskConfig, extras: list[pa.Field],
                 skip_ids: Any = None):
        """``skip_ids``: sorted uint64 id hashes (or a Ray object ref to them) of rows an earlier
        attempt already committed; those rows are left out (resume)."""
        self.skip_ids = skip_ids
        self._skip: np.ndarray | None = None
        self.manifest_dir = parent_uri(manifest_uri)
        self.jsonl = fmt == "jsonl"
        self.columns = columns
        self.task = task
        self.extras = extras
        self.schema = pa.schema(list(PREPARED_FIELDS) + list(extras))

    def __call__(self, batch: pa.Table) -> pa.Table:
        c = self.columns
        rows = []
        for raw in batch.to_pylist():
            origin = raw[JSONL_LINE] if self.jsonl else json.dumps(raw, sort_keys=True, default=str)
            raw, problem = _parse_line(raw) if self.jsonl else (raw, None)
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
            if problem or row["audio"] is None:
                row["status"], row["error"] = Status.INVALID_ROW.value, problem or f"row has no {c.audio!r} value"
            if row["id"] is None:
                row["id"] = stable_id(row["audio"] or origin)
            for field in self.extras:
                value = raw.get(field.metadata[b"source"].decode())
                row[field.name] = _carried(value) if pa.types.is_string(field.type) else value
            rows.append(row)
        if self.skip_ids is not None and rows:
            rows = [row for row, done in zip(rows, self._committed([r["id"] for r in rows])) if not done]
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _committed(self, ids: list[str]) -> np.ndarray:
        from .output import id_hashes

        if self._skip is None:
            skip = self.skip_ids
            if not isinstance(skip, np.ndarray):  # a Ray object ref, fetched once per worker
                import ray

                skip = ray.get(skip)
            self._skip = skip
        if not len(self._skip):
            return np.zeros(len(ids), dtype=bool)
        hashes = id_hashes(ids)
        at = np.minimum(np.searchsorted(self._skip, hashes), len(self._skip) - 1)
        return self._skip[at] == hashes
