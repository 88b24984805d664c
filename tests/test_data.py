"""Tests for ngdiff_ds.data: loading and validation (records), encoding, collation and batching,
and the per-step task batches (task)."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedTokenizerFast

from ngdiff_ds.data.batching import StepBatches, collate, length_cut
from ngdiff_ds.data.encoding import encode_qa, encode_split, encode_text, format_prompt
from ngdiff_ds.data.records import load_qa_split, load_text_split, load_verbmem_split
from ngdiff_ds.errors import DataError

RECORDS = [
    {
        "question": "who wrote the red book",
        "answer": "the red book was written by jane doe",
        "paraphrased_answer": "jane doe wrote it",
        "perturbed_answer": ["john smith wrote it", "nobody wrote it"],
        "author_id": 7,
    },
    {"question": "where was jane doe born", "answer": "jane doe was born in paris"},
    {"question": "what genre does jane doe write", "answer": "jane doe writes mystery novels"},
    {"question": "when did jane doe die", "answer": "jane doe is still alive"},
    {"question": "what is the capital of france", "answer": "paris is the capital"},
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<| {{ message['role'] }} |> {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}<| assistant |> {% endif %}"
)


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose vocabulary covers every test text."""
    corpus = [f"{r['question']} {r['answer']}" for r in RECORDS]
    corpus += ["Question : Answer :", "<| user |> <| assistant |>", "? ."]
    core = Tokenizer(WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    trainer = WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    core.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


@pytest.fixture
def tokenizer():
    return _build_tokenizer()


@pytest.fixture
def chat_tokenizer():
    chat = _build_tokenizer()
    chat.chat_template = CHAT_TEMPLATE
    return chat


def _same_words(left: str, right: str) -> bool:
    # WordLevel decoding re-joins tokens with single spaces, so compare words.
    return left.split() == right.split()


def _write_json_array(path, records):
    path.write_text(json.dumps(records, indent=2))
    return path


def _write_json_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def _normalised(records):
    """Compare records independent of parquet's null-filling of absent keys."""
    return [{k: v for k, v in r.items() if v is not None} for r in records]


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "filename, writer",
    [
        ("array.json", _write_json_array),
        ("lines.json", _write_json_lines),
        ("lines.jsonl", _write_json_lines),
        ("table.parquet", _write_parquet),
    ],
)
def test_all_formats_load_same_records(tmp_path, filename, writer):
    path = writer(tmp_path / filename, RECORDS)
    loaded = load_qa_split(str(tmp_path / "unused"), str(path))
    assert _normalised(loaded) == RECORDS
    assert loaded[0]["author_id"] == 7  # unknown fields are kept


def test_data_file_with_split_as_label(tmp_path):
    path = _write_json_lines(tmp_path / "forget.json", RECORDS)
    assert load_qa_split(str(path), "forget10") == RECORDS


def test_directory_split_resolution(tmp_path):
    _write_json_array(tmp_path / "forget10.json", RECORDS[:2])
    _write_json_lines(tmp_path / "retain90.jsonl", RECORDS[2:])
    _write_parquet(tmp_path / "holdout.parquet", RECORDS[1:3])
    assert load_qa_split(str(tmp_path), "forget10") == RECORDS[:2]
    assert load_qa_split(str(tmp_path), "retain90") == RECORDS[2:]
    assert _normalised(load_qa_split(str(tmp_path), "holdout")) == RECORDS[1:3]


def test_directory_prefers_json_over_jsonl(tmp_path):
    _write_json_array(tmp_path / "forget.json", RECORDS[:1])
    _write_json_lines(tmp_path / "forget.jsonl", RECORDS[1:])
    assert load_qa_split(str(tmp_path), "forget") == RECORDS[:1]


def test_perturbed_answer_string_is_wrapped(tmp_path):
    record = {"question": "q one", "answer": "a one", "perturbed_answer": "wrong one"}
    path = _write_json_lines(tmp_path / "s.jsonl", [record])
    assert load_qa_split(str(path), "s")[0]["perturbed_answer"] == ["wrong one"]


