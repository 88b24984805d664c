"""An independent single-process NGDiff in plain PyTorch — no DeepSpeed, no ngdiff_ds math.

Only the data pipeline (loading, tokenisation, which examples form a step's global batch) is
shared with the package, because that is not what the comparison is about and is tested on
its own. Everything else is written out again here in the most direct way: one example per
forward (so no padding at all), per-example mean answer NLL with an explicit shift, the full
gradient flattened into float64 vectors, norms and the NGDiff direction in float64, and a stock
``torch.optim`` optimizer on the ordinary (unpartitioned) model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from ngdiff_ds.data.batching import StepBatches
from ngdiff_ds.data.encoding import encode_split
from ngdiff_ds.data.records import load_qa_split


def _answer_token_logprobs(model, example) -> torch.Tensor:
    """log p of each answer (non -100) target token, one example per forward (no padding):
    position t predicts token t+1."""
    input_ids = torch.tensor([example["input_ids"]])
    targets = torch.tensor(example["labels"])[1:]
    keep = targets != -100
    logits = model(input_ids=input_ids).logits[0][:-1][keep].float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[keep].unsqueeze(1)).squeeze(1)


def _example_nll(model, example) -> torch.Tensor:
    """Mean NLL of the answer tokens."""
    return -_answer_token_logprobs(model, example).mean()


def _example_logprob(model, example) -> torch.Tensor:
    """log p(y|x): the sum of the answer tokens' log-probs."""
    return _answer_token_logprobs(model, example).sum()


def _example_kl(model, frozen, example) -> torch.Tensor:
    """Mean over the answer positions of KL(p_frozen || p_model), one example per forward."""
    input_ids = torch.tensor([example["input_ids"]])
    keep = torch.tensor(example["labels"])[1:] != -100
    log_p = torch.log_softmax(model(input_ids=input_ids).logits[0][:-1][keep].float(), dim=-1)
    with torch.no_grad():
        log_ref = torch.log_softmax(frozen(input_ids=input_ids).logits[0][:-1][keep].float(),
                                    dim=-1)
    return (log_ref.exp() * (log_ref - log_p)).sum(-1).mean()


# the package's presets, written out: forgetting loss, retaining loss, combine rule, weights
NGDIFF_METHOD = {"forget": "ga", "retain": "nll", "combine": "ngdiff"}
PRESET_METHODS = {
    "ga": {"forget": "ga", "retain": "nll", "combine": "ga"},
    "gdiff": {"forget": "ga", "retain": "nll", "combine": "gdiff", "alpha": 1.0, "gamma": 1.0},
    "gdiff_kl": {"forget": "ga", "retain": "kl", "combine": "gdiff", "alpha": 1.0, "gamma": 1.0},
    "npo": {"forget": "npo", "retain": "nll", "combine": "ga", "beta": 0.1},
    "npo_gdiff": {"forget": "npo", "retain": "nll", "combine": "gdiff", "alpha": 1.0,
                  "gamma": 1.0, "beta": 0.1},
    "simnpo": {"forget": "simnpo", "retain": "nll", "combine": "gdiff", "alpha": 1.0,
               "gamma": 0.125, "beta": 4.5, "delta": 0.0},
    "ngdiff": NGDIFF_METHOD,
    "ngdiff_npo": {"forget": "npo", "retain": "nll", "combine": "ngdiff", "beta": 0.1},
}


def _example_task_loss(method: dict, name: str, model, example, reference_logprob=None,
                       frozen=None) -> torch.Tensor:
    """One example's loss to minimise, from the method's formulas written out."""
    if name == "retain":
        return _example_nll(model, example) if method["retain"] == "nll" else \
            _example_kl(model, frozen, example)
    if method["forget"] == "ga":
        return -_example_nll(model, example)
    beta = method["beta"]
    if method["forget"] == "npo":  # -(2/beta) log sigmoid(-beta (log p - log p_ref))
        log_ratio = _example_logprob(model, example) - reference_logprob
        return -2.0 / beta * F.logsigmoid(-beta * log_ratio)
    # simnpo: -(2/beta) log sigmoid(beta (NLL/|y| - delta))
    return -2.0 / beta * F.logsigmoid(beta * (_example_nll(model, example) - method["delta"]))


def _direction(method: dict, forget_grad, retain_grad, forget_norm, retain_norm):
    if method["combine"] == "ngdiff":
        return retain_grad / retain_norm + forget_grad / forget_norm
    if method["combine"] == "gdiff":
        return method["alpha"] * retain_grad + method["gamma"] * forget_grad
    assert method["combine"] == "ga"
    return forget_grad.clone()


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
    return cls([p for p in model.parameters() if p.requires_grad], **params)


