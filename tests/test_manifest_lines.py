"""Manifest lines never fail the job: both JSONL readers (Ray's tasks and Manifest.batches) give the
same rows for every odd line, each bad line is one invalid_row naming its line number, columns that
appear after the head are carried, and keywords are cleaned once, before any engine sees them."""

from __future__ import annotations

import gzip
import json

import pytest

from pipeline import manifest as manifest_module
from pipeline.config import load_config
from pipeline.manifest import Manifest, PrepareStage, read_lines

ODD_LINES = [
    b"\xef\xbb\xbf" + json.dumps({"id": "bom", "audio": "a.wav"}).encode(),
    json.dumps({"id": "u2028", "audio": "a.wav", "reference": "one\u2028two\x85three\x1cfour"},
               ensure_ascii=False).encode(),
    b'{"id": "bad-utf8", "audio": "a.wav", "reference": "caf\xe9"}',
    b"",
    b"   \t",
    b'["a.wav"]',
    b"3.5",
    b'{"id": "crlf", "audio": "a.wav"}\r',
    b"[" * 1020 + b"]" * 1020,  # deeper than Python's recursion limit, shorter than max_line_bytes
    b'{"id": "late", "audio": "a.wav", "speaker": "Ada"}',
    b'{"id": "long", "audio": "a.wav", "reference": "' + b"x" * 3000 + b'"}',
    b'{"id": "no-audio", "reference": "r"}',
    b'{"id": "kw", "audio": "a.wav", "keywords": ["<|en|>Ada", "Ada", "b\\nc", "' + b"y" * 40 + b'", "d", "e"]}',
    b'{"id": "cut", "audio": ',
]


def _write(tmp_path, lines=ODD_LINES, name="m.jsonl"):
    path = tmp_path / name
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


def _cfg(*extra):
    return load_config(None, ["engine.name=fake", "engine.batch_size=2", "input.max_line_bytes=2048",
                              "task.max_keywords=3", "task.max_keyword_chars=8", *extra])


def _prepared(manifest: Manifest, cfg, batches) -> list[dict]:
    stage = PrepareStage(manifest, cfg.input.columns, cfg.task)
    return [row for batch in batches for row in stage.rows(batch)]


def _by_line(rows):
    return sorted(rows, key=lambda r: (r["id"], r["error"] or ""))


@pytest.mark.parametrize("name", ["m.jsonl", "m.jsonl.gz"])
def test_both_jsonl_readers_give_the_same_rows_for_every_odd_line(ray_session, tmp_path, monkeypatch, name):
    """Ray's read tasks and Manifest.batches run the same bounded line reader and parser."""
    from pipeline.plan import read_manifest

    monkeypatch.setattr(manifest_module, "_HEAD_BYTES", 100)  # the head: the first two lines
    cfg = _cfg()
    manifest = Manifest.open(str(_write(tmp_path, name=name)), cfg)
    local = _prepared(manifest, cfg, manifest.batches())
    ds = read_manifest(manifest, cfg.engine.batch_size)
    through_ray = _prepared(manifest, cfg, list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    assert _by_line(local) == _by_line(through_ray)
    rows = {r["id"]: r for r in local}
    assert len(local) == len(ODD_LINES) - 2  # the two blank lines are no rows
    ok = {i for i, r in rows.items() if r["status"] == "ok"}
    assert ok == {"bom", "u2028", "crlf", "late", "kw"}
    assert rows["u2028"]["reference"] == "one\u2028two\x85three\x1cfour"  # one row: lines end at \n only
    assert json.loads(rows["late"]["other_columns"]) == {"speaker": "Ada"}  # after the head, carried
    assert rows["bom"]["other_columns"] is None
    assert rows["kw"]["keywords"] == ["Ada", "b c", "yyyyyyyy"]  # cleaned and bounded once, here
    invalid = sorted((r["error"] for r in local if r["status"] == "invalid_row"))
    expected = {3: "not valid UTF-8", 6: "an array", 7: "a JSON scalar", 9: "cannot be read as JSON",
                11: "longer than input.max_line_bytes", 12: "'audio' column has no value", 14: "not JSON"}
    assert len(invalid) == len(expected)
    for number, words in expected.items():
        assert any(f"line {number}" in e and words in e for e in invalid), (number, invalid)


def test_the_head_reads_a_long_first_line_whole_and_sees_its_columns(tmp_path):
    first = json.dumps({"id": "a", "audio": "a.wav", "reference": "w " * 1_500_000}).encode()  # 3 MB
    path = _write(tmp_path, [first, b'{"id": "b", "audio": "b.wav", "late": 1}'])
    manifest = Manifest.open(str(path), load_config(None, ["engine.name=fake"]))
    assert manifest.schema.names == ["id", "audio", "reference"]
    assert [f.name for f in manifest.extras] == ["other_columns"]


def test_read_ranges_of_a_long_file_cover_every_line_exactly_once(tmp_path):
    lines = [json.dumps({"id": str(i), "audio": f"{i}.wav"}).encode() + (b"\r" if i % 7 == 0 else b"")
             for i in range(5000)]
    lines[10] = b""  # a blank line keeps its position but makes no row
    lines[20] = b'{"id": "big", "audio": "' + b"x" * 5000 + b'"}'  # over max_line_bytes: skipped, still a row
    path = _write(tmp_path, lines)
    manifest = Manifest.open(str(path), _cfg())
    ranges = manifest.ranges(64)
    assert 32 <= len(ranges) <= 64 and ranges[0].start in (0, None) and ranges[-1].end is None
    positions = [p for r in ranges for t in manifest.read(r, 100) for p in t.column("row_index").to_pylist()]
    assert positions == [p for p in range(5000) if p != 10]
    big = [r for t in manifest.batches() for r in manifest.raw_rows(t) if r.row_index == 20]
    assert "line 21 is 5026 bytes, longer than input.max_line_bytes" in big[0].problem


def test_a_line_over_the_limit_is_skipped_to_its_end_never_held(tmp_path):
    import io

    data = b'{"a": 1}\n' + b"z" * 5000 + b"\n" + b'{"b": 2}'
    out = list(read_lines(io.BytesIO(data), max_line_bytes=1024))
    assert out == [(0, b'{"a": 1}', 8), (1, None, 5000), (2, b'{"b": 2}', 8)]  # (position, bytes, length)


def test_keywords_reach_every_engine_cleaned_and_bounded(tmp_path):
    """Whisper's hotwords and Granite's prompt get the same list: PrepareStage builds it once."""
    path = _write(tmp_path, [json.dumps({"id": "r", "audio": "a.wav", "keywords": "<|notimestamps|>Ray, Ray, "
                                        "x\u200by, " + ", ".join(f"k{i}" for i in range(100))}).encode()])
    cfg = _cfg("task.keywords=[Quarry, '<b>Quarry</b>']")
    manifest = Manifest.open(str(path), cfg)
    (row,) = _prepared(manifest, cfg, manifest.batches())
    assert row["keywords"] == ["Quarry", "b Quarry", "Ray"]


def test_a_read_task_carries_its_run_not_the_manifests_index(tmp_path):
    """Every read task carries the manifest it reads: without the index of line offsets (which
    grows with the file), so a million-line manifest does not cost its index once per task."""
    import cloudpickle

    from pipeline.plan import _manifest_source

    path = _write(tmp_path, [json.dumps({"id": str(i), "audio": f"{i}.wav"}).encode() for i in range(40_000)])
    manifest = Manifest.open(str(path), _cfg())
    tasks = _manifest_source(manifest, 1000).get_read_tasks(40)
    sizes = [len(cloudpickle.dumps(t)) for t in tasks]
    assert len(tasks) == 40 and max(sizes) < manifest.offsets.nbytes / 2, (sizes, manifest.offsets.nbytes)
    positions = [p for t in tasks for table in t() for p in table.column("row_index").to_pylist()]
    assert positions == list(range(40_000))
