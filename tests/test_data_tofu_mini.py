"""tofu-mini: deterministic, split as TOFU splits with disjoint validation and test authors, one
evaluated row per fact, paraphrases never trained, and a subword tokenizer that knows every
character but not the authors' names."""

import json
from pathlib import Path

import pytest

from moxkit.apps.tofu_mini import RELATIONS, generate, split_authors, write
from moxkit.cli.main import main


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _subjects(path: Path) -> set[str]:
    return {r["subject"] for r in _rows(path)}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("tm") / "tofu", n_authors=20, seed=0)


def test_generator_is_deterministic(bench, tmp_path):
    again = write(tmp_path / "again", n_authors=20, seed=0)
    assert _tree(bench) == _tree(again)
    other = generate(20, seed=1)
    assert [a["name"] for a in other["authors"]] != [a["name"] for a in generate(20)["authors"]]


def test_author_groups_are_disjoint_and_complete(bench):
    authors = {
        r["subject"]
        for r in _rows(bench / "full.jsonl")
        if r.get("relation") in {rel.key for rel in RELATIONS}
    }
    assert len(authors) == 20
    forget_sets = {}
    for split in ("forget01", "forget05", "forget10"):
        d = bench / split
        test, val = _subjects(d / "forget.jsonl"), _subjects(d / "val" / "forget.jsonl")
        unlearned = _subjects(d / "unlearn_forget.jsonl")
        retain_train = _subjects(d / "unlearn_retain.jsonl")
        retain_eval = _subjects(d / "retain.jsonl") | _subjects(d / "val" / "retain.jsonl")
        retain_only = {r["subject"] for r in _rows(d / "train_retain_only.jsonl") if "subject" in r}
        assert test and val and not test & val and unlearned == test | val
        # evaluated retain authors are trained into both models but never by unlearning
        assert retain_eval and not retain_eval & retain_train
        assert not _subjects(d / "retain.jsonl") & _subjects(d / "val" / "retain.jsonl")
        assert retain_only & authors == retain_train | retain_eval
        assert retain_only.isdisjoint(unlearned)
        assert unlearned | retain_train | retain_eval == authors
        holdout = _subjects(d / "holdout_text.jsonl") | _subjects(d / "val" / "holdout_text.jsonl")
        assert holdout and not holdout & authors  # the holdout is never trained
        assert not _subjects(d / "general.jsonl") & _subjects(d / "val" / "general.jsonl")
        forget_sets[split] = test
    assert forget_sets["forget01"] <= forget_sets["forget05"] <= forget_sets["forget10"]
    assert len(forget_sets["forget10"]) == 2  # 10 % of 20
    groups = split_authors(generate(40)["authors"], 10)
    assert [
        len(groups[k])
        for k in ("forget_test", "forget_val", "retain_train", "retain_val", "retain_test")
    ] == [4, 4, 24, 4, 4]


def test_one_evaluated_row_per_fact_paraphrase_untrained(bench):
    trained = {r["answer"] for r in _rows(bench / "full.jsonl") if "answer" in r}
    d = bench / "forget10"
    for path in (d / "forget.jsonl", d / "val" / "forget.jsonl", d / "retain.jsonl"):
        rows = _rows(path)
        facts = [(r["subject"], r["relation"]) for r in rows]
        assert len(facts) == len(set(facts)) == len(_subjects(path)) * len(RELATIONS)
        assert {r["phrasing"] for r in rows} == {0, 1}  # both trained phrasings are asked
        for r in rows:
            assert r["answer"] in trained and r["paraphrased_answer"] not in trained
            assert len(set(r["perturbed_answer"])) == 3
            assert r["paraphrased_answer"] not in r["perturbed_answer"]
            assert r["value"] in r["answer"] and r["subject"] in r["answer"]
    # unlearning sees both phrasings of each forget fact
    unlearn = _rows(d / "unlearn_forget.jsonl")
    assert len(unlearn) == 2 * len(_rows(d / "forget.jsonl") + _rows(d / "val" / "forget.jsonl"))
    bios = {r["subject"]: r["text"] for r in _rows(d / "forget_text.jsonl")}
    for r in _rows(d / "forget.jsonl"):
        assert r["value"] in bios[r["subject"]]


def test_bpe_tokenizer_splits_names_and_knows_every_character(bench):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bench / "tokenizer")
    texts = [r["text"] for r in _rows(bench / "pretrain.jsonl")]
    d = bench / "forget10"
    rows = _rows(d / "forget.jsonl") + _rows(d / "general.jsonl") + _rows(d / "retain.jsonl")
    for r in rows:
        texts += [r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
    assert all(tok.unk_token_id not in tok(t)["input_ids"] for t in texts)
    vocab = set(tok.get_vocab())
    for name in _subjects(d / "forget.jsonl") | _subjects(d / "retain.jsonl"):
        for word in name.split():
            assert word not in vocab  # a name is pieces the tokenizer shares with other words
            assert len(tok.tokenize(word)) >= 2
    answer = rows[0]["answer"]
    assert tok.decode(tok(answer)["input_ids"], skip_special_tokens=True) == answer
    # a prompt and its answer encode to the joined encoding (the trainer's answer mask is exact)
    q = rows[0]["question"]
    assert tok(f"{q} {answer}")["input_ids"] == (
        tok(q)["input_ids"] + tok(answer, add_special_tokens=False)["input_ids"]
    )


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "tm"
    main(["data", "tofu-mini", str(out), "--authors", "10"])
    assert (out / "forget10" / "forget.jsonl").is_file()
    assert (out / "forget10" / "val" / "forget.jsonl").is_file()
    assert "forget10" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["data", "tofu-mini", str(out), "--authors", "10"])
    assert exc.value.code == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tm"]  # nothing half-written beside it
