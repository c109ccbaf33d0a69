"""Secrets never leave: one place that scrubs credentials from URIs, free text, config data and log
records.

* :func:`redact_uri`: user-info (``https://user:pass@host``) and the values of query parameters
  (presigned tokens: ``X-Amz-Signature``, ``X-Amz-Security-Token``, Azure's ``sig``, ...) become
  ``***``; the scheme, host, path and parameter names stay, so a reader can still tell which object
  a row was. A URI without either is returned unchanged (ids derived from it do not move).
* :func:`redact_text`: every URI inside a message (an error, a log line), plus any value registered
  with :func:`register_secret` (the job's own credentials), wherever it appears.
* :func:`redact_mapping`: config data: every value under a credential-shaped key (``key``,
  ``secret``, ``token``, ``account_key``, ``connection_string``, ``Authorization``, camelCase or
  kebab-case spellings), everything nested under such a key, and credentials inside URI values.
* :func:`install_log_scrubber`: every log record this process creates is scrubbed before any
  handler sees it (messages, arguments and tracebacks).

Nothing here imports the rest of Quarry: it sits beside ``records`` and ``config`` at the bottom.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# Query parameters that say which object, never who may read it: their values are kept.
_PLAIN_PARAMS = frozenset({"versionid", "generation", "x-amz-algorithm", "x-amz-date", "x-amz-expires",
                           "x-amz-signedheaders", "x-goog-algorithm", "x-goog-date", "x-goog-expires",
                           "x-goog-signedheaders", "sv", "se", "st", "sp", "sr", "spr", "ss", "srt"})

# A URI inside free text: scheme://, then anything up to whitespace or a quote / bracket that
# usually ends a URI in a message ("... reading 'https://...': 403").
_URI_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s'"<>`]+""")

# Words of a key name (snake_case, kebab-case, camelCase, dotted) that make its value a secret.
_SECRET_WORDS = frozenset({
    "secret", "secrets", "password", "passwd", "pwd", "passphrase", "token", "credential",
    "credentials", "creds", "auth", "authorization", "signature", "sig", "sas", "apikey", "cookie",
    "cookies", "key", "keys", "privatekey", "connectionstring", "bearer", "session",
})
# Two words that make a secret together: connection_string, key_id is covered by "key".
_SECRET_PAIRS = frozenset({("connection", "string"), ("access", "id")})
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_BEARER = re.compile(r"^\s*(bearer|basic|token|sharedkey|aws4-hmac-sha256)\s+\S", re.I)

_registered: set[str] = set()
_lock = threading.Lock()
_MIN_SECRET_CHARS = 6  # shorter values would scrub ordinary words out of messages


def key_words(key: str) -> list[str]:
    """``"aws_secret_access_key"`` -> [aws, secret, access, key]; ``"accountKey"`` -> [account, key]."""
    return [w.lower() for w in _WORD.findall(str(key))]


def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a credential (its value, and anything under it, is masked).

    Whole words only, so ``max_keywords`` or ``max_output_tokens_per_s`` are not secrets."""
    words = key_words(key)
    if any(w in _SECRET_WORDS for w in words):
        return True
    joined = "".join(words)
    if joined in _SECRET_WORDS:
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def redact_uri(uri: str) -> str:
    """``uri`` without credentials: user-info and query values masked (see the module doc)."""
    if not isinstance(uri, str) or "://" not in uri or ("@" not in uri and "?" not in uri):
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: mask everything after the scheme
        return uri.split("://", 1)[0] + "://" + MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        query = "&".join(_redact_param(p) for p in query.split("&"))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_param(param: str) -> str:
    name, sep, value = param.partition("=")
    if not sep:
        return param if not value and len(name) < 16 else MASK  # a bare flag, or a bare token
    if name.lower() in _PLAIN_PARAMS or not value:
        return param
    return f"{name}={MASK}"


def register_secret(*values: str | None) -> None:
    """Values that must never appear in this process's messages (the job's own credentials):
    :func:`redact_text` and the log scrubber replace them wherever they occur."""
    with _lock:
        _registered.update(v for v in values if isinstance(v, str) and len(v) >= _MIN_SECRET_CHARS)


def register_secrets_in(data: Any, key: str = "", under_secret: bool = False) -> None:
    """Register every value of ``data`` (config-like: dicts and lists) that sits under a
    credential-shaped key, so that it is scrubbed from free text too."""
    secret = under_secret or bool(key and is_secret_key(key))
    if isinstance(data, dict):
        for k, v in data.items():
            register_secrets_in(v, str(k), secret)
    elif isinstance(data, (list, tuple)):
        for v in data:
            register_secrets_in(v, key, secret)
    elif secret and isinstance(data, str):
        register_secret(data)


def redact_text(text: Any) -> Any:
    """``text`` with the credentials of every URI in it masked and every registered secret
    replaced; anything that is not a string is returned as it is."""
    if not isinstance(text, str) or not text:
        return text
    if "://" in text:
        text = _URI_IN_TEXT.sub(_redact_match, text)
    with _lock:
        secrets = sorted(_registered, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _redact_match(match: re.Match) -> str:
    uri = match.group(0)
    core = uri.rstrip(".,:;)]}")  # punctuation that ends the sentence, not the URI
    return redact_uri(core) + uri[len(core):]


def redact_mapping(value: Any, key: str = "") -> Any:
    """Config-like data with credentials masked: any value under a credential-shaped key (a whole
    subtree when the value is a mapping or a list), header values that carry a scheme
    (``Bearer ...``), and credentials inside URI strings."""
    if key and is_secret_key(key):
        return MASK if value not in (None, "", {}, []) else value
    if isinstance(value, dict):
        return {k: redact_mapping(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_mapping(v) for v in value]
    if isinstance(value, str):
        if _BEARER.match(value):
            return MASK
        return redact_text(value)
    return value


# --- Logging -------------------------------------------------------------------------------------

_installed = False


def install_log_scrubber() -> None:
    """Scrub every log record this process creates (its formatted message and traceback), for
    every logger and handler, present or future. Idempotent."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    make_record = logging.getLogRecordFactory()

    def scrubbed(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the logging module's to report
            return record
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(scrubbed)


def scrub_lines(lines: Iterable[str]) -> list[str]:
    """Lines to print, scrubbed (the CLI's summary and error lines)."""
    return [redact_text(line) for line in lines]
