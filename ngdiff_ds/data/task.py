"""A task's data: its encoded examples and which of them each rank trains on at each step.

``load_task`` is the one way a split becomes training data (unlearning's forget and retain
tasks, fine-tuning, the embedded default's fine-tunes, the tests)::

    forget = load_task("forget", data, "forget10+forget10_text", tokenizer, max_length,
                       layout, seed, note=log.print)
    batches = forget.micro_batches(step, rank, device)   # this rank's K micro-batches
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ngdiff_ds.config import BatchLayout
from ngdiff_ds.data.batching import StepBatches, collate, length_cut
from ngdiff_ds.data.encoding import encode_split
from ngdiff_ds.data.records import load_training_records


@dataclass
class TaskData:
    """One task's encoded examples and the deterministic per-step batching over ranks."""

    name: str
    examples: list[dict]
    batches: StepBatches
    pad_token_id: int
    # per-example numbers every collated batch carries as a float64 [batch] tensor, e.g. the
    # reference log-probability NPO compares with (starting_model.py adds it)
    scalar_fields: list[str] = field(default_factory=list)

    def micro_batches(self, step: int, rank: int, device) -> list[dict[str, torch.Tensor]]:
        """This rank's K micro-batches of ``step``."""
        return [self._collate(self.batches.micro_batch_indices(step, rank, k), device)
                for k in range(self.batches.micro_batches_per_step)]

    def length_grouped_batches(self, step: int, rank: int, device) -> tuple[list[dict], list[float]]:
        """This rank's K micro-batches of ``step``, each cut into short and long rows where that
        saves padding, and each piece's weight (its share of the micro-batch, over K): the
        weighted losses sum to the same per-example mean as the K micro-batches.

        For training sets that mix short QA pairs with long passages. The cut length comes from
        the step's global batch, which every rank knows, so every rank runs the same number of
        forwards (ZeRO-3 gathers parameters collectively in each): a rank with no row on one
        side runs one of its rows there with weight 0.
        """
        cut = length_cut([len(self.examples[i]["input_ids"])
                          for i in self.batches.global_batch_indices(step)])
        out, weights = [], []
        micro_batches = self.batches.micro_batches_per_step
        for k in range(micro_batches):
            indices = self.batches.micro_batch_indices(step, rank, k)
            if cut is None:
                pieces = [indices]
            else:
                pieces = [[i for i in indices if len(self.examples[i]["input_ids"]) <= cut],
                          [i for i in indices if len(self.examples[i]["input_ids"]) > cut]]
            for piece in pieces:
                out.append(self._collate(piece or indices[:1], device))
                weights.append(len(piece) / (len(indices) * micro_batches))
        return out, weights

    def _collate(self, indices: list[int], device) -> dict[str, torch.Tensor]:
        examples = [self.examples[i] for i in indices]
        batch = collate(examples, self.pad_token_id)
        for name in self.scalar_fields:
            batch[name] = torch.tensor([example[name] for example in examples],
                                       dtype=torch.float64)
        return {name: t.to(device) for name, t in batch.items()}


def task_from_records(name: str, records: list[dict], split: str, tokenizer, max_length: int,
                      layout: BatchLayout, seed: int, note=None) -> TaskData:
    """Tokenise ``records`` (QA pairs train on the answer, texts on every token) and batch
    them per step and rank; ``note`` is told how many examples were cut to ``max_length``."""
    examples, truncated = encode_split(tokenizer, records, max_length, split)
    if truncated and note is not None:
        note(f"warning: {truncated} of {len(examples)} examples of split {split!r} were longer "
             f"than --max-length {max_length} and were cut from the end (answers or texts)")
    batches = StepBatches(len(examples), layout.micro_batch_size, layout.micro_batches_per_step,
                          layout.world_size, seed)
    return TaskData(name=name, examples=examples, batches=batches,
                    pad_token_id=tokenizer.pad_token_id)


def load_task(name: str, data: str, split: str, tokenizer, max_length: int, layout: BatchLayout,
              seed: int, note=None) -> TaskData:
    """Load, validate and tokenise one split (or ``a+b``: several, concatenated) as a task."""
    return task_from_records(name, load_training_records(data, split), split, tokenizer,
                             max_length, layout, seed, note)


def shared_examples(first: TaskData, second: TaskData) -> int:
    """How many examples of ``first`` also appear, token for token, in ``second``."""
    seen = {(tuple(e["input_ids"]), tuple(e["labels"])) for e in second.examples}
    return sum((tuple(e["input_ids"]), tuple(e["labels"])) in seen for e in first.examples)