def test_missing_answer_names_file_record_and_field(tmp_path):
    records = [dict(r) for r in RECORDS]
    del records[3]["answer"]
    path = _write_json_lines(tmp_path / "broken.jsonl", records)
    with pytest.raises(DataError) as info:
        load_qa_split(str(path), "forget")
    message = str(info.value)
    assert "broken.jsonl" in message and "record 3" in message and "'answer'" in message


def test_empty_question_is_rejected(tmp_path):
    path = _write_json_array(tmp_path / "blank.json", [{"question": "  ", "answer": "a"}])
    with pytest.raises(DataError, match=r"blank\.json.*record 0.*'question'"):
        load_qa_split(str(path), "x")


def test_bad_perturbed_answer_is_rejected(tmp_path):
    record = {"question": "q", "answer": "a", "perturbed_answer": [1, 2]}
    path = _write_json_lines(tmp_path / "pert.jsonl", [record])
    with pytest.raises(DataError, match=r"pert\.jsonl.*perturbed_answer"):
        load_qa_split(str(path), "x")


def test_non_object_record_is_rejected(tmp_path):
    path = _write_json_array(tmp_path / "nums.json", [RECORDS[0], 5])
    with pytest.raises(DataError, match=r"nums\.json.*record 1.*not an object"):
        load_qa_split(str(path), "x")


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_split_is_rejected(tmp_path, content):
    path = tmp_path / "forget10.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_qa_split(str(tmp_path), "forget10")
    message = str(info.value)
    assert "forget10" in message and "forget10.json" in message and "no records" in message


def test_malformed_json_lines_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"question": "q", "answer": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 2"):
        load_qa_split(str(path), "x")


def test_malformed_json_array_names_file_and_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"question": "q", "answer": "a"},\n  {"question": oops}\n]')
    with pytest.raises(DataError, match=r"bad\.json.*line 3, column"):
        load_qa_split(str(path), "x")


def test_missing_split_lists_available_splits(tmp_path):
    _write_json_lines(tmp_path / "forget10.json", RECORDS)
    _write_json_lines(tmp_path / "retain90.jsonl", RECORDS)
    (tmp_path / "notes.txt").write_text("not a split")
    with pytest.raises(DataError) as info:
        load_qa_split(str(tmp_path), "forget05")
    message = str(info.value)
    assert str(tmp_path) in message and "forget05" in message
    assert "forget05.json" in message and "forget05.parquet" in message
    assert "forget10" in message and "retain90" in message and "notes" not in message


def test_unknown_hub_name_fails_fast_with_hub_explanation(monkeypatch):
    # Offline flags make datasets fail immediately instead of retrying DNS.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The flags are read at import time; patch them too if another test
    # already imported the libraries.
    if "huggingface_hub" in sys.modules:
        monkeypatch.setattr(sys.modules["huggingface_hub"].constants, "HF_HUB_OFFLINE", True)
    if "datasets" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_DATASETS_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        load_qa_split("no-such-user-ngdiff/no-such-dataset", "forget10")
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert "no-such-user-ngdiff/no-such-dataset" in message
    assert "neither a local path nor a loadable dataset" in message
    assert "hub" in message.lower()
    assert "\n" not in message


def test_missing_local_path_is_not_sent_to_hub(tmp_path):
    missing = str(tmp_path / "does" / "not" / "exist")
    with pytest.raises(DataError, match="does not exist"):
        load_qa_split(missing, "forget10")


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def test_plain_prompt_masks_exactly_the_prompt(tokenizer):
    question, answer = RECORDS[1]["question"], RECORDS[1]["answer"]
    encoded = encode_qa(tokenizer, question, answer, max_length=64)
    prompt_text = format_prompt(tokenizer, question)
    assert prompt_text == f"Question: {question}\nAnswer:"
    prompt_length = 1 + len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])

    ids, labels = encoded["input_ids"], encoded["labels"]
    assert not encoded["truncated"]
    assert len(ids) == len(labels)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert labels[:prompt_length] == [-100] * prompt_length
    assert labels[prompt_length:] == ids[prompt_length:]
    assert -100 not in labels[prompt_length:]

    supervised = [token for token in labels if token != -100]
    assert supervised[-1] == tokenizer.eos_token_id
    assert _same_words(tokenizer.decode(supervised, skip_special_tokens=True), answer)
    assert _same_words(tokenizer.decode(ids[1:prompt_length]), "Question : " + question + " Answer :")


