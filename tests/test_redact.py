"""PII redaction (redact.*; pipeline/redact/): Presidio's recognizers over transcripts whose
spoken numbers and addresses were first rewritten, spans mapped back.

* The rewrite maps every span back to the words it came from.
* Planted card numbers (Luhn-valid), phone numbers, e-mail addresses and SSNs, in digits and in
  words, inside sentences of the eval references, and the references alone: recall and precision
  printed and bounded; no planted value is left in the redacted text.
* drop_text: the raw text leaves the row; words, channel and turn texts keep their redacted forms.
* The pipeline on synthetic calls (espeak-ng) with whisper tiny.en: `text_redacted`, redacted
  words, and the redacted audio copies, which, transcribed again with tiny.en, hold none of the
  planted numbers (e-mail addresses are left out of the audio check: tiny.en mishears espeak's
  spelled-out addresses before any redaction could see them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf

from pipeline.config import RedactConfig, load_config
from pipeline.redact import load_redactor, redact_row
from pipeline.redact.spoken import normalise

from .conftest import eval_rows
from .helpers import read_transcripts, write_jsonl

pytestmark = pytest.mark.callcenter  # needs the callcenter extra (make test installs it)

ENTITIES = ["CREDIT_CARD", "PHONE_NUMBER", "EMAIL_ADDRESS", "US_SSN", "IBAN_CODE"]
RATE = 16_000
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def redactor():
    return load_redactor(RedactConfig(entities=ENTITIES))


def test_spoken_numbers_and_addresses_are_rewritten_and_map_back_to_their_words():
    text = "card four one one one, one one one one, 1111 one one one one thanks; mail jo dot li at example dot com"
    norm = normalise(text)
    assert "4111 1111 1111 1111" in norm.text and "jo.li@example.com" in norm.text
    at = norm.text.index("4111")
    a, b = norm.original_span(at, at + len("4111 1111 1111 1111"))
    assert text[a:b] == "four one one one, one one one one, 1111 one one one one"
    at = norm.text.index("jo.li")
    a, b = norm.original_span(at, at + len("jo.li@example.com"))
    assert text[a:b] == "jo dot li at example dot com"
    assert normalise("I have one question about two or three things").text == "I have one question about two or three things"
    assert "212-555-0182" in normalise("two one two five five five oh one eight two").text
    assert "4111" in normalise("forty one eleven").text


# --- Planted values ------------------------------------------------------------------------------

def _luhn_complete(body: str) -> str:
    digits = [int(d) for d in body][::-1]
    total = sum(d if i % 2 else (2 * d if 2 * d < 10 else 2 * d - 9) for i, d in enumerate(digits))
    return body + str((10 - total % 10) % 10)


def _spoken(digits: str, groups: list[int]) -> str:
    out, at = [], 0
    for g in groups:
        out.append(" ".join(DIGIT_WORDS[int(d)] for d in digits[at:at + g]))
        at += g
    return ", ".join(out)


def planted(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(entity, the value's digits or address, how it is written) in digits and in words."""
    out = []
    for k in range(6):
        card = _luhn_complete(("4" if k % 2 else "5") + "".join(str(d) for d in rng.integers(0, 10, 14)))
        out.append(("CREDIT_CARD", card, " ".join(card[i:i + 4] for i in range(0, 16, 4))))
        out.append(("CREDIT_CARD", card, _spoken(card, [4, 4, 4, 4])))
        phone = f"{rng.choice([212, 415, 617, 312, 206])}{rng.integers(200, 999)}{rng.integers(1000, 9999)}"
        out.append(("PHONE_NUMBER", phone, f"{phone[:3]}-{phone[3:6]}-{phone[6:]}"))
        out.append(("PHONE_NUMBER", phone, _spoken(phone, [3, 3, 4])))
        ssn = f"{rng.integers(101, 665)}{rng.integers(10, 99)}{rng.integers(1001, 9999)}"
        out.append(("US_SSN", ssn, f"{ssn[:3]}-{ssn[3:5]}-{ssn[5:]}"))
        out.append(("US_SSN", ssn, _spoken(ssn, [3, 2, 4])))
        name = ["jane", "omar", "li", "maria", "tom", "ana"][k]
        out.append(("EMAIL_ADDRESS", f"{name}.smith{k}@example.com", f"{name}.smith{k}@example.com"))
        out.append(("EMAIL_ADDRESS", f"{name}@mail{k}.org", f"{name} at mail{k} dot org"))
    return out


