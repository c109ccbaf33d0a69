"""URIs and filesystems: one place that turns a URI into (filesystem, path).

Any fsspec URL works (local path, file://, s3://, memory://, ...). S3 credentials and the
endpoint come from the standard AWS environment variables (AWS_ENDPOINT_URL included), so any
S3-compatible store works without secrets in configs.

Transient storage faults (throttling, 5xx, broken connections) are retried here, in two layers
(botocore per request, :func:`retry_call` per operation; see "Retries" below); permanent ones
(missing object, access denied) are raised at once.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import os
import posixpath
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import tenacity
from fsspec.asyn import AsyncFileSystem

from .scrub import redact_uri

T = TypeVar("T")

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def has_scheme(uri: str) -> bool:
    return bool(_SCHEME.match(uri))


def url_to_fs(uri: str, storage_options: dict[str, Any] | None = None, policy: RetryPolicy | None = None):
    """(fsspec filesystem, path inside it) for a URI, with request-level retries (``policy``,
    default :data:`DEFAULT_RETRY`) set up where the store takes them (s3://)."""
    return fsspec.core.url_to_fs(uri, **storage_options_for(uri, storage_options, policy or DEFAULT_RETRY))


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


def _fs_protocol(fs) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_process_local(fs) -> bool:
    """True for filesystems that live in one process's memory (memory://)."""
    return _fs_protocol(fs) == "memory"


def is_local(fs) -> bool:
    """True for this machine's disks (where a half-written file is visible until it is renamed)."""
    return _fs_protocol(fs) in ("file", "local")


# --- Retries -------------------------------------------------------------------------------------
#
# Object stores fail transiently (S3 answers 503 SlowDown when throttling, 5xx on its own trouble,
# connections reset), and a batch job must ride that out rather than lose rows. Two layers:
#
# * request level: botocore retries each S3 HTTP request (``retries`` in s3fs's ``config_kwargs``,
#   "standard" mode: 500/502/503/504, throttling codes such as SlowDown, connection errors), with
#   its own capped exponential backoff with jitter. s3fs adds a few retries of its own on top for
#   SlowDown and cut-off response bodies. :func:`storage_options_for` sets this up for s3 URLs and
#   :func:`url_to_fs` applies it, so every reader and writer that goes through this module has it.
# * operation level: :func:`retry_call` re-runs a whole operation (open + read, write + rename) with
#   tenacity when a transient error still escapes, e.g. during a longer outage, or on a filesystem
#   without its own retries.
#
# Permanent faults are never retried: a missing object (404 -> FileNotFoundError) or a refusal
# (403 -> PermissionError) is an answer, and becomes the row's status at once.

log = logging.getLogger("quarry.storage")

_RETRY_MODES = ("standard", "adaptive", "legacy")


@dataclass(frozen=True)
class RetryPolicy:
    """How storage operations are retried (see the layers above).

    ``attempts`` counts tries of a whole operation (1 = no operation-level retry); the waits
    between them are random in [0, backoff_s * 2**n] capped at ``max_backoff_s`` ("full jitter"),
    and no retry starts after ``deadline_s``. ``request_attempts`` counts botocore's tries of each
    S3 request (1 = none) in ``request_mode``.
    """

    attempts: int = 4
    backoff_s: float = 0.25
    max_backoff_s: float = 20.0
    deadline_s: float = 300.0
    request_attempts: int = 8
    request_mode: str = "standard"

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.request_attempts < 1:
            raise ValueError("RetryPolicy: attempts and request_attempts must be at least 1")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.deadline_s < 0:
            raise ValueError("RetryPolicy: backoff_s, max_backoff_s and deadline_s must not be negative")
        if self.request_mode not in _RETRY_MODES:
            raise ValueError(f"RetryPolicy: request_mode must be one of {_RETRY_MODES}, not {self.request_mode!r}")


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1, request_attempts=1)

# Errors that are answers, not accidents: never retried.
_PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
)  # and NotRegularObject / ObjectTooLarge below, which are not OSErrors: never transient
_TRANSIENT_ERRNOS = frozenset({
    errno.EBUSY,  # s3fs: 503 SlowDown / ServiceUnavailable
    getattr(errno, "EREMOTEIO", 121),  # s3fs: 500 InternalError
    errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
    errno.EPIPE, errno.ENETRESET, errno.ENETUNREACH, errno.EHOSTUNREACH,
})
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
    "TooManyRequestsException", "BandwidthLimitExceeded", "ServiceUnavailable", "InternalError",
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
})


