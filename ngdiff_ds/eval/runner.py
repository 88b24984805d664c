"""Distributed scoring on the ZeRO-3 engine: per-example values, gathered in example order.

Example i is scored on rank ``i % world_size`` (rank and world size of the process group,
see distributed.py; one process without a group is rank 0 of 1). Under ZeRO-3 every
forward gathers the parameters collectively, so every rank runs the same number of batches: a rank whose share
is exhausted scores a dummy batch and discards it, and generation runs with
``synced_gpus=True`` so a rank that finished early keeps stepping with the others. The
results therefore do not depend on the number of ranks (up to float reduction order).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ngdiff_ds.data.batching import collate
from ngdiff_ds.data.encoding import encode_plain_prompt, encode_prompt, encode_qa, encode_text
from ngdiff_ds.distributed import rank_and_world_size
from ngdiff_ds.losses import IGNORE_INDEX, per_example_nll, per_example_target_logprob


def _rounds(num_examples: int, world_size: int, batch_size: int) -> int:
    """Batches each rank runs: enough for the rank with the most examples."""
    return math.ceil(math.ceil(num_examples / world_size) / batch_size)


def _my_batches(num_examples: int, batch_size: int):
    """This rank's example indices per round ([] where its share is exhausted)."""
    rank, world_size = rank_and_world_size()
    mine = list(range(rank, num_examples, world_size))
    for b in range(_rounds(num_examples, world_size, batch_size)):
        yield mine[b * batch_size:(b + 1) * batch_size]


def _gather_in_order(local_values: list, num_examples: int) -> list:
    """Every rank's values back in example order, on every rank."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return list(local_values)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local_values)  # over all ranks: each holds a disjoint share
    ordered = [None] * num_examples
    for source_rank, values in enumerate(gathered):
        for j, value in enumerate(values):
            ordered[source_rank + j * world_size] = value
    return ordered


@contextmanager
def _eval_mode(engine):
    """Eval mode inside (no dropout), the engine's previous mode afterwards."""
    was_training = engine.module.training
    engine.eval()
    try:
        yield
    finally:
        if was_training:
            engine.train()


def _lockstep_forwards(engine, examples: list[dict], pad_token_id: int, batch_size: int):
    """Forward this rank's share of ``examples`` in batches, every rank the same number of
    times (a rank whose share is exhausted runs a dummy batch that is not yielded); yields
    ``(batch, logits, indices)`` for this rank's real batches, in eval mode."""
    with _eval_mode(engine):
        for indices in _my_batches(len(examples), batch_size):
            batch = collate([examples[i] for i in (indices or [0])], pad_token_id)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits  # one pass: a KV cache is never read
            if indices:  # else the dummy batch only kept this rank in step with the others
                yield batch, logits, indices


def _score_in_step(engine, examples: list[dict], pad_token_id: int, batch_size: int,
                   score_batch) -> list:
    """``score_batch(batch, logits, indices)`` -> per-example values, over every rank's share;
    returns all values in example order."""
    local = []
    for batch, logits, indices in _lockstep_forwards(engine, examples, pad_token_id, batch_size):
        local += score_batch(batch, logits, indices)
    return _gather_in_order(local, len(examples))


@torch.no_grad()
def mean_target_nll(engine, examples: list[dict], pad_token_id: int, batch_size: int) -> float:
    """Mean per-example NLL of the training targets (the answer of a QA pair, every token of a
    text) over encoded ``examples``; collective, every rank gets the value."""
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)  # nll sum, count
    for batch, logits, indices in _lockstep_forwards(engine, examples, pad_token_id, batch_size):
        totals[0] += per_example_nll(logits, batch["labels"]).double().sum()
        totals[1] += len(indices)
    if rank_and_world_size()[1] > 1:
        dist.all_reduce(totals)  # over all ranks: each example is counted on exactly one rank
    return (totals[0] / totals[1]).item()


@torch.no_grad()
def target_logprobs(engine, examples: list[dict], pad_token_id: int, batch_size: int) -> list[float]:
    """``log p(y|x)`` of each encoded example: the sum of its training targets' log-probs
    (``per_example_target_logprob``), every rank scoring its share; all values, in example
    order, on every rank."""
    def score_batch(batch, logits, indices):
        return per_example_target_logprob(logits, batch["labels"]).double().tolist()

    return _score_in_step(engine, examples, pad_token_id, batch_size, score_batch)


@torch.no_grad()
def answer_logprobs(engine, tokenizer, pairs: list[tuple[str, str]], max_length: int,
                    batch_size: int) -> list[tuple[float, int]]:
    """(sum of answer-token log-probs, number of answer tokens) for each (question, answer)."""
    examples = [encode_qa(tokenizer, q, a, max_length) for q, a in pairs]

    def score_batch(batch, logits, indices):
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
        sums = -per_example_nll(logits, batch["labels"]).double() * counts
        return [(float(s), int(c)) for s, c in zip(sums.tolist(), counts.tolist())]

    return _score_in_step(engine, examples, tokenizer.pad_token_id, batch_size, score_batch)


@torch.no_grad()
def text_token_logprobs(engine, tokenizer, texts: list[str], max_length: int,
                        batch_size: int) -> list[list[float]]:
    """Log-prob of every token of each text given the tokens before it (the first given the
    bos), as Min-K% needs them; texts longer than ``max_length`` tokens are cut."""
    stats = text_token_statistics(engine, tokenizer, texts, max_length, batch_size, moments=False)
    return [row["logprobs"] for row in stats]


