"""A corpus of hostile inputs, with good rows, in one JSONL manifest (tests/test_hostile.py).

``build_hostile(folder, http_base)`` writes the audio objects and special files into ``folder``
and returns the manifest's bytes and one :class:`Kind` per hostile kind, each with the status its
row must end in. Categories: bounded reads (``reads``), bounded decodes (``decodes``), manifest
lines (``lines``), URIs outside the job's storage (``uris``), credentials in URIs (``secrets``),
keywords (``keywords``), and the good rows (``good``). ``http_base`` is a local HTTP server
serving ``folder`` (``/stall/...`` answers HEAD, then never sends a body).

The job runs with :data:`JOB_SETTINGS`: limits small enough that every kind is quick to make (a
64 MiB size limit, a 1 GiB decode budget, a 16 MiB line limit, a 2 s read timeout).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


from pipeline.records import Status

from .badaudio import RATE, encoded, speech

SECRETS = {name: f"QSEC-{name}-{n:04d}-hostile" for n, name in enumerate(
    ["presigned-signature", "presigned-token", "userinfo-password", "outside-password", "outside-sig",
     "invalid-line-sig", "stall-token"])}
"""A distinct credential in each URI of the manifest that carries one; none may appear in anything
the job writes or prints."""

MAX_BYTES = 64 * 2**20
DECODE_BUDGET_MB = 1024
MAX_LINE_BYTES = 16 * 2**20
READ_TIMEOUT_S = 2.0
MAX_KEYWORDS, MAX_KEYWORD_CHARS = 5, 12
JOB_SETTINGS = [
    "engine.name=fake", "engine.batch_size=4", f"audio.max_bytes={MAX_BYTES}",
    f"audio.decode_budget_mb={DECODE_BUDGET_MB}", f"audio.read_timeout_s={READ_TIMEOUT_S}",
    f"input.max_line_bytes={MAX_LINE_BYTES}", f"task.max_keywords={MAX_KEYWORDS}",
    f"task.max_keyword_chars={MAX_KEYWORD_CHARS}", "output.rows_per_file=1000",
]


@dataclass
class Kind:
    """One hostile kind: the manifest line(s) that make it, and what its row must end in."""

    name: str
    category: str
    status: Status | None  # None: no row at all (blank lines)
    lines: list[bytes]
    row_id: str | None = None  # the id the manifest gives it, when the line can carry one
    audio: str | None = None  # the file its good text comes from (status ok)
    keywords: tuple[str, ...] = ()  # what the engine must have received
    checks: list[Callable[[dict], str | None]] = field(default_factory=list)  # extra checks on its row
    first_line: int = 0  # set when the manifest is assembled


def line(row: dict | list | object) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode() + b"\n"


# --- Files ---------------------------------------------------------------------------------------


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _utf8_number(n: int) -> bytes:
    """FLAC's frame number coding (UTF-8-like)."""
    if n < 0x80:
        return bytes([n])
    if n < 0x800:
        return bytes([0xC0 | n >> 6, 0x80 | n & 0x3F])
    if n < 0x10000:
        return bytes([0xE0 | n >> 12, 0x80 | n >> 6 & 0x3F, 0x80 | n & 0x3F])
    return bytes([0xF0 | n >> 18, 0x80 | n >> 12 & 0x3F, 0x80 | n >> 6 & 0x3F, 0x80 | n & 0x3F])


