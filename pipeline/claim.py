"""One writer per output: a driver claims ``<output>/_quarry_lock.json`` before it writes anything.

Two drivers started on the same output (a cron that fired twice, a retried RayJob whose first
driver still runs) never interleave: the second is refused with a message naming the holder. The
claim uses the store's own atomic primitives:

* **local disks**: an exclusive ``flock`` on the lock file. The kernel drops it when the holding
  process dies, however it dies, so a dead driver never locks the output.
* **S3 and S3-compatible stores**: a lease object written with conditional writes. ``PutObject``
  with ``If-None-Match: *`` creates it only if no one holds it; the holder renews it every
  ``lease_s / 3`` with ``If-Match`` on its own ETag; a lease not renewed within ``lease_s`` (its
  driver died) is taken over with ``If-Match`` on the stale ETag, so of two drivers taking over at
  once exactly one wins. A holder whose renewal is refused has lost the output and stops before
  its next commit (:meth:`Claim.check`).
* **memory://** (one process by definition): no lock is needed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import CannotRun
from .storage import join_uri, url_to_fs

log = logging.getLogger("quarry")

LOCK_NAME = "_quarry_lock.json"
DEFAULT_LEASE_S = 120.0


class OutputBusy(CannotRun, RuntimeError):
    """Another driver holds the output."""


class ClaimLost(CannotRun, RuntimeError):
    """This driver's lease was taken over (it could not renew it in time); it must stop writing."""


def _holder() -> dict[str, Any]:
    return {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


@dataclass
class Claim:
    """A held output. Use as a context manager (:func:`claim_output`); :meth:`check` raises
    :class:`ClaimLost` once the claim is no longer this driver's."""

    uri: str
    holder: dict[str, Any]
    _release: Any = None
    _lost: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self._lost.is_set():
            raise ClaimLost(f"lost the claim on {self.uri}: another driver took it over (this one could not renew "
                            "its lease in time); stopping before the next commit")

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_output(output_uri: str, storage_options: dict[str, Any] | None = None, *,
                 lease_s: float = DEFAULT_LEASE_S) -> Claim:
    """Claim ``output_uri`` for this driver, or raise :class:`OutputBusy` naming the holder."""
    fs, root = url_to_fs(output_uri, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    uri = join_uri(output_uri, LOCK_NAME)
    holder = _holder()
    if protocol in ("file", "local"):
        return _claim_local(uri, root.rstrip("/") + "/" + LOCK_NAME, fs, holder)
    if protocol in ("s3", "s3a"):
        return _claim_s3(uri, root.rstrip("/") + "/" + LOCK_NAME, fs, holder, lease_s)
    if protocol == "memory":
        return Claim(uri, holder)
    raise CannotRun(f"cannot claim {output_uri}: no atomic create on {protocol}:// outputs (supported: local "
                    "paths, s3://)")


def _claim_local(uri: str, path: str, fs, holder: dict[str, Any]) -> Claim:
    import fcntl

    fs.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole job
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        try:
            current = json.loads(f.read() or "{}")
        except ValueError:
            current = {}
        f.close()
        raise OutputBusy(f"output {uri.rsplit('/', 1)[0]} is being written by another driver "
                         f"({_describe(current)}); wait for it to finish") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(holder))
    f.flush()

    def release() -> None:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({**holder, "released": True}))
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()

    return Claim(uri, holder, release)


def _claim_s3(uri: str, path: str, fs, holder: dict[str, Any], lease_s: float) -> Claim:
    from botocore.exceptions import ClientError

    bucket, key = path.split("/", 1)

    def put(condition: dict[str, str]) -> str:
        body = json.dumps({**holder, "expires_at": time.time() + lease_s}).encode()
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)["ETag"]

    def precondition_failed(error: BaseException | None) -> bool:
        """A 412: the condition did not hold (s3fs turns it into FileExistsError or OSError)."""
        while error is not None:
            code = error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else None
            if code in ("PreconditionFailed", "412") or isinstance(error, FileExistsError) or \
                    "pre-conditions you specified did not hold" in str(error):
                return True
            error = error.__cause__ or error.__context__
        return False

    try:
        etag = put({"IfNoneMatch": "*"})
    except Exception as e:  # noqa: BLE001 - s3fs may wrap botocore's error
        if not precondition_failed(e):
            raise
        # Its ETag first, then its body: the takeover below is conditional on that ETag, so it fails
        # if the lease changed after the ETag was read, whatever the body said.
        current = fs.call_s3("head_object", Bucket=bucket, Key=key)
        try:
            state = json.loads(fs.cat_file(path) or b"{}")
        except ValueError:
            state = {}
        if not state.get("released") and state.get("expires_at", 0) > time.time():
            raise OutputBusy(f"output {uri.rsplit('/', 1)[0]} is being written by another driver "
                             f"({_describe(state)}, lease until "
                             f"{time.strftime('%H:%M:%SZ', time.gmtime(state['expires_at']))}); wait for it to "
                             "finish, or for its lease to expire if it died") from None
        try:  # released or expired: take it over, unless someone else just did
            etag = put({"IfMatch": current["ETag"]})
        except Exception as e2:  # noqa: BLE001
            if precondition_failed(e2):
                raise OutputBusy(f"output {uri.rsplit('/', 1)[0]} was just claimed by another driver") from None
            raise
        if not state.get("released"):
            log.warning("took over %s from %s: its lease had expired", uri, _describe(state))
    state = {"etag": etag}
    stop = threading.Event()
    claim = Claim(uri, holder)

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                state["etag"] = put({"IfMatch": state["etag"]})
            except Exception as e:  # noqa: BLE001
                if precondition_failed(e):
                    claim._lost.set()
                    log.error("lost the claim on %s: another driver took it over", uri)
                    return
                log.warning("could not renew the claim on %s (%s); retrying", uri, type(e).__name__)

    thread = threading.Thread(target=renew, name="quarry-claim", daemon=True)
    thread.start()

    def release() -> None:
        stop.set()
        thread.join(timeout=5)
        if not claim._lost.is_set():
            try:
                body = json.dumps({**holder, "released": True, "expires_at": 0}).encode()
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfMatch=state["etag"])
            except Exception as e:  # noqa: BLE001 - an expired lease frees the output anyway
                log.warning("could not release the claim on %s (%s)", uri, type(e).__name__)

    claim._release = release
    return claim
