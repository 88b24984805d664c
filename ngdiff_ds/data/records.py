"""Reading split files: TOFU-schema QA records, MUSE-style text and verbmem records.

QA records have the TOFU fields ``question`` and ``answer`` (required), optionally
``paraphrased_answer`` (str) and ``perturbed_answer`` (list of str); any other field is kept
untouched. Text records (MUSE ``raw``/``privleak`` splits) have a ``text`` field;
verbatim-memorisation records (MUSE ``verbmem``) have ``prompt`` and ``gt`` (the true
continuation). A split is a file in a data directory, a single file, or a ``datasets`` hub
config; errors name the file, the record and the field.
"""

from __future__ import annotations

import json
import os

from ngdiff_ds.errors import DataError, MissingField, SplitNotFound

REQUIRED_FIELDS = ("question", "answer")
TEXT_FIELDS = ("text",)
VERBMEM_FIELDS = ("prompt", "gt")

# Extensions tried, in order, when a split is resolved inside a data directory.
SPLIT_EXTENSIONS = (".json", ".jsonl", ".parquet")


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
