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
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import tenacity

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
)
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


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None, policy: RetryPolicy = DEFAULT_RETRY) -> bytes:
    """The whole object at ``uri``, with both retry layers; permanent errors raise at once.

    One GET for an S3 object (no HEAD first); the URI is taken literally (no glob expansion).
    Raises FileNotFoundError / PermissionError / IsADirectoryError as the store answers, or the
    last transient error once ``policy`` gives up.
    """

    def once() -> bytes:
        opened = fsspec.open(uri, "rb", **storage_options_for(uri, storage_options, policy))
        return opened.fs.cat_file(opened.path)

    return retry_call(once, policy=policy, what=f"read {uri}")


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

    retry_call(once, policy=policy, what=f"write {uri}")
