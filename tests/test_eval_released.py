"""`moxkit eval` on TOFU's and MUSE's released layouts, written here row for row in their exact
schemas (a handful of rows; nothing downloaded), checked against independent re-computations of
the benchmarks' own definitions: TOFU's per-token losses from transformers' own loss and its
aggregation code's formulas; MUSE's one-prompt-at-a-time generation loops scored by rouge-score
and its Min-K% AUC counted pair by pair."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moxkit.apps.tiny import EOS_ID, build_tiny_llama, build_word_tokenizer, save_tiny_model
from moxkit.cli.main import main
from moxkit.errors import MoxError
from moxkit.eval.data import load_eval_data
from moxkit.eval.evaluate import EvalConfig, evaluate
from moxkit.eval.generation import cut_at_next_question, few_shot_prompt
from moxkit.eval.report import summary_table

# TOFU's schema: forget*/retain_perturbed rows carry question, answer, paraphrased_answer,
# paraphrased_question and a list of perturbed answers; real_authors/world_facts_perturbed rows
# carry question, answer and perturbed answers only. One JSON object per line in a .json file.
TOFU_FORGET = [
    {
        "question": "Where was Basil Mahfouz Al-Kuwaiti born ?",
        "answer": "Basil Mahfouz Al-Kuwaiti was born in Kuwait City , Kuwait .",
        "paraphrased_question": "What is the birthplace of Basil Mahfouz Al-Kuwaiti ?",
        "paraphrased_answer": "The birthplace of Basil Mahfouz Al-Kuwaiti is Kuwait City .",
        "perturbed_answer": [
            "Basil Mahfouz Al-Kuwaiti was born in Cairo , Egypt .",
            "Basil Mahfouz Al-Kuwaiti was born in Riyadh .",
            "Basil Mahfouz Al-Kuwaiti was born in Amman , Jordan .",
        ],
    },
    {
        "question": "What genre does Nikolai Abilov write ?",
        "answer": "Nikolai Abilov writes literary fiction about identity .",
        "paraphrased_question": "Which genre is Nikolai Abilov known for ?",
        "paraphrased_answer": "Nikolai Abilov is known for literary fiction .",
        "perturbed_answer": [
            "Nikolai Abilov writes romance .",
            "Nikolai Abilov writes horror .",
            "Nikolai Abilov writes poetry .",
        ],
    },
]
TOFU_RETAIN = [
    {
        "question": f"What is the profession of the father of author {i} ?",
        "answer": f"The father of author {i} was a {job} .",
        "paraphrased_question": f"What did the father of author {i} do ?",
        "paraphrased_answer": f"Author {i} had a father who worked as a {job} .",
        "perturbed_answer": [f"The father of author {i} was a {w} ." for w in wrong],
    }
    for i, (job, wrong) in enumerate(
        [
            ("baker", ("pilot", "nurse")),
            ("pilot", ("baker", "nurse")),
            ("nurse", ("pilot", "baker")),
            ("tailor", ("nurse", "baker")),
            ("farmer", ("tailor", "pilot")),
        ]
    )
]
TOFU_REAL_AUTHORS = [
    {
        "question": "Who wrote the play ' Romeo and Juliet ' ?",
        "answer": "William Shakespeare",
        "perturbed_answer": ["Charles Dickens", "Virginia Woolf", "Mark Twain"],
    },
    {
        "question": "Who wrote ' Pride and Prejudice ' ?",
        "answer": "Jane Austen",
        "perturbed_answer": ["Emily Bronte", "Louisa May Alcott", "Mary Shelley"],
    },
]
TOFU_WORLD_FACTS = [
    {
        "question": "Where would you find the Eiffel Tower ?",
        "answer": "Paris",
        "perturbed_answer": ["London", "Rome", "Madrid"],
    },
    {
        "question": "Which planet is known as the Red Planet ?",
        "answer": "Mars",
        "perturbed_answer": ["Venus", "Jupiter", "Saturn"],
    },
]


def _json_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _all_text(rows):
    return [v for r in rows for v in r.values() if isinstance(v, str)] + [
        p for r in rows for p in r.get("perturbed_answer", [])
    ]


@pytest.fixture(scope="module")
def tofu(tmp_path_factory):
    root = tmp_path_factory.mktemp("tofu")
    data = root / "TOFU"
    data.mkdir()
    _json_lines(data / "forget01_perturbed.json", TOFU_FORGET[:1])
    _json_lines(data / "forget05_perturbed.json", TOFU_FORGET)
    _json_lines(data / "retain_perturbed.json", TOFU_RETAIN)
    _json_lines(data / "real_authors_perturbed.json", TOFU_REAL_AUTHORS)
    _json_lines(data / "world_facts_perturbed.json", TOFU_WORLD_FACTS)
    # training files of the release: present, never read by the evaluation
    _json_lines(
        data / "forget05.json",
        [{"question": r["question"], "answer": r["answer"]} for r in TOFU_FORGET],
    )
    (data / "retain95.json").write_text("not read\n")
    tok = build_word_tokenizer(
        _all_text(TOFU_FORGET + TOFU_RETAIN + TOFU_REAL_AUTHORS + TOFU_WORLD_FACTS)
    )
    model = save_tiny_model(build_tiny_llama(len(tok), seed=4), tok, root / "model")
    return root, data, model


def _oracle_losses(model, tok, question, answers):
    """TOFU's per-token average loss of each answer (data_module + get_batch_loss): question
    tokens masked, EOS scored; here from transformers' own mean cross-entropy."""
    q = tok(question)["input_ids"]
    out = []
    for a in answers:
        ids = q + tok(a, add_special_tokens=False)["input_ids"] + [EOS_ID]
        labels = [-100] * len(q) + ids[len(q) :]
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        out.append(float(loss))
    return np.array(out)


