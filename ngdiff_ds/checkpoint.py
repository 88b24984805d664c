"""Checkpoints of an unlearning run, in DeepSpeed's own layout, and finding one to resume from.

    <output-dir>/checkpoints/
        latest                    the tag of the newest complete checkpoint (DeepSpeed's file)
        step000020/               DeepSpeed's save_checkpoint: model states (with our client
                                  state), one ZeRO optimizer-state file per rank
            rng_rank0.pt ...      every RNG state of each rank
            hf/                   config.json + tokenizer: what an HF export needs
            ngdiff_checkpoint.json  written last, once every rank has finished: the files and
                                  their sizes. A tag directory without it, or whose files do
                                  not match it, is incomplete and never used.

A checkpoint is written with ``save_latest=False`` (DeepSpeed's rank 0 would write ``latest``
before the other ranks are done); after a barrier rank 0 writes the manifest, then ``latest``,
each by an atomic rename, then prunes to ``--keep-last``. A kill at any moment leaves the
previous complete checkpoint in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ngdiff_ds.distributed import barrier, is_main_process, rank_and_world_size
from ngdiff_ds.errors import ConfigError
from ngdiff_ds.settings import invalid, option

CHECKPOINTS = "checkpoints"
MANIFEST = "ngdiff_checkpoint.json"
FORMAT_VERSION = 1
_TAG = re.compile(r"^step(\d+)$")


@dataclass
class CheckpointSettings:
    """When to checkpoint and where to resume from."""

    save_every: int = option(0, help="checkpoint every this many steps, and then also at every "
                                     "evaluation point and at the end (0: only with --resume, "
                                     "on preemption always)")
    keep_last: int = option(2, help="complete checkpoints kept; older ones are deleted")
    resume: str | None = option(None, metavar="auto|PATH",
                                help="auto: continue from the newest complete checkpoint under "
                                     "--output-dir, or start fresh when there is none (the same "
                                     "command for the first run and every requeue); PATH: a "
                                     "checkpoints directory or one of its step directories")

    def __post_init__(self) -> None:
        if self.save_every < 0:
            invalid(self, "save_every", "must be >= 0")
        if self.keep_last < 1:
            invalid(self, "keep_last", "must be at least 1")

    @property
    def enabled(self) -> bool:
        """Scheduled checkpoints: every --save-every steps, at evaluation points, at the end."""
        return self.save_every > 0 or self.resume is not None


def tag_of(steps_done: int) -> str:
    return f"step{steps_done:06d}"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def _files_of(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}


def check_complete(tag_dir: Path) -> str | None:
    """None when ``tag_dir`` is a complete checkpoint, else why not."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest ({error})"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def step_directories(root: Path) -> list[Path]:
    """The step directories under a checkpoints directory, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def read_manifest(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MANIFEST).read_text())


class Checkpointer:
    """Writes checkpoints under ``<output_dir>/checkpoints`` and finds one to resume from."""

    def __init__(self, settings: CheckpointSettings, output_dir: str | Path, log):
        self.settings = settings
        self.root = Path(output_dir) / CHECKPOINTS
        self.log = log

    def due(self, steps_done: int, max_steps: int, evaluated: bool) -> bool:
        """Whether the loop should checkpoint after ``steps_done`` steps (preemption aside)."""
        if not self.settings.enabled:
            return False
        every = self.settings.save_every
        return evaluated or steps_done == max_steps or (every > 0 and steps_done % every == 0)

    def save(self, built, tokenizer, steps_done: int, client_state: dict) -> Path:
        """Write the checkpoint of ``steps_done`` steps; collective (every rank calls it)."""
        rank, world_size = rank_and_world_size()
        tag = tag_of(steps_done)
        tag_dir = self.root / tag
        if is_main_process() and tag_dir.exists():
            shutil.rmtree(tag_dir)  # an incomplete save of the same step, from a killed run
        barrier()
        built.engine.save_checkpoint(str(self.root), tag=tag, save_latest=False,
                                     client_state={"ngdiff": client_state})
        torch.save(_rng_state(), tag_dir / f"rng_rank{rank}.pt")
        if is_main_process():
            from ngdiff_ds.engine import save_adapter_config

            built.model.config.save_pretrained(tag_dir / "hf")
            save_adapter_config(built, tag_dir / "hf")
            if tokenizer is not None:
                tokenizer.save_pretrained(tag_dir / "hf")
        barrier()  # every rank's files are on disk: only now may the checkpoint count
        if is_main_process():
            manifest = {"format": FORMAT_VERSION, "tag": tag, "steps_done": steps_done,
                        "world_size": world_size, "identity": client_state.get("identity"),
                        "files": _files_of(tag_dir)}
            _write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
            _write_atomic(self.root / "latest", tag)
            self._prune()
        barrier()
        self.log.print(f"checkpoint {tag_dir} written ({steps_done} steps)")
        return tag_dir

    def _prune(self) -> None:
        complete = [path for path in step_directories(self.root) if check_complete(path) is None]
        for path in complete[self.settings.keep_last:]:
            shutil.rmtree(path, ignore_errors=True)
        newest = complete[0] if complete else None
        for path in step_directories(self.root):  # incomplete saves older than the newest
            if newest is not None and path not in complete and path.name < newest.name:
                shutil.rmtree(path, ignore_errors=True)

    def find_resume(self) -> Path | None:
        """The checkpoint ``--resume`` names: auto -> the newest complete one under the output
        directory (None: start fresh), else the given step or checkpoints directory."""
        resume = self.settings.resume
        if resume is None:
            return None
        if resume == "auto":
            return self._newest_complete(self.root, allow_none=True)
        path = Path(resume).expanduser()
        if (path / MANIFEST).is_file() or _TAG.match(path.name):
            if reason := check_complete(path):
                raise ConfigError(f"--resume {path}: not a complete checkpoint: {reason}")
            return path
        if path.is_dir():
            return self._newest_complete(path, allow_none=False)
        raise ConfigError(f"--resume {resume}: no such checkpoint or checkpoints directory")

    def _newest_complete(self, root: Path, allow_none: bool) -> Path | None:
        for path in step_directories(root):
            reason = check_complete(path)
            if reason is None:
                return path
            self.log.print(f"warning: skipping checkpoint {path}: {reason}")
        if allow_none:
            self.log.print(f"no complete checkpoint under {root}: starting from step 0")
            return None
        raise ConfigError(f"--resume {root}: no complete checkpoint in it")

    def to_universal(self, tag_dir: Path, optimizer_type: str) -> Path:
        """Convert ``tag_dir`` to DeepSpeed's universal checkpoint (rank 0; collective), for a
        resume on another number of ranks; returns the converted step directory.

        The conversion knows Adam's two moments only (``exp_avg``, ``exp_avg_sq``): an SGD
        checkpoint (momentum) is refused.
        """
        if optimizer_type not in ("Adam", "AdamW"):
            raise ConfigError(
                f"checkpoint {tag_dir} was written by {read_manifest(tag_dir)['world_size']} "
                f"rank(s): resuming it on another number needs DeepSpeed's universal conversion, "
                f"which knows Adam/AdamW state only (this run's optimizer is {optimizer_type}); "
                "resume on the original number of ranks")
        universal = self.root / ".universal" / tag_dir.name
        if is_main_process():
            from argparse import Namespace

            from deepspeed.checkpoint import ds_to_universal

            shutil.rmtree(universal.parent, ignore_errors=True)
            universal.parent.mkdir(parents=True)
            # Plain file I/O on rank 0; one worker each: no process pool.
            ds_to_universal.main(Namespace(
                input_folder=str(tag_dir), output_folder=str(universal), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=False))
        barrier()
        return universal

    def load(self, built, tag_dir: Path, universal: Path | None = None) -> dict:
        """Load weights, optimizer state and this rank's RNG state; return the client state.

        ``universal``: ``tag_dir`` converted by ``to_universal`` (the engine was built with
        ``checkpoint.load_universal``); each rank then takes the RNG state of the saved rank
        ``rank % saved_world_size``.
        """
        rank, world_size = rank_and_world_size()
        saved_world = read_manifest(tag_dir)["world_size"]
        if saved_world != world_size and universal is None:
            raise ConfigError(f"checkpoint {tag_dir} was written by {saved_world} rank(s), this "
                              f"job has {world_size}")
        source = universal or tag_dir
        load_path, client_state = built.engine.load_checkpoint(
            str(source.parent), tag=source.name, load_optimizer_states=True,
            load_lr_scheduler_states=False)
        if load_path is None:
            raise ConfigError(f"DeepSpeed could not load checkpoint {source}")
        if universal is not None:
            built.partitions.separate_step_counters()
            barrier()
            if is_main_process():
                shutil.rmtree(universal.parent, ignore_errors=True)
        rng_file = tag_dir / f"rng_rank{rank % saved_world}.pt"
        _set_rng_state(torch.load(rng_file, weights_only=False))
        self.log.print(f"resumed from checkpoint {tag_dir}"
                       + (f" ({saved_world} rank(s) -> {world_size}, through DeepSpeed's "
                          "universal checkpoint)" if universal is not None else ""))
        return client_state["ngdiff"]
