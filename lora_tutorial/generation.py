"""Batched text generation with a KV cache.

How it works, step by step:

1. Tokenize the prompts and *left*-pad them to one length, so that every row's last prompt token
   sits in the last column and the next token of every row is predicted from the same position.
2. Prefill: run all prompt tokens once, filling the KV cache, and keep only the last position's logits.
3. Decode: pick the next token of each row (greedy argmax, or sampling with temperature / top-k /
   top-p), feed only those B tokens through the model (the cache supplies everything before), repeat.
   A row that produced EOS is finished; it keeps receiving the pad token until all rows are done.

Prompts are processed in length-sorted batches (less padding), and results come back in input order.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from .decode_step import block_runner
from .model import GPT
from .progress import progress_bar
from .tokenizer import Tokenizer


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily switch off dropout, restoring the caller's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# Sequence widths, for generation and for training batches (SFTCollator), are rounded up to this:
# few distinct shapes, so few oneDNN kernels to compile.
PAD_MULTIPLE = 32


def _left_pad(batch: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    if len(batch) > 1:  # a single prompt needs no padding (and then no attention mask at all)
        width = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def _seen_tokens(ids: torch.Tensor, mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """(B, vocab) booleans: which tokens each row's *real* prompt tokens contain (pads never count).

    A left-padded row ends with a real token, so its pads are replaced by that token before scattering.
    """
    if mask is not None:
        ids = torch.where(mask.bool(), ids, ids[:, -1:])
    seen = torch.zeros(ids.shape[0], vocab_size, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: tokens already seen get their logit divided (if > 0) or multiplied by it."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p of the probability.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def next_tokens(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row from (B, vocab) logits."""
    if greedy:
        # The same first-maximum index as ``argmax``, but PyTorch's CPU ``max`` kernel is vectorised and its
        # bf16 ``argmax`` is not: 332 vs 1,483 us for 16 rows of 49,152 logits (bench/kernels.json).
        return logits.max(-1).indices
    logits = _filter_top_k_top_p(logits.float() / max(temperature, 1e-5), top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: GPT, prompt_ids: Sequence[Sequence[int]], tokens_to_generate: int = 30,
                 greedy: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 end_ids: Sequence[int] = (), blank_ids: Sequence[int] = ()) -> list[list[int]]:
    """Generate up to ``tokens_to_generate`` new ids for one batch of prompts.

    A row ends at a token of ``stop_ids`` (EOS: not returned) or of ``end_ids`` once it has produced a
    token that is not in ``blank_ids``, the end token itself included (the end token is returned). With
    the newline tokens as ``end_ids`` and the whitespace tokens as ``blank_ids``, a row ends after its
    first line of text: all that an answer keeps (``metrics.clean_prediction``). The batch stops as soon as every row has ended.
    """
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.wte.weight.device
    ids, mask = _left_pad(prompt_ids, pad_id, device)
    B = ids.shape[0]
    if bool(mask.all()):
        mask = None  # no padding: plain causal attention, no mask to build or apply at each step
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    end = torch.tensor(sorted(set(end_ids)) or [-1], device=device)
    blank = torch.tensor(sorted(set(blank_ids)) or [-1], device=device)
    has_text = torch.zeros(B, dtype=torch.bool, device=device)
    cache = model.new_cache(B, ids.shape[1] + tokens_to_generate) if use_cache else None
    if cache is not None:
        cache.run_blocks = block_runner(model, cache)  # fewer, larger calls where it can (decode_step.py)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    seen = _seen_tokens(ids, mask, model.config.vocab_size) if repetition_penalty != 1.0 else None
    out: list[torch.Tensor] = []
    step_ids = ids
    with eval_mode(model):
        for _ in range(tokens_to_generate):
            if use_cache:
                logits = model(step_ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]
            else:
                seq = torch.cat([ids, *[t[:, None] for t in out]], dim=1)
                logits = model(seq, attention_mask=mask, last_only=True)[:, -1]
            if seen is not None:
                logits = _apply_repetition_penalty(logits, seen, repetition_penalty)
            token = next_tokens(logits, greedy, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            if seen is not None:  # a finished row's pad is not a token it produced
                seen[torch.arange(B, device=device), token] |= ~done
            has_text |= ~torch.isin(token, blank)  # "Paris\n" is text and an end at once: it ends the row
            done |= torch.isin(token, stop) | (has_text & torch.isin(token, end))
            out.append(token)
            if done.all():
                break
            step_ids = token[:, None]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # finished rows' outputs are ignored
    generated = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
    stop_set, end_set, blank_set = set(stop_ids), set(end_ids), set(blank_ids)
    results = []
    for row in generated:  # up to the first stop token (dropped) or ending end token (kept); pads follow
        kept, seen_text = [], False
        for t in row:
            if t in stop_set:
                break
            kept.append(t)
            seen_text |= t not in blank_set
            if t in end_set and seen_text:
                break
        results.append(kept)
    return results


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an answer: EOS, and ``<|endoftext|>`` where the vocabulary has it."""
    ids = {tokenizer.eos_id}
    endoftext = tokenizer.token_to_id("<|endoftext|>")
    if endoftext is not None:
        ids.add(endoftext)
    return sorted(ids)


def generate(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str] | str, tokens_to_generate: int = 30,
             greedy: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, batch_size: int = 16, add_bos: bool = False,
             seed: int | None = None, progress: bool = False, use_cache: bool = True) -> list[str] | str:
    """Continue each prompt; return the generated text without the prompt (a str for a str input).

    Prompts are used as given: wrap them with ``tokenizer.apply_chat_template`` first for chat use.
    Generation stops at the tokenizer's EOS (and ``<|endoftext|>`` where the vocabulary has it).
    """
    single = isinstance(prompts, str)
    prompt_list = [prompts] if single else list(prompts)
    encoded = [tokenizer.encode(p, add_bos=add_bos) for p in prompt_list]
    stop_ids = stop_token_ids(tokenizer)
    generator = torch.Generator(device=model.wte.weight.device).manual_seed(seed) if seed is not None else None
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress_bar(batches, desc="generate", disable=not progress, leave=False):
        new_ids = generate_ids(model, [encoded[i] for i in batch], tokens_to_generate, greedy, temperature,
                               top_k, top_p, repetition_penalty, stop_ids, tokenizer.pad_id,
                               use_cache, generator)
        for i, ids in zip(batch, new_ids):
            texts[i] = tokenizer.decode(ids)
    return texts[0] if single else texts