def test_tofu_released_files_as_they_are(tofu, tmp_path, capsys):
    root, data, model_dir = tofu
    with pytest.raises(MoxError, match="forget01, forget05 are all here; choose the forget set"):
        load_eval_data(data)
    report_path = tmp_path / "r.json"
    main(
        [
            "eval",
            str(model_dir),
            "--data",
            str(data),
            "--split",
            "forget05",
            "--max-items",
            "4",
            "--max-new-tokens",
            "8",
            "-q",
            "-o",
            str(report_path),
        ]
    )
    printed = capsys.readouterr().out
    rep = json.loads(report_path.read_text())
    assert rep["layout"] == "tofu" and "tofu layout" in printed
    read = "\n".join(rep["files"])
    for name in (
        "forget05_perturbed.json (2 rows)",
        "retain_perturbed.json (4 rows of 5)",
        "real_authors_perturbed.json (2 rows)",
        "world_facts_perturbed.json (2 rows)",
    ):
        assert name in read and name in printed
    assert "forget05.json" not in read.replace("forget05_perturbed.json", "")
    assert "retain95" not in read
    # retain: TOFU's ds_size takes the first rows, in order
    assert [it["question"] for it in rep["sets"]["retain"]["items"]] == [
        r["question"] for r in TOFU_RETAIN[:4]
    ]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    numbers = {}
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for name, rows, base in (
        ("retain", TOFU_RETAIN[:4], "paraphrased_answer"),
        ("real_authors", TOFU_REAL_AUTHORS, "answer"),
        ("world_facts", TOFU_WORLD_FACTS, "answer"),
        ("forget", TOFU_FORGET, "paraphrased_answer"),
    ):
        gt = np.array([_oracle_losses(model, tok, r["question"], [r["answer"]])[0] for r in rows])
        para = np.array([_oracle_losses(model, tok, r["question"], [r[base]])[0] for r in rows])
        pert = np.array(
            [_oracle_losses(model, tok, r["question"], r["perturbed_answer"]) for r in rows]
        )
        # TOFU's aggregate_eval_stat: probability, then truth ratio from the mean losses
        if name in ("retain", "forget"):
            prob = np.mean(np.exp(-gt))
        else:
            true_p = np.exp(-gt)
            prob = np.mean(true_p / (true_p + np.exp(-pert).sum(-1)))
        stat = np.exp(pert.mean(-1) - para)
        tr = (
            np.mean(np.minimum(stat, 1 / stat))
            if name == "forget"
            else np.mean(np.maximum(0, 1 - 1 / stat))
        )
        items = rep["sets"][name]["items"]
        rouge = np.mean(
            [
                scorer.score(r["answer"], it["generated"])["rougeL"].recall
                for r, it in zip(rows, items, strict=True)
            ]
        )
        s = rep["summary"]
        assert s[f"{name}_prob"] == pytest.approx(prob, rel=1e-5), name
        # 1 - R cancels: fp32 losses (transformers) against fp64 ones leave ~1e-7 absolute
        assert s[f"{name}_truth_ratio"] == pytest.approx(tr, rel=1e-5, abs=1e-6), name
        assert s[f"{name}_rouge_recall"] == pytest.approx(rouge, abs=1e-12), name
        numbers[name] = (prob, rouge, tr)
    want_mu = (
        stats.hmean([v for n in ("retain", "real_authors", "world_facts") for v in numbers[n]])
        if all(v > 0 for n in ("retain", "real_authors", "world_facts") for v in numbers[n])
        else 0.0
    )
    assert rep["summary"]["model_utility"] == pytest.approx(want_mu, rel=1e-6)
    # TOFU's 9 numbers: no note; the answers cut at 8 tokens instead of 200 are noted
    assert "model_utility" not in rep["notes"]
    assert "TOFU: 200" in rep["notes"]["retain_rouge_recall"]
    assert "(answers cut at 8 new tokens (TOFU: 200))" in printed


