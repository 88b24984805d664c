"""Batching: right-padded collation, the short/long length cut, and the deterministic
per-step, per-rank batch schedule."""

from __future__ import annotations

from collections import OrderedDict

import torch

from ngdiff_ds.losses import IGNORE_INDEX



def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence.

    Returns int64 tensors of shape [B, T]: ``input_ids`` (padded with
    ``pad_token_id``), ``labels`` (padded with -100) and ``attention_mask``
    (1 on real tokens, 0 on padding).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id (set tokenizer.pad_token)")
    longest = max(len(example["input_ids"]) for example in examples)
    shape = (len(examples), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.int64)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros(shape, dtype=torch.int64)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.int64)
        labels[row, :length] = torch.tensor(example["labels"], dtype=torch.int64)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def length_cut(lengths: list[int], min_saving: float = 0.3) -> int | None:
    """The length at which to cut a batch into short and long rows, or None not to cut.

    A batch of short QA pairs with a few long passages pads every row to the longest; cut at
    the best point of the sorted lengths, the short rows pad only to their own longest. The
    cut costs a second forward, so it is taken only when it saves at least ``min_saving`` of
    the padded tokens. Rows of length <= the returned value form the short group.
    """
    if not lengths:
        raise ValueError("length_cut needs at least one length")
    ordered = sorted(lengths)
    whole = len(ordered) * ordered[-1]
    best_cost, best_cut = whole, None
    for count in range(1, len(ordered)):
        if ordered[count - 1] == ordered[count]:
            continue  # equal lengths must land in the same group
        cost = count * ordered[count - 1] + (len(ordered) - count) * ordered[-1]
        if cost < best_cost:
            best_cost, best_cut = cost, ordered[count - 1]
    return best_cut if best_cost <= (1.0 - min_saving) * whole else None




class StepBatches:
    """Deterministic data-parallel batching: the global batch of a step does not depend on the number of ranks.

    The data is an infinite stream of epochs; epoch ``e`` is a permutation of
    ``range(num_examples)`` seeded from ``(seed, e)``. Step ``t`` consumes
    stream positions ``[t*G, (t+1)*G)`` with ``G = global_batch_size``
    (spilling into the next epoch, or wrapping several times when
    ``num_examples < G``). That global batch is cut into
    ``world_size * micro_batches_per_step`` consecutive chunks of
    ``micro_batch_size``; rank ``r``'s micro-batch ``k`` is chunk
    ``k * world_size + r``. Any layout with the same ``G`` therefore sees the
    same examples at every step, so runs are comparable across cluster sizes.
    """

    # Odd multiplier to keep (seed, epoch) pairs from colliding for small values.
    _SEED_STRIDE = 1_000_003
    # A step touches at most a couple of epochs when G <= num_examples.
    _CACHED_EPOCHS = 4

    def __init__(
        self,
        num_examples: int,
        micro_batch_size: int,
        micro_batches_per_step: int,
        world_size: int,
        seed: int,
    ):
        for name, value in (
            ("num_examples", num_examples),
            ("micro_batch_size", micro_batch_size),
            ("micro_batches_per_step", micro_batches_per_step),
            ("world_size", world_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.micro_batches_per_step = micro_batches_per_step
        self.world_size = world_size
        self.seed = int(seed)
        self._epoch_permutations: OrderedDict[int, list[int]] = OrderedDict()

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.micro_batches_per_step * self.world_size

    def micro_batch_indices(self, step: int, rank: int, micro_index: int) -> list[int]:
        """Example indices of rank ``rank``'s micro-batch ``micro_index`` at ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        if not 0 <= micro_index < self.micro_batches_per_step:
            raise ValueError(
                f"micro_index must be in [0, {self.micro_batches_per_step}), got {micro_index}"
            )
        chunk = micro_index * self.world_size + rank
        start = step * self.global_batch_size + chunk * self.micro_batch_size
        return self._stream_slice(start, self.micro_batch_size)

    def global_batch_indices(self, step: int) -> list[int]:
        """All example indices of ``step`` in stream order (every rank, every micro-batch)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self._stream_slice(step * self.global_batch_size, self.global_batch_size)

    def _stream_slice(self, start: int, length: int) -> list[int]:
        """Stream positions [start, start+length), computed without replaying earlier steps."""
        indices = []
        position = start
        end = start + length
        while position < end:
            epoch, offset = divmod(position, self.num_examples)
            take = min(end - position, self.num_examples - offset)
            indices.extend(self._permutation(epoch)[offset : offset + take])
            position += take
        return indices

    def _permutation(self, epoch: int) -> list[int]:
        cached = self._epoch_permutations.get(epoch)
        if cached is not None:
            self._epoch_permutations.move_to_end(epoch)
            return cached
        # Mask into the unsigned 64-bit range manual_seed accepts (seed may be
        # negative or large).
        mixed_seed = (self.seed * self._SEED_STRIDE + epoch) & 0xFFFF_FFFF_FFFF_FFFF
        generator = torch.Generator().manual_seed(mixed_seed)
        permutation = torch.randperm(self.num_examples, generator=generator).tolist()
        self._epoch_permutations[epoch] = permutation
        if len(self._epoch_permutations) > self._CACHED_EPOCHS:
            self._epoch_permutations.popitem(last=False)
        return permutation