def _with_lora(model, lora: dict):
    """peft's LoRA adapters (rank ``r``, scale numerator ``alpha``, on ``targets``), drawn
    with torch seed 0 as the package draws them; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                target_modules=lora["targets"],
                                                lora_dropout=0.0, bias="none"))


def _retain_loss_at(model, examples, indices, params, theta, offset=None, scale=0.0) -> float:
    """Retain loss with the weights set to theta (+ scale * offset), weights left as they were."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        start = 0
        for p in params:
            value = theta[start:start + p.numel()]
            if offset is not None:
                value = value + scale * offset[start:start + p.numel()]
            p.copy_(value.view_as(p).to(p.dtype))
            start += p.numel()
        loss = torch.stack([_example_nll(model, examples[i]) for i in indices]).mean().item()
        for p, old in zip(params, saved):
            p.copy_(old)
    return loss


def _set_params(params, theta: torch.Tensor) -> None:
    with torch.no_grad():
        start = 0
        for p in params:
            p.copy_(theta[start:start + p.numel()].view_as(p).to(p.dtype))
            start += p.numel()


def _budget_root(losses: list[float], max_rise: float) -> float:
    """Smallest s > 0 where the parabola through the probes at -1, 0, +1 has risen by
    ``max_rise * |L(0)|`` (numpy's roots); inf when it never does."""
    import numpy as np

    curvature, slope, _ = np.polyfit([-1.0, 0.0, 1.0], losses, 2)
    roots = np.roots([curvature, slope, -max_rise * abs(losses[1])])
    ahead = [r.real for r in roots if abs(r.imag) < 1e-12 and r.real > 0]
    return min(ahead) if ahead else float("inf")


def _fitted_rate(lr: float, losses: list[float], adaptive: dict) -> tuple[float, bool]:
    """(next rate, refit after the next step) from probes at s = -1, 0, +1.

    Without a rise budget (``max_rise`` 0): GeN, exact parabola, accepted if convex and
    downhill. With one: the budget root, for any finite profile, clipped to [clip_low, 2]
    ([clip_low, clip_high] on a flat profile). Both smoothed; a target outside [0.5, 2] asks
    for a refit.
    """
    import numpy as np

    curvature, slope, _ = np.polyfit([-1.0, 0.0, 1.0], losses, 2)
    max_rise = adaptive.get("max_rise", 0.0)
    far = lambda multiple: not 0.5 <= multiple <= 2.0  # noqa: E731
    if max_rise > 0:  # log-space smoothing: lr * clip(multiple) ** beta
        multiple = _budget_root(losses, max_rise)
        # growth beyond x2 only when every probe is within a tenth of the budget of L(0)
        flat = max(abs(v - losses[1]) for v in losses) <= 0.1 * max_rise * abs(losses[1])
        high = adaptive["clip_high"] if flat else min(2.0, adaptive["clip_high"])
        clipped = min(max(multiple, adaptive["clip_low"]), high)
        return lr * math.exp(adaptive["smoothing"] * math.log(clipped)), far(multiple)
    if curvature > 1e-8 * abs(losses[1]) and slope < 0:
        multiple = -slope / (2 * curvature)
        proposal = min(max(multiple * lr, adaptive["clip_low"] * lr), adaptive["clip_high"] * lr)
        return (1 - adaptive["smoothing"]) * lr + adaptive["smoothing"] * proposal, far(multiple)
    return lr, False