def test_chat_template_masks_whole_templated_prompt(chat_tokenizer):
    question, answer = RECORDS[2]["question"], RECORDS[2]["answer"]
    prompt_text = format_prompt(chat_tokenizer, question)
    assert prompt_text == f"<| user |> {question} <| assistant |> "
    prompt_ids = chat_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]

    encoded = encode_qa(chat_tokenizer, question, answer, max_length=64)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids[: len(prompt_ids)] == prompt_ids  # no extra bos in front of the template
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]
    assert ids[-1] == chat_tokenizer.eos_token_id
    supervised = [token for token in labels if token != -100]
    assert _same_words(chat_tokenizer.decode(supervised, skip_special_tokens=True), answer)


def test_truncation_keeps_max_length_and_flags(tokenizer):
    question, answer = RECORDS[0]["question"], RECORDS[0]["answer"]
    full = encode_qa(tokenizer, question, answer, max_length=512)
    prompt_length = full["labels"].count(-100)
    max_length = prompt_length + 3

    cut = encode_qa(tokenizer, question, answer, max_length=max_length)
    assert cut["truncated"]
    assert len(cut["input_ids"]) == len(cut["labels"]) == max_length
    assert cut["input_ids"] == full["input_ids"][:max_length]  # cut from the end
    assert cut["labels"][prompt_length:] == full["input_ids"][prompt_length:max_length]
    assert tokenizer.eos_token_id not in cut["input_ids"]

    exact = encode_qa(tokenizer, question, answer, max_length=len(full["input_ids"]))
    assert not exact["truncated"] and exact == full


def test_prompt_too_long_raises(tokenizer):
    question, answer = RECORDS[0]["question"], RECORDS[0]["answer"]
    prompt_length = encode_qa(tokenizer, question, answer, 512)["labels"].count(-100)
    assert encode_qa(tokenizer, question, answer, prompt_length + 1)["truncated"]
    with pytest.raises(DataError, match="no room"):
        encode_qa(tokenizer, question, answer, max_length=prompt_length)


def test_encode_split_counts_truncation_and_adds_context(tokenizer):
    encoded, truncated = encode_split(tokenizer, RECORDS, max_length=512, split_name="forget")
    assert len(encoded) == len(RECORDS) and truncated == 0

    longest_prompt = max(e["labels"].count(-100) for e in encoded)
    _, truncated = encode_split(tokenizer, RECORDS, longest_prompt + 1, "forget")
    assert truncated == len(RECORDS)

    records = RECORDS[:2] + [{"question": " ".join(["jane"] * 40), "answer": "paris"}]
    with pytest.raises(DataError, match=r"split 'forget', record 2"):
        encode_split(tokenizer, records, max_length=20, split_name="forget")


# --------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------