def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, http.client.IncompleteRead,
                                         http.client.RemoteDisconnected]
    try:  # botocore's connection errors (ConnectionClosedError, ReadTimeoutError, ...)
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, ResponseStreamingError

        types += [BotoConnectionError, HTTPClientError, ResponseStreamingError]
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    try:  # aiohttp's, as raised by aiobotocore (ClientPayloadError, ServerDisconnectedError, ...)
        from aiohttp import ClientConnectionError, ClientPayloadError

        types += [ClientConnectionError, ClientPayloadError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_NETWORK_ERRORS = _network_error_types()


def _causes(error: BaseException):
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_transient(error: BaseException) -> bool:
    """True when a storage error is worth retrying: throttling, 5xx, timeouts, broken connections.

    The error and its causes are examined outermost first, so s3fs's translations (an OSError
    whose cause is botocore's ClientError) are judged by what the store answered. Missing objects,
    refusals (403) and anything unrecognised are not transient.
    """
    for link in _causes(error):
        if isinstance(link, _PERMANENT_ERRORS):
            return False
        response = getattr(link, "response", None)
        if isinstance(response, dict) and ("Error" in response or "ResponseMetadata" in response):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS or (code.isdigit() and int(code) in _TRANSIENT_STATUS)
        if isinstance(link, _NETWORK_ERRORS):
            return True
        if isinstance(link, OSError) and link.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if has_scheme(uri) else "file"


def storage_options_for(uri: str, storage_options: dict[str, Any] | None = None,
                        policy: RetryPolicy = DEFAULT_RETRY) -> dict[str, Any]:
    """``storage_options`` plus request-level retries for ``policy`` where the store takes them.

    For s3:// (s3fs) this sets botocore's ``retries`` in ``config_kwargs`` unless the caller gave
    their own; other filesystems get the options unchanged. The input is never modified.
    """
    options = dict(storage_options or {})
    if _protocol(uri) in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"mode": policy.request_mode, "total_max_attempts": policy.request_attempts})
        options["config_kwargs"] = config
    return options


def retry_call(fn: Callable[..., T], *args: Any, policy: RetryPolicy = DEFAULT_RETRY, what: str = "storage call",
               **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, re-run on transient errors (:func:`is_transient`) as ``policy`` says.

    The last error is re-raised unchanged when the attempts or the deadline run out, and at once
    when it is not transient. ``what`` names the operation in log lines (never put secrets in it).
    Use it around whole, idempotent operations: a read, or a write to a temporary name plus the
    rename into place.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts) | tenacity.stop_after_delay(policy.deadline_s),
        wait=tenacity.wait_random_exponential(multiplier=policy.backoff_s, max=policy.max_backoff_s),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=lambda state: _note_retry(what, policy, state),
        reraise=True,
    )
    return retrying(fn, *args, **kwargs)


# Operation-level retries in this process, by operation kind (tests and progress logs read it).
RETRY_COUNTS: Counter = Counter()


