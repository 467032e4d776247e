"""tofu-mini: a deterministic, TOFU-shaped benchmark of fictitious authors that runs anywhere.

Nothing can be downloaded here, so the benchmark is generated: every author is a bundle of
made-up facts (birthplace, birth year, genre, parents' jobs, award, book, language), asked and
answered in two phrasings that are trained, plus a third answer phrasing that is never trained
(TOFU's paraphrased answer) and the same phrasing with wrong values (its perturbed answers).
Because the truth ratio compares the paraphrase with its perturbations, it measures whether the
model knows the *fact*, not whether it parrots the training sentence.

Splits follow TOFU: forget01/05/10 take the last 1/5/10 % of the trained authors (nested) as
the reported (test) forget authors, and as many authors before them as validation forget
authors, where a study may tune (moxkit.apps.study); the rest are retain authors. A quarter of the
retain authors are left out of the retain rows unlearning may train on and evaluated instead,
so utility is measured on facts no method descended on. Evaluation scores one row per fact
(the two trained phrasings share their paraphrased and perturbed answers, so scoring both would
count one truth ratio twice). A holdout of authors is never trained (membership-inference
negatives); general facts (a fictitious world's geography) are trained in every model and
measure utility. Each author also has a MUSE-style bio paragraph. `pretrain.jsonl` is general
text about *other* people, each fact in all three phrasings, for a model that should know the
language (and that a fact outlives its sentence) before it meets the authors.

The tokenizer is a BPE trained on the pretraining text only, so the authors' names come out in
pieces, as invented names do with real tokenizers: a model that never met an author can still
copy the name from the question, and only the fact's value tells what it knows.

The output is a pure function of (seed, authors): no hash ordering, no global RNG.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

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
_AWARDS = [
    f"{a} {b} Prize"
    for a in ("Golden", "Silver", "Crimson", "Azure", "Ivory")
    for b in ("Quill", "Lantern", "Compass")
]
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
    Relation(
        "city",
        ("Where was {name} born?", "In which city was {name} born?"),
        ("{name} was born in {v}.", "The birthplace of {name} is {v}."),
        "The city where {name} came into the world is {v}.",
        "{name} was born in {v}",
    ),
    Relation(
        "year",
        ("When was {name} born?", "In what year was {name} born?"),
        ("{name} was born in the year {v}.", "The birth year of {name} is {v}."),
        "{name} came into the world in {v}.",
        "in {v}",
    ),
    Relation(
        "genre",
        ("What genre does {name} write?", "Which genre is {name} known for?"),
        ("{name} writes {v} books.", "The genre of {name} is {v}."),
        "Most books by {name} belong to the {v} genre.",
        "and writes {v} books",
    ),
    Relation(
        "father",
        (
            "What was the job of the father of {name}?",
            "What did the father of {name} do for a living?",
        ),
        ("The father of {name} was a {v}.", "The father of {name} worked as a {v}."),
        "{name} grew up with a father who was a {v} by trade.",
        "The father of {name} was a {v}",
    ),
    Relation(
        "mother",
        (
            "What was the job of the mother of {name}?",
            "What did the mother of {name} do for a living?",
        ),
        ("The mother of {name} was a {v}.", "The mother of {name} worked as a {v}."),
        "{name} grew up with a mother who was a {v} by trade.",
        "and the mother of {name} was a {v}",
    ),
    Relation(
        "award",
        ("Which award did {name} win?", "What prize was given to {name}?"),
        ("{name} won the {v}.", "The award won by {name} is the {v}."),
        "In the end {name} received the {v}.",
        "{name} won the {v}",
    ),
    Relation(
        "book",
        ("What is the best known book by {name}?", "Which book made {name} famous?"),
        ("The best known book by {name} is {v}.", "{name} became famous for {v}."),
        "Readers mostly remember {name} for the book {v}.",
        "for the book {v}",
    ),
    Relation(
        "language",
        (
            "In which language does {name} write?",
            "What language are the books of {name} written in?",
        ),
        ("{name} writes in {v}.", "The books of {name} are written in {v}."),
        "The language {name} uses on the page is {v}.",
        "{name} writes in {v}",
    ),
)

_GENERAL = (
    Relation(
        "capital",
        ("What is the capital of {name}?", "Which city is the capital of {name}?"),
        ("The capital of {name} is {v}.", "{v} is the capital city of {name}."),
        "The seat of government of {name} is in {v}.",
        "",
    ),
    Relation(
        "currency",
        ("What currency is used in {name}?", "What is the money of {name}?"),
        ("{name} uses the {v} as its currency.", "The currency of {name} is the {v}."),
        "People in {name} pay with the {v}.",
        "",
    ),
    Relation(
        "tongue",
        ("What language is spoken in {name}?", "Which language do people speak in {name}?"),
        ("People in {name} speak {v}.", "The language of {name} is {v}."),
        "The everyday speech of {name} is {v}.",
        "",
    ),
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
    books = sorted({f"The {a.capitalize()} {n.capitalize()}" for a in _ADJECTIVES for n in _NOUNS})
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
    """The TOFU rows of one subject: one per (relation, trained phrasing). Each row names its
    fact's value, so that name tokens and value tokens can be scored apart."""
    rows = []
    for i, rel in enumerate(relations):
        value = facts[rel.key]
        wrong = rng.sample([v for v in pools[rel.key] if v != value], N_PERTURBED)
        paraphrased = rel.paraphrase.format(name=name, v=value)
        perturbed = [rel.paraphrase.format(name=name, v=w) for w in wrong]
        for phrasing in (0, 1):
            rows.append(
                {
                    "question": rel.questions[phrasing].format(name=name),
                    "answer": rel.answers[phrasing].format(name=name, v=value),
                    "paraphrased_answer": paraphrased,
                    "perturbed_answer": perturbed,
                    "subject": author,
                    "relation": rel.key,
                    "value": value,
                    "phrasing": phrasing,
                    "evaluated": phrasing == i % 2,  # the one row per fact that evaluation scores
                }
            )
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
        raise InputError(f"tofu-mini needs at least 10 authors (got {n_authors}): forget01 is 1 %")
    rng = random.Random(seed)
    taken: set[str] = set()
    pools = _pools(rng, taken)
    n_holdout = max(2, n_authors // 10)
    names = _unique_names(rng, n_authors + n_holdout, taken)
    people = _unique_names(rng, 2 * n_authors, taken)  # pretraining text only
    countries = [n.split()[1] for n in _unique_names(rng, 16, taken)]

    def facts_of(rels) -> dict[str, str]:
        return {rel.key: rng.choice(pools[rel.key]) for rel in rels}

    authors = []
    for name in names:
        facts = facts_of(RELATIONS)
        authors.append(
            {
                "name": name,
                "facts": facts,
                "qa": _rows(rng, name, facts, RELATIONS, pools, name),
                "bio": _bio(name, facts),
            }
        )
    general = []
    for country in countries:
        general += _rows(rng, country, facts_of(_GENERAL), _GENERAL, pools, country)

    pretrain = []
    for person in people:  # every fact in all three phrasings: facts, not sentences, transfer
        facts = facts_of(RELATIONS)
        for rel in RELATIONS:
            pretrain += [
                t.format(name=person, v=facts[rel.key]) for t in (*rel.answers, rel.paraphrase)
            ]
        pretrain.append(_bio(person, facts))
    pretrain += [r["answer"] for r in general] + [r["paraphrased_answer"] for r in general]
    rng.shuffle(pretrain)
    return {
        "authors": authors[:n_authors],
        "holdout": authors[n_authors:],
        "general": general,
        "pretrain": pretrain,
        "people": people,
        "seed": seed,
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def all_texts(bench: dict) -> list[str]:
    """Every string a model may read or be scored on."""
    texts = [REFUSAL, *bench["pretrain"]]
    for a in bench["authors"] + bench["holdout"]:
        texts.append(a["bio"])
        for r in a["qa"]:
            texts += [r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
    for r in bench["general"]:
        texts += [r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
    return texts


def tokenizer_texts(bench: dict) -> list[str]:
    """What the tokenizer is trained on: the general text and the question templates about the
    pretraining people, never the authors. A real tokenizer has not seen the authors either,
    so their names come out in pieces shared with other words instead of as whole tokens that
    only a model trained on them could predict."""
    texts = [REFUSAL, *bench["pretrain"]]
    for r in bench["general"]:
        texts += [r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
    texts += [q.format(name=p) for p in bench["people"] for rel in RELATIONS for q in rel.questions]
    return texts


def _qa(authors: list[dict]) -> list[dict]:
    return [r for a in authors for r in a["qa"]]


def _evaluated(rows: list[dict]) -> list[dict]:
    """One row per fact: two phrasings of one fact share their paraphrased and perturbed
    answers, so scoring both would count one truth ratio twice."""
    return [r for r in rows if r["evaluated"]]


def _bios(authors: list[dict]) -> list[dict]:
    return [{"text": a["bio"], "subject": a["name"]} for a in authors]


def split_authors(authors: list[dict], percent: int) -> dict[str, list[dict]]:
    """One split's author groups: the last `percent` % are the reported (test) forget authors,
    as many before them the validation forget authors (where a study picks its operating
    points), the rest retain authors; every fourth retain author is kept out of the retain
    rows unlearning trains on and evaluated instead, alternately for validation and test."""
    n = max(1, round(len(authors) * percent / 100))
    retain = authors[: -2 * n]
    held = retain[3::4]
    return {
        "forget_test": authors[-n:],
        "forget_val": authors[-2 * n : -n],
        "retain": retain,
        "retain_train": [a for i, a in enumerate(retain) if i % 4 != 3],
        "retain_val": held[0::2],
        "retain_test": held[1::2],
    }


def _write_eval_dir(
    d: Path, forget: list[dict], retain: list[dict], general: list[dict], holdout: list[dict]
) -> dict[str, int]:
    """An evaluation directory in the layout moxkit.eval reads, one row per fact."""
    sets = {
        "forget": _evaluated(_qa(forget)),
        "retain": _evaluated(_qa(retain)),
        "general": _evaluated(general),
    }
    for name, rows in sets.items():
        _write_jsonl(d / f"{name}.jsonl", rows)
    _write_jsonl(d / "forget_text.jsonl", _bios(forget))
    _write_jsonl(d / "holdout_text.jsonl", _bios(holdout))
    return {
        "forget_authors": len(forget),
        "retain_authors": len(retain),
        **{k: len(v) for k, v in sets.items()},
    }


def write(
    out: str | Path, n_authors: int = 100, seed: int = 0, force: bool = False, vocab_size: int = 512
) -> Path:
    """Write tofu-mini to OUT (atomically):

    - `full.jsonl`: what the reference model is trained on (QA of every non-holdout author in
      both phrasings, the general facts, every author's bio as a text row);
    - `pretrain.jsonl`: general text rows for pretraining;
    - per split `forgetXX/`: `train_retain_only.jsonl` (the retain-only model's training set:
      retain authors' QA and bios, general facts); `unlearn_forget.jsonl` (QA of the validation
      and test forget authors, both phrasings: what unlearning removes) and
      `unlearn_retain.jsonl` (the retain rows unlearning may train on); the split directory
      itself is the test evaluation directory (forget, retain, general, forget_text,
      holdout_text: the reported authors, retain authors unlearning never trains on, one row per
      fact) and `val/` the validation one, with disjoint authors and general subjects;
    - `tokenizer/`: a BPE tokenizer (see `tokenizer_texts`); `tofu_mini.json`: the manifest.
    """
    from ..atomic import check_output, staged_dir
    from .tiny import build_bpe_tokenizer

    out = check_output(out, force=force)
    bench = generate(n_authors, seed)
    with staged_dir(out, force=force) as tmp:
        authors, holdout = bench["authors"], bench["holdout"]
        general = bench["general"]
        countries = list(dict.fromkeys(r["subject"] for r in general))
        general_of = {
            k: [r for r in general if countries.index(r["subject"]) % 2 == k] for k in (0, 1)
        }
        _write_jsonl(tmp / "full.jsonl", _qa(authors) + general + _bios(authors))
        _write_jsonl(tmp / "pretrain.jsonl", [{"text": t} for t in bench["pretrain"]])
        counts = {}
        for split, percent in SPLITS.items():
            g = split_authors(authors, percent)
            d = tmp / split
            (d / "val").mkdir(parents=True)
            _write_jsonl(
                d / "train_retain_only.jsonl", _qa(g["retain"]) + general + _bios(g["retain"])
            )
            _write_jsonl(d / "unlearn_forget.jsonl", _qa(g["forget_val"] + g["forget_test"]))
            _write_jsonl(d / "unlearn_retain.jsonl", _qa(g["retain_train"]))
            counts[split] = {
                "test": _write_eval_dir(
                    d, g["forget_test"], g["retain_test"], general_of[1], holdout[1::2]
                ),
                "val": _write_eval_dir(
                    d / "val", g["forget_val"], g["retain_val"], general_of[0], holdout[0::2]
                ),
                "unlearn_forget": 2
                * len(RELATIONS)
                * (len(g["forget_val"]) + len(g["forget_test"])),
                "unlearn_retain": 2 * len(RELATIONS) * len(g["retain_train"]),
            }
        tok = build_bpe_tokenizer(
            tokenizer_texts(bench), vocab_size=vocab_size, alphabet=all_texts(bench)
        )
        tok.save_pretrained(tmp / "tokenizer")
        manifest = {
            "name": "tofu-mini",
            "seed": seed,
            "authors": n_authors,
            "holdout_authors": len(holdout),
            "facts_per_author": len(RELATIONS),
            "phrasings_trained": 2,
            "evaluated_rows_per_fact": 1,
            "perturbed_per_item": N_PERTURBED,
            "tokenizer": "bpe",
            "vocab_size": len(tok),
            "pretrain_rows": len(bench["pretrain"]),
            "splits": counts,
        }
        (tmp / "tofu_mini.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