def reference_run(model_dir: str, data_dir: str, optimizer_config: dict, global_batch: int,
                  steps: int, forget_seed: int = 3, retain_seed: int = 4, max_length: int = 64,
                  lrs: list[float] | None = None, adaptive: dict | None = None,
                  lora: dict | None = None, method: dict | None = None):
    """Return (state_dict after ``steps`` NGDiff steps, per-step stats dicts).

    ``lora`` (keys r, alpha, targets): train LoRA adapters only (``_with_lora``); the norms
    and the direction are then those of the adapter gradients.

    ``adaptive`` (keys period, smoothing, clip_low, clip_high; optional max_rise,
    max_backtracks) turns on the adaptive rate with the retain loss probed at
    theta_old - delta, theta_old and theta_old + delta after every ``period``-th step (and
    after the step following a fit that asked for a refit), on the next step's retain batch.
    With ``max_rise`` > 0, a step that raised the probe by more than ``backtrack_rise *
    |L(0)|`` is retaken at the longest of r, r/2, r/4, ... whose rise is within
    ``max_rise * |L(0)|`` (backtracking; r: where the probes' parabola rises by that).

    ``method``: one of ``PRESET_METHODS`` (default NGDiff). NPO's reference log-probs are
    computed with the weights before the first step; the KL's reference is a frozen copy of
    the model as loaded.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    if lora is not None:
        model = _with_lora(model, lora)
    optimizer = _make_optimizer(model, optimizer_config)
    tasks = {}
    for name, split, seed in (("forget", "forget10", forget_seed), ("retain", "retain90", retain_seed)):
        examples, _ = encode_split(tokenizer, load_qa_split(data_dir, split), max_length, split)
        tasks[name] = (examples, StepBatches(len(examples), global_batch, 1, 1, seed))
    method = method or NGDIFF_METHOD
    frozen = None
    if method["retain"] == "kl":
        import copy

        frozen = copy.deepcopy(model).eval()
    reference_logprobs = None
    if method["forget"] == "npo":
        with torch.no_grad():
            reference_logprobs = [_example_logprob(model, e).item() for e in tasks["forget"][0]]
    stats = []
    params = [p for p in model.parameters() if p.requires_grad]
    lr = optimizer.param_groups[0]["lr"]
    refit = False  # the last fit asked for another right after the next step
    for step in range(steps):
        losses, grads = {}, {}
        for name, (examples, batches) in tasks.items():
            indices = batches.global_batch_indices(step)
            task_loss = torch.stack([_example_task_loss(
                method, name, model, examples[i],
                reference_logprobs[i] if reference_logprobs and name == "forget" else None,
                frozen) for i in indices]).mean()
            losses[name] = float(task_loss.detach())
            grads[name] = _flat_grad(model, task_loss)
        forget_norm = grads["forget"].norm().item()
        retain_norm = grads["retain"].norm().item()
        direction = _direction(method, grads["forget"], grads["retain"], forget_norm, retain_norm)
        offset = 0
        for p in params:
            p.grad = direction[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        if lrs is not None:
            lr = lrs[step]
        for group in optimizer.param_groups:
            group["lr"] = lr
        theta_old = torch.cat([p.detach().reshape(-1).double() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"forget_loss": losses["forget"], "retain_loss": losses["retain"],
                  "forget_grad_norm": forget_norm, "retain_grad_norm": retain_norm,
                  "cosine": float(grads["forget"] @ grads["retain"]) / (forget_norm * retain_norm)
                  if forget_norm * retain_norm > 0 else math.nan,
                  "lr": lr}
        if adaptive is not None and (step % adaptive["period"] == 0 or refit):
            theta_new = torch.cat([p.detach().reshape(-1).double() for p in params])
            delta = theta_new - theta_old
            examples, batches = tasks["retain"]
            indices = batches.global_batch_indices(step + 1)  # probe on the next step's batch
            probes = [_retain_loss_at(model, examples, indices, params, theta_old, delta, -1.0),
                      _retain_loss_at(model, examples, indices, params, theta_old),
                      _retain_loss_at(model, examples, indices, params, theta_new)]
            record["probe_losses"] = probes
            budget = adaptive.get("max_rise", 0.0) * abs(probes[1])
            threshold = adaptive.get("backtrack_rise", 3 * adaptive.get("max_rise", 0.0)) \
                * abs(probes[1])
            if adaptive.get("max_rise", 0.0) > 0 and not probes[2] - probes[1] <= threshold:
                # backtracking: from the budget root of the probes' parabola, halve the step
                # until the rise is within the budget, then retake the step there (for SGD:
                # the step at that multiple of the rate)
                first, tries = _budget_root(probes, adaptive["max_rise"]), []
                for k in range(adaptive.get("max_backtracks", 12)):
                    multiple = first * 0.5 ** k
                    tries.append((multiple, _retain_loss_at(model, examples, indices, params,
                                                            theta_old, delta, multiple)))
                    if tries[-1][1] - probes[1] <= budget:
                        break
                within = [m for m, loss in tries if loss - probes[1] <= budget]
                multiple = max(within) if within else min(m for m, _ in tries)
                _set_params(params, theta_old + multiple * delta)
                record["step_multiple"], record["backtrack_losses"] = multiple, [v for _, v in tries]
                lr, refit = lr * math.exp(adaptive["smoothing"] * math.log(multiple)), True
            else:
                lr, refit = _fitted_rate(lr, probes, adaptive)
        stats.append(record)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats


def reference_finetune(model_dir: str, data_dir: str, splits: str, max_length: int, global_batch: int,
                       steps: int, peak_lr: float, warmup_steps: int, seed: int) -> dict:
    """Plain SGD fine-tuning, one example per forward: the mean per-example NLL of each step's
    global batch, the rate warmed up linearly then cosine-decayed to 10 % (as run_finetune)."""
    import math

    from ngdiff_ds.data.records import load_training_records

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    examples, _ = encode_split(tokenizer, load_training_records(data_dir, splits), max_length, splits)
    batches = StepBatches(len(examples), global_batch, 1, 1, seed)
    for step in range(steps):
        if step < warmup_steps:
            lr = peak_lr * (step + 1) / warmup_steps
        else:
            fraction = (step - warmup_steps) / max(1, steps - warmup_steps)
            lr = peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * fraction)))
        indices = batches.global_batch_indices(step)
        loss = torch.stack([_example_nll(model, examples[i]) for i in indices]).mean()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= lr * g
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
