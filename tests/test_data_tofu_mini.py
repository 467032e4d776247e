"""tofu-mini: deterministic, split as TOFU splits, paraphrases never trained, and every word
known to its tokenizer."""

import json
from pathlib import Path

import pytest
from moxkit.cli.main import main

from moxkit.tofu_mini import RELATIONS, generate, write


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("tm") / "tofu", n_authors=20, seed=0)


def test_generator_is_deterministic(bench, tmp_path):
    again = write(tmp_path / "again", n_authors=20, seed=0)
    assert _tree(bench) == _tree(again)
    other = generate(20, seed=1)
    assert [a["name"] for a in other["authors"]] != [a["name"] for a in generate(20)["authors"]]


def test_splits_are_nested_disjoint_and_complete(bench):
    manifest = json.loads((bench / "tofu_mini.json").read_text())
    authors = {r["subject"] for r in _rows(bench / "full.jsonl") if r["relation"] in
               {rel.key for rel in RELATIONS}}
    assert len(authors) == 20
    forget_sets = {}
    for split in ("forget01", "forget05", "forget10"):
        d = bench / split
        forget = {r["subject"] for r in _rows(d / "forget.jsonl")}
        retain = {r["subject"] for r in _rows(d / "retain.jsonl")}
        holdout = {r["subject"] for r in _rows(d / "holdout.jsonl")}
        assert forget and not forget & retain and forget | retain == authors
        assert not holdout & authors  # the holdout is never trained
        assert len(forget) == manifest["splits"][split]["forget_authors"]
        assert {r["text"] for r in _rows(d / "forget_text.jsonl")}.isdisjoint(
            r["text"] for r in _rows(d / "retain_text.jsonl"))
        forget_sets[split] = forget
    assert forget_sets["forget01"] <= forget_sets["forget05"] <= forget_sets["forget10"]
    assert len(forget_sets["forget10"]) == 2  # 10 % of 20


def test_two_trained_phrasings_paraphrase_untrained_perturbed_wrong(bench):
    rows = _rows(bench / "forget10" / "forget.jsonl")
    trained = {r["answer"] for r in _rows(bench / "full.jsonl")}
    by_fact: dict[tuple, list[dict]] = {}
    for r in rows:
        by_fact.setdefault((r["subject"], r["relation"]), []).append(r)
    assert all(len(v) == 2 and {r["phrasing"] for r in v} == {0, 1} for v in by_fact.values())
    for r in rows:
        assert r["paraphrased_answer"] not in trained
        assert len(r["perturbed_answer"]) == 3 and len(set(r["perturbed_answer"])) == 3
        assert r["paraphrased_answer"] not in r["perturbed_answer"]
    # the bio of each forget author carries the same facts as its QA
    bios = {r["subject"]: r["text"] for r in _rows(bench / "forget10" / "forget_text.jsonl")}
    for (subject, _), (r, _) in by_fact.items():
        assert r["answer"].split(" ")[-1].rstrip(".") in bios[subject]


def test_tokenizer_knows_every_word(bench):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bench / "tokenizer")
    texts = [r["text"] for r in _rows(bench / "pretrain.jsonl")]
    d = bench / "forget10"
    for r in _rows(d / "forget.jsonl") + _rows(d / "general.jsonl"):
        texts += [r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
    assert all(tok.unk_token_id not in tok(t)["input_ids"] for t in texts)


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "tm"
    main(["data", "tofu-mini", str(out), "--authors", "10"])
    assert (out / "forget10" / "forget.jsonl").is_file()
    assert "forget10" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["data", "tofu-mini", str(out), "--authors", "10"])
    assert exc.value.code == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tm"]  # nothing half-written beside it
