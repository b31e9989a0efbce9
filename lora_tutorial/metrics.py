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
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Sequence

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


def score_predictions(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus EM and F1 (percent) of ``predictions[i]`` against the gold list ``references[i]``.

    Returns ``{"exact_match": float, "f1": float, "n": int}``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"score_predictions: {len(predictions)} predictions but {len(references)} "
                         "reference lists; they must pair up one to one")
    if not predictions:
        raise ValueError("score_predictions: nothing to score (no predictions)")
    for i, golds in enumerate(references):
        if isinstance(golds, str):
            raise ValueError(f"score_predictions: references[{i}] is a string; wrap it in a list of gold "
                             "answers")
    em = sum(metric_max_over_ground_truths(exact_match_score, p, g) for p, g in zip(predictions, references))
    f1 = sum(metric_max_over_ground_truths(f1_score, p, g) for p, g in zip(predictions, references))
    n = len(predictions)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "n": n}


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