@torch.no_grad()
def text_token_statistics(engine, tokenizer, texts: list[str], max_length: int, batch_size: int,
                          moments: bool = True) -> list[dict[str, list]]:
    """Per token of each text (the eos that training appends is not part of it):
    ``logprobs``, ``matches`` and, with ``moments``, ``mu`` and ``sigma`` (see
    ``_row_statistics``); texts longer than ``max_length`` tokens are cut."""
    examples = [encode_text(tokenizer, text, max_length) for text in texts]
    keep_eos = [example["truncated"] for example in examples]  # a cut text has no eos
    return _token_statistics(engine, examples, tokenizer.pad_token_id, batch_size, moments,
                             drop_last=[not keep for keep in keep_eos])


@torch.no_grad()
def answer_token_statistics(engine, tokenizer, pairs: list[tuple[str, str]], max_length: int,
                            batch_size: int, moments: bool = True) -> list[dict[str, list]]:
    """The same per answer token of each (question, answer) pair, teacher-forced on the
    question (the answer's eos included, as in the answer probability): what extraction
    strength, exact memorisation and the QA-side membership attacks read."""
    examples = [encode_qa(tokenizer, q, a, max_length) for q, a in pairs]
    return _token_statistics(engine, examples, tokenizer.pad_token_id, batch_size, moments,
                             drop_last=[False] * len(examples))


def _token_statistics(engine, examples, pad_token_id, batch_size, moments, drop_last):
    def score_batch(batch, logits, indices):
        targets = batch["labels"][:, 1:]
        rows = []
        for row, index in enumerate(indices):
            # One row at a time in float32: a [batch, length, vocabulary] copy in a wider type
            # would be gigabytes for long texts and large vocabularies.
            keep = targets[row] != IGNORE_INDEX
            values = _row_statistics(logits[row, :-1][keep].float(), targets[row][keep], moments)
            rows.append({name: column[:-1] if drop_last[index] else column
                         for name, column in values.items()})
        return rows

    return _score_in_step(engine, examples, pad_token_id, batch_size, score_batch)


def _row_statistics(logits: torch.Tensor, targets: torch.Tensor, moments: bool) -> dict[str, list]:
    """For each scored position: the target's log-prob, whether the argmax is the target,
    and (``moments``) the mean and standard deviation of the log-prob under the model's own
    next-token distribution, ``mu = sum_v p_v log p_v`` and
    ``sigma = sqrt(sum_v p_v (log p_v)^2 - mu^2)`` (Min-K%++ standardises by them)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    out = {"logprobs": log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().tolist(),
           "matches": (logits.argmax(-1) == targets).int().tolist()}
    if moments:
        probs = log_probs.exp()
        mu = (probs * log_probs).sum(-1)
        second = (probs * log_probs.square()).sum(-1)
        out["mu"] = mu.double().tolist()
        out["sigma"] = (second - mu.square()).clamp(min=0).sqrt().double().tolist()
    return out


@torch.no_grad()
def greedy_answers(engine, tokenizer, questions: list[str], max_new_tokens: int,
                   batch_size: int) -> list[str]:
    """Greedy generations for each question (special tokens dropped, whitespace stripped)."""
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    return _greedy(engine, tokenizer, prompts, max_new_tokens, batch_size)


@torch.no_grad()
def greedy_continuations(engine, tokenizer, prompts: list[str], max_new_tokens: int,
                         batch_size: int, strip: bool = True,
                         stop_strings: tuple[str, ...] = ()) -> list[str]:
    """Greedy continuations of plain-text prompts (``[bos] + ids(prompt)``, no QA format),
    as MUSE's verbatim-memorisation and KnowMem tests ask for; ``strip=False`` keeps the
    whitespace (KnowMem cuts at blank lines). ``stop_strings``: a row stops growing once its
    text ends with one (the caller cuts there, so what would come after is never read)."""
    encoded = [encode_plain_prompt(tokenizer, p) for p in prompts]
    return _greedy(engine, tokenizer, encoded, max_new_tokens, batch_size, strip, stop_strings)


def _greedy(engine, tokenizer, prompts: list[list[int]], max_new_tokens: int,
            batch_size: int, strip: bool = True, stop_strings: tuple[str, ...] = ()) -> list[str]:
    # Every rank generates until all rows of every rank are done (synced_gpus: each step is
    # a collective forward under ZeRO-3), so a batch costs its longest row: eos and the stop
    # strings end rows early.
    stopping = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    local = []
    with _eval_mode(engine):
        for indices in _my_batches(len(prompts), batch_size):
            rows = [prompts[i] for i in (indices or [0])]  # [0]: a dummy row, as in scoring
            input_ids, attention_mask = _left_padded(rows, tokenizer.pad_token_id)
            output = engine.module.generate(
                input_ids=input_ids.to(engine.device),
                attention_mask=attention_mask.to(engine.device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                synced_gpus=rank_and_world_size()[1] > 1, **stopping)
            if indices:
                new_tokens = output[:, input_ids.shape[1]:]
                local += [t.strip() if strip else t for t in
                          tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return _gather_in_order(local, len(prompts))


def _left_padded(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding: every prompt ends where generation starts."""
    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, longest - len(ids):] = torch.tensor(ids)
        attention_mask[row, longest - len(ids):] = 1
    return input_ids, attention_mask
