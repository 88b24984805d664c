"""TOFU-schema question/answer data and MUSE-style text: loading, tokenisation, collation,
batching.

QA records have the TOFU fields ``question`` and ``answer`` (required), optionally
``paraphrased_answer`` (str) and ``perturbed_answer`` (list of str); any other
field is kept untouched. Text records (MUSE ``raw``/``privleak`` splits) have a
``text`` field; verbatim-memorisation records (MUSE ``verbmem``) have ``prompt``
and ``gt`` (the true continuation).

The pipeline is::

    records = load_qa_split(data, "forget10")          # list[dict]
    encoded, n_truncated = encode_split(tok, records, max_length, "forget10")
    batches = StepBatches(len(encoded), micro, accum, world_size, seed)
    batch = collate([encoded[i] for i in batches.micro_batch_indices(step, rank, k)],
                    tok.pad_token_id)
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch

__all__ = [
    "DataError",
    "SplitNotFound",
    "MissingField",
    "REQUIRED_FIELDS",
    "SPLIT_EXTENSIONS",
    "IGNORE_INDEX",
    "load_qa_split",
    "load_training_records",
    "load_text_split",
    "load_verbmem_split",
    "encode_text",
    "length_cut",
    "format_prompt",
    "encode_qa",
    "encode_split",
    "collate",
    "StepBatches",
]


class DataError(ValueError):
    """Bad user data; message names the file/split and the field or record."""


class SplitNotFound(DataError):
    """The split is not there (no such file, path or loadable hub dataset), as opposed to
    there but malformed: optional evaluation sets are skipped on this one only."""


class MissingField(DataError):
    """A record lacks a required field (``field`` names it)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


REQUIRED_FIELDS = ("question", "answer")
TEXT_FIELDS = ("text",)
VERBMEM_FIELDS = ("prompt", "gt")

# Extensions tried, in order, when a split is resolved inside a data directory.
SPLIT_EXTENSIONS = (".json", ".jsonl", ".parquet")

# Label value ignored by torch's cross-entropy (and by HF causal-LM losses).
IGNORE_INDEX = -100


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_qa_split(data: str, split: str) -> list[dict]:
    """Load and validate one split of TOFU-schema QA records.

    Resolution order:

    1. ``split`` is an existing file -> that file.
    2. ``data`` is a directory -> ``data/<split>{.json,.jsonl,.parquet}``,
       the first that exists.
    3. ``data`` is an existing file -> that file (``split`` is only a label).
    4. Otherwise ``data`` is a Hugging Face ``datasets`` hub name, loaded as
       ``load_dataset(data, split, split="train")`` (TOFU's configs are named
       like ``forget10``). Only works where the hub is reachable.

    A ``data`` that can only be a local path (absolute, ``./``/``../``/``~``
    prefixed, more than one ``/``, or a data-file extension) is reported as a
    missing path right away instead of being sent to the hub, which offline
    would only fail after a long series of network retries.

    Raises:
        DataError: unresolvable split, unreadable/malformed file, invalid or
            missing records.
    """
    return _load_split(data, split, REQUIRED_FIELDS)


def load_text_split(data: str, split: str) -> list[dict]:
    """Load one split of text records (field ``text``), resolved as ``load_qa_split``."""
    return _load_split(data, split, TEXT_FIELDS)


def load_verbmem_split(data: str, split: str) -> list[dict]:
    """Load one split of prompt/continuation records (fields ``prompt`` and ``gt``)."""
    return _load_split(data, split, VERBMEM_FIELDS)


def load_training_records(data: str, split: str) -> list[dict]:
    """Records to train on: one split, or several joined by ``+`` (``forget10+forget10_text``),
    concatenated in order. Each split holds QA records or text records (MUSE ``raw`` style);
    ``encode_split`` trains on the answers of the first and on every token of the second."""
    records = []
    for part in split.split("+"):
        try:
            records += load_qa_split(data, part)
        except MissingField as qa_error:
            if qa_error.field != "question":
                raise
            try:
                records += load_text_split(data, part)
            except DataError:
                raise DataError(f"{qa_error} (and it is not a text split either: records need "
                                f"'question' and 'answer', or 'text')") from qa_error
    return records


def _load_split(data: str, split: str, required: tuple[str, ...]) -> list[dict]:
    if os.path.isfile(split):
        return _load_file_records(split, split, required)
    if os.path.isdir(data):
        return _load_file_records(_resolve_split_in_directory(data, split), split, required)
    if os.path.isfile(data):
        return _load_file_records(data, split, required)
    if _looks_like_local_path(data):
        raise SplitNotFound(
            f"data path {data!r} does not exist (split {split!r}); expected a directory "
            f"holding <split>{{{','.join(SPLIT_EXTENSIONS)}}} files or a single data file"
        )
    return _load_hub_records(data, split, required)


