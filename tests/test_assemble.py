"""The driver-side Assembler on hand-made segment rows (no Ray): order, stitching, channels,
scoring, failures and incomplete recordings."""

from __future__ import annotations

import pyarrow as pa

from pipeline.assemble import Assembler, subtitle_name
from pipeline.config import load_config
from pipeline.records import transcript_schema
from pipeline.stages import scored_schema

BASE = dict(
    id="rec", audio="a.wav", status="ok", error=None, reference=None, language="en", task="transcribe",
    target_language=None, duration_s=60.0, source_sample_rate=16000, source_channels=1, engine="fake", model="m",
    avg_logprob=-0.2, inference_s=1.0, finished_at=None, prompt=None, metric=None, normalizer=None, ref_words=None,
    substitutions=None, deletions=None, insertions=None, wer=None, segments=1, channel_texts=None, overlap_s=None,
    conversation=None, row_index=0, channel=None, n_channels=1, segment_index=0, n_segments=1,
    seam_overlap_s=0.0, speech=None,
)


def _table(rows):
    return pa.Table.from_pylist([{**BASE, **r} for r in rows], schema=scored_schema([]))


def _assembler():
    return Assembler(transcript_schema([]), load_config(None).scoring)


def test_segments_arriving_out_of_order_become_one_scored_recording():
    a = _assembler()
    seg = lambda i, text, **kw: dict(segment_index=i, n_segments=3, start_s=20.0 * i, end_s=20.0 * (i + 1),  # noqa: E731
                                     text=text, reference="one two three four five six", **kw)
    rec, segs = a.add(_table([seg(2, "five six"), seg(0, "one two")]))
    assert rec.num_rows == 0 and segs.num_rows == 0 and a.pending == 1  # waits for the last segment
    rec, segs = a.add(_table([seg(1, "three four", inference_s=2.0)]))
    row = rec.to_pylist()[0]
    assert row["text"] == "one two three four five six" and row["segments"] == 3 and row["wer"] == 0.0
    assert row["inference_s"] == 4.0 and a.pending == 0
    assert segs.column("segment_index").to_pylist() == [0, 1, 2]
    assert set(rec.schema.names) == set(transcript_schema([]).names)  # internal columns are gone


def test_a_failed_segment_fails_its_recording_with_the_reason_and_keeps_the_rest():
    a = _assembler()
    rec, segs = a.add(_table([
        dict(segment_index=0, n_segments=2, start_s=0.0, end_s=30.0, text="kept words"),
        dict(segment_index=1, n_segments=2, start_s=30.0, end_s=60.0, text=None, status="inference_error",
             error="boom"),
    ]))
    row = rec.to_pylist()[0]
    assert row["status"] == "inference_error" and "1 of 2 segments failed" in row["error"] and "boom" in row["error"]
    assert row["text"] == "kept words"
    assert segs.column("status").to_pylist() == ["ok", "inference_error"]


def test_split_channels_give_texts_turns_and_a_score_without_channel_labels():
    a = _assembler()
    common = dict(n_channels=2, n_segments=1, reference="hello there general kenobi", source_channels=2)
    rec, _ = a.add(_table([
        dict(common, channel="customer", start_s=4.0, end_s=9.0, text="general kenobi", speech=[[4.0, 9.0]]),
        dict(common, channel="agent", start_s=0.0, end_s=5.0, text="hello there", speech=[[0.0, 5.0]]),
    ]))
    row = rec.to_pylist()[0]
    assert row["text"] == "agent: hello there\ncustomer: general kenobi"
    assert [t["channel"] for t in row["conversation"]] == ["agent", "customer"]
    assert {c["channel"]: c["speaking_s"] for c in row["channel_texts"]} == {"customer": 5.0, "agent": 5.0}
    assert row["overlap_s"] == 1.0 and row["wer"] == 0.0 and row["ref_words"] == 4


def test_recordings_left_incomplete_at_the_end_are_kept_as_failures():
    a = _assembler()
    a.add(_table([dict(segment_index=0, n_segments=3, start_s=0.0, end_s=20.0, text="x")]))
    rec, _ = a.close()
    row = rec.to_pylist()[0]
    assert row["status"] == "inference_error" and "only 1 of 3" in row["error"] and a.pending == 0


def test_subtitle_names_cannot_leave_their_folder_and_do_not_collide():
    names = {subtitle_name(i) for i in ("../../etc/passwd", "a/b", "a_b", "/abs", "..", "x" * 500)}
    assert len(names) == 6
    assert all("/" not in n and not n.startswith(".") and len(n) < 100 for n in names)
