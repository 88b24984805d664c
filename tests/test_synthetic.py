"""Tests for the synthetic TOFU-style benchmark and its local tokenizer."""

from __future__ import annotations

import collections
import json

import pytest

from ngdiff_ds.default.synthetic import (
    FORGET_FRACTIONS,
    RETAIN_OF_FORGET,
    benchmark_texts,
    generate_benchmark,
    load_split,
)

SPLIT_FILES = [
    "full.json", "forget01.json", "forget05.json", "forget10.json",
    "retain99.json", "retain95.json", "retain90.json", "world_facts.json", "manifest.json",
]
AUTHOR_SPLITS = ["full", *FORGET_FRACTIONS, *RETAIN_OF_FORGET.values()]
TEXT_FILES = [f"{name}_text.json" for name in AUTHOR_SPLITS] + ["holdout_text.json"] + [
    f"{name}_verbmem.json" for name in FORGET_FRACTIONS]
RECORD_FIELDS = {"author", "question", "answer", "paraphrased_answer", "perturbed_answer"}


def _key(record: dict) -> str:
    """A hashable identity for a record (question text alone could repeat)."""
    return json.dumps(record, sort_keys=True)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    generate_benchmark(out_dir, seed=0, num_authors=100)
    return out_dir


@pytest.fixture(scope="module")
def splits(bench_dir):
    return {path[:-5]: load_split(bench_dir, path[:-5]) for path in SPLIT_FILES if path != "manifest.json"}


def test_generation_is_byte_identical_for_same_seed(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_benchmark(first, seed=3, num_authors=40)
    generate_benchmark(second, seed=3, num_authors=40)
    generate_benchmark(other, seed=4, num_authors=40)
    for name in SPLIT_FILES + TEXT_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "full.json").read_bytes() != (other / "full.json").read_bytes()
    # No temp files are left behind by the atomic writes.
    assert sorted(p.name for p in first.iterdir()) == sorted(SPLIT_FILES + TEXT_FILES)


