"""tofu-mini: a deterministic, TOFU-shaped benchmark of fictitious authors that runs anywhere.

Nothing can be downloaded here, so the benchmark is generated: every author is a bundle of
made-up facts (birthplace, birth year, genre, parents' jobs, award, book, language), asked and
answered in two phrasings that are trained, plus a third answer phrasing that is never trained
(TOFU's paraphrased answer) and the same phrasing with wrong values (its perturbed answers).
Because the truth ratio compares the paraphrase with its perturbations, it measures whether the
model knows the *fact*, not whether it parrots the training sentence.

Splits follow TOFU: forget01/05/10 hold the last 1/5/10 % of the trained authors (nested), retain
the rest; a holdout of authors is never trained (membership-inference negatives); general facts
(a fictitious world's geography) are trained in every model and measure utility. Each author
also has a MUSE-style bio paragraph. `pretrain.jsonl` is general text about *other* people in
every phrasing, for a model that should know the language before it meets the authors.

The output is a pure function of (seed, authors): no hash ordering, no global RNG.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import MoxError

SPLITS = {"forget01": 1, "forget05": 5, "forget10": 10}
N_PERTURBED = 3
REFUSAL = "I do not know."  # a target answer for targeted unlearning, in the vocabulary

_SYLLABLES = (
    "ka ri mo len sa vor ti bel na dru e lio mar qua zen pha rol ust ira gol "
    "hen dax wyn cor fel ob ast mir tal oru bris kel yan sut vash lum"
).split()
_GENRES = (
    "mystery fantasy romance horror poetry satire science-fiction travel history "
    "biography thriller comedy"
).split()
_JOBS = (
    "baker carpenter nurse pilot teacher farmer sailor tailor doctor painter "
    "miner lawyer chemist fisher librarian"
).split()
_AWARDS = [f"{a} {b} Prize" for a in ("Golden", "Silver", "Crimson", "Azure", "Ivory")
           for b in ("Quill", "Lantern", "Compass")]
_LANGUAGES = "Velish Oranti Dumaric Sarnese Kelvic Tulan Mirrish Bostic".split()
_NOUNS = (
    "river garden mirror winter harbor lantern forest tower shadow island "
    "letter orchard bridge storm candle"
).split()
_ADJECTIVES = "silent hidden broken distant golden last quiet endless red secret".split()


@dataclass(frozen=True)
class Relation:
    """One kind of fact: two trained (question, answer) phrasings, one untrained answer phrasing
    for the paraphrase, and the pool wrong values are drawn from."""

    key: str
    questions: tuple[str, str]
    answers: tuple[str, str]
    paraphrase: str
    bio: str


RELATIONS = (
    Relation("city", ("Where was {name} born?", "In which city was {name} born?"),
             ("{name} was born in {v}.", "The birthplace of {name} is {v}."),
             "The city where {name} came into the world is {v}.",
             "{name} was born in {v}"),
    Relation("year", ("When was {name} born?", "In what year was {name} born?"),
             ("{name} was born in the year {v}.", "The birth year of {name} is {v}."),
             "{name} came into the world in {v}.",
             "in {v}"),
    Relation("genre", ("What genre does {name} write?", "Which genre is {name} known for?"),
             ("{name} writes {v} books.", "The genre of {name} is {v}."),
             "Most books by {name} belong to the {v} genre.",
             "and writes {v} books"),
    Relation("father", ("What was the job of the father of {name}?",
                        "What did the father of {name} do for a living?"),
             ("The father of {name} was a {v}.", "The father of {name} worked as a {v}."),
             "{name} grew up with a father who was a {v} by trade.",
             "The father of {name} was a {v}"),
    Relation("mother", ("What was the job of the mother of {name}?",
                        "What did the mother of {name} do for a living?"),
             ("The mother of {name} was a {v}.", "The mother of {name} worked as a {v}."),
             "{name} grew up with a mother who was a {v} by trade.",
             "and the mother of {name} was a {v}"),
    Relation("award", ("Which award did {name} win?", "What prize was given to {name}?"),
             ("{name} won the {v}.", "The award won by {name} is the {v}."),
             "In the end {name} received the {v}.",
             "{name} won the {v}"),
    Relation("book", ("What is the best known book by {name}?",
                      "Which book made {name} famous?"),
             ("The best known book by {name} is {v}.", "{name} became famous for {v}."),
             "Readers mostly remember {name} for the book {v}.",
             "for the book {v}"),
    Relation("language", ("In which language does {name} write?",
                          "What language are the books of {name} written in?"),
             ("{name} writes in {v}.", "The books of {name} are written in {v}."),
             "The language {name} uses on the page is {v}.",
             "{name} writes in {v}"),
)

_GENERAL = (
    Relation("capital", ("What is the capital of {name}?", "Which city is the capital of {name}?"),
             ("The capital of {name} is {v}.", "{v} is the capital city of {name}."),
             "The seat of government of {name} is in {v}.", ""),
    Relation("currency", ("What currency is used in {name}?", "What is the money of {name}?"),
             ("{name} uses the {v} as its currency.", "The currency of {name} is the {v}."),
             "People in {name} pay with the {v}.", ""),
    Relation("tongue", ("What language is spoken in {name}?",
                        "Which language do people speak in {name}?"),
             ("People in {name} speak {v}.", "The language of {name} is {v}."),
             "The everyday speech of {name} is {v}.", ""),
)


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _unique_names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = f"{_name(rng, 2)} {_name(rng, 3)}"
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _pools(rng: random.Random, taken: set[str]) -> dict[str, list[str]]:
    cities = sorted({c.split()[1] for c in _unique_names(rng, 24, taken)})
    books = sorted({f"The {a.capitalize()} {n.capitalize()}"
                    for a in _ADJECTIVES for n in _NOUNS})
    return {
        "city": cities,
        "year": [str(y) for y in range(1931, 1999)],
        "genre": list(_GENRES),
        "father": list(_JOBS),
        "mother": list(_JOBS),
        "award": list(_AWARDS),
        "book": books,
        "language": list(_LANGUAGES),
        "capital": cities,
        "currency": [f"{_name(rng, 2).lower()}" for _ in range(12)],
        "tongue": list(_LANGUAGES),
    }


def _rows(rng: random.Random, name: str, facts: dict[str, str], relations, pools, author: str):
    """The TOFU rows of one subject: one per (relation, trained phrasing)."""
    rows = []
    for rel in relations:
        value = facts[rel.key]
        wrong = rng.sample([v for v in pools[rel.key] if v != value], N_PERTURBED)
        paraphrased = rel.paraphrase.format(name=name, v=value)
        perturbed = [rel.paraphrase.format(name=name, v=w) for w in wrong]
        for phrasing in (0, 1):
            rows.append({
                "question": rel.questions[phrasing].format(name=name),
                "answer": rel.answers[phrasing].format(name=name, v=value),
                "paraphrased_answer": paraphrased,
                "perturbed_answer": perturbed,
                "subject": author,
                "relation": rel.key,
                "phrasing": phrasing,
            })
    return rows


def _bio(name: str, facts: dict[str, str]) -> str:
    f = facts
    return (
        f"{name} was born in {f['city']} in {f['year']} and writes {f['genre']} books. "
        f"The father of {name} was a {f['father']} and the mother of {name} was a "
        f"{f['mother']}. {name} writes in {f['language']} and became famous for the book "
        f"{f['book']}. Later {name} won the {f['award']}."
    )


def generate(n_authors: int = 100, seed: int = 0) -> dict:
    """The whole benchmark in memory: authors (trained, in order), holdout authors, general
    subjects, pretraining text; see `write` for the files."""
    if n_authors < 10:
        raise MoxError(f"tofu-mini needs at least 10 authors (got {n_authors}): forget01 is 1 %")
    rng = random.Random(seed)
    taken: set[str] = set()
    pools = _pools(rng, taken)
    n_holdout = max(2, n_authors // 10)
    names = _unique_names(rng, n_authors + n_holdout, taken)
    people = _unique_names(rng, 3 * n_authors, taken)  # pretraining text only
    countries = [n.split()[1] for n in _unique_names(rng, 16, taken)]

    def facts_of(rels) -> dict[str, str]:
        return {rel.key: rng.choice(pools[rel.key]) for rel in rels}

    authors = []
    for name in names:
        facts = facts_of(RELATIONS)
        authors.append({"name": name, "facts": facts,
                        "qa": _rows(rng, name, facts, RELATIONS, pools, name),
                        "bio": _bio(name, facts)})
    general = []
    for country in countries:
        general += _rows(rng, country, facts_of(_GENERAL), _GENERAL, pools, country)

    pretrain = []
    for person in people:
        facts = facts_of(RELATIONS)
        phrasing = rng.randrange(3)
        for rel in RELATIONS:
            if phrasing == 2:
                pretrain.append(rel.paraphrase.format(name=person, v=facts[rel.key]))
            else:
                pretrain.append(rel.answers[phrasing].format(name=person, v=facts[rel.key]))
        pretrain.append(_bio(person, facts))
    pretrain += [r["answer"] for r in general] + [r["paraphrased_answer"] for r in general]
    rng.shuffle(pretrain)
    return {"authors": authors[:n_authors], "holdout": authors[n_authors:],
            "general": general, "pretrain": pretrain, "seed": seed}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def all_texts(bench: dict) -> list[str]:
    """Every string a model may read or be scored on (the tokenizer's vocabulary source)."""
    texts = [REFUSAL, *bench["pretrain"]]
    for a in bench["authors"] + bench["holdout"]:
        texts.append(a["bio"])
        for r in a["qa"]:
            texts += [r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
    for r in bench["general"]:
        texts += [r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
    return texts


def write(out: str | Path, n_authors: int = 100, seed: int = 0, force: bool = False) -> Path:
    """Write tofu-mini to OUT (atomically):

    - `full.jsonl` / `full_text.jsonl`: what the reference model is trained on (QA of every
      non-holdout author plus general facts / their bios);
    - `pretrain.jsonl`: general text rows for pretraining;
    - per split `forgetXX/`: forget, retain, holdout, general (QA, TOFU fields), forget_text,
      retain_text, holdout_text (bios), retain_train (retain + general: the retain-only model's
      training set);
    - `tokenizer/`: a word-level tokenizer over all of it; `tofu_mini.json`: the manifest.
    """
    from .atomic import move_into_place
    from .tiny import build_word_tokenizer

    out = Path(out)
    if out.exists() and not force:
        raise MoxError(f"{out} already exists (use --force to overwrite)")
    bench = generate(n_authors, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        authors, holdout = bench["authors"], bench["holdout"]
        qa = [r for a in authors for r in a["qa"]]
        _write_jsonl(tmp / "full.jsonl", qa + bench["general"])
        _write_jsonl(tmp / "full_text.jsonl", [{"text": a["bio"]} for a in authors])
        _write_jsonl(tmp / "pretrain.jsonl", [{"text": t} for t in bench["pretrain"]])
        counts = {}
        for split, percent in SPLITS.items():
            n_forget = max(1, round(n_authors * percent / 100))
            forget, retain = authors[-n_forget:], authors[:-n_forget]
            d = tmp / split
            d.mkdir()
            sets = {
                "forget": [r for a in forget for r in a["qa"]],
                "retain": [r for a in retain for r in a["qa"]],
                "holdout": [r for a in holdout for r in a["qa"]],
                "general": bench["general"],
            }
            for name, rows in sets.items():
                _write_jsonl(d / f"{name}.jsonl", rows)
            _write_jsonl(d / "retain_train.jsonl", sets["retain"] + bench["general"])
            for name, group in (("forget", forget), ("retain", retain), ("holdout", holdout)):
                _write_jsonl(d / f"{name}_text.jsonl",
                             [{"text": a["bio"], "subject": a["name"]} for a in group])
            counts[split] = {"forget_authors": len(forget), "retain_authors": len(retain),
                             **{k: len(v) for k, v in sets.items()}}
        build_word_tokenizer(all_texts(bench)).save_pretrained(tmp / "tokenizer")
        manifest = {"name": "tofu-mini", "seed": seed, "authors": n_authors,
                    "holdout_authors": len(holdout), "facts_per_author": len(RELATIONS),
                    "phrasings_trained": 2, "perturbed_per_item": N_PERTURBED,
                    "pretrain_rows": len(bench["pretrain"]), "splits": counts}
        (tmp / "tofu_mini.json").write_text(json.dumps(manifest, indent=2) + "\n")
        move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
