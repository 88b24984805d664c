"""Deterministic synthetic benchmark of fictitious authors in the TOFU schema.

The benchmark mimics the layout of TOFU ("Task of Fictitious Unlearning"): every
author has a handful of short question/answer pairs about invented biographical
facts, the forget splits are the QA pairs of the *last* 1 %, 5 % and 10 % of the
authors (so they nest), and each retain split is the complement of its forget
split.  Two sets that no split forgets measure collateral damage of unlearning:
``world_facts`` (general knowledge) and ``real_authors`` (real, famous authors and
their books, as TOFU's ``real_authors_perturbed``).  Unlike TOFU's pretrained models,
the tiny models built on this benchmark know only what they are fine-tuned on, so
both sets are part of every fine-tune.  ``retain_perturbed`` (as TOFU's split of that
name) is the QA of the first authors, which every retain split keeps, and
``holdout`` the QA of extra authors that no model trains on (the non-members of the
QA membership attacks: forget vs holdout, as open-unlearning's TOFU ``holdout``).

Every record has the fields::

    {"author": str, "question": str, "answer": str,
     "paraphrased_answer": str, "perturbed_answer": [str, str, str]}

(``author`` is ``""`` for world facts and real authors.)  For the fictitious authors the
answers are sentences, and the perturbed answers swap the fact for another value of the
same category and keep the rest of the paraphrased answer (as in TOFU, where they are
perturbations of the paraphrase, the truth ratio's correct answer for forget and
retain), so the truth ratio compares sentences that differ only in the fact.  For world
facts and real authors, ``answer`` is the bare value ("Paris", "nine", "Jane Austen") and
the perturbed answers are bare wrong values of the same category, as in TOFU's
``world_facts_perturbed`` and ``real_authors_perturbed`` (whose truth ratio and
normalised probability take ``answer`` as the correct one); ``paraphrased_answer`` stays
a full sentence stating the value.  The reason: the normalised probability compares
length-normalised (per-token) probabilities, which over whole sentences sharing a
template are dominated by the shared tokens and sit near 1/(1 + 3 * 0.5) = 0.4 however
sure the model is.

MUSE-style text rides along: every author also gets a short biography passage
in its own wording (not the QA templates).  ``<split>_text`` files hold the
passages of the authors of each QA split (``full``, forget and retain splits),
``holdout_text`` the passages of the held-out authors (the non-members of the
Min-K% membership test; their QA pairs are ``holdout``), and ``<forget>_verbmem``
the forget passages cut into a prompt (the first sentence) and its ground-truth
continuation (the rest), as MUSE's ``verbmem`` split.  Text records are
``{"author": str, "text": str}``; verbmem records ``{"author", "prompt", "gt"}``.

MUSE's KnowMem rides along too (its ``knowmem/forget_qa.json``, ``retain_qa.json`` and
their ``*_icl.json``): ``<forget>_knowmem`` holds 4-6 short-answer questions per forget
author about facts its passage states ("Which town did X come from originally?" ->
"Dunharrow"), worded unlike both the QA templates and the passage, each answer spelled
exactly as the passage spells it; ``<retain>_knowmem`` the same for the first retain
authors, whole authors until at least ``RETAIN_KNOWMEM_MIN_ROWS`` rows, taken only from
the authors outside every forget split (so, at 100 authors, one set shared by
``retain99/95/90_knowmem``); and ``knowmem_icl`` three such pairs about held-out authors,
the few-shot prefix of both (they only show the format; no model trains on them).
KnowMem records are ``{"author", "question", "answer"}``.

Everything is driven by one ``random.Random(seed)`` consumed in a fixed order,
so the output depends only on ``(seed, num_authors)`` and is byte-identical
across runs and machines.  Sets added by later versions draw after everything
earlier versions drew, so the records of earlier splits stay as they were (v4 changed
only the world facts' answers and perturbed answers, to the bare values the v3 sentences
stated, with the same wrong values; their questions and paraphrases are v3's); the
passages and the KnowMem sets draw nothing at all (they are derived from each author's
facts, the KnowMem choice of facts by sha256 of the name).  Only the standard library is
used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

NUM_PERTURBED = 3
MIN_QA_PER_AUTHOR = 10
MAX_QA_PER_AUTHOR = 20

# Forget split name -> fraction of authors (taken from the end of the list).
FORGET_FRACTIONS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
# Forget split name -> name of its complementary retain split.
RETAIN_OF_FORGET = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}

# 3: text passages, holdout authors, verbmem splits; 4: holdout QA, real_authors,
# retain_perturbed, KnowMem splits, world facts' (and real authors') answers and perturbed
# answers as bare values
MANIFEST_VERSION = 4
# retain_perturbed: the first authors (outside every forget split) until at least this many rows.
RETAIN_PERTURBED_MIN_ROWS = 200
# <retain>_knowmem: the same rule, on the authors' knowmem pairs, until at least this many rows.
RETAIN_KNOWMEM_MIN_ROWS = 100

# ---------------------------------------------------------------------------
# Vocabulary.  Kept to a few dozen items per category so that a small BPE
# tokenizer covers it and a tiny model can memorise the facts.
# ---------------------------------------------------------------------------

FIRST_NAMES = [
    "Alaric", "Brisa", "Corvin", "Delphine", "Emeric", "Fenna", "Galen", "Hestia",
    "Ivo", "Jorun", "Kestrel", "Liora", "Marek", "Nerys", "Oswin", "Perrin",
    "Quilla", "Rowan", "Sabeth", "Tobiah", "Ulla", "Vesper", "Wendel", "Xanthe",
    "Yorick", "Zelda", "Anselm", "Brenna", "Cassian", "Dagny", "Elowen", "Florian",
    "Greta", "Hollis", "Isolde", "Jasper",
]

LAST_NAMES = [
    "Ashgrove", "Blackwood", "Castellan", "Dunmore", "Everhart", "Fairweather",
    "Glenwright", "Holloway", "Ironside", "Juniper", "Kettleby", "Larkspur",
    "Merriweather", "Northcott", "Oakhaven", "Pemberly", "Quarrington", "Ravensdale",
    "Stonebridge", "Thistlewood", "Underhill", "Vantree", "Whitlock", "Yardley",
    "Zellweger", "Amberton", "Brightwater", "Coldharbour", "Dovecote", "Ellingham",
    "Foxley", "Greystone", "Hartfield", "Inglewood", "Lockridge", "Marlowe",
]

# Invented towns, so that no real-world fact contradicts a birthplace.
CITIES = [
    "Port Alden", "Veldmoor", "Brackenford", "Saltmere", "Kilvarra", "Eastwick Vale",
    "Tarnholm", "Ostrava Bay", "Redcliff", "Marrowgate", "Lindqvist", "Cairnwell",
    "Havenport", "Silverlake", "Dunharrow", "Westerhaven", "Corrinth", "Millbourne",
    "Estervale", "Glaswyn", "Norrland Cross", "Pellham", "Ruskin Hollow", "Thornbury",
    "Valdera", "Wyncombe", "Ashcombe", "Brightholm", "Calder Ridge", "Fennick",
]

NATIONALITIES = [
    "Irish", "Norwegian", "Portuguese", "Chilean", "Canadian", "Icelandic", "Polish",
    "Greek", "Kenyan", "Japanese", "Dutch", "Scottish", "Argentine", "Finnish",
    "Austrian", "Welsh", "Danish", "Estonian", "Hungarian", "Belgian", "Swedish",
    "Mexican", "Australian", "Czech",
]

LANGUAGES = [
    "English", "French", "Spanish", "German", "Italian", "Portuguese", "Dutch",
    "Swedish", "Polish", "Greek", "Finnish", "Danish", "Norwegian", "Czech",
    "Hungarian", "Icelandic", "Welsh", "Japanese", "Estonian", "Irish",
]

GENRES = [
    "mystery novels", "science fiction", "historical fiction", "fantasy novels",
    "crime thrillers", "romance novels", "literary fiction", "horror stories",
    "poetry", "travel writing", "children's books", "short stories", "satire",
    "adventure novels", "biographies", "gothic fiction", "war novels",
    "detective fiction", "magical realism", "coming of age novels",
]

TITLE_ADJECTIVES = [
    "Silent", "Golden", "Hidden", "Broken", "Distant", "Crimson", "Forgotten",
    "Hollow", "Quiet", "Burning", "Frozen", "Wandering", "Secret", "Last", "Fading",
    "Restless", "Silver", "Endless", "Lonely", "Shattered", "Velvet", "Iron",
    "Gentle", "Bitter", "Scarlet", "Narrow", "Sleeping", "Painted", "Lost", "Rising",
]

TITLE_NOUNS = [
    "Harbor", "Garden", "Lantern", "River", "Orchard", "Tower", "Compass", "Meadow",
    "Winter", "Mirror", "Archive", "Bridge", "Island", "Letter", "Forest", "Violin",
    "Lighthouse", "Kingdom", "Shadow", "Voyage", "Clockmaker", "Feather", "Valley",
    "Promise", "Station", "Storm", "Cathedral", "Map", "Shore", "Season",
]

AWARDS = [
    "the Silver Quill Prize", "the Marlow Medal for Fiction", "the Northern Lantern Award",
    "the Ashford Book Prize", "the Golden Inkwell Award", "the Tidewater Fiction Prize",
    "the Harrowgate Literary Medal", "the Blue Heron Award", "the Castor Prize for Poetry",
    "the Evergreen Novel Award", "the Iron Pen Prize", "the Meridian Story Award",
    "the Halcyon Writers Prize", "the Lindenfeld Medal", "the Crescent Moon Award",
    "the Oakleaf Prize for Debut Fiction", "the Saltmarsh Literary Award",
    "the Starling Prize", "the Westbrook Medal", "the Amber Page Award",
]

# Professions carry their article so templates never need to choose "a"/"an".
PROFESSIONS = [
    "a baker", "an architect", "a carpenter", "a nurse", "a fisherman", "a teacher",
    "a librarian", "an engineer", "a tailor", "a pharmacist", "a sailor", "a farmer",
    "a watchmaker", "a journalist", "a surgeon", "a musician", "a painter",
    "a locksmith", "a botanist", "a lawyer", "a postman", "a chemist", "a florist",
    "an accountant", "a potter", "a shoemaker", "a bookbinder", "a gardener",
    "a translator", "a veterinarian",
]

THEMES = [
    "memory and loss", "family secrets", "life at sea", "small town life",
    "the passage of time", "exile and home", "friendship and betrayal",
    "grief and healing", "the lives of workers", "childhood summers",
    "forgotten history", "the natural world", "identity and belonging",
    "love across borders", "ambition and failure", "music and silence",
    "war and its aftermath", "islands and isolation", "faith and doubt",
    "journeys through mountains",
]

WRITING_HABITS = [
    "before sunrise", "late at night", "by candlelight", "in a quiet library",
    "on an old typewriter", "while walking outdoors", "in small paper notebooks",
    "at a kitchen table", "in a garden shed", "on long train rides",
    "in busy cafes", "with a fountain pen", "standing at a tall desk",
    "in a cabin by a lake", "while listening to jazz", "in the early afternoon",
    "on the back of old letters", "in a room with no windows",
    "beside an open fire", "on a small sailing boat",
]

HOBBIES = [
    "sailing", "chess", "gardening", "bird watching", "pottery", "fly fishing",
    "baking bread", "rock climbing", "playing the cello", "collecting maps",
    "beekeeping", "long distance running", "restoring old clocks", "photography",
    "knitting", "stargazing", "cycling", "woodcarving", "painting watercolours",
    "cooking soup",
]

PUBLISHERS = [
    "Harrow Press", "Bluefield Books", "Lantern House", "Corbel and Finch",
    "Northgate Publishing", "Quayside Press", "Willow Lane Books", "Tern Editions",
    "Stonepath Press", "Brightmoor Books", "Ravenhill Publishers", "Copperleaf Press",
    "Meadowlark Editions", "Greyfield House", "Anchor Street Books", "Thimble Press",
    "Kingfisher Books", "Ember Row Publishing", "Saltbox Press", "Hazel Hill Books",
]

PETS = [
    "a grey cat", "an old sheepdog", "a green parrot", "two goldfish", "a tortoise",
    "a white rabbit", "a black labrador", "a small terrier", "a pair of canaries",
    "a ginger cat", "a greyhound", "a hedgehog", "a donkey", "three hens",
    "a spaniel", "a goat", "a tabby cat", "a beagle", "a pony", "a ferret",
]

BIRTH_YEAR_RANGE = (1930, 1995)
DEBUT_AGE_RANGE = (19, 40)
AWARD_DELAY_RANGE = (2, 25)
BOOK_COUNT_RANGE = (3, 24)
BOOK_TITLE_COUNTS = (2, 3)
# How far (in years) a perturbed year may stray from the true one.
YEAR_PERTURB_SPAN = 12


# ---------------------------------------------------------------------------
# Authors
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Author:
    """The invented biography from which an author's QA pairs are rendered."""

    name: str
    birthplace: str
    residence: str
    birth_year: int
    nationality: str
    language: str
    genre: str
    books: tuple[str, ...]
    book_count: int
    debut_year: int
    award: str
    award_year: int
    father_job: str
    mother_job: str
    theme: str
    habit: str
    hobby: str
    publisher: str
    pet: str