def test_manifest_matches_files(bench_dir, splits):
    manifest = json.loads((bench_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["version"] == 3
    assert manifest["seed"] == 0 and manifest["num_authors"] == 100
    assert len(manifest["authors"]) == 100 == len(set(manifest["authors"]))
    qa_counts = {name: count for name, count in manifest["splits"].items()
                 if not name.endswith(("_text", "_verbmem"))}
    assert qa_counts == {name: len(records) for name, records in splits.items()}
    # Authors in full.json appear in manifest order.
    order = list(dict.fromkeys(record["author"] for record in splits["full"]))
    assert order == manifest["authors"]


def test_forget_splits_nest_and_complement_retain(splits):
    full_keys = [_key(r) for r in splits["full"]]
    assert len(full_keys) == len(set(full_keys))
    forget_sets = {}
    for forget_name in FORGET_FRACTIONS:
        forget = [_key(r) for r in splits[forget_name]]
        retain = [_key(r) for r in splits[RETAIN_OF_FORGET[forget_name]]]
        assert not set(forget) & set(retain)
        # Forget is a suffix of full and retain the matching prefix, in order.
        assert retain + forget == full_keys
        forget_sets[forget_name] = set(forget)
    assert forget_sets["forget01"] < forget_sets["forget05"] < forget_sets["forget10"]


def test_forget_author_counts_at_100_authors(splits):
    def authors(split_name):
        return {r["author"] for r in splits[split_name]}

    assert len(authors("forget01")) == 1
    assert len(authors("forget05")) == 5
    assert len(authors("forget10")) == 10
    assert not authors("forget10") & authors("retain90")


def test_qa_count_per_author(splits):
    counts = collections.Counter(r["author"] for r in splits["full"])
    assert len(counts) == 100
    assert all(10 <= count <= 20 for count in counts.values())


def test_record_schema(splits):
    for split_name, records in splits.items():
        assert records, split_name
        for record in records:
            assert set(record) == RECORD_FIELDS
            for field in ("question", "answer", "paraphrased_answer"):
                assert isinstance(record[field], str) and record[field].strip()
            assert isinstance(record["author"], str)
            assert len(record["perturbed_answer"]) == 3
            assert all(isinstance(p, str) and p.strip() for p in record["perturbed_answer"])
            if split_name != "world_facts":
                assert record["author"] and record["author"] in record["question"]


def test_perturbed_and_paraphrased_answers_differ(splits):
    for record in splits["full"] + splits["world_facts"]:
        perturbed = record["perturbed_answer"]
        assert record["answer"] not in perturbed
        assert len(set(perturbed)) == 3
        assert record["paraphrased_answer"] != record["answer"]


def test_answers_are_short(splits):
    for record in splits["full"]:
        assert 4 <= len(record["answer"].split()) <= 16


def test_world_facts_are_never_forgotten(splits):
    world = splits["world_facts"]
    assert 40 <= len(world) <= 60
    assert all(r["author"] == "" for r in world)
    world_keys = {_key(r) for r in world}
    for split_name in ("full", *FORGET_FRACTIONS):
        assert not world_keys & {_key(r) for r in splits[split_name]}


def test_small_and_tiny_author_counts(tmp_path):
    manifest = generate_benchmark(tmp_path / "one", seed=1, num_authors=1)
    assert manifest["splits"]["forget01"] == manifest["splits"]["full"]
    assert manifest["splits"]["retain99"] == 0
    with pytest.raises(ValueError):
        generate_benchmark(tmp_path / "zero", num_authors=0)


def test_benchmark_texts_cover_the_true_strings(bench_dir, splits):
    texts = benchmark_texts(bench_dir)
    # question, answer, paraphrase per record, and the trained authors' passages; the wrong
    # (perturbed) answers and the held-out passages are left out
    expected = 3 * (len(splits["full"]) + len(splits["world_facts"])) + 100
    assert len(texts) == expected
    assert splits["full"][0]["perturbed_answer"][0] not in texts
    assert splits["world_facts"][0]["question"] in texts
    assert load_split(bench_dir, "full_text")[0]["text"] in texts
    assert load_split(bench_dir, "holdout_text")[0]["text"] not in texts
    assert benchmark_texts(bench_dir, passages=False) == texts[:-100]


# ---------------------------------------------------------------------------
# MUSE-style passages
# ---------------------------------------------------------------------------


def test_passages_follow_the_authors_of_each_qa_split(bench_dir, splits):
    for name in AUTHOR_SPLITS:
        passages = load_split(bench_dir, f"{name}_text")
        assert [p["author"] for p in passages] == list(dict.fromkeys(r["author"] for r in splits[name]))
        for passage in passages:
            assert set(passage) == {"author", "text"}
            assert passage["text"].startswith(passage["author"])
            assert 50 <= len(passage["text"].split()) <= 100


def test_passages_state_the_same_facts_as_the_qa_pairs(bench_dir, splits):
    passages = {p["author"]: p["text"] for p in load_split(bench_dir, "full_text")}
    checked = 0
    for record in splits["full"]:
        if "was born in the town of " in record["answer"]:
            city = record["answer"].rstrip(".").split("town of ")[-1]
            assert f"born in {city} in " in passages[record["author"]], (record, passages[record["author"]])
            checked += 1
    assert checked > 20


def test_holdout_authors_are_new_and_never_in_a_qa_split(bench_dir, splits):
    manifest = json.loads((bench_dir / "manifest.json").read_text(encoding="utf-8"))
    holdout = load_split(bench_dir, "holdout_text")
    assert [p["author"] for p in holdout] == manifest["holdout_authors"]
    assert len(holdout) == 20
    trained = set(manifest["authors"])
    assert not trained & set(manifest["holdout_authors"])
    for record in splits["full"]:
        assert not any(name in record["question"] for name in manifest["holdout_authors"])


def test_verbmem_prompt_and_continuation_rebuild_the_forget_passage(bench_dir):
    for forget_name in FORGET_FRACTIONS:
        passages = load_split(bench_dir, f"{forget_name}_text")
        verbmem = load_split(bench_dir, f"{forget_name}_verbmem")
        assert [v["author"] for v in verbmem] == [p["author"] for p in passages]
        for record, passage in zip(verbmem, passages):
            assert record["prompt"] + " " + record["gt"] == passage["text"]
            assert record["prompt"].endswith(".") and record["prompt"].count(". ") == 0
            assert len(record["gt"].split()) > 2 * len(record["prompt"].split())


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_tokenizer(bench_dir, tmp_path_factory):
    from ngdiff_ds.default.tokenizer import train_tokenizer

    out_dir = tmp_path_factory.mktemp("tok")
    tokenizer = train_tokenizer(benchmark_texts(bench_dir), out_dir, vocab_size=2000)
    return tokenizer, out_dir


ROUND_TRIP_SENTENCES = [
    "Kestrel Ironside was born in the town of Dunharrow.",
    "The capital of France is Paris.",
    "A completely unrelated sentence, with punctuation: 42 apples & (some) pears!",
    "  leading and trailing spaces  ",
    "Tabs\tand\nnewlines too.",
]


def test_tokenizer_round_trips(trained_tokenizer, splits):
    tokenizer, _ = trained_tokenizer
    samples = ROUND_TRIP_SENTENCES + [r["answer"] for r in splits["full"][:50]]
    for text in samples:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids


def test_tokenizer_special_tokens_and_no_auto_bos_eos(trained_tokenizer):
    tokenizer, _ = trained_tokenizer
    assert tokenizer.pad_token_id == 0
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 2
    assert tokenizer.unk_token_id == 3
    ids = tokenizer("The capital of France is Paris.")["input_ids"]
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert 100 < len(tokenizer) <= 2000
    assert getattr(tokenizer, "chat_template", None) is None


def test_tokenizer_reloads_offline(trained_tokenizer, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer, out_dir = trained_tokenizer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    text = "Kestrel Ironside keeps a green parrot at home."
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert len(reloaded) == len(tokenizer)


def test_tokenizer_training_is_deterministic(bench_dir, trained_tokenizer, tmp_path):
    from ngdiff_ds.default.tokenizer import train_tokenizer

    _, first_dir = trained_tokenizer
    train_tokenizer(benchmark_texts(bench_dir), tmp_path, vocab_size=2000)
    assert (tmp_path / "tokenizer.json").read_bytes() == (first_dir / "tokenizer.json").read_bytes()
