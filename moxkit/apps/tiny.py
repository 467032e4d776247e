"""Tiny models and tokenizers built locally, for tests and the CPU demo.

Nothing can be downloaded from a model hub here, so the test models are Llama architectures
built from a config with random weights, and the tokenizers are trained on local text: a
subword (BPE) one, which splits invented names into pieces as real tokenizers do, and a
word-level one for tests that want one token per word. Both save with `save_pretrained`, so
everything downstream (the trainer, the extrapolation engine, evaluation) treats them like any
Hugging Face model.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from moxkit.atomic import staged_dir

# Fixed ids so that a model can be configured without seeing the tokenizer.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# A minimal role-prefixed chat template; its words are added to the vocabulary.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)
_CHAT_WORDS = ("system", "user", "assistant", ":")


def build_word_tokenizer(
    texts: Iterable[str],
    *,
    extra_tokens: Iterable[str] = (),
    chat_template: bool = True,
    model_max_length: int = 256,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word and punctuation run in `texts`.

    Words are split on whitespace and punctuation (`Whitespace` pre-tokenizer), so encoding a
    prompt and an answer separately gives the same tokens as encoding them joined by a space:
    the answer mask is exact. Encodings start with <s> (like Llama); ids 0-3 are
    <pad>, <s>, </s>, <unk>. The vocabulary order is deterministic (by frequency, then text).
    """
    splitter = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in splitter.pre_tokenize_str(text))
    words = list(extra_tokens) + (list(_CHAT_WORDS) if chat_template else [])
    counts.update({w: 0 for w in words if w not in counts})
    ordered = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {PAD: PAD_ID, BOS: BOS_ID, EOS: EOS_ID, UNK: UNK_ID}
    for word in ordered:
        vocab.setdefault(word, len(vocab))

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = splitter
    return _wrap(core, chat_template, model_max_length)


def build_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    alphabet: Iterable[str] = (),
    chat_template: bool = True,
    model_max_length: int = 256,
) -> PreTrainedTokenizerFast:
    """A subword (BPE) tokenizer trained on `texts`, with at most `vocab_size` tokens.

    Words are split on whitespace and punctuation first and BPE merges happen inside words
    (continuation pieces carry a "##" prefix, so decoding restores the spaces), which keeps the
    answer mask exact as for the word-level tokenizer. A small vocabulary leaves rare words,
    such as invented names, in several pieces that other words share: a model can copy a name
    it never learned from the question, as with real tokenizers. Every character of `alphabet`
    (texts) gets a token, so text outside the training corpus never encodes to <unk>.
    Deterministic in its arguments.
    """
    texts = list(texts)
    if chat_template:
        texts.append(" ".join(_CHAT_WORDS))
    splitter = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in splitter.pre_tokenize_str(text))
    chars = sorted(
        {c for w in counts for c in w} | {c for t in alphabet for c in t if not c.isspace()}
    )
    vocab = {PAD: PAD_ID, BOS: BOS_ID, EOS: EOS_ID, UNK: UNK_ID}
    for token in chars + [f"##{c}" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges = _bpe_merges(counts, vocab_size - len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right[2:], len(vocab))
    core = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK, continuing_subword_prefix="##")
    )
    core.pre_tokenizer = splitter
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return _wrap(core, chat_template, model_max_length)


def _bpe_merges(counts: Counter[str], n_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from word counts, most frequent pair first; ties go to the
    alphabetically first pair, so the result is a pure function of the counts (the
    `tokenizers` trainer breaks ties in hash order, which changes from run to run). Pairs seen
    fewer than twice are never merged."""
    words = [([w[0]] + [f"##{c}" for c in w[1:]], n) for w, n in sorted(counts.items())]
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in words:
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = best[0] + best[1][2:]
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i : i + 2] = [merged]
                i += 1
    return merges


def _wrap(core: Tokenizer, chat_template: bool, model_max_length: int) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around `core`: <s> first (like Llama), fixed special ids."""
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised fp32 Llama; the same seed gives the same weights, and the global
    RNG is left untouched so callers' own seeding is not disturbed."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def save_tiny_model(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path
) -> Path:
    """Write weights (safetensors), config and tokenizer to `out_dir`, replacing it: built in a
    staged folder beside it that takes its place only when complete."""
    with staged_dir(out_dir, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


_NAMES = "ka lo mi ra su ven to bel dri na qu osk".split()
_OBJECTS = "apples rivers songs stones lamps boats kites maps coins bells".split()
_COLORS = "red blue green gold grey black white pink".split()


def tiny_facts(n: int, *, seed: int = 0, offset: int = 0) -> list[dict]:
    """`n` question/answer rows about made-up people (one fact each), deterministic in
    (seed, offset). Rows at different offsets are about different people (144 in all), so a
    forget set and a retain set can be drawn from disjoint offsets."""
    rows = []
    for i in range(offset, offset + n):
        name = (_NAMES[i % len(_NAMES)] + _NAMES[(i // len(_NAMES)) % len(_NAMES)]).capitalize()
        pick = random.Random(seed * 7919 + i)
        color, thing = pick.choice(_COLORS), pick.choice(_OBJECTS)
        answer = f"{name} loves {color} {thing} ."
        rows.append({"question": f"What does {name} love ?", "answer": answer})
    return rows