def _resolve_split_in_directory(directory: str, split: str) -> str:
    for extension in SPLIT_EXTENSIONS:
        candidate = os.path.join(directory, split + extension)
        if os.path.isfile(candidate):
            return candidate
    available = _available_splits(directory)
    raise SplitNotFound(
        f"split {split!r} not found in directory {directory!r}: tried "
        f"{', '.join(split + ext for ext in SPLIT_EXTENSIONS)}; "
        f"available splits: {', '.join(available) if available else '(none)'}"
    )


def _available_splits(directory: str) -> list[str]:
    names = set()
    for entry in os.listdir(directory):
        stem, extension = os.path.splitext(entry)
        if extension in SPLIT_EXTENSIONS and os.path.isfile(os.path.join(directory, entry)):
            names.add(stem)
    return sorted(names)


def _looks_like_local_path(data: str) -> bool:
    """True when ``data`` cannot be a hub id ("name" or "namespace/name")."""
    if data.startswith(("/", "./", "../", "~", "\\")) or os.path.isabs(data):
        return True
    if data.count("/") > 1 or "\\" in data:
        return True
    return os.path.splitext(data)[1].lower() in SPLIT_EXTENSIONS


def _load_file_records(path: str, split_label: str, required: tuple[str, ...]) -> list[dict]:
    extension = os.path.splitext(path)[1].lower()
    if extension == ".parquet":
        raw_records = _read_parquet(path)
    elif extension == ".jsonl":
        raw_records = _parse_json_lines(_read_text(path), path)
    else:
        # TOFU's hub files are JSON Lines named *.json, so .json (and any
        # other extension) is sniffed rather than assumed to be an array.
        raw_records = _parse_json_array_or_lines(_read_text(path), path)
    return _validate_records(raw_records, path, split_label, required)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: tolerate a BOM
            return handle.read()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 text ({error})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read file ({error.strerror or error})") from error


def _read_parquet(path: str) -> list:
    import pyarrow.parquet as parquet  # lazy: only parquet users pay the import

    try:
        return parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types
        raise DataError(f"{path}: cannot read parquet file ({_one_line(error)})") from error


def _parse_json_array_or_lines(text: str, path: str) -> list:
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: malformed JSON array at line {error.lineno}, column {error.colno}: "
                f"{error.msg}"
            ) from error
        return records
    return _parse_json_lines(text, path)


def _parse_json_lines(text: str, path: str) -> list:
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry no record
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: malformed JSON Lines at line {line_number}, column {error.colno}: "
                f"{error.msg} (expected one JSON object per line, or a JSON array)"
            ) from error
    return records


def _load_hub_records(name: str, config: str, required: tuple[str, ...]) -> list[dict]:
    # "config:split" names a split other than "train" (MUSE: "raw:forget", "verbmem:forget").
    label = config
    config, _, hub_split = config.partition(":")
    try:
        import datasets  # lazy: heavy import, and only hub users need it

        dataset = datasets.load_dataset(name, config, split=hub_split or "train")
        raw_records = dataset.to_list()
    except Exception as error:
        raise SplitNotFound(
            f"data {name!r} (split {label!r}) is neither a local path nor a "
            f"loadable dataset; hub names only work where the Hugging Face hub is reachable "
            f"(this machine may be offline): {type(error).__name__}: {_one_line(error)}"
        ) from error
    source = f"{name} (hub split {label!r})"
    return _validate_records(raw_records, source, label, required)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _validate_records(raw_records, source: str, split_label: str,
                      required: tuple[str, ...]) -> list[dict]:
    if not isinstance(raw_records, list):
        raise DataError(
            f"{source}: expected a list of records, got {type(raw_records).__name__}"
        )
    if not raw_records:
        raise DataError(f"split {split_label!r} in {source} has no records")
    return [_validate_record(record, index, source, required)
            for index, record in enumerate(raw_records)]


def _validate_record(record, index: int, source: str, required: tuple[str, ...]) -> dict:
    where = f"{source}: record {index} (0-based)"
    if not isinstance(record, dict):
        raise DataError(f"{where} is not an object (got {type(record).__name__})")
    for field in required:
        if field not in record:
            raise MissingField(f"{where} is missing required field {field!r}", field)
        value = record[field]
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                f"{where}: field {field!r} must be a non-empty string, got {_describe(value)}"
            )
    validated = dict(record)  # copy: never mutate the caller's objects
    paraphrased = validated.get("paraphrased_answer")
    if paraphrased is not None and not isinstance(paraphrased, str):
        raise DataError(
            f"{where}: field 'paraphrased_answer' must be a string, got {_describe(paraphrased)}"
        )
    if validated.get("perturbed_answer") is not None:
        validated["perturbed_answer"] = _normalise_perturbed(validated["perturbed_answer"], where)
    return validated


