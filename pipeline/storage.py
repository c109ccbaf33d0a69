"""URIs and filesystems: one place that turns a URI into (filesystem, path).

Any fsspec URL works (local path, file://, s3://, memory://, ...). S3 credentials and the
endpoint come from the standard AWS environment variables (AWS_ENDPOINT_URL included), so any
S3-compatible store works without secrets in configs.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import fsspec
import pyarrow.fs as pafs

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def has_scheme(uri: str) -> bool:
    return bool(_SCHEME.match(uri))


def url_to_fs(uri: str, storage_options: dict[str, Any] | None = None):
    """(fsspec filesystem, path inside it) for a URI."""
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def arrow_filesystem(fs) -> pafs.FileSystem:
    """A pyarrow filesystem over an fsspec one, for Ray Data readers."""
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI (a local path or scheme://bucket/prefix)."""
    if has_scheme(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *parts)
    return posixpath.join(base, *parts)


def parent_uri(uri: str) -> str:
    if has_scheme(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.dirname(rest.rstrip("/"))
    return posixpath.dirname(uri)


def is_process_local(fs) -> bool:
    """True for filesystems that live in one process's memory (memory://)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol == "memory"
