"""An independent single-process NGDiff in plain PyTorch — no DeepSpeed, no ngdiff_ds math.

Only the data pipeline (loading, tokenisation, which examples form a step's global batch) is
shared with the package, because that is not what the comparison is about and is tested on
its own. Everything else is written out again here in the most direct way: one example per
forward (so no padding at all), per-example mean answer NLL with an explicit shift, the full
gradient flattened into float64 vectors, norms and the NGDiff direction in float64, and a stock
``torch.optim`` optimizer on the ordinary (unpartitioned) model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from ngdiff_ds.data.qa import StepBatches, encode_split, load_qa_split


def _example_nll(model, example) -> torch.Tensor:
    input_ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor(example["labels"])
    logits = model(input_ids=input_ids).logits[0]
    # position t predicts token t+1; keep only the answer (non -100) targets
    targets = labels[1:]
    keep = targets != -100
    return F.cross_entropy(logits[:-1][keep].float(), targets[keep], reduction="mean")


def _flat_grad(model, loss) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def _make_optimizer(model, optimizer_config: dict):
    params = dict(optimizer_config.get("params", {}))
    params.pop("torch_adam", None)
    kind = optimizer_config["type"]
    cls = {"AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}[kind]
    return cls(model.parameters(), **params)


def reference_run(model_dir: str, data_dir: str, optimizer_config: dict, global_batch: int,
                  steps: int, forget_seed: int = 3, retain_seed: int = 4, max_length: int = 64,
                  lrs: list[float] | None = None):
    """Return (state_dict after ``steps`` NGDiff steps, per-step stats dicts)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = _make_optimizer(model, optimizer_config)
    tasks = {}
    for name, split, seed in (("forget", "forget10", forget_seed), ("retain", "retain90", retain_seed)):
        examples, _ = encode_split(tokenizer, load_qa_split(data_dir, split), max_length, split)
        tasks[name] = (examples, StepBatches(len(examples), global_batch, 1, 1, seed))
    stats = []
    for step in range(steps):
        losses, grads = {}, {}
        for name, (examples, batches) in tasks.items():
            indices = batches.global_batch_indices(step)
            nll = torch.stack([_example_nll(model, examples[i]) for i in indices]).mean()
            task_loss = -nll if name == "forget" else nll  # gradient ascent on the forget set
            losses[name] = float(task_loss)
            grads[name] = _flat_grad(model, task_loss)
        forget_norm = grads["forget"].norm().item()
        retain_norm = grads["retain"].norm().item()
        direction = grads["retain"] / retain_norm + grads["forget"] / forget_norm
        offset = 0
        for p in model.parameters():
            p.grad = direction[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        if lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = lrs[step]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats.append({"forget_loss": losses["forget"], "retain_loss": losses["retain"],
                      "forget_grad_norm": forget_norm, "retain_grad_norm": retain_norm,
                      "cosine": float(grads["forget"] @ grads["retain"]) / (forget_norm * retain_norm)})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats
