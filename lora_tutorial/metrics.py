"""SQuAD v1.1 evaluation: exact match (EM) and token-level F1.

Both metrics compare *normalized* strings, so that "The Eiffel Tower." and "eiffel tower" count as the
same answer. The normalization is the one of the official v1.1 evaluation script:

1. lower-case,
2. drop every ASCII punctuation character (``string.punctuation``),
3. drop the articles "a", "an", "the" when they are whole words,
4. collapse runs of whitespace into single spaces (and trim the ends).

A question has several gold answers (crowdworkers disagreed on the span), and a prediction gets the best
score over them. The corpus scores are averages over questions, times 100.

A generative model does not stop where the gold span stops, so ``clean_prediction`` first cuts the
generated text at the end of its first line.

**How sure is a score?** A score on n questions is a mean of n per-question numbers, and another sample
of n questions would give another mean. ``score_predictions`` reports a 95 % *bootstrap* interval:
resample the n per-question scores with replacement many times, recompute the mean each time, and keep
the middle 95 % of those means. With 1,000 questions the EM interval is about +-3 points; with 20 it is
about +-20, which is why two runs a few points apart on 20 questions tell you nothing.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Apply the SQuAD v1.1 normalization (see the module docstring) to ``text``."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 if the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Harmonic mean of token precision and recall between the normalized strings.

    Tokens are counted as a multiset (``Counter``): a word predicted twice only matches twice if the gold
    answer has it twice. With no token in common (an empty prediction included) the score is 0, as in the
    official v1.1 script.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(metric: Callable[[str, str], float], prediction: str,
                                  ground_truths: Sequence[str]) -> float:
    """The best ``metric(prediction, gold)`` over all the gold answers of one question."""
    if not ground_truths:
        raise ValueError("metric_max_over_ground_truths: a question needs at least one gold answer")
    return max(metric(prediction, gold) for gold in ground_truths)


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, samples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded, so a score prints the same twice)."""
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(samples, len(data)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Scores:
    """Corpus EM and F1 in percent on ``n`` questions, each with its 95 % bootstrap interval."""

    exact_match: float
    f1: float
    n: int
    em_interval: tuple[float, float]
    f1_interval: tuple[float, float]

    def __str__(self) -> str:
        em, f1 = self.em_interval, self.f1_interval
        return (f"EM {self.exact_match:.1f} [{em[0]:.1f}, {em[1]:.1f}]  F1 {self.f1:.1f} [{f1[0]:.1f}, {f1[1]:.1f}]  "
                f"on {self.n:,} questions (95 % bootstrap intervals)")


def per_question_scores(predictions: Sequence[str],
                        references: Sequence[Sequence[str]]) -> tuple[list[float], list[float]]:
    """(EM, F1) of every question, each the best over its gold answers, in percent."""
    if len(predictions) != len(references):
        raise ValueError(f"score_predictions: {len(predictions)} predictions but {len(references)} "
                         "reference lists; they must pair up one to one")
    if not predictions:
        raise ValueError("score_predictions: nothing to score (no predictions)")
    for i, golds in enumerate(references):
        if isinstance(golds, str):
            raise ValueError(f"score_predictions: references[{i}] is a string; wrap it in a list of gold "
                             "answers")
    em = [100.0 * metric_max_over_ground_truths(exact_match_score, p, g) for p, g in zip(predictions, references)]
    f1 = [100.0 * metric_max_over_ground_truths(f1_score, p, g) for p, g in zip(predictions, references)]
    return em, f1


def score_predictions(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Scores:
    """Corpus EM and F1 (percent, with 95 % bootstrap intervals) of ``predictions[i]`` against the gold
    list ``references[i]``."""
    em, f1 = per_question_scores(predictions, references)
    return Scores(float(np.mean(em)), float(np.mean(f1)), len(em), bootstrap_interval(em), bootstrap_interval(f1))


DEFAULT_STOP_STRINGS = ("\n", "<|im_end|>", "<|endoftext|>", "</s>")


def clean_prediction(text: str, stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS) -> str:
    """Keep the generated text up to the first stop string (newline, end-of-turn or EOS text), stripped.

    A fine-tuned model answers "Denver Broncos" and then often keeps going ("\\n\\nUser: ..."); only the
    first line is the answer. Leading whitespace is stripped *before* cutting, so an answer that starts
    on a new line (" \\nDenver Broncos") is not cut down to nothing.
    """
    text = text.lstrip()
    cut = min((pos for stop in stop_strings if stop and (pos := text.find(stop)) >= 0), default=len(text))
    return text[:cut].strip()
