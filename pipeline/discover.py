"""Incremental input: audio objects under a prefix or glob, minus what earlier runs already did.

For nightly jobs over an archive that only grows there is no manifest: ``quarry run --audio
'URI'`` lists the objects, leaves out those an earlier successful run under ``--skip-done-in``
already committed (any status but the transient ones), and writes what is left as the job's
manifest, ``<output>/inputs.jsonl``. From there the job is an ordinary manifest job, resumable
like any other. Ids are :func:`pipeline.records.stable_id` of the object URI, so the same object
has the same id every night.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .manifest import ManifestError
from .output import INPUTS_NAME
from .records import TRANSIENT, id_hashes, stable_id
from .storage import atomic_open, has_scheme, join_uri, url_to_fs

log = logging.getLogger("quarry")

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".aiff", ".aif", ".au", ".w64", ".rf64")


@dataclass(frozen=True)
class Discovery:
    manifest_uri: str  # the written manifest of what is left to do
    n_found: int  # audio objects under the prefix / matching the glob
    n_done_before: int  # of those, already done by an earlier successful run
    n_todo: int
    root: str  # the prefix listed: where the written manifest's audio may be read from


def listing_root(pattern: str) -> str:
    """The prefix a pattern lists under: up to the last ``/`` before its first glob character
    (``s3://archive/calls/2026-11-*/*.wav`` -> ``s3://archive/calls/``), or the prefix itself."""
    cut = min((i for i in (pattern.find(c) for c in "*?[") if i >= 0), default=-1)
    return pattern if cut < 0 else pattern[: pattern.rfind("/", 0, cut) + 1]


def _full_uri(fs, path: str, like: str) -> str:
    """fsspec returns paths without the scheme; put it back (s3://...), leave local paths alone."""
    if not has_scheme(like) or like.startswith("file://"):
        return path
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path}"


def list_audio(pattern: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Audio object URIs matching ``pattern``: a glob (``*``, ``?``, ``[``) or a prefix (every
    object below it with an audio extension), in sorted order."""
    fs, path = url_to_fs(pattern, storage_options)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    else:
        found = fs.find(path)
    for item in sorted(found):
        if posixpath.splitext(item)[1].lower() in AUDIO_EXTENSIONS:
            yield _full_uri(fs, item, pattern)


def done_ids(root: str, storage_options: dict[str, Any] | None = None, *, exclude: str | None = None) -> np.ndarray:
    """Sorted id hashes of rows that earlier runs committed under ``root`` (``root`` itself, or
    its sub-folders one or two levels down, e.g. ``runs/run_date=2026-11-22/``) with a final
    answer: a run that crashed or stopped early still counts what it committed, and rows with a
    transient status get another chance. ``exclude``: the output being written now (its own rows
    are its resume's business, not discovery's)."""
    fs, path = url_to_fs(root, storage_options)
    path = path.rstrip("/")
    skip = url_to_fs(exclude, storage_options)[1].rstrip("/") + "/" if exclude else None
    parts = [p for depth in ("", "/*", "/*/*") for p in fs.glob(f"{path}{depth}/transcripts/part-*.parquet")]
    hashes: list[np.ndarray] = []
    for part in parts:
        if skip and part.startswith(skip):
            continue
        with fs.open(part, "rb") as f:
            table = pq.read_table(f, columns=["id", "status"])
        final = pc.invert(pc.is_in(table["status"], pa.array(sorted(TRANSIENT))))
        hashes.append(id_hashes(table["id"].filter(final).to_pylist()))
    return np.unique(np.concatenate(hashes)) if hashes else np.empty(0, dtype=np.uint64)


def discover(pattern: str, output_uri: str, *, skip_done_in: str | None = None,
             storage_options: dict[str, Any] | None = None) -> Discovery:
    """List ``pattern``, drop what earlier runs did, write ``<output>/inputs.jsonl``."""
    done = (done_ids(skip_done_in, storage_options, exclude=output_uri) if skip_done_in
            else np.empty(0, dtype=np.uint64))
    fs, out = url_to_fs(output_uri, storage_options)
    n_found = n_todo = 0
    with atomic_open(fs, out.rstrip("/") + "/" + INPUTS_NAME, "w") as f:
        for uri in list_audio(pattern, storage_options):
            n_found += 1
            row_id = stable_id(uri)
            if len(done) and _contains(done, id_hashes([row_id])[0]):
                continue
            f.write(json.dumps({"id": row_id, "audio": uri}, ensure_ascii=False) + "\n")
            n_todo += 1
    if n_found == 0:
        raise ManifestError(f"no audio objects match {pattern!r} (extensions: {', '.join(AUDIO_EXTENSIONS)})")
    log.info("discovered %d audio objects under %s: %d done by earlier runs, %d to do",
             n_found, pattern, n_found - n_todo, n_todo)
    return Discovery(join_uri(output_uri, INPUTS_NAME), n_found, n_found - n_todo, n_todo, listing_root(pattern))


def _contains(sorted_hashes: np.ndarray, value: np.uint64) -> bool:
    at = int(np.searchsorted(sorted_hashes, value))
    return at < len(sorted_hashes) and sorted_hashes[at] == value