def _note_retry(what: str, policy: RetryPolicy, state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    RETRY_COUNTS[what.split(" ", 1)[0]] += 1
    log.warning("retrying %s after %s (attempt %d of %d failed), next in %.2f s", what,
                type(error).__name__ if error else "?", state.attempt_number, policy.attempts,
                state.upcoming_sleep)


class NotRegularObject(Exception):
    """The URI names something that is not a regular file or object (a FIFO, a device, a socket):
    reading it could block forever or never end, so it is refused without opening it."""


class ObjectTooLarge(Exception):
    """The object is larger than the caller's limit; nothing of it was read."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"{size} bytes, over the limit of {limit}")
        self.size, self.limit = size, limit


READ_CHUNK_BYTES = 64 * 2**20  # one ranged read; the deadline is checked between them


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None, policy: RetryPolicy = DEFAULT_RETRY,
               *, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
    """The whole object at ``uri``, bounded, with both retry layers; permanent errors raise at once.

    Its size and kind are asked first (one HEAD on S3, a ``stat`` for a local file): anything but
    a regular file or object raises :class:`NotRegularObject` (a FIFO would block the read
    forever, a device never ends), a folder IsADirectoryError, and an object over ``max_bytes``
    :class:`ObjectTooLarge`, before a byte is read. Then exactly the stated size is read, in ranged
    reads of at most :data:`READ_CHUNK_BYTES` (one GET for most audio). ``timeout_s`` bounds each
    attempt (the size check included; on async stores such as S3 and HTTP it cancels a stalled
    call) and raises TimeoutError, which is transient. The URI is taken literally (no glob
    expansion). Raises FileNotFoundError / PermissionError as the store answers, or the last
    transient error once ``policy`` gives up.
    """

    def once() -> bytes:
        opened = fsspec.open(uri, "rb", **storage_options_for(uri, storage_options, policy))  # no I/O yet
        fs, path = opened.fs, opened.path
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
            if deadline is None:
                return fn(*args, **kwargs)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"reading took longer than {timeout_s:g} s")
            if isinstance(fs, AsyncFileSystem):  # fsspec's sync() gives up on the call after `timeout`
                kwargs["timeout"] = left
            return fn(*args, **kwargs)

        info = call(fs.info, path)
        kind, size = info.get("type"), info.get("size")
        if kind == "directory":
            raise IsADirectoryError(f"{uri} is a folder")
        if kind != "file":
            raise NotRegularObject(f"{uri} is not a regular file ({kind or 'unknown kind'})")
        if size is None:  # a server that states no length: read one byte past the limit at most
            with fs.open(path, "rb") as f:
                data = call(f.read, (max_bytes + 1) if max_bytes is not None else -1)
            if max_bytes is not None and len(data) > max_bytes:
                raise ObjectTooLarge(len(data), max_bytes)
            return data
        if max_bytes is not None and size > max_bytes:
            raise ObjectTooLarge(size, max_bytes)
        chunks: list[bytes] = []
        at = 0
        while at < size:
            end = min(size, at + READ_CHUNK_BYTES)
            data = call(fs.cat_file, path, start=at, end=end)
            if not data:
                break  # it shrank since the size check: what there is (decoding judges it)
            chunks.append(data[: end - at])  # a server that ignored the range sent more
            at += len(chunks[-1])
        return b"".join(chunks)

    return retry_call(once, policy=policy, what=f"read {redact_uri(uri)}")


# --- What a job may read ---------------------------------------------------------------------------
#
# A manifest is written by someone else's script, so the URIs in it are untrusted: a row must not
# make the job read outside the storage it was given (file:///etc/..., another bucket, a cloud
# metadata endpoint at http://169.254.169.254/...). Rows are checked against a list of allowed
# prefixes (``input.allowed_prefixes``; by default the manifest's own store, :func:`store_root`).
# Matching is by scheme, host / bucket and whole path segments, after ``.`` and ``..`` segments are
# resolved; chained fsspec URLs (``zip://x::s3://...``) are refused outright, and for local files
# symbolic links are followed before the check, so a link cannot lead outside either.

_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "local": "file", "gcs": "gs", "abfss": "abfs"}


@dataclass(frozen=True)
class _Place:
    scheme: str
    host: str
    path: str  # absolute, "." and ".." resolved, no trailing slash except the root


def _resolve_dots(path: str) -> str:
    """``/a/./b/../c`` -> ``/a/c`` (empty segments kept: object keys may hold ``//``); never above
    the root."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment == ".":
            continue
        if segment == "..":
            if len(out) > 1:
                out.pop()
            continue
        out.append(segment)
    resolved = "/".join(out)
    return resolved if resolved.startswith("/") else "/" + resolved


def _place(uri: str) -> _Place:
    if not has_scheme(uri):
        return _Place("file", "", _resolve_dots(posixpath.abspath(uri) if uri else "/"))
    scheme, rest = uri.split("://", 1)
    scheme = _SCHEME_ALIASES.get(scheme.lower(), scheme.lower())
    if scheme == "file":
        return _Place("file", "", _resolve_dots("/" + rest.lstrip("/") if not rest.startswith("localhost/") else rest[9:]))
    rest = rest.split("?", 1)[0].split("#", 1)[0] if scheme in ("http", "https") else rest
    host, _, path = rest.partition("/")
    host = host.rsplit("@", 1)[-1]  # user-info names who, not where
    if scheme in ("http", "https"):
        host = host.lower()
    return _Place(scheme, host, _resolve_dots("/" + path))


def store_root(uri: str) -> str:
    """The store a URI lives in, as an allowed prefix: ``s3://bucket`` for an object, ``file://``
    (this machine's files) for a local path, ``https://host`` for a web address."""
    place = _place(uri)
    if place.scheme == "file":
        return "file://"
    return f"{place.scheme}://{place.host}"


def normalize_uri(uri: str) -> str:
    """A scheme URI with its ``.`` and ``..`` path segments resolved (a relative path joined onto
    a manifest's folder can hold them), so the URI that is checked is the URI that is read. Local
    paths are left to the caller (``posixpath.normpath``)."""
    if not has_scheme(uri):
        return uri
    scheme, rest = uri.split("://", 1)
    if scheme.lower() == "file":
        return uri if rest.startswith("localhost/") else f"{scheme}://" + _resolve_dots("/" + rest.lstrip("/"))
    head, sep, path = rest.partition("/")
    if not sep:
        return uri
    tail = ""
    if scheme.lower() in ("http", "https"):  # the query and fragment are not path
        cut = min((i for i in (path.find("?"), path.find("#")) if i >= 0), default=len(path))
        path, tail = path[:cut], path[cut:]
    return f"{scheme}://{head}{_resolve_dots('/' + path)}{tail}"


def _within(place: _Place, prefix: _Place) -> bool:
    if place.scheme != prefix.scheme or place.host != prefix.host:
        return False
    root = prefix.path.rstrip("/")
    return not root or place.path == root or place.path.startswith(root + "/")


def refusal(uri: str, allowed: tuple[str, ...] | list[str]) -> str | None:
    """Why the job may not read ``uri`` (None when it may): outside every prefix of ``allowed``,
    a chained URL, or (local files) a link that leads outside."""
    if "::" in uri:
        return "chained fsspec URLs (a::b) are not allowed"
    try:
        place = _place(uri)
        prefixes = [_place(p) for p in allowed]
    except (OSError, ValueError) as e:
        return f"not a usable URI ({type(e).__name__})"
    if not any(_within(place, p) for p in prefixes):
        return f"outside the storage this job may read (input.allowed_prefixes: {', '.join(allowed)})"
    if "\0" in uri:
        return "a NUL character in the path"
    if place.scheme == "file":
        try:
            real = _Place("file", "", os.path.realpath(place.path))
            real_prefixes = [_Place("file", "", os.path.realpath(p.path) if p.path != "/" else "/") for p in prefixes
                             if p.scheme == "file"]
        except (OSError, ValueError) as e:
            return f"the path cannot be resolved ({type(e).__name__})"
        if not any(_within(real, p) for p in real_prefixes):
            return f"a link that leads outside the storage this job may read (to {real.path})"
    return None


TEMP_PREFIX = "_tmp-"
"""Files being written carry this prefix until they are complete; readers (pyarrow datasets,
globs of ``part-*``) never see them, and a rerun removes leftovers."""


@contextlib.contextmanager
def atomic_open(fs, path: str, mode: str = "wb", **open_kwargs: Any) -> Iterator[Any]:
    """Open ``path`` for writing so that readers see the old file or the whole new one, never half:
    the data goes to ``_tmp-<name>`` beside it and is moved into place when the block ends without
    an error (on an error the temporary file is removed). The one way Quarry writes a file that
    readers may open."""
    parent, name = posixpath.split(path)
    temp = posixpath.join(parent, TEMP_PREFIX + name)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(temp, mode, **open_kwargs) as f:
            yield f
        fs.mv(temp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(temp):
                fs.rm(temp)
        raise


def write_atomic(uri: str, data: bytes, storage_options: dict[str, Any] | None = None,
                 policy: RetryPolicy = DEFAULT_RETRY, *, fs: Any = None) -> None:
    """Write ``data`` as the whole file at ``uri`` (replacing it) through :func:`atomic_open`, with
    both retry layers. ``fs``: a filesystem already made for ``uri``'s store (``uri`` is then its
    path)."""

    def once() -> None:
        target, path = (fs, uri) if fs is not None else url_to_fs(uri, storage_options, policy)
        if not is_local(target):  # one PUT: an object store shows the whole object or none
            target.pipe_file(path, data)
            return
        with atomic_open(target, path) as f:
            f.write(data)

    retry_call(once, policy=policy, what=f"write {redact_uri(uri)}")
