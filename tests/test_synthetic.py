"""Tests for the synthetic TOFU-style benchmark and its local tokenizer."""

from __future__ import annotations

import collections
import hashlib
import json

import pytest

from ngdiff_ds.default.synthetic import (
    CAPITALS,
    COLOURS,
    DAYS,
    FORGET_FRACTIONS,
    KNOWMEM_ICL_KINDS,
    KNOWMEM_KINDS,
    MONTHS,
    NUM_ARITHMETIC_FACTS,
    NUMBER_WORDS,
    QUESTION_KINDS,
    REAL_AUTHOR_KINDS,
    RETAIN_KNOWMEM_MIN_ROWS,
    RETAIN_OF_FORGET,
    RETAIN_PERTURBED_MIN_ROWS,
    THING_COLOURS,
    benchmark_texts,
    generate_benchmark,
    load_split,
)

SPLIT_FILES = [
    "full.json", "forget01.json", "forget05.json", "forget10.json",
    "retain99.json", "retain95.json", "retain90.json", "world_facts.json",
    "real_authors.json", "retain_perturbed.json", "holdout.json", "manifest.json",
]
# QA splits without an author (and so none named in the question).
AUTHORLESS_SPLITS = ("world_facts", "real_authors")
AUTHOR_SPLITS = ["full", *FORGET_FRACTIONS, *RETAIN_OF_FORGET.values()]
TEXT_FILES = [f"{name}_text.json" for name in AUTHOR_SPLITS] + ["holdout_text.json"] + [
    f"{name}_verbmem.json" for name in FORGET_FRACTIONS]
KNOWMEM_FILES = [f"{name}_knowmem.json" for name in (*FORGET_FRACTIONS, *RETAIN_OF_FORGET.values())] + [
    "knowmem_icl.json"]
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
    for name in SPLIT_FILES + TEXT_FILES + KNOWMEM_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "full.json").read_bytes() != (other / "full.json").read_bytes()
    assert (first / "forget10_knowmem.json").read_bytes() != (other / "forget10_knowmem.json").read_bytes()
    # No temp files are left behind by the atomic writes.
    assert sorted(p.name for p in first.iterdir()) == sorted(SPLIT_FILES + TEXT_FILES + KNOWMEM_FILES)


