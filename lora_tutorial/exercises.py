"""Short exercises for the notebooks, each with a checker that says right or wrong and gives a hint.

In a notebook::

    from lora_tutorial.exercises import check
    answer = ...                      # your code (the notebook ships a solution; replace it to try yourself)
    check("1.1", answer)

``check`` recomputes the expected answer from the package itself (never from a stored number), so it
stays right whatever the data or the model. Every exercise is listed in ``EXERCISES`` with its question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from .metrics import f1_score, normalize_answer
from .notebook import find_repo_root
from .pretrained import load_tokenizer


@dataclass(frozen=True)
class Exercise:
    question: str
    expected: Callable[[], Any]  # computes the right answer
    hint: str
    same: Callable[[Any, Any], bool] = lambda given, expected: given == expected


def _answer_tokens() -> int:
    return len(load_tokenizer().encode(" Denver Broncos")) + 1  # the separator space belongs to the answer; + EOS


def _test_articles(n: int = 200) -> int:
    with open(find_repo_root() / "data/SQuAD/splits/test.jsonl", encoding="utf-8") as f:
        return len({json.loads(line)["title"] for _, line in zip(range(n), f)})


def _lora_params(rank: int, d_in: int, d_out: int, layers: int) -> int:
    return layers * rank * (d_in + d_out)


EXERCISES: dict[str, Exercise] = {
    "1.1": Exercise("How many tokens is the model trained to produce for the answer 'Denver Broncos'?",
                    _answer_tokens, "Tokenize the answer as the dataset does: with the space the template puts "
                    "before {output}, and count the end-of-sequence token too."),
    "1.2": Exercise("From how many different articles do the first 200 test questions come?",
                    _test_articles, "Read the first 200 lines of data/SQuAD/splits/test.jsonl and count the "
                    "distinct 'title' values (analysis.subset_summary does it)."),
    "2.1": Exercise("How many trainable parameters does LoRA with rank 8 on attention_qkv only add to SmolLM2?",
                    lambda: _lora_params(8, 576, 960, 30), "r x (d_in + d_out) per adapted matrix: A is r x d_in, "
                    "B is d_out x r; the fused QKV matrix is 960 x 576, and there are 30 layers."),
    "2.2": Exercise("With global_batch_size 16, micro_batch_size 4 and trainer.devices 2, how many micro-batches "
                    "does each process accumulate per optimizer step?", lambda: 16 // (4 * 2),
                    "global = micro x devices x nodes x accumulation; try training.gradient_accumulation(cfg)."),
    "3.1": Exercise("How many training questions did the run in this notebook see in total?",
                    lambda: None, "Each optimizer step sees global_batch_size questions; trainer.global_step says "
                    "how many steps ran."),
    "3.2": Exercise("What is the tuned model's exact match, counted by hand from its answers and the golds?",
                    lambda: None, "For each question take the best exact_match_score over its gold answers, average, "
                    "times 100, rounded to one decimal."),
    "4.1": Exercise("How many numbers do lora_A and lora_B of ONE layer's mlp_fc1 hold together (r = 32)?",
                    lambda: _lora_params(32, 576, 3072, 1), "mlp_fc1 is the fused gate + up projection: 3072 x 576."),
    "4.2": Exercise("How many non-zero singular values can ΔW = (α/r)·B·A have at most, for r = 32?",
                    lambda: 32, "The rank of a product is at most the smallest inner dimension."),
    "5.1": Exercise("What does SQuAD's normalization turn 'The Denver Broncos!' into?",
                    lambda: normalize_answer("The Denver Broncos!"),
                    "Lower-case, drop punctuation, drop the articles a/an/the, collapse spaces."),
    "5.2": Exercise("What F1 (percent, one decimal) does the answer 'the Denver Broncos' get against the gold "
                    "'Broncos'?", lambda: round(100 * f1_score("the Denver Broncos", "Broncos"), 1),
                    "Normalize both (the article goes), then precision = shared words / predicted words, recall = "
                    "shared words / gold words, F1 = 2PR / (P + R)."),
    "6.1": Exercise("How many trainable parameters does IA3 add per layer of SmolLM2?",
                    lambda: 192 + 192 + 1536, "One scale per key dimension (3 heads x 64), per value dimension, and "
                    "per FFN hidden unit (1536)."),
    "7.1": Exercise("How many trainable numbers does DoRA add to LoRA in one layer, on all four projections?",
                    lambda: 960 + 576 + 3072 + 576, "One magnitude per output row of every adapted matrix: QKV has "
                    "960 rows, the attention output 576, gate|up 3072, down 576."),
    "7.2": Exercise("How many bytes does one Q4_1 block of 32 weights take?", lambda: 32 * 4 // 8 + 2 + 2,
                    "32 four-bit codes, plus one f16 scale and one f16 minimum."),
    "6.2": Exercise("After freeze_prompt_encoder, how many numbers does p-tuning need at inference?",
                    lambda: 10 * 576, "The encoder's output is a table: one d_model vector per virtual token."),
}


def is_right(exercise: str, answer: Any, expected: Any = None) -> bool:
    """Whether ``answer`` is right for ``exercise`` (``check`` without the printing)."""
    ex = EXERCISES[exercise]
    want = ex.expected() if expected is None else expected
    if want is None:
        raise ValueError(f"exercise {exercise} is about your own run: pass expected=...")
    return ex.same(answer, want)


def check(exercise: str, answer: Any, expected: Any = None) -> None:
    """Print whether ``answer`` is right for ``exercise``, with a hint when it is not.

    Exercises about the learner's own run (3.1, 3.2) need ``expected``, computed from that run by the
    notebook; the others compute it themselves.
    """
    if is_right(exercise, answer, expected):
        print(f"Exercise {exercise}: right ({answer!r}).")
    else:
        print(f"Exercise {exercise}: not yet ({answer!r}). Hint: {EXERCISES[exercise].hint}")


__all__ = ["EXERCISES", "Exercise", "check", "is_right"]