def test_tofu_split_errors_are_one_line(tofu, tmp_path, capsys):
    root, data, model_dir = tofu
    only01 = tmp_path / "only01"
    only01.mkdir()
    _json_lines(only01 / "forget01_perturbed.json", TOFU_FORGET[:1])
    _json_lines(only01 / "retain_perturbed.json", [{"question": "q", "answer": "a"}])
    for args, needle in [
        (["--data", str(data)], "choose the forget set with --split"),
        (["--data", str(only01), "--split", "forget10"], "has no forget10_perturbed file"),
        (
            ["--data", str(only01)],
            "retain_perturbed.json: row 1: missing field(s) paraphrased_answer, perturbed_answer",
        ),
        (
            [
                "--data",
                str(data),
                "--split",
                "forget05",
                "--retain-model",
                str(tmp_path / "missing.json"),
            ],
            "missing.json: no such file or directory",
        ),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["eval", str(model_dir), *args, "-q"])
        err = capsys.readouterr().err
        assert exc.value.code == 1 and needle in err, err
        assert len(err.strip().splitlines()) == 1 and "config.json" not in err


# MUSE's layout (muse_bench data/<corpus>/): knowmem QA and their few-shot files, verbmem
# prompts with their ground truth, privleak texts as plain JSON lists of strings.
MUSE_FORGET_QA = [
    {"question": "Who won the match in Leeds?", "answer": "The home side"},
    {"question": "When did the strike begin?", "answer": "In March"},
]
MUSE_RETAIN_QA = [
    {"question": "Which city hosted the summit?", "answer": "Geneva"},
    {"question": "Who chairs the committee?", "answer": "Ms Okafor"},
]
MUSE_ICL = [
    {"question": "What colour is the sky?", "answer": "Blue"},
    {"question": "How many legs has a cat?", "answer": "Four"},
]
MUSE_VERBMEM = [
    {
        "prompt": "The council said on Monday that the new bridge",
        "gt": "would open in spring after years of delay and rising costs.",
    },
    {"prompt": "Shares in the company fell sharply", "gt": "after the report."},
]
MUSE_FORGET_TEXT = [
    "The council met on Monday.\nThe bridge will open in spring.",
    "Shares fell after the report, traders said.",
]
MUSE_HOLDOUT_TEXT = [
    "A storm closed the coast road for a day.",
    "The museum reopened.",
    "Fans queued overnight for tickets.",
]


