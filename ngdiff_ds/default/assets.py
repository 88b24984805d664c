"""The embedded default: synthetic TOFU-style data, a local tokenizer, and tiny Llama models.

Built once under a cache directory and reused; anything missing is rebuilt. Layout::

    <cache>/default-v4/data/             synthetic benchmark (TOFU split files incl.
                                         real_authors, retain_perturbed and the held-out
                                         authors' QA, MUSE-style passages, held-out
                                         passages, verbmem and knowmem splits)
    <cache>/default-v4/tokenizer/        BPE tokenizer trained on that data (every true
                                         string, held-out QA and passages included)
    <cache>/default-v4/init/             randomly initialised tiny Llama
    <cache>/default-v4/model_full/       fine-tuned on every author's QA pairs and passage +
                                         world facts + real authors (the model to unlearn)
    <cache>/default-v4/model_<retain>/   the same for the retain split's authors only, with
                                         the same world facts and real authors
                                         (the "never saw the forget set" reference)

Neither model trains on the held-out authors (``holdout``, ``holdout_text``): they are the
non-members of the membership attacks. Unlike TOFU's pretrained models, a tiny model knows
only what it is fine-tuned on, so ``real_authors`` is part of both fine-tunes, like the world
facts.

The fine-tunes run in one plain PyTorch process on rank 0 (the other ranks wait): the
models are tiny, and under ZeRO-3 each of their ~1100 steps was dominated by the
collectives (about 8 minutes on 2 CPU cores; one process takes about a minute). One process
with a fixed thread count, fixed seeds and torch's deterministic algorithms also makes the
cached models independent of the job's rank count and repeatable on one machine (across
CPUs, float kernels may still round differently: the README states the spread).
``launch/finetune.py`` fine-tunes any model and data through the ZeRO-3 engine.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from ngdiff_ds.config import BatchLayout
from ngdiff_ds.data.records import load_training_records
from ngdiff_ds.data.task import task_from_records
from ngdiff_ds.distributed import barrier, rank_and_world_size
from ngdiff_ds.engine import load_tokenizer, staged_directory
from ngdiff_ds.losses import RETAIN_LOSSES
from ngdiff_ds.run_log import RunLog
from ngdiff_ds.trainer import finetune_rate

# v2: perturbed answers use the paraphrase template; v3: biography passages (MUSE-style);
# v4: real_authors (trained), retain_perturbed, holdout QA, MUSE-style knowmem splits, real
# authors' and world facts' answers and perturbed answers as bare values (as TOFU's), the
# tokenizer trained on the real-author and held-out text too
VERSION = "default-v4"
NUM_AUTHORS = 100
FINETUNE_GLOBAL_BATCH = 64
FINETUNE_EPOCHS = 20
FINETUNE_PEAK_LR = 3e-3
FINETUNE_MAX_LENGTH = 160  # passages are about 110 tokens
FINETUNE_WARMUP_STEPS = 10
FINETUNE_THREADS = 2  # fixed: the reduction order of the float kernels depends on it
PASSAGE_REPEATS = 3


def tiny_llama_config(tokenizer):
    """A Llama small enough to memorise the benchmark in minutes on two CPU cores."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=FINETUNE_MAX_LENGTH * 2, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def finetune_layout() -> BatchLayout:
    """The fine-tunes' batches: one process, FINETUNE_GLOBAL_BATCH examples per step."""
    return BatchLayout(micro_batch_size=FINETUNE_GLOBAL_BATCH, micro_batches_per_step=1,
                       world_size=1)


def _build_inputs(root: Path) -> None:
    """Data, tokenizer and initial weights (rank 0 only; cheap and deterministic)."""
    from transformers import LlamaForCausalLM

    from ngdiff_ds.default.synthetic import benchmark_texts, generate_benchmark
    from ngdiff_ds.default.tokenizer import train_tokenizer

    if not (root / "data" / "manifest.json").is_file():
        generate_benchmark(root / "data", seed=0, num_authors=NUM_AUTHORS)
    if not (root / "tokenizer" / "tokenizer.json").is_file():
        train_tokenizer(benchmark_texts(root / "data", passages=True, real_authors=True, holdout=True),
                        root / "tokenizer")
    if not (root / "init" / "config.json").is_file():
        tokenizer = load_tokenizer(str(root / "tokenizer"))
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(tokenizer))
        staging = root / ".init.tmp"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(root / "init")