TEMPLATES = {"CREDIT_CARD": "my card number is {} and", "PHONE_NUMBER": "you can call me back on {} after",
             "US_SSN": "my social security number is {} I think", "EMAIL_ADDRESS": "please email me at {} thanks"}


def _left(value: str, redacted: str) -> bool:
    """Whether ``value`` (digits, or an address) can still be read in ``redacted``."""
    norm = normalise(redacted).text.lower()
    return value in re.sub(r"\D", "", norm) if value.isdigit() else value in norm


def test_planted_values_are_found_in_digits_and_in_words_with_few_false_alarms(redactor):
    rng = np.random.default_rng(14)
    references = [r["reference"] for r in eval_rows("en")]
    found = missed = false = 0
    left = []
    started = time.perf_counter()
    for i, (entity, value, written) in enumerate(planted(rng)):
        words = references[i % len(references)].split()
        text = " ".join(words[:6] + [TEMPLATES[entity].format(written)] + words[6:])
        hits = redactor.find(text)
        span = (text.index(written), text.index(written) + len(written))
        right = [h for h in hits if h.start < span[1] and span[0] < h.end and h.entity == entity]
        found += bool(right)
        missed += not right
        false += len(hits) - len(right)
        if _left(value, redactor.replace(text, hits)):
            left.append(written)
    n_texts = len(planted(np.random.default_rng(14)))
    for text in references:  # no PII in the references: everything found is a false alarm
        false += len(redactor.find(text))
    per_row_ms = (time.perf_counter() - started) * 1000 / (n_texts + len(references))
    recall, precision = found / (found + missed), found / (found + false)
    print(f"\nredaction over {found + missed} planted values (digits and words) and {len(references)} clean "
          f"references: recall {recall:.3f}, precision {precision:.3f} ({false} false alarms); "
          f"{per_row_ms:.1f} ms per text; values left readable: {left}")
    assert recall >= 0.95 and precision >= 0.9 and not left


def test_drop_text_leaves_only_redacted_forms_in_the_row(redactor):
    cfg = RedactConfig(entities=ENTITIES, drop_text=True)
    words = [{"word": w, "start_s": float(i), "end_s": i + 0.5, "probability": 0.9, "speaker": "spk0"}
             for i, w in enumerate("call me on two one two five five five zero one eight two please".split())]
    row = {"status": "ok", "text": " ".join(w["word"] for w in words), "words": words,
           "speakers": [{"speaker": "spk0", "text": " ".join(w["word"] for w in words), "speaking_s": 14.0}],
           "speaker_turns": None, "channel_texts": None, "conversation": None}
    redact_row(row, redactor, cfg)
    assert row["text"] is None
    assert row["text_redacted"] == "call me on [PHONE_NUMBER] please"
    assert [w["word"] for w in row["words"]] == ["call", "me", "on", "[PHONE_NUMBER]", "please"]
    assert (row["words"][3]["start_s"], row["words"][3]["end_s"]) == (3.0, 12.5)
    assert row["redactions"] == [{"entity": "PHONE_NUMBER", "score": pytest.approx(0.4, abs=0.6), "start_s": 3.0,
                                  "end_s": 12.5}]
    assert row["speakers"][0]["text"] == "call me on [PHONE_NUMBER] please"


# --- The pipeline, and the redacted audio --------------------------------------------------------

