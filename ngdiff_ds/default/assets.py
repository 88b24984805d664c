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

The fine-tunes run through the same ZeRO-3 engine (``launch/finetune.py`` does the same for
any model and data), on however many ranks the job has. Their global batch is fixed at 64
when the number of ranks divides 64, so the cached models do not depend on it (other rank
counts round the per-rank batch down).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ngdiff_ds.config import BatchLayout, engine_config
from ngdiff_ds.data.records import load_training_records
from ngdiff_ds.data.task import task_from_records
from ngdiff_ds.distributed import barrier, rank_and_world_size
from ngdiff_ds.engine import build_engine, load_tokenizer, save_hf_model
from ngdiff_ds.trainer import run_finetune
from ngdiff_ds.run_log import RunLog

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
PASSAGE_REPEATS = 3


def tiny_llama_config(tokenizer):
    """A Llama small enough to memorise the benchmark in minutes on two CPU cores."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=FINETUNE_MAX_LENGTH * 2, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def finetune_ds_config(world_size: int, optimizer_type: str = "AdamW") -> tuple[dict, BatchLayout]:
    """ZeRO-3 config for the fine-tunes: fp32, torch AdamW, fixed global batch."""
    micro = max(1, FINETUNE_GLOBAL_BATCH // world_size)
    layout = BatchLayout(micro_batch_size=micro, micro_batches_per_step=1, world_size=world_size)
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": optimizer_type,
                      "params": {"lr": FINETUNE_PEAK_LR, "weight_decay": 0.0, "torch_adam": True}},
        "bf16": {"enabled": False},
    }
    return engine_config(config, layout), layout


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


def _finetune(root: Path, out_name: str, splits: list[str], world_size: int, log: RunLog) -> None:
    tokenizer = load_tokenizer(str(root / "tokenizer"))
    records = load_training_records(str(root / "data"), "+".join(splits))
    # Passages are repeated: reciting ~100 tokens verbatim takes more epochs than a QA answer.
    records += [r for r in records if "text" in r] * (PASSAGE_REPEATS - 1)
    ds_config, layout = finetune_ds_config(world_size)
    data = task_from_records(out_name, records, "+".join(splits), tokenizer, FINETUNE_MAX_LENGTH,
                             layout, seed=0)
    truncated = sum(example["truncated"] for example in data.examples)
    if truncated:
        raise RuntimeError(f"{truncated} fine-tuning examples exceed {FINETUNE_MAX_LENGTH} tokens")
    steps = FINETUNE_EPOCHS * len(data.examples) // data.batches.global_batch_size
    log.print(f"building the embedded default: fine-tuning {out_name} on {'+'.join(splits)} "
              f"({len(data.examples)} QA pairs and passages, {steps} steps, {world_size} rank(s)); "
              f"done once, cached in {root}")
    built = build_engine(str(root / "init"), ds_config)
    # The fine-tune's own metrics go next to the model, not into the caller's run.
    finetune_log = RunLog(root / "logs" / out_name, tensorboard=False)
    loss = run_finetune(built, data, steps, FINETUNE_PEAK_LR, finetune_log)
    finetune_log.close()
    log.print(f"{out_name}: final training loss {loss:.4f}")
    save_hf_model(built, tokenizer, root / out_name)
    del built


def ensure_default_assets(cache_dir: Path, retain_split: str, log: RunLog) -> dict[str, str]:
    """Build what is missing; return paths: data, tokenizer, model_full, model_retain.

    ``model_full`` trains on ``full``, ``world_facts``, ``real_authors`` and ``full_text``;
    ``model_<retain_split>`` on ``<retain_split>``, ``world_facts``, ``real_authors`` and
    ``<retain_split>_text``. Every rank must call this (the fine-tunes are collective).
    """
    rank, world_size = rank_and_world_size()
    root = Path(cache_dir) / VERSION
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _build_inputs(root)
    barrier()
    retain_name = f"model_{retain_split}"
    for out_name, splits in (("model_full", ["full", "world_facts", "real_authors", "full_text"]),
                             (retain_name, [retain_split, "world_facts", "real_authors",
                                            f"{retain_split}_text"])):
        if not (root / out_name / "config.json").is_file():
            _finetune(root, out_name, splits, world_size, log)
        barrier()
    paths = {"data": root / "data", "tokenizer": root / "tokenizer",
             "model_full": root / "model_full", "model_retain": root / retain_name}
    if rank == 0:
        (root / "paths.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return {k: str(v) for k, v in paths.items()}