def _finetune(root: Path, out_name: str, splits: list[str], log: RunLog) -> None:
    """Fine-tune the initial model on ``splits`` in this process (rank 0 only) and save it."""
    tokenizer = load_tokenizer(str(root / "tokenizer"))
    records = load_training_records(str(root / "data"), "+".join(splits))
    # Passages are repeated: reciting ~100 tokens verbatim takes more epochs than a QA answer.
    records += [r for r in records if "text" in r] * (PASSAGE_REPEATS - 1)
    data = task_from_records(out_name, records, "+".join(splits), tokenizer, FINETUNE_MAX_LENGTH,
                             finetune_layout(), seed=0)
    truncated = sum(example["truncated"] for example in data.examples)
    if truncated:
        raise RuntimeError(f"{truncated} fine-tuning examples exceed {FINETUNE_MAX_LENGTH} tokens")
    steps = FINETUNE_EPOCHS * len(data.examples) // data.batches.global_batch_size
    log.print(f"building the embedded default: fine-tuning {out_name} on {'+'.join(splits)} "
              f"({len(data.examples)} QA pairs and passages, {steps} steps, one process); "
              f"done once, cached in {root}")
    # The fine-tune's own metrics go next to the model, not into the caller's run.
    finetune_log = RunLog(root / "logs" / out_name, tensorboard=False)
    with _repeatable_torch():
        model, loss = _train(root / "init", data, steps, finetune_log)
    finetune_log.close()
    log.print(f"{out_name}: final training loss {loss:.4f}")
    with staged_directory(root / out_name) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)


@contextmanager
def _repeatable_torch():
    """Fixed threads and seed, deterministic kernels; the caller's settings afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(FINETUNE_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(init_dir: Path, data, steps: int, log: RunLog):
    """AdamW (no weight decay) on the per-example answer NLL at ``finetune_rate``; each step's
    short and long rows run as separate forwards (``length_grouped_batches``), weighted to
    the mean over the step's batch. Returns the model and the last step's loss."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=FINETUNE_PEAK_LR, weight_decay=0.0)
    loss_fn = RETAIN_LOSSES.bind("nll")
    progress = tqdm(range(steps), desc=f"finetune {data.name}", dynamic_ncols=True)
    loss = math.nan
    for step in progress:
        lr = finetune_rate(step, steps, FINETUNE_PEAK_LR, FINETUNE_WARMUP_STEPS)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        micro_batches, weights = data.length_grouped_batches(step, 0, torch.device("cpu"))
        total = 0.0
        for batch, weight in zip(micro_batches, weights):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
            piece = loss_fn(logits, batch) * weight
            piece.backward()
            total += piece.item()
        optimizer.step()
        loss = total
        log.record("finetune", step, {"loss": loss, "lr": lr})
        progress.set_postfix(loss=f"{loss:.3f}")
    return model.eval(), loss


def ensure_default_assets(cache_dir: Path, retain_split: str, log: RunLog) -> dict[str, str]:
    """Build what is missing; return paths: data, tokenizer, model_full, model_retain.

    ``model_full`` trains on ``full``, ``world_facts``, ``real_authors`` and ``full_text``;
    ``model_<retain_split>`` on ``<retain_split>``, ``world_facts``, ``real_authors`` and
    ``<retain_split>_text``. Every rank must call this: rank 0 builds, the others wait.
    """
    rank, _ = rank_and_world_size()
    root = Path(cache_dir) / VERSION
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _build_inputs(root)
    barrier()
    retain_name = f"model_{retain_split}"
    for out_name, splits in (("model_full", ["full", "world_facts", "real_authors", "full_text"]),
                             (retain_name, [retain_split, "world_facts", "real_authors",
                                            f"{retain_split}_text"])):
        if rank == 0 and not (root / out_name / "config.json").is_file():
            _finetune(root, out_name, splits, log)
        barrier()
    paths = {"data": root / "data", "tokenizer": root / "tokenizer",
             "model_full": root / "model_full", "model_retain": root / retain_name}
    if rank == 0:
        (root / "paths.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return {k: str(v) for k, v in paths.items()}