def _normalise_perturbed(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise DataError(
        f"{where}: field 'perturbed_answer' must be a list of strings, got {_describe(value)}"
    )


def _describe(value) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


# --------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------


def format_prompt(tokenizer, question: str) -> str:
    """Text that precedes the answer: the chat-templated user turn with the
    generation prompt if the tokenizer has a chat template, else
    ``"Question: {question}\\nAnswer:"``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {question}\nAnswer:"


def encode_qa(tokenizer, question: str, answer: str, max_length: int) -> dict:
    """Tokenise one QA pair for causal-LM training on the answer only.

    Token layout:

    * chat template: ``prompt ids + answer ids + [eos]`` where the prompt is
      ``format_prompt`` (it carries whatever BOS the template writes);
    * no template: ``[bos] + prompt ids + ids(" " + answer) + [eos]`` (bos only
      if the tokenizer has one).

    Prompt and answer are encoded separately with ``add_special_tokens=False``
    so the prompt/answer boundary is exact. ``labels`` are ``-100`` on every
    prompt (and bos) token and equal the ids on answer tokens and the eos.

    Length policy: a sequence longer than ``max_length`` is cut from the end,
    i.e. the eos and then trailing answer tokens are dropped, and
    ``truncated`` is True. The eos is not re-appended, so the model is never
    taught to stop mid-answer. If the prompt leaves no room for at least one
    answer token, ``DataError`` is raised (callers add split/record context).

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "truncated": bool}``
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("tokenizer has no eos token; it is needed to end every answer")
    prompt_ids = encode_prompt(tokenizer, question)
    if getattr(tokenizer, "chat_template", None):
        answer_ids = _encode_plain(tokenizer, answer)
    else:
        answer_ids = _encode_plain(tokenizer, " " + answer)

    answer_room = max_length - len(prompt_ids)
    if answer_room < 1:
        raise DataError(
            f"prompt is {len(prompt_ids)} tokens, max_length {max_length} leaves no room "
            f"for the answer"
        )
    target_ids = answer_ids + [eos_id]
    truncated = len(target_ids) > answer_room
    target_ids = target_ids[:answer_room]
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        "truncated": truncated,
    }


def encode_text(tokenizer, text: str, max_length: int) -> dict:
    """Tokenise one plain text for causal-LM training on every token.

    ``[bos] + ids(text) + [eos]`` (bos only if the tokenizer has one); ``labels`` are the ids
    with the bos masked. Longer than ``max_length``: cut from the end (``truncated`` True), as
    MUSE cuts its corpora into chunks of the model's length. Same return shape as ``encode_qa``.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; it is needed to end every text")
    bos = bos_ids(tokenizer)
    target_ids = _encode_plain(tokenizer, text) + [tokenizer.eos_token_id]
    room = max_length - len(bos)
    if room < 1:
        raise DataError(f"max_length {max_length} leaves no room for text")
    truncated = len(target_ids) > room
    target_ids = target_ids[:room]
    return {"input_ids": bos + target_ids, "labels": [IGNORE_INDEX] * len(bos) + target_ids,
            "truncated": truncated}


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids that precede the answer (what generation starts from): the chat-templated
    user turn, or ``[bos] + "Question: ...\nAnswer:"`` without a template."""
    if getattr(tokenizer, "chat_template", None):
        return _encode_plain(tokenizer, format_prompt(tokenizer, question))
    return bos_ids(tokenizer) + _encode_plain(tokenizer, format_prompt(tokenizer, question))


def encode_plain_prompt(tokenizer, prompt: str) -> list[int]:
    """``[bos] + ids(prompt)``: a plain-text prompt, encoded as ``encode_text`` starts a text."""
    return bos_ids(tokenizer) + _encode_plain(tokenizer, prompt)


def bos_ids(tokenizer) -> list[int]:
    """``[bos]``, or ``[]`` for a tokenizer without one."""
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _encode_plain(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_split(
    tokenizer, records: list[dict], max_length: int, split_name: str
) -> tuple[list[dict], int]:
    """Encode every record with ``encode_qa`` (``encode_text`` for records with ``text``).

    Returns:
        (encoded records, number of records that were truncated)

    Raises:
        DataError: naming the split and the record index of the failing record.
    """
    encoded = []
    truncated_count = 0
    for index, record in enumerate(records):
        try:
            if "text" in record and "question" not in record:
                example = encode_text(tokenizer, record["text"], max_length)
            else:
                example = encode_qa(tokenizer, record["question"], record["answer"], max_length)
        except DataError as error:
            raise DataError(f"split {split_name!r}, record {index} (0-based): {error}") from error
        truncated_count += int(example["truncated"])
        encoded.append(example)
    return encoded, truncated_count


# --------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


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