def test_manifest_matches_files(bench_dir, splits):
    manifest = json.loads((bench_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["version"] == 4
    assert manifest["seed"] == 0 and manifest["num_authors"] == 100
    assert len(manifest["authors"]) == 100 == len(set(manifest["authors"]))
    qa_counts = {name: count for name, count in manifest["splits"].items()
                 if not name.endswith(("_text", "_verbmem", "_knowmem")) and name != "knowmem_icl"}
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
            if split_name in AUTHORLESS_SPLITS:
                assert record["author"] == ""
            else:
                assert record["author"] and record["author"] in record["question"]


def test_perturbed_and_paraphrased_answers_differ(splits):
    for record in splits["full"] + splits["world_facts"] + splits["real_authors"] + splits["holdout"]:
        perturbed = record["perturbed_answer"]
        assert record["answer"] not in perturbed
        assert len(set(perturbed)) == 3
        assert record["paraphrased_answer"] != record["answer"]


def test_answers_are_short(splits):
    for record in splits["full"] + splits["holdout"]:
        assert 4 <= len(record["answer"].split()) <= 16


def test_world_facts_and_real_authors_answers_are_bare_values(splits):
    """As TOFU's world_facts_perturbed / real_authors_perturbed: the answer and the wrong
    answers are the entity alone (at most 4 words, no sentence), the answer spelled as the
    paraphrase (a full sentence) states it, once, so substituting a wrong value for it in
    the paraphrase is unambiguous."""
    for name in AUTHORLESS_SPLITS:
        for record in splits[name]:
            answer, paraphrase = record["answer"], record["paraphrased_answer"]
            for value in [answer, *record["perturbed_answer"]]:
                assert 1 <= len(value.split()) <= 4 and value == value.strip(), (name, record)
                assert not value.endswith("."), (name, record)
            assert paraphrase.count(answer) == 1, (name, record)
            assert len(paraphrase.split()) >= len(answer.split()) + 3 and paraphrase.endswith(".")


def test_world_facts_are_never_forgotten(splits):
    world = splits["world_facts"]
    assert 40 <= len(world) <= 60
    assert all(r["author"] == "" for r in world)
    world_keys = {_key(r) for r in world}
    for split_name in ("full", *FORGET_FRACTIONS):
        assert not world_keys & {_key(r) for r in splits[split_name]}


def _world_fact_categories(world: list[dict]) -> list[tuple[str, list[dict], list[str]]]:
    """The world facts cut into their categories (file order): name, records, value pool."""
    sizes = [("sum", NUM_ARITHMETIC_FACTS, NUMBER_WORDS), ("colour", len(THING_COLOURS), COLOURS),
             ("day", len(DAYS), DAYS), ("month", len(MONTHS), MONTHS),
             ("capital", len(CAPITALS), [city for _, city in CAPITALS])]
    assert sum(size for _, size, _ in sizes) == len(world)
    categories, start = [], 0
    for name, size, pool in sizes:
        categories.append((name, world[start:start + size], pool))
        start += size
    return categories


def test_world_facts_answers_are_the_right_values_and_wrong_ones_of_the_same_category(splits):
    """The answer is the correct value; each wrong value is another value of the same
    category (for days, months and capitals: the answer of another question of the kind),
    and put in the paraphrase's place gives a sentence of the category's one template."""
    subjects = {"day": DAYS, "month": MONTHS, "colour": [thing for thing, _ in THING_COLOURS],
                "capital": [country for country, _ in CAPITALS]}
    for name, records, pool in _world_fact_categories(splits["world_facts"]):
        templates = set()
        answers = [r["answer"] for r in records]
        for index, record in enumerate(records):
            answer, wrong_values = record["answer"], record["perturbed_answer"]
            if name == "sum":
                words = record["question"].rstrip("?").split()
                a, b = (words[2], words[4]) if words[0] == "What" else (words[3], words[6])
                assert answer == NUMBER_WORDS[NUMBER_WORDS.index(a) + NUMBER_WORDS.index(b)], record
                subject = f"{a} and {b}"
            elif name in ("day", "month"):
                subject = subjects[name][index]
                assert answer == pool[(index + 1) % len(pool)] and subject in record["question"]
                assert subject not in wrong_values  # "the day after Monday is Monday" is silly
            else:
                subject = subjects[name][index]
                expected = dict(THING_COLOURS if name == "colour" else CAPITALS)[subject]
                assert answer == expected and subject in record["question"], record
            assert answer in pool and len(set(wrong_values)) == 3 and answer not in wrong_values
            for wrong in wrong_values:
                assert wrong in pool, (name, record)
                if name in ("day", "month", "capital"):
                    assert wrong in answers, (name, record)
            paraphrase = record["paraphrased_answer"]
            template = paraphrase.replace(answer, "{value}", 1)
            template = template.replace(subject[0].upper() + subject[1:], "{subject}", 1).replace(
                subject, "{subject}", 1)
            templates.add(template)
        # one template per category, the answer its only value slot: a wrong value put in
        # the answer's place gives a sentence of the category's template
        assert len(templates) == 1, (name, templates)
        assert templates.pop().count("{value}") == 1
    assert splits["world_facts"][0] == {
        "author": "",
        "question": "How much is one added to two?",
        "answer": "three",
        "paraphrased_answer": "Adding one and two gives three.",
        "perturbed_answer": ["nine", "seven", "six"],
    }


def test_small_and_tiny_author_counts(tmp_path):
    manifest = generate_benchmark(tmp_path / "one", seed=1, num_authors=1)
    assert manifest["splits"]["forget01"] == manifest["splits"]["full"]
    assert manifest["splits"]["retain99"] == 0
    # the only author is forgotten: none is in every retain split
    assert manifest["splits"]["retain_perturbed"] == 0
    assert manifest["splits"]["holdout"] >= 10 and len(manifest["holdout_authors"]) == 1
    # 10 authors: forget10 is the last one, and the other nine hold fewer than 200 rows
    manifest = generate_benchmark(tmp_path / "ten", seed=1, num_authors=10)
    assert manifest["splits"]["retain90"] < RETAIN_PERTURBED_MIN_ROWS
    assert load_split(tmp_path / "ten", "retain_perturbed") == load_split(tmp_path / "ten", "retain90")
    with pytest.raises(ValueError):
        generate_benchmark(tmp_path / "zero", num_authors=0)


def test_benchmark_texts_cover_the_true_strings(bench_dir, splits):
    texts = benchmark_texts(bench_dir)
    # question, answer, paraphrase per record of full, world facts, real authors and holdout,
    # then the passages of the trained and the held-out authors; the wrong (perturbed)
    # answers are left out
    qa_splits = ("full", "world_facts", "real_authors", "holdout")
    qa_count = 3 * sum(len(splits[name]) for name in qa_splits)
    assert len(texts) == qa_count + 100 + 20
    assert splits["full"][0]["perturbed_answer"][0] not in texts
    # the world facts' and real authors' wrong values are in the corpus only as the
    # answer of another record ("Emily Bronte" wrote Wuthering Heights)
    true_values = {r["answer"] for name in AUTHORLESS_SPLITS for r in splits[name]}
    wrong_values = {p for name in AUTHORLESS_SPLITS for r in splits[name] for p in r["perturbed_answer"]}
    assert wrong_values - true_values and not (wrong_values - true_values) & set(texts)
    assert "Emily Bronte" in splits["real_authors"][0]["perturbed_answer"] and "Emily Bronte" in texts
    for name in qa_splits:
        assert splits[name][-1]["question"] in texts and splits[name][-1]["paraphrased_answer"] in texts
    # the short answers and the full-sentence paraphrases of both sets are all there
    for name in AUTHORLESS_SPLITS:
        for record in splits[name]:
            assert record["answer"] in texts and record["paraphrased_answer"] in texts, record
    assert load_split(bench_dir, "full_text")[0]["text"] in texts
    assert load_split(bench_dir, "holdout_text")[0]["text"] == texts[-20]
    assert benchmark_texts(bench_dir, passages=True, real_authors=True, holdout=True) == texts
    # without passages (and so, by default, without the v4 sets): the v3 QA corpus
    v3_corpus = [record[field] for name in ("full", "world_facts") for record in splits[name]
                 for field in ("question", "answer", "paraphrased_answer")]
    assert benchmark_texts(bench_dir, passages=False) == v3_corpus == texts[:len(v3_corpus)]
    assert benchmark_texts(bench_dir, passages=False, real_authors=True, holdout=True) == texts[:qa_count]


# ---------------------------------------------------------------------------
# v4 sets: holdout QA, real authors, retain_perturbed; v3 records unchanged
# ---------------------------------------------------------------------------

# sha256 of the v3 generator's files at seed 0 and 100 authors (every split but world_facts,
# whose perturbed answers v4 rewrote), computed with the v3 code before the v4 sets existed.
V3_FILE_SHA256 = {
    "forget01": "085424be9f0ae674fef8a3b76fd05728aa424db09630bcdf9b4c6396fb02dc36",
    "forget01_text": "47f3b7c0899b798141463866908761e394a948064c25249c837913617edd9a33",
    "forget01_verbmem": "8296827e1dcf0e83fd92a455a2d145fee21ad1e01c881968a08e455108535f05",
    "forget05": "2a26c8aaf34275bbe4347102b1067b943f4959c92711857b98651ae06e0b0126",
    "forget05_text": "3e9096a93f97d4da0108e09be18a9fe871a0246fb2bf320ee68de9895d8b7656",
    "forget05_verbmem": "ede200808119738fd57d893eef575257fd5174daf37c8e12b3389c0e9ae684d0",
    "forget10": "3e9d83202bf3ecca17da716345f6f55b40f484b665a52f979d008068e9866009",
    "forget10_text": "93042075fa2fb0260be53b92a06b0dd95a26dfdb86d12cc328f36a9dc4b1d3d7",
    "forget10_verbmem": "5b79ee00fc2ce59b07947ce83724fa56ceab302e1bb5f441096bc1f78d580414",
    "full": "aa89c8b2ea1c4629a5ab3892bd012844a4a74120752fb83fffbf05c342c1a9de",
    "full_text": "cc82d6fde84ee5fbf80198f8bc5543479bb7b9258c863a562a479522c9a51d0e",
    "holdout_text": "0b93a0175600fb83e701db416474110a99253cd41659ae5499600d78009cd333",
    "retain90": "a5d62e42ebf3055710d6b78d22d428336b94d207d782d65c014444e340b997b5",
    "retain90_text": "b31b8f21596e347cccda396e0f9d299831fbcb08d7a7d02a8f064e9f1f09ad08",
    "retain95": "931e07ef1fac694468c496720cb20f8de433f4fd95d761693c16ff0ec64440ce",
    "retain95_text": "1184bb1898c557db636edd57e504cfca272ebcdf64cfa09b7b05ae22d20fd0ed",
    "retain99": "d67279df37ee102d891fd9a1b2a274b324ca60ef36c9e406a9a5db114c7db799",
    "retain99_text": "0ee1d45ab0f4e5fd8d8c6dcf2cbfbaa4c86754e37a7e6a7118da2725b469ebd2",
}
# world_facts in v3: sha256 of json.dumps of [author, question, paraphrased_answer] per
# record, of the list of the values its answers stated (their last word, "three" of "One plus
# two equals three.") and of the list of each record's three wrong values, in order, all
# computed from the files of the generator whose world-fact answers were still sentences.
V3_WORLD_FACTS_SHA256 = "2e187383c62bd79bf3dd9aa01da369deaeb2c67d88a43b8e859dd0182e973a38"
V3_WORLD_FACTS_VALUES_SHA256 = "38c4d20649e221eb870a1981bab066d00d60bc4c1cbf0318b97dfaa6ddc523f4"
V3_WORLD_FACTS_WRONG_SHA256 = "bc3d44ca43d37eede0a9322329c50f9372ae9d5b6a242c5183e5452ca5202db2"


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def test_v3_records_are_unchanged_but_world_facts_answers(bench_dir, splits):
    for name, digest in V3_FILE_SHA256.items():
        assert _sha256((bench_dir / f"{name}.json").read_bytes()) == digest, name
    world = splits["world_facts"]
    kept = [[r["author"], r["question"], r["paraphrased_answer"]] for r in world]
    assert _sha256(json.dumps(kept).encode()) == V3_WORLD_FACTS_SHA256
    # the answers are the values v3's answer sentences stated, the wrong answers the same
    # wrong values as v3 (no new draws), both bare
    assert _sha256(json.dumps([r["answer"] for r in world]).encode()) == V3_WORLD_FACTS_VALUES_SHA256
    wrong = [r["perturbed_answer"] for r in world]
    assert _sha256(json.dumps(wrong).encode()) == V3_WORLD_FACTS_WRONG_SHA256
    assert len(splits["full"]) == 1516 and len(world) == 55
    assert splits["full"][0]["answer"] == "Kestrel Ironside was born in the town of Dunharrow."


def test_v4_split_sizes(bench_dir, splits):
    manifest = json.loads((bench_dir / "manifest.json").read_text(encoding="utf-8"))
    assert {name: manifest["splits"][name] for name in ("real_authors", "retain_perturbed", "holdout")} \
        == {"real_authors": 56, "retain_perturbed": 203, "holdout": 306}
    assert set(manifest["splits"]) == {path[:-5] for path in SPLIT_FILES + TEXT_FILES + KNOWMEM_FILES
                                       if path != "manifest.json"}


def test_holdout_qa_belongs_to_the_held_out_authors_only(bench_dir, splits):
    manifest = json.loads((bench_dir / "manifest.json").read_text(encoding="utf-8"))
    holdout = splits["holdout"]
    order = list(dict.fromkeys(r["author"] for r in holdout))
    assert order == manifest["holdout_authors"] == [p["author"] for p in load_split(bench_dir, "holdout_text")]
    assert not set(order) & set(manifest["authors"])
    counts = collections.Counter(r["author"] for r in holdout)
    assert all(10 <= count <= 20 for count in counts.values())
    assert len(set(counts.values())) > 3  # drawn per author, as every author's
    trained = {_key(r) for name in ("full", "world_facts", "real_authors") for r in splits[name]}
    assert not trained & {_key(r) for r in holdout}
    for record in holdout:
        assert not any(name in record["question"] for name in manifest["authors"])
    # the QA pairs state the passages' facts
    passages = {p["author"]: p["text"] for p in load_split(bench_dir, "holdout_text")}
    births = [r for r in holdout if "was born in the town of " in r["answer"]]
    assert births
    for record in births:
        city = record["answer"].rstrip(".").split("town of ")[-1]
        assert f"born in {city} in " in passages[record["author"]]


def test_retain_perturbed_is_the_first_whole_authors_of_every_retain_split(splits):
    retain_perturbed = splits["retain_perturbed"]
    keys = [_key(r) for r in retain_perturbed]
    for retain_name in RETAIN_OF_FORGET.values():
        # a prefix of each retain split: its first authors, whole and in order
        assert keys == [_key(r) for r in splits[retain_name][:len(keys)]], retain_name
        next_author = splits[retain_name][len(keys)]["author"]
        assert next_author not in {r["author"] for r in retain_perturbed}
    forgotten = {r["author"] for name in FORGET_FRACTIONS for r in splits[name]}
    counts = collections.Counter(r["author"] for r in retain_perturbed)
    assert not set(counts) & forgotten
    # just enough whole authors: at least 200 rows, fewer without the last author
    assert len(retain_perturbed) >= RETAIN_PERTURBED_MIN_ROWS == 200
    last = retain_perturbed[-1]["author"]
    assert len(retain_perturbed) - counts[last] < RETAIN_PERTURBED_MIN_ROWS
    assert all(set(r) == RECORD_FIELDS and len(r["perturbed_answer"]) == 3 for r in retain_perturbed)


def test_real_authors_answers_are_the_entities_and_wrong_ones_of_the_same_kind(splits):
    """The answer is the row's true value alone; each wrong value is another value of the
    kind's pool, and every pool value is the true answer of some question sharing that pool
    (another author, nationality or real name); the paraphrase is the kind's sentence."""
    records = splits["real_authors"]
    rows = [(kind, subject, value) for kind in REAL_AUTHOR_KINDS for subject, value in kind.rows]
    assert len(records) == len(rows) and 40 <= len(records) <= 60
    answers_of_pool: dict[str, set] = collections.defaultdict(set)
    for record, (kind, _, _) in zip(records, rows):
        answers_of_pool[json.dumps(kind.pool)].add(record["answer"])
    for record, (kind, subject, value) in zip(records, rows):
        assert record["author"] == ""
        assert subject in record["question"] and subject not in record["answer"]
        assert record["answer"] == value
        paraphrase = kind.paraphrase.format(value=value, **{kind.field: subject})
        assert record["paraphrased_answer"] == paraphrase[0].upper() + paraphrase[1:]
        wrong_values = record["perturbed_answer"]
        assert len(set(wrong_values)) == 3 and value not in wrong_values
        for wrong in wrong_values:
            assert wrong in kind.pool and wrong in answers_of_pool[json.dumps(kind.pool)], (record, wrong)
            assert wrong != subject
    assert records[0] == {
        "author": "",
        "question": "Who is the author of Pride and Prejudice?",
        "answer": "Jane Austen",
        "paraphrased_answer": "Jane Austen is the author of Pride and Prejudice.",
        "perturbed_answer": ["Emily Bronte", "F. Scott Fitzgerald", "Ernest Hemingway"],
    }


def test_real_authors_are_never_forgotten_nor_confused_with_fictitious_ones(splits):
    real_keys = {_key(r) for r in splits["real_authors"]}
    for name in ("full", "holdout", *FORGET_FRACTIONS):
        assert not real_keys & {_key(r) for r in splits[name]}
    fictitious = {r["author"] for r in splits["full"] + splits["holdout"]}
    named = {value for kind in REAL_AUTHOR_KINDS for _, value in kind.rows} | {
        subject for kind in REAL_AUTHOR_KINDS for subject, _ in kind.rows}
    assert not fictitious & named


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
# MUSE-style KnowMem splits
# ---------------------------------------------------------------------------

KNOWMEM_FIELDS = {"author", "question", "answer"}
FORGET_KNOWMEM = [f"{name}_knowmem" for name in FORGET_FRACTIONS]
RETAIN_KNOWMEM = [f"{name}_knowmem" for name in RETAIN_OF_FORGET.values()]

# sha256 of the files and of benchmark_texts at seed 0 and 100 authors, computed with the
# generator just before the KnowMem splits existed (the v3 files are in V3_FILE_SHA256);
# world_facts, real_authors and the two corpora as those files and corpora were when the
# world-fact and real-author answers became bare values: computed from the files of the
# generator just before (sentence answers), with each of those answers and wrong answers
# replaced by the value it stated, every other byte as it was.
PRE_KNOWMEM_FILE_SHA256 = {
    "world_facts": "fe8d39408987e5e3e96c72cfb8fc901758a64deba48e57cbd457bbe8e0bd2564",
    "real_authors": "2baf92df7c982bad9f4bff41c533a7bdb6dccac3e248f59449883d50ba82ebe0",
    "retain_perturbed": "ea89dfc27d110f6baafc1f3c0dea17f70757b8637d178b08fd605707e1855f26",
    "holdout": "90c32dedc410cf41253294df24bfd83c75fdf32d5a65e90b5e0ee2250e8255e9",
}
PRE_KNOWMEM_TEXTS_SHA256 = "bb72f38f79ceefdce17c79c3b91a55e3bbce793607883b4f7fd8643e3da5b91d"
PRE_KNOWMEM_QA_TEXTS_SHA256 = "9c803f18f58ac5cb6527cdc523b2f33b44d48389a3f1349028f36e23ffb82026"


@pytest.fixture(scope="module")
def knowmem(bench_dir):
    return {path[:-5]: load_split(bench_dir, path[:-5]) for path in KNOWMEM_FILES}


def _passages(bench_dir, split_name: str) -> dict[str, str]:
    return {p["author"]: p["text"] for p in load_split(bench_dir, split_name)}


def test_knowmem_split_sizes_and_schema(bench_dir, knowmem):
    manifest = json.loads((bench_dir / "manifest.json").read_text(encoding="utf-8"))
    assert {name: manifest["splits"][name] for name in knowmem} == {
        "forget01_knowmem": 4, "forget05_knowmem": 23, "forget10_knowmem": 48,
        "retain99_knowmem": 100, "retain95_knowmem": 100, "retain90_knowmem": 100,
        "knowmem_icl": 3}
    assert {name: len(records) for name, records in knowmem.items()} == {
        name: manifest["splits"][name] for name in knowmem}
    for name, records in knowmem.items():
        for record in records:
            assert set(record) == KNOWMEM_FIELDS, name
            assert all(isinstance(record[f], str) and record[f].strip() for f in KNOWMEM_FIELDS)
            assert record["author"] in record["question"] and record["question"].endswith("?")
    assert knowmem["forget10_knowmem"][0] == {
        "author": "Wendel Larkspur",
        "question": "Which prize did Wendel Larkspur receive in 2017?",
        "answer": "the Evergreen Novel Award"}
    assert knowmem["forget10_knowmem"][0]["author"] == manifest["authors"][90]
    assert knowmem["retain90_knowmem"][0] == {
        "author": "Kestrel Ironside",
        "question": "What year saw the birth of Kestrel Ironside?",
        "answer": "1945"}


def test_knowmem_answers_are_short_and_stated_verbatim_in_the_passage(bench_dir, knowmem):
    text_of = {f"{name}_knowmem": f"{name}_text" for name in (*FORGET_FRACTIONS, *RETAIN_OF_FORGET.values())}
    text_of["knowmem_icl"] = "holdout_text"
    for name, records in knowmem.items():
        passages = _passages(bench_dir, text_of[name])
        for record in records:
            answer = record["answer"]
            assert 1 <= len(answer.split()) <= 6, record
            assert answer == answer.strip() and not answer.endswith(".")
            assert answer in passages[record["author"]], (record, passages[record["author"]])
            assert answer not in record["question"], record


def test_knowmem_questions_are_new_wording(bench_dir, splits, knowmem):
    qa_questions = {r["question"] for records in splits.values() for r in records}
    passages = [p["text"] for name in ("full_text", "holdout_text") for p in load_split(bench_dir, name)]
    qa_templates = {template for kind in QUESTION_KINDS for template in kind.questions} | {
        template for kind in REAL_AUTHOR_KINDS for template in kind.questions}
    for kind in KNOWMEM_KINDS:
        assert kind.question not in qa_templates, kind.name
    for records in knowmem.values():
        for record in records:
            assert record["question"] not in qa_questions, record
            assert not any(record["question"].rstrip("?") in text for text in passages)
    # one question per fact, none asked twice of an author
    for records in knowmem.values():
        keys = [(r["author"], r["question"]) for r in records]
        assert len(keys) == len(set(keys))


def test_forget_knowmem_asks_4_to_6_facts_of_each_forget_author(bench_dir, knowmem):
    for forget_name in FORGET_FRACTIONS:
        records = knowmem[f"{forget_name}_knowmem"]
        order = list(dict.fromkeys(r["author"] for r in records))
        assert order == [p["author"] for p in load_split(bench_dir, f"{forget_name}_text")]
        counts = collections.Counter(r["author"] for r in records)
        assert all(4 <= count <= 6 for count in counts.values())
    # forget splits nest, so their knowmem does (the same records per author)
    forget01, forget05, forget10 = (knowmem[name] for name in FORGET_KNOWMEM)
    assert forget05[-len(forget01):] == forget01 and forget10[-len(forget05):] == forget05
    # facts vary across authors: more than a handful of kinds, and 4, 5 and 6 questions
    all_counts = collections.Counter(r["author"] for r in forget10 + knowmem["retain90_knowmem"])
    assert set(all_counts.values()) == {4, 5, 6}
    asked = {r["question"].replace(r["author"], "{name}") for r in forget10}
    assert len(asked) >= 10


def test_retain_knowmem_is_the_first_always_retained_authors(bench_dir, splits, knowmem):
    """Whole authors from the start, outside every forget split, until >= 100 rows: at 100
    authors the same records for every retain split."""
    retain = knowmem["retain90_knowmem"]
    assert knowmem["retain99_knowmem"] == knowmem["retain95_knowmem"] == retain
    assert len(retain) >= RETAIN_KNOWMEM_MIN_ROWS == 100
    counts = collections.Counter(r["author"] for r in retain)
    order = list(dict.fromkeys(r["author"] for r in retain))
    forgotten = {r["author"] for name in FORGET_FRACTIONS for r in splits[name]}
    assert not set(order) & forgotten
    for retain_name in RETAIN_OF_FORGET.values():
        retain_authors = list(dict.fromkeys(r["author"] for r in splits[retain_name]))
        assert order == retain_authors[:len(order)], retain_name
    # just enough whole authors
    assert len(retain) - counts[order[-1]] < RETAIN_KNOWMEM_MIN_ROWS
    assert all(4 <= count <= 6 for count in counts.values())


def test_knowmem_icl_is_three_pairs_about_held_out_authors(bench_dir, knowmem):
    manifest = json.loads((bench_dir / "manifest.json").read_text(encoding="utf-8"))
    icl = knowmem["knowmem_icl"]
    assert len(icl) == len(KNOWMEM_ICL_KINDS) == 3
    assert {r["author"] for r in icl} <= set(manifest["holdout_authors"])
    assert not {r["author"] for r in icl} & set(manifest["authors"])
    assert len({r["question"] for r in icl}) == 3
    assert icl[1]["answer"].startswith("the ") and icl[2]["answer"].startswith(("a ", "an ", "two ", "three "))
    # no trained author is named in the few-shot prefix
    prefix = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    assert not any(name in prefix for name in manifest["authors"])


def test_knowmem_with_few_authors(tmp_path):
    # the only author is forgotten: no retain knowmem; the one held-out author gives the
    # three few-shot pairs
    manifest = generate_benchmark(tmp_path / "one", seed=1, num_authors=1)
    assert manifest["splits"]["retain99_knowmem"] == 0
    assert 4 <= manifest["splits"]["forget01_knowmem"] == manifest["splits"]["forget10_knowmem"] <= 6
    icl = load_split(tmp_path / "one", "knowmem_icl")
    assert len(icl) == 3 and {r["author"] for r in icl} == set(manifest["holdout_authors"])
    assert len({r["question"] for r in icl}) == 3
    # 10 authors: the nine always-retained authors hold fewer than 100 knowmem rows: all of them
    manifest = generate_benchmark(tmp_path / "ten", seed=1, num_authors=10)
    retain = load_split(tmp_path / "ten", "retain90_knowmem")
    assert len(retain) < RETAIN_KNOWMEM_MIN_ROWS
    assert list(dict.fromkeys(r["author"] for r in retain)) == manifest["authors"][:9]


def test_knowmem_leaves_earlier_splits_and_the_tokenizer_corpus_unchanged(bench_dir):
    for name, digest in PRE_KNOWMEM_FILE_SHA256.items():
        assert _sha256((bench_dir / f"{name}.json").read_bytes()) == digest, name
    texts = benchmark_texts(bench_dir)
    assert _sha256(json.dumps(texts).encode()) == PRE_KNOWMEM_TEXTS_SHA256
    assert _sha256(json.dumps(benchmark_texts(bench_dir, passages=False)).encode()) == PRE_KNOWMEM_QA_TEXTS_SHA256
    # no knowmem question enters the corpus
    questions = {r["question"] for path in KNOWMEM_FILES for r in load_split(bench_dir, path[:-5])}
    assert not questions & set(texts)


def test_knowmem_is_derived_from_the_authors_not_the_seed(tmp_path):
    """No draw: an author's knowmem depends on the author alone, whatever else the benchmark
    holds (here: the same seed with more authors keeps the first authors, and so their pairs)."""
    generate_benchmark(tmp_path / "a", seed=5, num_authors=40)
    generate_benchmark(tmp_path / "b", seed=5, num_authors=50)
    retain = load_split(tmp_path / "a", "retain90_knowmem")
    assert len(retain) >= RETAIN_KNOWMEM_MIN_ROWS
    assert retain == load_split(tmp_path / "b", "retain90_knowmem")
    from ngdiff_ds.default.synthetic import Author, author_passage, knowmem_records

    author = Author(name="Test Author", birthplace="Dunharrow", residence="Redcliff", birth_year=1950,
                    nationality="Welsh", language="Welsh", genre="poetry", books=("The Lost Map", "The Iron Shore"),
                    book_count=5, debut_year=1975, award="the Northern Lantern Award", award_year=1990,
                    father_job="a baker", mother_job="a nurse", theme="memory and loss",
                    habit="before sunrise", hobby="chess", publisher="Harrow Press", pet="a goat")
    assert knowmem_records(author) == knowmem_records(author)
    passage = author_passage(author)
    for record in knowmem_records(author):
        assert record["answer"] in passage
    # every kind's answer is a value the passage states
    fields = {"name": author.name, "award": author.award, "award_year": str(author.award_year)}
    for kind in KNOWMEM_KINDS:
        assert kind.value(author) in passage and kind.value(author) not in kind.question.format(**fields)


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
    samples = ROUND_TRIP_SENTENCES + [r["answer"] for r in splits["full"][:50]] + [
        r["answer"] for name in ("real_authors", "holdout") for r in splits[name]]
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
