"""The tiny model and tokenizer builders: what tests and the demo stand on."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moxkit.apps.tiny import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    build_tiny_llama,
    build_word_tokenizer,
    save_tiny_model,
    tiny_facts,
)

TEXTS = ["Who wrote Dune?", "Frank Herbert wrote Dune.", "The sky is blue."]


def test_word_tokenizer_vocab_and_specials():
    tok = build_word_tokenizer(TEXTS, extra_tokens=["zebra"])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (
        PAD_ID,
        BOS_ID,
        EOS_ID,
        UNK_ID,
    )
    ids = tok("Frank Herbert wrote Dune.")["input_ids"]
    assert ids[0] == BOS_ID and len(ids) == 6  # <s> + 4 words + "."
    assert UNK_ID not in ids
    assert tok.convert_ids_to_tokens(ids[1:]) == ["Frank", "Herbert", "wrote", "Dune", "."]
    assert tok("zebra", add_special_tokens=False)["input_ids"] != [UNK_ID]
    assert tok("platypus", add_special_tokens=False)["input_ids"] == [UNK_ID]
    # ".", "Dune" and "wrote" appear twice: first after the specials, in text order
    assert tok.convert_tokens_to_ids([".", "Dune", "wrote"]) == [4, 5, 6]
    # prompt and answer encoded apart concatenate to the joined encoding (exact answer mask)
    joined = tok("Who wrote Dune? Frank Herbert wrote Dune.")["input_ids"]
    apart = (
        tok("Who wrote Dune?")["input_ids"]
        + tok("Frank Herbert wrote Dune.", add_special_tokens=False)["input_ids"]
    )
    assert joined == apart


def test_chat_template_tokens_known():
    tok = build_word_tokenizer(TEXTS)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Who wrote Dune?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("user : Who wrote Dune?") and text.rstrip().endswith("assistant :")
    assert UNK_ID not in tok(text)["input_ids"]


def test_tiny_llama_seeded_and_roundtrips(tmp_path):
    tok = build_word_tokenizer(TEXTS)
    state = torch.get_rng_state()
    a = build_tiny_llama(len(tok), hidden_size=32, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    b = build_tiny_llama(len(tok), hidden_size=32, seed=3)
    c = build_tiny_llama(len(tok), hidden_size=32, seed=4)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.vocab_size == len(tok) and a.config.tie_word_embeddings

    out = save_tiny_model(a, tok, tmp_path / "tiny")
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temp dir left behind
    loaded = AutoModelForCausalLM.from_pretrained(out)
    loaded_tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([loaded_tok("Who wrote Dune?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, a(ids).logits, rtol=0, atol=0)
    assert loaded_tok.pad_token_id == PAD_ID and loaded_tok.chat_template is not None


def test_tiny_facts_deterministic_and_disjoint():
    a, b = tiny_facts(20, offset=0), tiny_facts(20, offset=20)
    assert a == tiny_facts(20, offset=0) and len(a) == 20
    people = lambda rows: {r["question"].split()[2] for r in rows}  # noqa: E731
    assert len(people(a)) == 20 and not people(a) & people(b)
    assert all(r["answer"].startswith(r["question"].split()[2] + " loves ") for r in a)
