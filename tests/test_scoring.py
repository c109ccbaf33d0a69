import pytest

from pipeline.config import ScoringConfig
from pipeline.scoring import CorpusTally, score

CFG = ScoringConfig()


def test_english_uses_whisper_english_normaliser_so_case_and_punctuation_do_not_count():
    counts = score("Mr. Smith went to Washington.", "mister smith went to washington", "en", CFG)
    assert counts.normalizer == "whisper_english"
    assert (counts.substitutions, counts.deletions, counts.insertions) == (0, 0, 0)
    assert counts.rate == 0.0


def test_other_languages_use_basic_normaliser_and_count_word_edits():
    counts = score("für die besten Aussichten", "für die beste aussichten und", "de", CFG)
    assert counts.normalizer == "whisper_basic"
    assert counts.metric == "wer"
    assert (counts.ref_units, counts.substitutions, counts.insertions) == (4, 1, 1)


def test_japanese_is_scored_by_characters():
    counts = score("日本語の音声", "日本語の音", "ja", CFG)
    assert counts.metric == "cer"
    assert counts.ref_units == 6 and counts.deletions == 1


def test_empty_hypothesis_is_all_deletions():
    counts = score("cats chase dogs", None, "en", CFG)
    assert counts.deletions == 3 and counts.rate == 1.0


def test_empty_reference_counts_insertions_with_no_rate():
    counts = score("", "hello there", "en", CFG)
    assert counts.ref_units == 0 and counts.insertions == 2 and counts.rate is None


def test_corpus_rate_is_summed_counts_not_mean_of_row_rates():
    tally = CorpusTally(metric="wer", normalizer="whisper_english")
    tally.add(ref_units=1, substitutions=1, deletions=0, insertions=0)  # row rate 1.0
    tally.add(ref_units=9, substitutions=0, deletions=0, insertions=0)  # row rate 0.0
    assert tally.rate == pytest.approx(0.1)  # the mean of row rates would say 0.5