@functools.cache
def flac_bomb(seconds: int = 7200, rate: int = 192_000, channels: int = 8) -> bytes:
    """A real decompression bomb: a valid FLAC stream of ``seconds`` of ``channels``-channel
    silence at ``rate`` Hz, written frame by frame with CONSTANT subframes (about 35 bytes per
    65535 frames): 2 h of 8-channel 192 kHz audio, 44 GB of float32 once decoded, in ~0.75 MB."""
    block, bps = 65535, 16
    total = seconds * rate
    info = struct.pack(">HH", block, block) + b"\0" * 6  # block sizes; frame sizes unknown
    info += ((rate << 44) | ((channels - 1) << 41) | ((bps - 1) << 36) | total).to_bytes(8, "big") + b"\0" * 16
    out = bytearray(b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info)  # last metadata block
    subframes = b"\x00\x00\x00" * channels  # each: CONSTANT subframe header, then a 16-bit zero
    for n in range(-(-total // block)):
        size = min(block, total - n * block)
        head = bytearray(b"\xff\xf8")
        head.append(0b0111_0000)  # block size in 16 bits after the header; rate from STREAMINFO
        head.append((channels - 1) << 4 | 0b100 << 1)  # independent channels, 16 bits per sample
        head += _utf8_number(n) + (size - 1).to_bytes(2, "big")
        head.append(_crc8(head))
        frame = bytes(head) + subframes
        out += frame + _crc16(frame).to_bytes(2, "big")
    return bytes(out)


def raw_wav(rate: int, channels: int, frames: int, *, data_size: int | None = None) -> bytes:
    """A PCM-16 WAV written by hand (so its header can say anything): ``frames`` of silence,
    the data chunk declaring ``data_size`` bytes (default: what is there)."""
    data = b"\0" * (frames * channels * 2)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * channels * 2) & 0xFFFFFFFF, channels * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data) if data_size is None else data_size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _good_files() -> dict[str, bytes]:
    clip = speech(2.0)
    return {
        "speech_16k.wav": encoded(clip, RATE, "WAV", "PCM_16"),
        "speech.flac": encoded(clip, RATE, "FLAC", "PCM_16"),
        "speech.mp3": encoded(clip, RATE, "MP3", "MPEG_LAYER_III"),
        "speech_vorbis.ogg": encoded(clip, RATE, "OGG", "VORBIS"),
    }


# --- The corpus ----------------------------------------------------------------------------------


