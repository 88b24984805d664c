"""What the losses that compare with the model before unlearning need, provided by the run.

A registered loss names the batch fields it needs (``needs=`` in its ``register`` line,
losses.py); two exist:

- ``reference_logprob`` (NPO): ``log p_ref(y|x)`` of every example of the task, scored once
  before step 0 on the training engine itself (its weights are the starting model then, so no
  second model is kept). Each rank scores its share of the examples and the values are
  gathered (eval/runner.py); every rank keeps all of them beside the examples (one float per
  example), so every micro-batch and every probe batch carries them. Checkpoints carry them
  too: after step 0 the engine is no longer the reference, so a resumed run must not score
  again.
- ``reference_logits`` (KL): the starting model's logits on each batch, from a frozen copy
  kept as an inference-only ZeRO-3 engine (its weights sharded like the trained model's, no
  optimizer state, no gradient buffer; ``launch/plan.py --reference-model`` counts it). The
  loss is wrapped so that its batch gets them: a forward of the frozen engine under no_grad,
  run by every rank for every micro-batch (ZeRO-3 gathers its weights collectively, and every
  rank runs the same number of micro-batches).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ngdiff_ds.data.task import TaskData
from ngdiff_ds.errors import ConfigError
from ngdiff_ds.losses import REFERENCE_LOGITS, REFERENCE_LOGPROB

KNOWN_NEEDS = (REFERENCE_LOGPROB, REFERENCE_LOGITS)


def check_needs(name: str, needs: tuple[str, ...]) -> None:
    """A loss may need only what the run can provide."""
    unknown = sorted(set(needs) - set(KNOWN_NEEDS))
    if unknown:
        raise ConfigError(f"loss {name!r} needs {', '.join(unknown)}, which the run cannot "
                          f"provide (it provides: {', '.join(KNOWN_NEEDS)})")


def needs_reference_model(method) -> bool:
    """Whether the run must keep a frozen copy of the starting model (``reference_logits``)."""
    return REFERENCE_LOGITS in method.forget_needs + method.retain_needs


def with_reference_logits(loss, reference_engine):
    """``loss`` whose batch also holds the frozen ``reference_engine``'s logits on it."""
    def loss_with_reference_logits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            reference_logits = reference_engine(input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"],
                                                use_cache=False).logits
        return loss(logits, {**batch, REFERENCE_LOGITS: reference_logits})

    return loss_with_reference_logits


def attach_reference_model(method, reference_engine):
    """``method`` with every loss that needs ``reference_logits`` fed by ``reference_engine``."""
    changes = {}
    if REFERENCE_LOGITS in method.forget_needs:
        changes["forget_loss"] = with_reference_logits(method.forget_loss, reference_engine)
    if REFERENCE_LOGITS in method.retain_needs:
        changes["retain_loss"] = with_reference_logits(method.retain_loss, reference_engine)
    return dataclasses.replace(method, **changes)


def tasks_needing_logprobs(method, forget: TaskData, retain: TaskData) -> list[TaskData]:
    return [task for task, needs in ((forget, method.forget_needs), (retain, method.retain_needs))
            if REFERENCE_LOGPROB in needs]


def set_reference_logprobs(task: TaskData, values: list[float]) -> None:
    """Store ``log p_ref`` with each example of ``task``; its batches carry them from now on."""
    if len(values) != len(task.examples):
        raise ConfigError(f"{len(values)} reference log-probabilities for the "
                          f"{len(task.examples)} examples of the {task.name} task")
    for example, value in zip(task.examples, values):
        example[REFERENCE_LOGPROB] = float(value)
    if REFERENCE_LOGPROB not in task.scalar_fields:
        task.scalar_fields.append(REFERENCE_LOGPROB)


def score_reference_logprobs(engine, tasks: list[TaskData], batch_size: int, log) -> None:
    """Before step 0: score each task's examples on ``engine`` (the starting model) and store
    the values with them. Collective: every rank calls it."""
    from ngdiff_ds.eval.runner import target_logprobs

    for task in tasks:
        started = time.perf_counter()
        set_reference_logprobs(task, target_logprobs(engine, task.examples, task.pad_token_id,
                                                     batch_size))
        log.print(f"reference log p(y|x) of the {len(task.examples)} {task.name} examples "
                  f"scored on the starting model ({time.perf_counter() - started:.1f} s)")


def saved_reference_logprobs(tasks: list[TaskData]) -> dict[str, list[float]]:
    """What a checkpoint keeps: task name -> the values, in example order."""
    return {task.name: [example[REFERENCE_LOGPROB] for example in task.examples]
            for task in tasks}


def restore_reference_logprobs(tasks: list[TaskData], saved: dict | None, where: str) -> None:
    """Put a checkpoint's values back (a resumed run must not score its current weights)."""
    for task in tasks:
        if not saved or task.name not in saved:
            raise ConfigError(f"checkpoint {where} has no reference log-probabilities of the "
                              f"{task.name} task, which this method needs")
        set_reference_logprobs(task, saved[task.name])