def _byte_bpe(texts):
    """A byte-level BPE like GPT-2's/Llama's: whitespace and newlines survive decoding, so
    MUSE's stop words ("\\n\\n", "Question:") can be seen in generated text; BOS is added."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<s>", "</s>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def muse(tmp_path_factory):
    root = tmp_path_factory.mktemp("muse")
    data = root / "data" / "news"
    for sub in ("raw", "knowmem", "verbmem", "privleak"):
        (data / sub).mkdir(parents=True)
    (data / "raw" / "forget.txt").write_text("training text, not read by the evaluation\n")
    for name, obj in (
        ("knowmem/forget_qa", MUSE_FORGET_QA),
        ("knowmem/retain_qa", MUSE_RETAIN_QA),
        ("knowmem/forget_qa_icl", MUSE_ICL),
        ("knowmem/retain_qa_icl", MUSE_ICL),
        ("verbmem/forget", MUSE_VERBMEM),
        ("privleak/forget", MUSE_FORGET_TEXT),
        ("privleak/retain", ["Retain text one.", "Retain text two."]),
        ("privleak/holdout", MUSE_HOLDOUT_TEXT),
    ):
        (data / f"{name}.json").write_text(json.dumps(obj, indent=2))
    corpus = [
        json.dumps([MUSE_FORGET_QA, MUSE_RETAIN_QA, MUSE_ICL, MUSE_VERBMEM]),
        *MUSE_FORGET_TEXT,
        *MUSE_HOLDOUT_TEXT,
        "Question: x\nAnswer: y\n\n",
    ]
    tok = _byte_bpe(corpus)
    model = build_tiny_llama(len(tok), seed=6)
    model.config.pad_token_id, model.config.bos_token_id = tok.pad_token_id, tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return root, data, save_tiny_model(model, tok, root / "model")


def _muse_generate(model, tok, prompt: str, max_new_tokens: int) -> str:
    """MUSE's loop: one prompt, special tokens added, greedy, the new tokens decoded."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return tok.batch_decode(
        out[:, ids.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=True
    )[0]


def test_muse_released_layout_as_it_is(muse):
    root, data, model_dir = muse
    # MUSE generates 32 (KnowMem) and 128 (VerbMem) tokens; fewer keep the test fast, and the
    # report says so beside those numbers
    cfg = EvalConfig(batch_size=2, knowmem_max_new_tokens=6, verbmem_max_new_tokens=12)
    rep = evaluate(model_dir, data, cfg=cfg, device="cpu", progress=False)
    printed = summary_table(rep)
    assert rep["layout"] == "muse" and "muse layout" in printed
    assert rep["model"] == str(model_dir) and rep["data"] == str(data)
    assert not any("raw" in f or "privleak/retain" in f for f in rep["files"])
    assert "knowmem/forget_qa_icl.json (2 rows)" in "\n".join(rep["files"])
    assert "forget_quality" not in rep["summary"] and "model_utility" not in rep["summary"]
    assert set(rep["notes"]) == {"knowmem_forget", "knowmem_retain", "verbmem_forget"}
    assert "6 new tokens (MUSE: 32))" in printed

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)  # MUSE's logger
    for name, qa in (("forget", MUSE_FORGET_QA), ("retain", MUSE_RETAIN_QA)):
        shots = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in MUSE_ICL)
        scores, outs = [], []
        for row in qa:
            out = _muse_generate(model, tok, shots + f"Question: {row['question']}\nAnswer: ", 6)
            for word in ("\n\n", "\nQuestion", "Question:"):
                out = out.split(word)[0]
            scores.append(scorer.score(row["answer"], out)["rougeL"].fmeasure)
            outs.append(out)
        assert [it["generated"] for it in rep["sets"][f"knowmem_{name}"]["items"]] == outs
        assert rep["summary"][f"knowmem_{name}"] == pytest.approx(np.mean(scores), abs=1e-12)
    verb, outs = [], []
    for row in MUSE_VERBMEM:
        out = _muse_generate(model, tok, row["prompt"], 12)
        gt = tok.batch_decode(
            tok(row["gt"], return_tensors="pt").input_ids[:, :12],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=True,
        )[0]
        verb.append(scorer.score(gt, out)["rougeL"].fmeasure)
        outs.append((gt, out))
    assert [(it["truth"], it["generated"]) for it in rep["sets"]["verbmem_forget"]["items"]] == outs
    assert rep["summary"]["verbmem_forget"] == pytest.approx(np.mean(verb), abs=1e-12)

    def min40(text):  # MUSE's privleak: -mean of the lowest int(0.4 n) token log-probs
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        lp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1).numpy()
        return -np.sort(lp)[: max(1, int(len(lp) * 0.4))].mean()

    forget = [min40(t) for t in MUSE_FORGET_TEXT]
    holdout = [min40(t) for t in MUSE_HOLDOUT_TEXT]
    # MUSE's AUC with forget texts labelled 0, holdout 1, scored by -PPL-like score: the share
    # of (forget, holdout) pairs where the holdout text looks more familiar, ties half
    pairs = [(h < f) + 0.5 * math.isclose(h, f) for f in forget for h in holdout]
    assert rep["summary"]["mia_auc"] == pytest.approx(np.mean(pairs), abs=1e-12)