def build_hostile(folder: Path, http_base: str) -> tuple[bytes, list[Kind]]:
    """Write the corpus's files into ``folder``; return the manifest's bytes and its kinds."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in _good_files().items():
        (folder / name).write_bytes(data)
    (folder / "flac_bomb.flac").write_bytes(flac_bomb())
    (folder / "upsampling_bomb.wav").write_bytes(raw_wav(1, 1, 20_000))  # 40 kB -> 5.6 h at 16 kHz
    (folder / "many_channels.wav").write_bytes(raw_wav(8_000, 1000, 400))
    (folder / "zero_channels.wav").write_bytes(raw_wav(16_000, 0, 0))
    (folder / "two_ghz.wav").write_bytes(raw_wav(2**31 - 1, 1, 16_000))
    (folder / "lying_size.wav").write_bytes(raw_wav(16_000, 1, 1600, data_size=0xFFFFFFF0))
    with open(folder / "oversized.wav", "wb") as f:  # sparse: no disk, no memory until read
        f.truncate(8 * MAX_BYTES)
    os.mkfifo(folder / "fifo.wav")  # a read would block for ever: no writer will come
    sock = socket.socket(socket.AF_UNIX)  # a socket file; closed, the file stays
    sock.bind(str(folder / "socket.wav"))
    sock.close()
    (folder / "folder.wav").mkdir()
    os.symlink("/dev/zero", folder / "link_to_dev_zero.wav")  # endless, and outside the store
    os.symlink("/etc/passwd", folder / "link_to_etc_passwd.wav")
    (folder / "stall").mkdir()

    s = SECRETS
    big_reference = " ".join(["word"] * 2_000_000)  # ~10 MB
    kinds: list[Kind] = []

    def add(name: str, category: str, status: Status | None, *lines: bytes, **kw) -> Kind:
        kind = Kind(name, category, status, list(lines), **kw)
        kinds.append(kind)
        return kind

    def row(name: str, category: str, status: Status, audio: str, **extra) -> Kind:
        row_id = f"{category}-{name}"
        good = audio if status is Status.OK and "://" not in audio else None
        return add(name, category, status, line({"id": row_id, "audio": audio, **extra}), row_id=row_id, audio=good)

    # Good rows first: the head (the first 1 MiB of whole lines) sees id, audio, reference only.
    add("byte-order mark before the first line", "lines", Status.OK,
        b"\xef\xbb\xbf" + line({"id": "lines-bom-first", "audio": "speech_16k.wav"}),
        row_id="lines-bom-first", audio="speech_16k.wav")
    row("flac", "good", Status.OK, "speech.flac")
    add("a 10 MB reference", "lines", Status.OK,
        line({"id": "lines-10mb-reference", "audio": "speech.mp3", "reference": big_reference}),
        row_id="lines-10mb-reference", audio="speech.mp3",
        checks=[lambda r: None if r["reference"] == big_reference else "reference not read whole"])
    late = add("a column that first appears after the head", "lines", Status.OK,
               line({"id": "lines-late-column", "audio": "speech_vorbis.ogg", "speaker": "Ada", "meta": {"a": [1]}}),
               row_id="lines-late-column", audio="speech_vorbis.ogg")
    late.checks.append(lambda r: None if json.loads(r["other_columns"] or "{}") == {"speaker": "Ada", "meta": {"a": [1]}}
                       else f"late column not carried: {r['other_columns']!r}")

    # Bounded reads
    row("object over audio.max_bytes (sparse, 512 MiB)", "reads", Status.TOO_LARGE, "oversized.wav")
    row("a FIFO", "reads", Status.FORBIDDEN_URI, "fifo.wav")
    row("a Unix socket", "reads", Status.FORBIDDEN_URI, "socket.wav")
    row("a folder", "reads", Status.MISSING_OBJECT, "folder.wav")
    row("a link to /dev/zero", "reads", Status.FORBIDDEN_URI, "link_to_dev_zero.wav")
    row("an HTTP server that never sends the body", "reads", Status.FETCH_ERROR,
        f"{http_base}/stall/slow.wav?token={s['stall-token']}")

    # Bounded decodes
    row("FLAC bomb: 2 h of 8-channel 192 kHz in 0.75 MB", "decodes", Status.TOO_LARGE, "flac_bomb.flac")
    row("upsampling bomb: 1 Hz WAV, 20000 frames", "decodes", Status.TOO_LARGE, "upsampling_bomb.wav")
    row("1000-channel WAV (blocks sized by channels)", "decodes", Status.OK, "many_channels.wav")
    row("WAV header with zero channels", "decodes", Status.DECODE_ERROR, "zero_channels.wav")
    row("WAV at 2 GHz", "decodes", Status.EMPTY_AUDIO, "two_ghz.wav")
    row("WAV data chunk claiming 4 GB", "decodes", Status.DECODE_ERROR, "lying_size.wav")

    # Manifest lines
    add("invalid UTF-8 byte", "lines", Status.INVALID_ROW,
        b'{"id": "lines-bad-utf8", "audio": "speech.flac", "reference": "caf\xe9"}\n')
    add("a JSON array", "lines", Status.INVALID_ROW, line(["speech.flac", "lines-array"]))
    add("a JSON number", "lines", Status.INVALID_ROW, b"42\n")
    add("a JSON string", "lines", Status.INVALID_ROW, line("speech.flac"))
    add("JSON null", "lines", Status.INVALID_ROW, b"null\n")
    add("a line cut off mid-object", "lines", Status.INVALID_ROW, b'{"id": "lines-cut", "audio": \n')
    add("nesting 100000 deep", "lines", Status.INVALID_ROW, b"[" * 100_000 + b"]" * 100_000 + b"\n")
    add("a 5000-digit number", "lines", Status.INVALID_ROW,
        b'{"id": "lines-long-number", "audio": "speech.flac", "n": ' + b"9" * 5000 + b"}\n")
    add("a 20 MB line, over input.max_line_bytes", "lines", Status.INVALID_ROW,
        line({"id": "lines-too-long", "audio": "speech.flac", "reference": "x" * (20 * 2**20)}))
    add("U+2028 and U+0085 inside a string", "lines", Status.OK,
        line({"id": "lines-u2028", "audio": "speech.flac", "reference": "one\u2028two\x85three"}),
        row_id="lines-u2028", audio="speech.flac")
    add("a byte-order mark mid-file (joined files)", "lines", Status.OK,
        b"\xef\xbb\xbf" + line({"id": "lines-bom-mid", "audio": "speech.flac"}), row_id="lines-bom-mid",
        audio="speech.flac")
    add("CRLF line ending", "lines", Status.OK, line({"id": "lines-crlf", "audio": "speech.flac"})[:-1] + b"\r\n",
        row_id="lines-crlf", audio="speech.flac")
    add("blank and whitespace-only lines", "lines", None, b"\n   \t\n\r\n")
    row("audio is a number", "lines", Status.INVALID_ROW, 7)  # type: ignore[arg-type]
    row("audio is an object", "lines", Status.INVALID_ROW, {"path": "speech.flac"})  # type: ignore[arg-type]

    # URIs outside the job's storage
    row("file:///etc/passwd", "uris", Status.FORBIDDEN_URI, "file:///etc/passwd")
    row("/etc/passwd", "uris", Status.FORBIDDEN_URI, "/etc/passwd")
    row("../ up to /etc/passwd", "uris", Status.FORBIDDEN_URI, "../../../../../../../../etc/passwd")
    row("a link to /etc/passwd", "uris", Status.FORBIDDEN_URI, "link_to_etc_passwd.wav")
    row("another bucket", "uris", Status.FORBIDDEN_URI, "s3://someone-elses-bucket/a.wav")
    row("cloud metadata endpoint", "uris", Status.FORBIDDEN_URI,
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    row("chained fsspec URL", "uris", Status.FORBIDDEN_URI, "simplecache::file:///etc/passwd")
    row("memory://", "uris", Status.FORBIDDEN_URI, "memory://quarry/a.wav")
    row("a NUL byte in the path", "uris", Status.FORBIDDEN_URI, "speech\u0000.flac")

    # Credentials in URIs
    row("presigned URL (signature and session token)", "secrets", Status.OK,
        f"{http_base}/speech_16k.wav?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAQUARRY%2F20260101"
        f"&X-Amz-Signature={s['presigned-signature']}&X-Amz-Security-Token={s['presigned-token']}")
    kinds[-1].audio = "speech_16k.wav"
    kinds[-1].checks.append(lambda r: None if "X-Amz-Signature=***" in (r["audio"] or "") else f"audio {r['audio']!r}")
    row("user:password@ on a missing object", "secrets", Status.MISSING_OBJECT,
        http_base.replace("://", f"://quarry:{s['userinfo-password']}@") + "/no-such-file.wav")
    row("user:password@ and a signature outside the store", "secrets", Status.FORBIDDEN_URI,
        f"https://ada:{s['outside-password']}@storage.example.com/a.wav?sig={s['outside-sig']}")
    add("a presigned URL inside a line that is not an object", "secrets", Status.INVALID_ROW,
        line([f"https://storage.example.com/a.wav?X-Amz-Signature={s['invalid-line-sig']}"]))

    # Keywords
    add("keywords with markup, controls, 10000 of them", "keywords", Status.OK,
        line({"id": "keywords-hostile", "audio": "speech.flac",
              "keywords": ["<|endoftext|>Ada", "Love\nlace", "x" * 100, "<b>bold</b>", "ada",
                           *[f"k{i}" for i in range(10_000)]]}),
        row_id="keywords-hostile", audio="speech.flac", keywords=("Ada", "Love lace", "x" * 12, "b bold /b", "k0"))

    manifest = bytearray()
    number = 1
    for kind in kinds:
        kind.first_line = number
        for text in kind.lines:
            manifest += text
            number += text.count(b"\n")
    return bytes(manifest), kinds
