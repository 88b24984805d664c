"""Distributed scoring on the ZeRO-3 engine: per-example values, gathered in example order.

Example i is scored on rank ``i % world_size``. Under ZeRO-3 every forward gathers the
parameters collectively, so every rank runs the same number of batches: a rank whose share
is exhausted scores a dummy batch and discards it, and generation runs with
``synced_gpus=True`` so a rank that finished early keeps stepping with the others. The
results therefore do not depend on the number of ranks (up to float reduction order).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ngdiff_ds.data.qa import (IGNORE_INDEX, collate, encode_plain_prompt, encode_prompt, encode_qa,
                               encode_text)
from ngdiff_ds.losses import per_example_nll


def _rounds(num_examples: int, world_size: int, batch_size: int) -> int:
    """Batches each rank runs: enough for the rank with the most examples."""
    return math.ceil(math.ceil(num_examples / world_size) / batch_size)


def _my_batches(num_examples: int, batch_size: int, rank: int, world_size: int):
    """This rank's example indices per round ([] where its share is exhausted)."""
    mine = list(range(rank, num_examples, world_size))
    for b in range(_rounds(num_examples, world_size, batch_size)):
        yield mine[b * batch_size:(b + 1) * batch_size]


def _gather_in_order(local_values: list, num_examples: int, rank: int, world_size: int) -> list:
    """Every rank's values back in example order, on every rank."""
    if world_size == 1:
        return list(local_values)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local_values)  # over all ranks: each holds a disjoint share
    ordered = [None] * num_examples
    for source_rank, values in enumerate(gathered):
        for j, value in enumerate(values):
            ordered[source_rank + j * world_size] = value
    return ordered


def _score_in_step(engine, examples: list[dict], pad_token_id: int, batch_size: int, rank: int,
                   world_size: int, score_batch) -> list:
    """Forward this rank's share of ``examples`` in batches, every rank the same number of
    times; ``score_batch(batch, logits, indices)`` turns one batch into per-example values.
    Returns every rank's values in example order."""
    was_training = engine.module.training
    engine.eval()
    local = []
    for indices in _my_batches(len(examples), batch_size, rank, world_size):
        batch = collate([examples[i] for i in (indices or [0])], pad_token_id)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if indices:  # else the dummy batch only kept this rank in step with the others
            local += score_batch(batch, logits, indices)
    if was_training:
        engine.train()
    return _gather_in_order(local, len(examples), rank, world_size)


@torch.no_grad()
def answer_logprobs(engine, tokenizer, pairs: list[tuple[str, str]], max_length: int,
                    batch_size: int, rank: int, world_size: int) -> list[tuple[float, int]]:
    """(sum of answer-token log-probs, number of answer tokens) for each (question, answer)."""
    examples = [encode_qa(tokenizer, q, a, max_length) for q, a in pairs]

    def score_batch(batch, logits, indices):
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
        sums = -per_example_nll(logits, batch["labels"]).double() * counts
        return [(float(s), int(c)) for s, c in zip(sums.tolist(), counts.tolist())]

    return _score_in_step(engine, examples, tokenizer.pad_token_id, batch_size, rank, world_size,
                          score_batch)


@torch.no_grad()
def text_token_logprobs(engine, tokenizer, texts: list[str], max_length: int, batch_size: int,
                        rank: int, world_size: int) -> list[list[float]]:
    """Log-prob of every token of each text given the tokens before it (the first given the
    bos), as Min-K% needs them; texts longer than ``max_length`` tokens are cut."""
    examples = [encode_text(tokenizer, text, max_length) for text in texts]

    def score_batch(batch, logits, indices):
        targets = batch["labels"][:, 1:]
        values_by_row = []
        for row, index in enumerate(indices):
            # One row at a time in float32: a [batch, length, vocabulary] copy in a wider type
            # would be gigabytes for long texts and large vocabularies.
            row_logits = logits[row, :-1].float()
            picked = row_logits.gather(-1, targets[row].clamp(min=0).unsqueeze(-1)).squeeze(-1) \
                - torch.logsumexp(row_logits, dim=-1)
            values = picked[targets[row] != IGNORE_INDEX].double().tolist()
            # The text's own tokens only: the eos that training appends is not part of it.
            values_by_row.append(values if examples[index]["truncated"] else values[:-1])
        return values_by_row

    return _score_in_step(engine, examples, tokenizer.pad_token_id, batch_size, rank, world_size,
                          score_batch)


@torch.no_grad()
def greedy_answers(engine, tokenizer, questions: list[str], max_new_tokens: int,
                   batch_size: int, rank: int, world_size: int) -> list[str]:
    """Greedy generations for each question (special tokens dropped, whitespace stripped)."""
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    return _greedy(engine, tokenizer, prompts, max_new_tokens, batch_size, rank, world_size)


@torch.no_grad()
def greedy_continuations(engine, tokenizer, prompts: list[str], max_new_tokens: int,
                         batch_size: int, rank: int, world_size: int) -> list[str]:
    """Greedy continuations of plain-text prompts (``[bos] + ids(prompt)``, no QA format),
    as MUSE's verbatim-memorisation test asks for."""
    encoded = [encode_plain_prompt(tokenizer, p) for p in prompts]
    return _greedy(engine, tokenizer, encoded, max_new_tokens, batch_size, rank, world_size)


def _greedy(engine, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
            rank: int, world_size: int) -> list[str]:
    was_training = engine.module.training
    engine.eval()
    local = []
    for indices in _my_batches(len(prompts), batch_size, rank, world_size):
        rows = [prompts[i] for i in (indices or [0])]
        longest = max(len(r) for r in rows)
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, longest - len(ids):] = torch.tensor(ids)
            attention_mask[row, longest - len(ids):] = 1
        output = engine.module.generate(
            input_ids=input_ids.to(engine.device), attention_mask=attention_mask.to(engine.device),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            synced_gpus=world_size > 1)
        if indices:
            new_tokens = output[:, longest:]
            local += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    if was_training:
        engine.train()
    return _gather_in_order(local, len(prompts), rank, world_size)