CALLS = {  # what espeak-ng says, and the digits that must not survive
    "card": ("Thanks for calling. My card number is four five three nine, one four eight eight, zero three four "
             "three, six four six seven. It expires next year.", "4539148803436467"),
    "phone": ("You can call me back at four one five, two six three, seven seven one nine, any time after lunch.",
              "4152637719"),
    "ssn": ("My social security number is five three six, two two, four one eight seven. Please keep it safe.",
            "536224187"),
}


def _speak(text: str, path) -> np.ndarray:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
    samples, rate = sf.read(path, dtype="float32")
    import soxr

    return soxr.resample(samples, rate, RATE).astype(np.float32)


@pytest.mark.slow
def test_pipeline_redacts_text_words_and_audio_of_single_and_stitched_recordings(ray_session, tmp_path):
    if not shutil.which("espeak-ng"):
        pytest.fail("espeak-ng is not installed: make test installs it (apt-get install espeak-ng)", pytrace=False)
    from pipeline.config import WhisperOptions
    from pipeline.engines import EngineRequest
    from pipeline.engines.whisper import WhisperEngine
    from pipeline.redact.audio import REDACTED_AUDIO_DIR, redacted_audio_name

    rows, pieces = [], []
    for name, (text, _) in CALLS.items():
        samples = _speak(text, tmp_path / f"{name}.raw.wav")
        sf.write(tmp_path / f"{name}.wav", samples, RATE, subtype="PCM_16")
        rows.append({"id": name, "audio": f"{name}.wav", "language": "en"})
        pieces += [samples, np.zeros(2 * RATE, np.float32)]
    long_call = np.concatenate(pieces * 2)  # over 30 s: cut into segments, redacted on the driver
    assert len(long_call) > 32 * RATE
    sf.write(tmp_path / "long.wav", long_call, RATE, subtype="PCM_16")
    rows.append({"id": "long", "audio": "long.wav", "language": "en"})
    out = tmp_path / "out"
    run_cfg = load_config(None, ["redact.entities=[CREDIT_CARD, PHONE_NUMBER, EMAIL_ADDRESS, US_SSN]",
                                 "redact.audio=true", "redact.drop_text=true", "output.words=true",
                                 "engine.cpus_per_replica=0.75"])
    from pipeline.plan import run_job

    run_job(run_cfg, str(write_jsonl(tmp_path / "m.jsonl", rows)), str(out))
    got = read_transcripts(out).set_index("id")
    assert (got["status"] == "ok").all() and got.loc["long", "segments"] >= 2
    assert got["text"].isna().all()  # drop_text
    engine = WhisperEngine("tiny.en", WhisperOptions())
    for rid in ("card", "phone", "ssn", "long"):
        redacted = got.loc[rid, "text_redacted"]
        entities = {r["entity"] for r in got.loc[rid, "redactions"]}
        values = [v for _, v in CALLS.values()] if rid == "long" else [CALLS[rid][1]]
        assert not any(_left(v, redacted) for v in values), redacted
        assert all("[" in w["word"] or not re.search(r"\d{3}", w["word"]) for w in got.loc[rid, "words"]), [
            " ".join(w["word"] for w in got.loc[rid, "words"]), got.loc[rid, "text_redacted"]]
        copy, _ = sf.read(out / REDACTED_AUDIO_DIR / redacted_audio_name(rid), dtype="float32")
        (heard,) = engine.transcribe([EngineRequest(rid, copy, "en")])
        digits = re.sub(r"\D", "", normalise(heard.text).text)
        print(f"\n{rid}: redacted {sorted(entities)}; text_redacted: {redacted!r}\n  the redacted audio heard again: "
              f"{heard.text!r}")
        assert not any(v[:4] in digits or v[-4:] in digits for v in values), heard.text
        assert "number" in heard.text.lower() or "call" in heard.text.lower()  # the rest of the call is still there
