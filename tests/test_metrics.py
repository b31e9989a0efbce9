"""SQuAD v1.1 EM/F1 (hand-made cases, each expected value worked out from the definition in the comment), and
the bootstrap intervals (checked against the exact bootstrap distribution of tiny examples and against the
normal approximation)."""

import dataclasses
import math

import numpy as np
import pytest

from lora_tutorial.metrics import (
    Scores,
    bootstrap_interval,
    clean_prediction,
    exact_match_score,
    f1_score,
    metric_max_over_ground_truths,
    normalize_answer,
    per_question_scores,
    score_predictions,
)


def f1_from(overlap: int, n_pred: int, n_gold: int) -> float:
    """Token F1 written out: precision = overlap / |pred|, recall = overlap / |gold|."""
    precision, recall = overlap / n_pred, overlap / n_gold
    return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("text, expected", [
    ("Denver Broncos", "denver broncos"),                 # lower-case
    ("  Denver \n\t Broncos  ", "denver broncos"),        # whitespace collapsed and trimmed
    ("The Eiffel Tower", "eiffel tower"),                 # leading article dropped
    ("a cat and an owl at the zoo", "cat and owl at zoo"),  # all three articles, anywhere
    ("Theater Anthem Aardvark", "theater anthem aardvark"),  # articles only as whole words
    ("U.S. (1990)!", "us 1990"),                          # punctuation removed, not replaced by a space
    ("Eiffel-Tower", "eiffeltower"),                      # so a hyphen joins the two words
    ("the", ""),                                          # an answer can normalize to nothing
    ("Café « Paris »", "café « paris »"),                 # only ASCII punctuation is removed
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match_score("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match_score("Denver", "Denver Broncos") == 0.0


def test_f1_partial_overlap():
    # pred tokens [denver, broncos, team], gold [denver, broncos]: 2 shared.
    assert f1_score("the Denver Broncos team", "Denver Broncos") == pytest.approx(f1_from(2, 3, 2))
    # pred [carolina, panthers], gold [panthers, of, carolina, nfl]? word order does not matter.
    assert f1_score("Carolina Panthers", "Panthers of Carolina, NFL") == pytest.approx(f1_from(2, 2, 4))


def test_f1_counts_repeated_tokens_once_per_occurrence():
    # pred [paris, paris], gold [paris]: the multiset overlap is min(2, 1) = 1, not 2 ...
    assert f1_score("Paris Paris", "Paris") == pytest.approx(f1_from(1, 2, 1))
    # ... and with gold [paris, or, paris] it is min(2, 2) = 2, not 1 (as a set intersection would say).
    assert f1_score("Paris Paris", "Paris or Paris") == pytest.approx(f1_from(2, 2, 3))


def test_f1_no_overlap_and_empty_prediction_are_zero():
    assert f1_score("Boston", "Denver Broncos") == 0.0
    assert f1_score("", "Denver Broncos") == 0.0
    assert exact_match_score("", "Denver Broncos") == 0.0
    # v1.1 quirk: "" and "The" both normalize to "", so EM says equal while F1 (no shared token) says 0.
    assert exact_match_score("", "The") == 1.0
    assert f1_score("", "The") == 0.0


def test_max_over_several_gold_answers():
    golds = ["Denver Broncos", "the Broncos", "Broncos"]
    assert metric_max_over_ground_truths(exact_match_score, "Broncos", golds) == 1.0
    # "Denver Broncos team" vs each gold: f1_from(2,3,2), f1_from(1,3,1), f1_from(1,3,1): the first wins.
    assert metric_max_over_ground_truths(f1_score, "Denver Broncos team", golds) == pytest.approx(
        max(f1_from(2, 3, 2), f1_from(1, 3, 1)))
    with pytest.raises(ValueError, match="at least one gold"):
        metric_max_over_ground_truths(f1_score, "x", [])


def test_score_predictions_averages_times_100():
    predictions = ["Denver Broncos", "the Panthers team", "Boston"]
    references = [["Denver Broncos", "Broncos"], ["Carolina Panthers"], ["Santa Clara"]]
    # EM: 1, 0, 0.  F1: 1, f1_from(1 shared "panthers", 2 pred tokens, 2 gold tokens), 0.
    em, f1 = per_question_scores(predictions, references)
    assert em == [100.0, 0.0, 0.0]
    assert f1 == pytest.approx([100.0, 100 * f1_from(1, 2, 2), 0.0])
    scores = score_predictions(predictions, references)
    assert scores.n == 3
    assert scores.exact_match == pytest.approx(100 * 1 / 3)
    assert scores.f1 == pytest.approx(100 * (1 + f1_from(1, 2, 2) + 0) / 3)
    for value, (low, high) in ((scores.exact_match, scores.em_interval), (scores.f1, scores.f1_interval)):
        assert 0 <= low <= value <= high <= 100
    assert "EM 33.3" in str(scores) and "on 3 questions" in str(scores)


def test_scores_are_frozen():
    scores = score_predictions(["Paris"], [["Paris"]])
    assert isinstance(scores, Scores)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scores.f1 = 0.0


def test_all_right_has_a_point_interval():
    scores = score_predictions(["Paris"] * 5, [["Paris"]] * 5)
    assert (scores.exact_match, scores.em_interval, scores.f1_interval) == (100.0, (100.0, 100.0), (100.0, 100.0))


@pytest.mark.parametrize("predictions, references, message", [
    (["a", "b"], [["a"]], "2 predictions but 1"),
    ([], [], "nothing to score"),
    (["Paris"], ["Paris"], "wrap it in a list"),
])
def test_score_predictions_rejects_bad_input(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        score_predictions(predictions, references)


@pytest.mark.parametrize("generated, expected", [
    (" Denver Broncos\n\nUser: Context: ...", "Denver Broncos"),  # the model kept talking
    ("Denver Broncos<|im_end|>\n<|im_start|>user", "Denver Broncos"),
    ("Denver Broncos<|endoftext|>", "Denver Broncos"),
    ("\n  Denver Broncos \nmore", "Denver Broncos"),  # leading newline is not the end of the answer
    ("   ", ""),
])
def test_clean_prediction(generated, expected):
    assert clean_prediction(generated) == expected


def test_clean_prediction_custom_stop_string():
    assert clean_prediction("Paris</answer> and more", stop_strings=["</answer>"]) == "Paris"


# --------------------------------------------------------------------------------------------------
# Bootstrap intervals
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, confidence, expected", [
    # Resampling [0, 100] gives the means 0, 50, 100 with probabilities 1/4, 1/2, 1/4: the 2.5 % and 97.5 %
    # percentiles are 0 and 100, the 30 % and 70 % ones (a 40 % interval) are both 50.
    ([0.0, 100.0], 0.95, (0.0, 100.0)),
    ([0.0, 100.0], 0.40, (50.0, 50.0)),
    # Resampling [0, 0, 100]: k picks of 100 ~ Binomial(3, 1/3), so the mean is 0, 100/3, 200/3, 100 with
    # probabilities 8/27, 12/27, 6/27, 1/27, cumulative 0.296, 0.741, 0.963, 1. The 10 % percentile is 0 and the
    # 90 % one 200/3 (an 80 % interval); the 97.5 % one is 100.
    ([0.0, 0.0, 100.0], 0.80, (0.0, 200 / 3)),
    ([0.0, 0.0, 100.0], 0.95, (0.0, 100.0)),
])
def test_bootstrap_matches_the_exact_bootstrap_distribution_of_tiny_samples(values, confidence, expected):
    low, high = bootstrap_interval(values, confidence=confidence, samples=20_000, seed=1)
    assert (low, high) == pytest.approx(expected)


def test_bootstrap_contains_the_mean_and_narrows_like_one_over_sqrt_n():
    rng = np.random.default_rng(5)
    widths = {}
    for n in (50, 1000):
        values = 100.0 * (rng.random(n) < 0.6)
        low, high = bootstrap_interval(values)
        assert low <= values.mean() <= high
        widths[n] = high - low
        # The normal approximation: 2 x 1.96 x standard error of the mean.
        normal = 2 * 1.96 * values.std() / math.sqrt(n)
        assert widths[n] == pytest.approx(normal, rel=0.15)
    assert widths[1000] < widths[50] / 3


def test_bootstrap_is_seeded():
    values = [100.0 * (i % 3 == 0) for i in range(40)]
    assert bootstrap_interval(values) == bootstrap_interval(values)
    assert bootstrap_interval(values, seed=1) == bootstrap_interval(values, seed=1)
    assert score_predictions(["a", "b"] * 20, [["a"]] * 40) == score_predictions(["a", "b"] * 20, [["a"]] * 40)
