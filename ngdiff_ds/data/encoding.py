"""Tokenisation: a QA pair trains on its answer, a text on every token.

Prompts use the tokenizer's chat template when it has one, else ``Question: ...\nAnswer:``.
Labels are ``IGNORE_INDEX`` wherever a token does not count (prompt, bos); the loss functions
shift them to next-token targets.
"""

from __future__ import annotations

from ngdiff_ds.errors import DataError, ModelError
from ngdiff_ds.losses import IGNORE_INDEX



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
        raise ModelError("the tokenizer has no eos token; it is needed to end every answer")
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
        raise ModelError("the tokenizer has no eos token; it is needed to end every text")
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