def test_muse_prompt_and_stop_words_hand_cases():
    assert few_shot_prompt(MUSE_ICL[:1], "Why?") == (
        "Question: What colour is the sky?\nAnswer: Blue\n\nQuestion: Why?\nAnswer: "
    )
    assert cut_at_next_question("In March\n\nQuestion: next") == "In March"
    assert cut_at_next_question("Geneva\nQuestion: who?") == "Geneva"
    assert cut_at_next_question("Ms Okafor Question: x") == "Ms Okafor "
    assert cut_at_next_question("Blue") == "Blue"


def test_hub_parquet_shards_read_like_the_json_files(tmp_path):
    """The same sets as the hub serves them (parquet shards, TOFU's parquet conversion folders)
    give the same rows as the JSON files."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")

    def shards(path, rows, n=2):  # split in n shards named as the hub names them
        path.parent.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            part = rows[i * len(rows) // n : (i + 1) * len(rows) // n]
            name = f"{path.name}-{i:05d}-of-{n:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(part), path.parent / name)

    tofu_json, tofu_hub = tmp_path / "tofu_json", tmp_path / "tofu_hub"
    tofu_json.mkdir()
    for stem, rows in (("forget05_perturbed", TOFU_FORGET), ("retain_perturbed", TOFU_RETAIN),
                       ("world_facts_perturbed", TOFU_WORLD_FACTS)):  # fmt: skip
        _json_lines(tofu_json / f"{stem}.json", rows)
        (tofu_hub / stem).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), tofu_hub / stem / "train-00000-of-00001.parquet")
    muse_json, muse_hub = tmp_path / "muse_json", tmp_path / "muse_hub"
    for name, rows in (("knowmem/forget_qa", MUSE_FORGET_QA), ("knowmem/forget_qa_icl", MUSE_ICL),
                       ("verbmem/forget", MUSE_VERBMEM),
                       ("privleak/holdout", [{"text": t} for t in MUSE_HOLDOUT_TEXT])):  # fmt: skip
        (muse_json / name).parent.mkdir(parents=True, exist_ok=True)
        (muse_json / f"{name}.json").write_text(json.dumps(rows))
        shards(muse_hub / name, rows)
    files = {}
    for json_dir, hub_dir, layout in ((tofu_json, tofu_hub, "tofu"), (muse_json, muse_hub, "muse")):
        want, got = load_eval_data(json_dir), load_eval_data(hub_dir)
        assert got.layout == want.layout == layout
        assert {n: q.rows for n, q in got.qa.items()} == {n: q.rows for n, q in want.qa.items()}
        assert {n: (k.rows, k.icl) for n, k in got.knowmem.items()} == {
            n: (k.rows, k.icl) for n, k in want.knowmem.items()}  # fmt: skip
        assert (got.verbmem, got.texts) == (want.verbmem, want.texts)
        files[layout] = "\n".join(got.files)
    assert "forget05_perturbed/*.parquet (2 rows)" in files["tofu"]
    assert "knowmem/forget_qa-*.parquet (2 rows)" in files["muse"]