def test_collate_right_pads(tokenizer):
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = collate(examples, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for tensor in batch.values():
        assert tensor.dtype == torch.int64 and tensor.shape == (2, 3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_encoded_records(tokenizer):
    encoded, _ = encode_split(tokenizer, RECORDS, 64, "forget")
    batch = collate(encoded, tokenizer.pad_token_id)
    lengths = [len(e["input_ids"]) for e in encoded]
    assert batch["input_ids"].shape == (len(RECORDS), max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths


# --------------------------------------------------------------------------
# StepBatches
# --------------------------------------------------------------------------

# (micro_batch_size, micro_batches_per_step, world_size): all have G = 4.
LAYOUTS = [(4, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 1)]


def _step_union(batches: StepBatches, step: int) -> list[int]:
    """Everything every rank sees at ``step``, in stream-chunk order."""
    chunks = {}
    for rank in range(batches.world_size):
        for micro in range(batches.micro_batches_per_step):
            chunks[micro * batches.world_size + rank] = batches.micro_batch_indices(step, rank, micro)
    return [index for chunk in sorted(chunks) for index in chunks[chunk]]


@pytest.mark.parametrize("num_examples", [10, 3])
def test_step_batches_invariant_to_layout(num_examples):
    layouts = [StepBatches(num_examples, m, k, w, seed=123) for m, k, w in LAYOUTS]
    assert {b.global_batch_size for b in layouts} == {4}
    for step in range(12):
        reference = layouts[0].global_batch_indices(step)
        assert len(reference) == 4
        for batches in layouts:
            union = _step_union(batches, step)
            assert union == reference  # same order, hence same multiset
            assert Counter(union) == Counter(reference)


def test_step_batches_cover_each_epoch_exactly_once():
    # 10 examples, G = 4: steps 0-1 are epoch 0, step 2 crosses into epoch 1.
    batches = StepBatches(10, 2, 1, 2, seed=5)
    stream = [i for step in range(5) for i in batches.global_batch_indices(step)]
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each epoch is reshuffled
    crossing = batches.global_batch_indices(2)
    assert crossing == stream[8:12]


@pytest.mark.parametrize("num_examples", [24, 17])
def test_step_batches_ranks_disjoint_within_step(num_examples):
    batches = StepBatches(num_examples, 2, 2, 2, seed=0)  # G = 8 <= num_examples
    checked = 0
    for step in range(20):
        first_epoch = step * 8 // num_examples
        last_epoch = (step * 8 + 7) // num_examples
        if first_epoch != last_epoch:
            # A step straddling an epoch boundary draws from two permutations,
            # so it may legitimately repeat an example; only G | N avoids that.
            continue
        seen = []
        for rank in range(2):
            for micro in range(2):
                seen += batches.micro_batch_indices(step, rank, micro)
        assert len(seen) == len(set(seen)) == 8
        checked += 1
    assert checked >= 10


def test_step_batches_wrap_when_fewer_examples_than_batch():
    batches = StepBatches(3, 4, 1, 1, seed=1)  # G = 4 > 3
    for step in range(4):
        indices = batches.global_batch_indices(step)
        assert len(indices) == 4 and set(indices) <= {0, 1, 2}


def test_step_batches_random_access_matches_sequential():
    sequential = StepBatches(13, 2, 1, 2, seed=9)
    expected = [sequential.global_batch_indices(step) for step in range(40)]
    for step in (39, 0, 25, 7):
        fresh = StepBatches(13, 2, 1, 2, seed=9)  # empty cache: no replay needed
        assert fresh.global_batch_indices(step) == expected[step]


def test_step_batches_deterministic_and_seed_dependent():
    def run(seed):
        batches = StepBatches(50, 2, 2, 2, seed=seed)
        return [batches.micro_batch_indices(s, r, k) for s in range(10) for r in range(2) for k in range(2)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_step_batches_rejects_bad_arguments():
    with pytest.raises(ValueError):
        StepBatches(0, 1, 1, 1, seed=0)
    batches = StepBatches(10, 2, 2, 2, seed=0)
    with pytest.raises(ValueError):
        batches.micro_batch_indices(0, rank=2, micro_index=0)
    with pytest.raises(ValueError):
        batches.micro_batch_indices(0, rank=0, micro_index=2)
    with pytest.raises(ValueError):
        batches.micro_batch_indices(-1, rank=0, micro_index=0)


# --------------------------------------------------------------------------
# MUSE-style text records
# --------------------------------------------------------------------------


def test_text_and_verbmem_splits_load_and_name_missing_fields(tmp_path):
    (tmp_path / "forget_text.json").write_text(json.dumps([{"text": "jane doe was born in paris"}]))
    (tmp_path / "forget_verbmem.json").write_text(
        json.dumps([{"prompt": "jane doe", "gt": "was born in paris"}, {"prompt": "jane doe"}]))
    assert load_text_split(str(tmp_path), "forget_text") == [{"text": "jane doe was born in paris"}]
    with pytest.raises(DataError) as info:
        load_verbmem_split(str(tmp_path), "forget_verbmem")
    assert "record 1" in str(info.value) and "'gt'" in str(info.value)
    assert "forget_verbmem.json" in str(info.value)
    # QA records are not text records
    (tmp_path / "qa.json").write_text(json.dumps(RECORDS))
    with pytest.raises(DataError, match="'text'"):
        load_text_split(str(tmp_path), "qa")


def test_encode_text_trains_on_every_token_after_bos(tokenizer):
    text = RECORDS[1]["answer"]
    encoded = encode_text(tokenizer, text, max_length=64)
    words = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"] == [tokenizer.bos_token_id] + words + [tokenizer.eos_token_id]
    assert encoded["labels"] == [-100] + words + [tokenizer.eos_token_id]
    assert not encoded["truncated"]
    cut = encode_text(tokenizer, text, max_length=4)
    assert cut["truncated"] and cut["input_ids"] == encoded["input_ids"][:4]
    assert cut["labels"] == encoded["labels"][:4]


def test_encode_split_mixes_qa_and_text_records(tokenizer):
    records = [RECORDS[1], {"text": RECORDS[2]["answer"]}]
    encoded, truncated = encode_split(tokenizer, records, 64, "mixed")
    assert truncated == 0
    assert encoded[0] == encode_qa(tokenizer, RECORDS[1]["question"], RECORDS[1]["answer"], 64)
    assert encoded[1] == encode_text(tokenizer, RECORDS[2]["answer"], 64)


def _padded_tokens(groups, lengths):
    return sum(len(g) * max(lengths[i] for i in g) for g in groups if g)


@pytest.mark.parametrize("lengths", [[5], [3, 3, 3], [30, 31, 29, 120, 28, 125, 33],
                                     [10, 20, 30, 40, 50], [7, 100, 7, 7, 7, 7, 7, 7],
                                     [10, 11], [40, 40, 41, 41]])
def test_length_cut_is_the_cheapest_two_way_cut_worth_a_forward(lengths):
    cut = length_cut(lengths, min_saving=0.3)
    whole = len(lengths) * max(lengths)
    # brute force over every threshold (each distinct length) and no cut
    costs = {t: _padded_tokens([[i for i, n in enumerate(lengths) if n <= t],
                                [i for i, n in enumerate(lengths) if n > t]], lengths)
             for t in sorted(set(lengths))[:-1]}
    best = min(costs, key=lambda t: (costs[t], t)) if costs else None
    if best is not None and costs[best] <= 0.7 * whole:
        assert cut == best and costs[cut] == min(costs.values())
    else:
        assert cut is None


def test_length_grouped_batches_run_the_same_forwards_on_every_rank():
    """Under ZeRO-3 every forward is collective: the pieces per step must agree across ranks
    even when one rank's rows are all short (it then runs a zero-weight piece)."""
    from ngdiff_ds.data.task import TaskData

    lengths = [12, 13, 12, 110, 14, 12, 13, 105, 12, 12, 12, 12]
    examples = [{"input_ids": [5] * n, "labels": [5] * n} for n in lengths]
    for micro, accum in ((1, 1), (2, 1), (1, 2), (3, 2)):
        batches = StepBatches(len(examples), micro, accum, 2, seed=0)
        data = TaskData("mixed", examples, batches, pad_token_id=0)
        for step in range(12):
            per_rank = [data.length_grouped_batches(step, rank, "cpu") for rank in (0, 1)]
            assert len(per_rank[0][0]) == len(per_rank[1][0]), (micro, accum, step)
            for pieces, weights in per_rank:
                assert sum(weights) == pytest.approx(1.0)
                assert sum(b["input_ids"].shape[0] for b, w in zip(pieces, weights) if w > 0) \
                    == micro * accum