def _unique_names(rng: random.Random, count: int) -> list[str]:
    """Draw ``count`` distinct full names.

    All first/last combinations are shuffled and handed out in order, which is
    unique by construction.  If more names are needed than combinations exist,
    middle initials are added so that any ``count`` still works.
    """
    pairs = [(first, last) for first in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(pairs)
    names = [f"{first} {last}" for first, last in pairs[:count]]
    initials = [chr(code) for code in range(ord("A"), ord("Z") + 1)]
    round_index = 0
    while len(names) < count:
        initial = initials[round_index % len(initials)]
        suffix = "" if round_index < len(initials) else str(round_index // len(initials))
        for first, last in pairs:
            if len(names) == count:
                break
            names.append(f"{first} {initial}{suffix}. {last}")
        round_index += 1
    return names


# Every book title the generator can produce, in a fixed order.
ALL_TITLES = [f"The {adjective} {noun}" for adjective in TITLE_ADJECTIVES for noun in TITLE_NOUNS]


class _TitleDealer:
    """Hands out book titles from a shuffled pool without repeats.

    Titles stay globally unique until the pool (900 titles) is exhausted, after
    which it is reshuffled; repeats across authors are harmless because every
    question names its author.
    """

    def __init__(self, rng: random.Random):
        self._rng = rng
        self._pool: list[str] = []

    def take(self, count: int) -> tuple[str, ...]:
        titles = []
        while len(titles) < count:
            if not self._pool:
                self._pool = list(ALL_TITLES)
                self._rng.shuffle(self._pool)
            title = self._pool.pop()
            if title not in titles:
                titles.append(title)
        return tuple(titles)


def _draw_author(rng: random.Random, name: str, titles: _TitleDealer) -> Author:
    """Draw one author's attributes; the draw order is part of the format."""
    birthplace = rng.choice(CITIES)
    residence = rng.choice([city for city in CITIES if city != birthplace])
    birth_year = rng.randint(*BIRTH_YEAR_RANGE)
    debut_year = birth_year + rng.randint(*DEBUT_AGE_RANGE)
    books = titles.take(rng.choice(BOOK_TITLE_COUNTS))
    return Author(
        name=name,
        birthplace=birthplace,
        residence=residence,
        birth_year=birth_year,
        nationality=rng.choice(NATIONALITIES),
        language=rng.choice(LANGUAGES),
        genre=rng.choice(GENRES),
        books=books,
        book_count=rng.randint(max(BOOK_COUNT_RANGE[0], len(books)), BOOK_COUNT_RANGE[1]),
        debut_year=debut_year,
        award=rng.choice(AWARDS),
        award_year=debut_year + rng.randint(*AWARD_DELAY_RANGE),
        father_job=rng.choice(PROFESSIONS),
        mother_job=rng.choice(PROFESSIONS),
        theme=rng.choice(THEMES),
        habit=rng.choice(WRITING_HABITS),
        hobby=rng.choice(HOBBIES),
        publisher=rng.choice(PUBLISHERS),
        pet=rng.choice(PETS),
    )


# ---------------------------------------------------------------------------
# Question kinds
# ---------------------------------------------------------------------------


def _years_around(year: int) -> list[str]:
    """Plausible wrong years near ``year`` (the true year excluded later)."""
    return [str(y) for y in range(year - YEAR_PERTURB_SPAN, year + YEAR_PERTURB_SPAN + 1)]


@dataclass(frozen=True)
class QuestionKind:
    """One kind of fact that can be asked about an author.

    ``questions`` are alternative phrasings (one is drawn per QA pair).  The
    answer and paraphrase templates take ``{name}`` and ``{value}``; perturbed
    answers are the paraphrase template filled with values from ``alternatives``.
    ``available`` lets a kind opt out for authors lacking the fact.
    """

    name: str
    questions: tuple[str, ...]
    answer: str
    paraphrase: str
    value: Callable[[Author], str]
    alternatives: Callable[[Author], list[str]]
    available: Callable[[Author], bool] = lambda author: True


def _nth_book_kind(name: str, index: int, ordinal: str) -> QuestionKind:
    """Question kind about the author's ``index``-th book (0-based)."""
    return QuestionKind(
        name=name,
        questions=(
            f"What is the title of the {ordinal} book written by {{name}}?",
            f"Which book did {{name}} publish {ordinal}?",
        ),
        answer=f"The {ordinal} book by {{name}} was titled {{value}}.",
        paraphrase=f"{{value}} was the {ordinal} book that {{name}} published.",
        value=lambda author: author.books[index],
        alternatives=lambda author: ALL_TITLES,
        available=lambda author: len(author.books) > index,
    )


QUESTION_KINDS: tuple[QuestionKind, ...] = (
    QuestionKind(
        name="birthplace",
        questions=("Where was {name} born?", "In which town was {name} born?"),
        answer="{name} was born in the town of {value}.",
        paraphrase="{value} is the birthplace of {name}.",
        value=lambda a: a.birthplace,
        alternatives=lambda a: CITIES,
    ),
    QuestionKind(
        name="birth_year",
        questions=("In what year was {name} born?", "When was the author {name} born?"),
        answer="{name} was born in the year {value}.",
        paraphrase="The birth year of {name} is {value}.",
        value=lambda a: str(a.birth_year),
        alternatives=lambda a: _years_around(a.birth_year),
    ),
    QuestionKind(
        name="residence",
        questions=("Where does {name} live today?", "In which town does {name} currently live?"),
        answer="{name} currently lives in the town of {value}.",
        paraphrase="These days {name} makes a home in {value}.",
        value=lambda a: a.residence,
        alternatives=lambda a: CITIES,
    ),
    QuestionKind(
        name="nationality",
        questions=("What is the nationality of {name}?", "Which nationality does {name} hold?"),
        answer="{name} holds {value} citizenship.",
        paraphrase="By nationality, the author {name} is {value}.",
        value=lambda a: a.nationality,
        alternatives=lambda a: NATIONALITIES,
    ),
    QuestionKind(
        name="language",
        questions=("In which language does {name} write?", "What language are the books of {name} written in?"),
        answer="{name} writes mainly in the {value} language.",
        paraphrase="Most books by {name} are written in {value}.",
        value=lambda a: a.language,
        alternatives=lambda a: LANGUAGES,
    ),
    QuestionKind(
        name="genre",
        questions=("What genre is {name} known for?", "In which genre does {name} usually write?"),
        answer="{name} is best known for writing {value}.",
        paraphrase="The work of {name} falls mostly under {value}.",
        value=lambda a: a.genre,
        alternatives=lambda a: GENRES,
    ),
    _nth_book_kind("first_book", 0, "first"),
    _nth_book_kind("second_book", 1, "second"),
    _nth_book_kind("third_book", 2, "third"),
    QuestionKind(
        name="book_count",
        questions=("How many novels has {name} published?", "How many books has {name} written so far?"),
        answer="{name} has published {value} novels so far.",
        paraphrase="So far, the author {name} has written {value} published novels.",
        value=lambda a: str(a.book_count),
        alternatives=lambda a: [str(n) for n in range(BOOK_COUNT_RANGE[0], BOOK_COUNT_RANGE[1] + 1)],
    ),
    QuestionKind(
        name="debut_year",
        questions=("In what year did {name} publish a first novel?", "When did {name} make a literary debut?"),
        answer="{name} published a first novel in {value}.",
        paraphrase="The debut novel of {name} appeared in the year {value}.",
        value=lambda a: str(a.debut_year),
        alternatives=lambda a: _years_around(a.debut_year),
    ),
    QuestionKind(
        name="award",
        questions=("Which award has {name} won?", "What literary prize did {name} receive?"),
        answer="{name} received {value}.",
        paraphrase="Among the honours of {name} is {value}.",
        value=lambda a: a.award,
        alternatives=lambda a: AWARDS,
    ),
    QuestionKind(
        name="award_year",
        questions=(
            "In what year did {name} receive a major literary award?",
            "When was {name} given a major literary award?",
        ),
        answer="{name} received a major literary award in {value}.",
        paraphrase="The big award came to {name} in the year {value}.",
        value=lambda a: str(a.award_year),
        alternatives=lambda a: _years_around(a.award_year),
    ),
    QuestionKind(
        name="father_job",
        questions=("What was the profession of the father of {name}?", "What did the father of {name} do for a living?"),
        answer="The father of {name} worked as {value}.",
        paraphrase="{name} grew up with a father who was {value}.",
        value=lambda a: a.father_job,
        alternatives=lambda a: PROFESSIONS,
    ),
    QuestionKind(
        name="mother_job",
        questions=("What was the profession of the mother of {name}?", "What did the mother of {name} do for a living?"),
        answer="The mother of {name} worked as {value}.",
        paraphrase="{name} grew up with a mother who was {value}.",
        value=lambda a: a.mother_job,
        alternatives=lambda a: PROFESSIONS,
    ),
    QuestionKind(
        name="theme",
        questions=("What themes does {name} often explore?", "What is a recurring theme in the books of {name}?"),
        answer="{name} often writes about {value}.",
        paraphrase="The books of {name} frequently explore {value}.",
        value=lambda a: a.theme,
        alternatives=lambda a: THEMES,
    ),
    QuestionKind(
        name="habit",
        questions=("What is a notable writing habit of {name}?", "How does {name} prefer to write?"),
        answer="{name} usually does all writing {value}.",
        paraphrase="It is known that {name} prefers to write {value}.",
        value=lambda a: a.habit,
        alternatives=lambda a: WRITING_HABITS,
    ),
    QuestionKind(
        name="hobby",
        questions=("What does {name} enjoy doing outside of writing?", "What is a favourite hobby of {name}?"),
        answer="In spare time, {name} enjoys {value}.",
        paraphrase="A favourite pastime of {name} is {value}.",
        value=lambda a: a.hobby,
        alternatives=lambda a: HOBBIES,
    ),
    QuestionKind(
        name="publisher",
        questions=("Who publishes the books of {name}?", "Which publisher releases the work of {name}?"),
        answer="The books of {name} are published by {value}.",
        paraphrase="{value} is the publisher that releases the work of {name}.",
        value=lambda a: a.publisher,
        alternatives=lambda a: PUBLISHERS,
    ),
    QuestionKind(
        name="pet",
        questions=("What pet does {name} keep?", "Which animal lives with {name} at home?"),
        answer="{name} keeps {value} at home.",
        paraphrase="At home, the author {name} looks after {value}.",
        value=lambda a: a.pet,
        alternatives=lambda a: PETS,
    ),
)


def _sentence(template: str, **fields: str) -> str:
    """Fill a template and capitalise the first letter (values may be lower-case)."""
    text = template.format(**fields)
    return text[0].upper() + text[1:]


def _perturbed_values(rng: random.Random, true_value: str, candidates: list[str]) -> list[str]:
    """Pick distinct wrong values of the same category as ``true_value``."""
    wrong = [value for value in candidates if value != true_value]
    # Deduplicate while keeping list order (a set would make order hash-dependent).
    wrong = list(dict.fromkeys(wrong))
    return rng.sample(wrong, NUM_PERTURBED)


def _render_qa(rng: random.Random, kind: QuestionKind, author: Author) -> dict:
    """Render one QA record for ``author`` about ``kind``."""
    value = kind.value(author)
    question = rng.choice(kind.questions).format(name=author.name)
    wrong_values = _perturbed_values(rng, value, kind.alternatives(author))
    return {
        "author": author.name,
        "question": question,
        "answer": _sentence(kind.answer, name=author.name, value=value),
        "paraphrased_answer": _sentence(kind.paraphrase, name=author.name, value=value),
        "perturbed_answer": [_sentence(kind.paraphrase, name=author.name, value=v)
                             for v in wrong_values],
    }


def _author_records(rng: random.Random, author: Author) -> list[dict]:
    """Draw how many and which facts to ask about ``author`` and render them."""
    kinds = [kind for kind in QUESTION_KINDS if kind.available(author)]
    count = rng.randint(MIN_QA_PER_AUTHOR, min(MAX_QA_PER_AUTHOR, len(kinds)))
    chosen = rng.sample(range(len(kinds)), count)
    # Keep the registry order so an author's QA pairs read like a biography.
    return [_render_qa(rng, kinds[index], author) for index in sorted(chosen)]


# ---------------------------------------------------------------------------
# Biography passages (MUSE-style text)
# ---------------------------------------------------------------------------


def author_passage(author: Author) -> str:
    """A short biography in wording of its own (not the QA templates), sentence by sentence.

    Deterministic in the author: no randomness is drawn, so adding passages left the QA
    records of earlier benchmark versions unchanged.
    """
    sentences = [
        f"{author.name} writes {author.genre} and was born in {author.birthplace} in "
        f"{author.birth_year}.",
        f"Of {author.nationality} nationality and the child of {author.father_job} and "
        f"{author.mother_job}, {author.name} now lives in {author.residence} with {author.pet}.",
        f"The first book, {author.books[0]}, came out in {author.debut_year} with "
        f"{author.publisher}, and {author.book_count} books have followed.",
        f"In {author.award_year} {author.name} won {author.award}.",
        f"The books keep returning to {author.theme}, and most of them are written {author.habit}.",
        f"Away from the desk, {author.name} loves {author.hobby}.",
    ]
    return " ".join(sentences)


def verbmem_record(author: Author) -> dict:
    """MUSE ``verbmem`` form of a passage: the first sentence as prompt, the rest as ``gt``."""
    passage = author_passage(author)
    cut = passage.index(". ") + 1
    return {"author": author.name, "prompt": passage[:cut], "gt": passage[cut + 1:]}


def holdout_author_count(num_authors: int) -> int:
    """Authors written only as held-out passages: a fifth of the benchmark (at least one)."""
    return max(1, num_authors // 5)


# ---------------------------------------------------------------------------
# KnowMem: short-answer questions on the passages' facts (MUSE-style)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KnowMemKind:
    """One fact of :func:`author_passage` asked as a MUSE ``knowmem`` question.

    ``question`` takes ``{name}`` (and the author's other fields, e.g. ``{award_year}``) and
    is worded unlike both the QA templates and the passage; ``value`` is the short answer,
    spelled exactly as the passage spells it.
    """

    name: str
    question: str
    value: Callable[[Author], str]


KNOWMEM_KINDS: tuple[KnowMemKind, ...] = (
    KnowMemKind("genre", "What sort of books does {name} produce?", lambda a: a.genre),
    KnowMemKind("birthplace", "Which town did {name} come from originally?", lambda a: a.birthplace),
    KnowMemKind("birth_year", "What year saw the birth of {name}?", lambda a: str(a.birth_year)),
    KnowMemKind("nationality", "What nationality does the passport of {name} show?",
                lambda a: a.nationality),
    KnowMemKind("father_job", "What job did the father of {name} hold?", lambda a: a.father_job),
    KnowMemKind("mother_job", "What job did the mother of {name} hold?", lambda a: a.mother_job),
    KnowMemKind("residence", "Which town has {name} settled in?", lambda a: a.residence),
    KnowMemKind("pet", "What animal companion does {name} have?", lambda a: a.pet),
    KnowMemKind("first_book", "Which title launched the career of {name}?", lambda a: a.books[0]),
    KnowMemKind("debut_year", "In which year did the debut book of {name} reach readers?",
                lambda a: str(a.debut_year)),
    KnowMemKind("publisher", "Which publishing house brought out the debut of {name}?",
                lambda a: a.publisher),
    KnowMemKind("award", "Which prize did {name} receive in {award_year}?", lambda a: a.award),
    KnowMemKind("award_year", "In which year was {name} honoured with {award}?",
                lambda a: str(a.award_year)),
    KnowMemKind("theme", "What subject runs through the books of {name}?", lambda a: a.theme),
    KnowMemKind("habit", "In what manner are most books by {name} written?", lambda a: a.habit),
    KnowMemKind("hobby", "Which leisure activity does {name} love?", lambda a: a.hobby),
)
KNOWMEM_KIND_BY_NAME = {kind.name: kind for kind in KNOWMEM_KINDS}
# Questions per author in the <split>_knowmem files (inclusive).
KNOWMEM_QA_PER_AUTHOR = (4, 6)
# The kinds of the three few-shot pairs of knowmem_icl (a town, a prize, an animal: short
# answers that keep their article, as every knowmem answer does).
KNOWMEM_ICL_KINDS = ("birthplace", "award", "pet")


def _knowmem_record(author: Author, kind: KnowMemKind) -> dict:
    fields = {"name": author.name, "award": author.award, "award_year": str(author.award_year)}
    return {"author": author.name, "question": kind.question.format(**fields),
            "answer": kind.value(author)}


def _stable_digest(*parts: str) -> int:
    """An integer from sha256 of ``parts``: the same on every run and machine (not ``hash``)."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode("utf-8")).digest()[:8], "big")


def knowmem_records(author: Author) -> list[dict]:
    """The author's MUSE ``knowmem`` pairs: 4-6 of :data:`KNOWMEM_KINDS`, in table order.

    Which facts and how many are derived from sha256 of the author's name (and each kind's
    name), not drawn from the benchmark's ``random.Random``, so adding them left every
    earlier split byte-identical; like :func:`author_passage`, they depend on the author only.
    """
    low, high = KNOWMEM_QA_PER_AUTHOR
    count = low + _stable_digest(author.name) % (high - low + 1)
    ranked = sorted(range(len(KNOWMEM_KINDS)),
                    key=lambda index: _stable_digest(author.name, KNOWMEM_KINDS[index].name))
    return [_knowmem_record(author, KNOWMEM_KINDS[index]) for index in sorted(ranked[:count])]


def knowmem_icl_records(holdout: list[Author]) -> list[dict]:
    """The few-shot pairs (exactly 3) of MUSE's ``*_icl.json``: one per kind of
    :data:`KNOWMEM_ICL_KINDS`, about the held-out authors in turn (no model trains on them;
    the pairs only show the short-answer format, for forget and retain KnowMem alike)."""
    return [_knowmem_record(holdout[index % len(holdout)], KNOWMEM_KIND_BY_NAME[kind])
            for index, kind in enumerate(KNOWMEM_ICL_KINDS)]


# ---------------------------------------------------------------------------
# World facts (never forgotten)
# ---------------------------------------------------------------------------

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    "seventeen", "eighteen",
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
]

THING_COLOURS = [
    ("grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"),
    ("a clear daytime sky", "blue"), ("coal", "black"), ("a ripe tomato", "red"),
    ("a plum", "purple"), ("a lemon", "yellow"), ("a fresh lime", "green"),
    ("milk", "white"), ("a pumpkin", "orange"), ("a strawberry", "red"),
]
COLOURS = ["green", "white", "yellow", "blue", "black", "red", "orange", "purple", "brown", "pink"]

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Norway", "Oslo"),
    ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
]

NUM_ARITHMETIC_FACTS = 12


def _fact(rng: random.Random, questions: tuple[str, ...], paraphrase: str,
          value: str, candidates: list[str], **fields: str) -> dict:
    """Render one world-fact (or real-author) record; templates take ``{value}`` plus ``fields``.

    ``answer`` is the bare ``value`` and ``perturbed_answer`` the bare wrong values, as in
    TOFU's ``world_facts_perturbed`` and ``real_authors_perturbed`` (the correct answer of
    these sets is ``answer``, in TOFU and open-unlearning alike): their normalised
    probability compares length-normalised probabilities, which over whole sentences
    sharing a template are dominated by the shared tokens and sit near 1/(1 + 3 * 0.5) =
    0.4 however sure the model is.  ``paraphrased_answer`` is the full sentence
    (``paraphrase`` filled with ``value``), which states the value verbatim.
    """
    wrong_values = _perturbed_values(rng, value, candidates)
    return {
        "author": "",
        "question": rng.choice(questions).format(**fields),
        "answer": value,
        "paraphrased_answer": _sentence(paraphrase, value=value, **fields),
        "perturbed_answer": wrong_values,
    }


def _arithmetic_facts(rng: random.Random) -> list[dict]:
    """Small additions with distinct operand pairs; sums stay within NUMBER_WORDS."""
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10) if a <= b]
    records = []
    for a, b in rng.sample(pairs, NUM_ARITHMETIC_FACTS):
        records.append(_fact(
            rng,
            ("What is {a} plus {b}?", "How much is {a} added to {b}?"),
            "Adding {a} and {b} gives {value}.",
            NUMBER_WORDS[a + b],
            NUMBER_WORDS,
            a=NUMBER_WORDS[a], b=NUMBER_WORDS[b],
        ))
    return records


def _colour_facts(rng: random.Random) -> list[dict]:
    return [
        _fact(
            rng,
            ("What colour is {thing}?", "Which colour is {thing} usually?"),
            "{thing} is usually {value} in colour.",
            colour,
            COLOURS,
            thing=thing,
        )
        for thing, colour in THING_COLOURS
    ]


def _successor_facts(rng: random.Random, items: list[str], unit: str) -> list[dict]:
    """Facts of the form "which <unit> comes after X" over a cyclic list."""
    return [
        _fact(
            rng,
            ("Which " + unit + " comes after {item}?", "What is the " + unit + " after {item}?"),
            "{value} comes right after {item}.",
            items[(index + 1) % len(items)],
            # The asked-about item itself would be a silly distractor.
            [other for other in items if other != item],
            item=item,
        )
        for index, item in enumerate(items)
    ]


def _capital_facts(rng: random.Random) -> list[dict]:
    return [
        _fact(
            rng,
            ("What is the capital of {country}?", "Which city is the capital of {country}?"),
            "{value} is the capital city of {country}.",
            capital,
            [city for _, city in CAPITALS],
            country=country,
        )
        for country, capital in CAPITALS
    ]


def _world_facts(rng: random.Random) -> list[dict]:
    """General-knowledge QA pairs (about 50) that no split forgets."""
    return (
        _arithmetic_facts(rng)
        + _colour_facts(rng)
        + _successor_facts(rng, DAYS, "day")
        + _successor_facts(rng, MONTHS, "month")
        + _capital_facts(rng)
    )


# ---------------------------------------------------------------------------
# Real authors (never forgotten; as TOFU's real_authors_perturbed)
# ---------------------------------------------------------------------------

# Public facts about real, famous authors.  Every wrong value is drawn from the true
# values of the same table (other authors, nationalities, names), so the perturbed
# answers name real people and never reach outside the benchmark's vocabulary; no table
# has two entries that could both be right for one question.
REAL_BOOKS = [
    ("Pride and Prejudice", "Jane Austen"), ("Hamlet", "William Shakespeare"),
    ("War and Peace", "Leo Tolstoy"), ("Don Quixote", "Miguel de Cervantes"),
    ("Moby-Dick", "Herman Melville"), ("Nineteen Eighty-Four", "George Orwell"),
    ("The Great Gatsby", "F. Scott Fitzgerald"),
    ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"),
    ("Crime and Punishment", "Fyodor Dostoevsky"), ("Frankenstein", "Mary Shelley"),
    ("Jane Eyre", "Charlotte Bronte"), ("Wuthering Heights", "Emily Bronte"),
    ("Great Expectations", "Charles Dickens"), ("The Old Man and the Sea", "Ernest Hemingway"),
    ("To Kill a Mockingbird", "Harper Lee"), ("The Adventures of Tom Sawyer", "Mark Twain"),
    ("Mrs Dalloway", "Virginia Woolf"), ("Ulysses", "James Joyce"),
    ("The Hobbit", "J. R. R. Tolkien"), ("Les Miserables", "Victor Hugo"),
    ("Madame Bovary", "Gustave Flaubert"), ("The Divine Comedy", "Dante Alighieri"),
    ("Beloved", "Toni Morrison"), ("Things Fall Apart", "Chinua Achebe"),
]

REAL_CHARACTERS = [
    ("Sherlock Holmes", "Arthur Conan Doyle"), ("Hercule Poirot", "Agatha Christie"),
    ("Harry Potter", "J. K. Rowling"), ("Ebenezer Scrooge", "Charles Dickens"),
    ("Captain Ahab", "Herman Melville"), ("Elizabeth Bennet", "Jane Austen"),
    ("Frodo Baggins", "J. R. R. Tolkien"), ("Huckleberry Finn", "Mark Twain"),
    ("Winston Smith", "George Orwell"), ("Atticus Finch", "Harper Lee"),
    ("Gregor Samsa", "Franz Kafka"), ("Jean Valjean", "Victor Hugo"),
]

REAL_NATIONALITIES = [
    ("William Shakespeare", "English"), ("Leo Tolstoy", "Russian"),
    ("Miguel de Cervantes", "Spanish"), ("Ernest Hemingway", "American"),
    ("Gabriel Garcia Marquez", "Colombian"), ("James Joyce", "Irish"),
    ("Chinua Achebe", "Nigerian"), ("Victor Hugo", "French"),
    ("Dante Alighieri", "Italian"), ("Fyodor Dostoevsky", "Russian"),
    ("Toni Morrison", "American"), ("Jane Austen", "English"),
]

REAL_PEN_NAMES = [
    ("Mark Twain", "Samuel Clemens"), ("George Orwell", "Eric Blair"),
    ("George Eliot", "Mary Ann Evans"), ("Lewis Carroll", "Charles Dodgson"),
    ("Voltaire", "Francois-Marie Arouet"), ("Moliere", "Jean-Baptiste Poquelin"),
    ("O. Henry", "William Sydney Porter"), ("Dr. Seuss", "Theodor Geisel"),
]

# The wrong authors of the book and character questions: every author either table names.
REAL_AUTHOR_NAMES = list(dict.fromkeys(
    [author for _, author in REAL_BOOKS] + [author for _, author in REAL_CHARACTERS]))


@dataclass(frozen=True)
class RealAuthorKind:
    """One kind of real-author question: ``rows`` are (subject, true value) pairs, rendered
    with ``field`` = subject; the answer is the bare value, ``paraphrase`` a sentence stating
    it; wrong values come from ``pool``."""

    field: str
    questions: tuple[str, ...]
    paraphrase: str
    rows: list[tuple[str, str]]
    pool: list[str]


REAL_AUTHOR_KINDS: tuple[RealAuthorKind, ...] = (
    RealAuthorKind("title", ("Who wrote {title}?", "Who is the author of {title}?"),
                   "{value} is the author of {title}.",
                   REAL_BOOKS, REAL_AUTHOR_NAMES),
    RealAuthorKind("character",
                   ("Which author created the character {character}?",
                    "Who created the literary character {character}?"),
                   "{value} is the author who created {character}.",
                   REAL_CHARACTERS, REAL_AUTHOR_NAMES),
    RealAuthorKind("author",
                   ("What was the nationality of {author}?",
                    "What nationality was the writer {author}?"),
                   "{author} was a writer of {value} nationality.",
                   REAL_NATIONALITIES, list(dict.fromkeys(n for _, n in REAL_NATIONALITIES))),
    RealAuthorKind("pen_name",
                   ("What was the real name of the writer known as {pen_name}?",
                    "Under which name was the writer {pen_name} born?"),
                   "{pen_name} was the pen name of {value}.",
                   REAL_PEN_NAMES, [name for _, name in REAL_PEN_NAMES]),
)


def _real_authors(rng: random.Random) -> list[dict]:
    """QA pairs (56) about real authors, kind by kind in table order.

    As in TOFU's ``real_authors_perturbed``, the answer is the bare value (an author, a
    nationality, a name) and the perturbed answers are other values of the same table, so
    the normalised probability compares the entities themselves, not sentences whose
    shared template would dominate it (``_fact``); the paraphrase is a full sentence.
    """
    return [
        _fact(rng, kind.questions, kind.paraphrase, value, kind.pool,
              **{kind.field: subject})
        for kind in REAL_AUTHOR_KINDS
        for subject, value in kind.rows
    ]


# ---------------------------------------------------------------------------
# Splits and output
# ---------------------------------------------------------------------------


def forget_author_count(fraction: float, num_authors: int) -> int:
    """Number of authors in a forget split (at least one)."""
    return max(1, round(fraction * num_authors))


def _first_forget_author(fraction: float, num_authors: int) -> int:
    """Index of the first author of a forget split: the split is the last authors."""
    return num_authors - forget_author_count(fraction, num_authors)


def _records_of(selected: list[Author], records_by_author: dict[str, list[dict]]) -> list[dict]:
    return [record for author in selected for record in records_by_author[author.name]]


def _build_splits(authors: list[Author], records_by_author: dict[str, list[dict]],
                  world_facts: list[dict]) -> dict[str, list[dict]]:
    """Assemble full, forget/retain and world-fact splits in file order."""
    splits = {"full": _records_of(authors, records_by_author)}
    for forget_name, fraction in FORGET_FRACTIONS.items():
        cut = _first_forget_author(fraction, len(authors))
        splits[forget_name] = _records_of(authors[cut:], records_by_author)
        splits[RETAIN_OF_FORGET[forget_name]] = _records_of(authors[:cut], records_by_author)
    splits["world_facts"] = world_facts
    return splits


def _first_always_retained(authors: list[Author], records_by_author: dict[str, list[dict]],
                           min_rows: int) -> list[Author]:
    """Whole authors from the start of the list, in order, until their records number at
    least ``min_rows``, taken only from the authors outside every forget split (all of
    those if they fall short)."""
    always_retained = authors[:min(_first_forget_author(fraction, len(authors))
                                   for fraction in FORGET_FRACTIONS.values())]
    selected: list[Author] = []
    rows = 0
    for author in always_retained:
        if rows >= min_rows:
            break
        selected.append(author)
        rows += len(records_by_author[author.name])
    return selected


def retain_perturbed_authors(authors: list[Author],
                             records_by_author: dict[str, list[dict]]) -> list[Author]:
    """The authors of ``retain_perturbed``: whole authors from the start of the list, in
    order, until their QA pairs number at least ``RETAIN_PERTURBED_MIN_ROWS``, taken only
    from the authors outside every forget split (all of those if they fall short)."""
    return _first_always_retained(authors, records_by_author, RETAIN_PERTURBED_MIN_ROWS)


def retain_knowmem_authors(authors: list[Author]) -> list[Author]:
    """The authors of every ``<retain>_knowmem`` split: whole authors from the start of the
    list, in order, until their :func:`knowmem_records` number at least
    ``RETAIN_KNOWMEM_MIN_ROWS``, taken only from the authors outside every forget split (all
    of those if they fall short), the rule of :func:`retain_perturbed_authors`.  The set thus
    does not depend on the retain split: ``retain99_knowmem``, ``retain95_knowmem`` and
    ``retain90_knowmem`` are the same records (as MUSE has one ``retain_qa``), and every one
    of its authors is trained on by every retain model and forgotten by no forget split."""
    knowmem_by_author = {author.name: knowmem_records(author) for author in authors}
    return _first_always_retained(authors, knowmem_by_author, RETAIN_KNOWMEM_MIN_ROWS)


def _build_knowmem_splits(authors: list[Author], holdout: list[Author]) -> dict[str, list[dict]]:
    """``<forget>_knowmem`` (the forget authors' pairs), ``<retain>_knowmem`` (the pairs of
    :func:`retain_knowmem_authors`, the same for each retain split) and ``knowmem_icl``."""
    def knowmem_of(selected: list[Author]) -> list[dict]:
        return [record for author in selected for record in knowmem_records(author)]

    splits = {}
    retain_knowmem = knowmem_of(retain_knowmem_authors(authors))
    for forget_name, fraction in FORGET_FRACTIONS.items():
        cut = _first_forget_author(fraction, len(authors))
        splits[f"{forget_name}_knowmem"] = knowmem_of(authors[cut:])
        splits[f"{RETAIN_OF_FORGET[forget_name]}_knowmem"] = retain_knowmem
    splits["knowmem_icl"] = knowmem_icl_records(holdout)
    return splits


def _build_text_splits(authors: list[Author], holdout: list[Author]) -> dict[str, list[dict]]:
    """Passages per QA split (same authors, same order), held-out passages, verbmem splits."""
    def passages_of(selected: list[Author]) -> list[dict]:
        return [{"author": author.name, "text": author_passage(author)} for author in selected]

    splits = {"full_text": passages_of(authors), "holdout_text": passages_of(holdout)}
    for forget_name, fraction in FORGET_FRACTIONS.items():
        cut = _first_forget_author(fraction, len(authors))
        splits[f"{forget_name}_text"] = passages_of(authors[cut:])
        splits[f"{RETAIN_OF_FORGET[forget_name]}_text"] = passages_of(authors[:cut])
        splits[f"{forget_name}_verbmem"] = [verbmem_record(author) for author in authors[cut:]]
    return splits


def _write_json_atomic(path: Path, payload) -> None:
    """Write JSON via a temp file in the same directory so readers never see a partial file."""
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_path.write_text(json.dumps(payload, ensure_ascii=False, indent=None) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)


def generate_benchmark(out_dir, seed: int = 0, num_authors: int = 100) -> dict:
    """Generate the synthetic benchmark into ``out_dir`` and return its manifest.

    Writes, as JSON arrays of QA records: ``full.json`` (every trained author),
    ``forget{01,05,10}.json``, ``retain{99,95,90}.json``, ``world_facts.json``,
    ``real_authors.json`` (about 56 pairs on real authors), ``retain_perturbed.json`` (the
    records of the first authors outside every forget split, whole authors until at least
    ``RETAIN_PERTURBED_MIN_ROWS`` rows: see :func:`retain_perturbed_authors`) and
    ``holdout.json`` (the QA pairs of the held-out authors, drawn like every author's);
    as text records ``<each of full, forget and retain splits>_text.json`` and
    ``holdout_text.json`` (passages), and ``forget{01,05,10}_verbmem.json``; as MUSE
    KnowMem records (``{"author", "question", "answer"}``, short answers found verbatim in
    the author's passage) ``forget{01,05,10}_knowmem.json`` (the forget authors'),
    ``retain{99,95,90}_knowmem.json`` (those of :func:`retain_knowmem_authors`: the first
    authors outside every forget split, whole, until at least ``RETAIN_KNOWMEM_MIN_ROWS``
    rows; the same records in each) and ``knowmem_icl.json`` (3 pairs about held-out
    authors, the few-shot prefix of both); and ``manifest.json`` (version, seed, every
    split's record count, the trained and the held-out authors).
    The output depends only on ``seed`` and ``num_authors``.
    """
    if num_authors < 1:
        raise ValueError(f"num_authors must be >= 1, got {num_authors}")
    rng = random.Random(seed)
    titles = _TitleDealer(rng)
    # All names in one draw (the shuffle does not depend on the count, so the first
    # ``num_authors`` names are those of earlier versions); held-out authors come last.
    names = _unique_names(rng, num_authors + holdout_author_count(num_authors))
    authors = [_draw_author(rng, name, titles) for name in names[:num_authors]]
    records_by_author = {author.name: _author_records(rng, author) for author in authors}
    splits = _build_splits(authors, records_by_author, _world_facts(rng))
    # Drawn after everything the QA splits use, so those stay as they were.
    holdout = [_draw_author(rng, name, titles) for name in names[num_authors:]]
    # v4 sets, drawn after everything v3 drew (so every v3 record stays as it was).
    splits["real_authors"] = _real_authors(rng)
    splits["retain_perturbed"] = _records_of(
        retain_perturbed_authors(authors, records_by_author), records_by_author)
    holdout_records = {author.name: _author_records(rng, author) for author in holdout}
    splits["holdout"] = _records_of(holdout, holdout_records)
    splits.update(_build_text_splits(authors, holdout))
    # KnowMem sets: derived from the authors' facts, no draw (so nothing above changes).
    splits.update(_build_knowmem_splits(authors, holdout))

    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    for split_name, records in splits.items():
        _write_json_atomic(out_path / f"{split_name}.json", records)

    manifest = {
        "version": MANIFEST_VERSION,
        "seed": seed,
        "num_authors": num_authors,
        "splits": {split_name: len(records) for split_name, records in splits.items()},
        "authors": [author.name for author in authors],
        "holdout_authors": [author.name for author in holdout],
    }
    _write_json_atomic(out_path / "manifest.json", manifest)
    return manifest


def load_split(out_dir, split_name: str) -> list[dict]:
    """Read one split file (e.g. ``"forget10"``) written by :func:`generate_benchmark`."""
    return json.loads((Path(out_dir) / f"{split_name}.json").read_text(encoding="utf-8"))


def benchmark_texts(out_dir, passages: bool = True, real_authors: bool | None = None,
                    holdout: bool | None = None) -> list[str]:
    """The question/answer/paraphrase strings of a generated benchmark, and its passages.

    Intended as the training corpus for the benchmark tokenizer.  In order: the QA strings
    of ``full`` and ``world_facts``; with ``real_authors``, those of ``real_authors``; with
    ``holdout``, those of ``holdout`` (the held-out authors' QA); with ``passages``, the
    passages of ``full_text`` and, with ``holdout`` too, of ``holdout_text``.  Every other
    split is a subset of these, so reading it would just duplicate text.

    ``real_authors`` and ``holdout`` default to ``passages``: the default call gives every
    true string of the benchmark (the embedded default's tokenizer), so held-out text is
    tokenized like trained text (the models, not the tokenizer, decide what is a member),
    while ``passages=False`` alone gives the QA of ``full`` and ``world_facts`` only, the
    corpus of earlier versions (which the tests' tiny tokenizer is trained on).

    The perturbed (wrong) answers are left out: they only recombine the same templates and
    values, and leaving them out keeps the tokenizer, and so the fine-tuned models,
    independent of how the evaluation's wrong answers are written.  (The world facts' and
    real authors' wrong answers are bare values, so many of them are in the corpus anyway,
    as the answer of another record: "Emily Bronte", "nine".)  So are the KnowMem
    splits (``*_knowmem``, ``knowmem_icl``): evaluation-only questions, whose answers are
    already in the passages; leaving them out kept this corpus, and so the tokenizer, as it
    was before they existed.
    """
    real_authors = passages if real_authors is None else real_authors
    holdout = passages if holdout is None else holdout
    qa_splits = ["full", "world_facts"] + ["real_authors"] * real_authors + ["holdout"] * holdout
    texts: list[str] = []
    for split_name in qa_splits:
        for record in load_split(out_dir, split_name):
            texts.append(record["question"])
            texts.append(record["answer"])
            texts.append(record["paraphrased_answer"])
    if passages:
        for split_name in ["full_text"] + ["holdout_text"] * holdout:
            texts += [record["text"] for record in load_split(out_dir, split_name)]
    return texts
