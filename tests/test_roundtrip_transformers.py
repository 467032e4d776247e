"""transformers is the oracle for the output format: tiny Llama models saved sharded by
save_pretrained, extrapolated, loaded back by from_pretrained, hold exactly the computed values,
keep their tied embeddings, and come with REF's config and tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from ckpt_factory import emulate
from transformers import AutoModelForCausalLM, AutoTokenizer

import moxkit
from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer


def _pair(tmp_path, tied: bool, dtype: torch.dtype):
    tok = build_word_tokenizer(["the quick brown fox jumps over the lazy dog"])
    ref = build_tiny_llama(len(tok), hidden_size=48, num_layers=2, tie_word_embeddings=tied, seed=0)
    mem = build_tiny_llama(len(tok), hidden_size=48, num_layers=2, tie_word_embeddings=tied, seed=1)
    ref, mem = ref.to(dtype), mem.to(dtype)
    ref.save_pretrained(tmp_path / "ref", max_shard_size="20KB")  # many shards
    mem.save_pretrained(tmp_path / "mem", max_shard_size="50KB")  # a different layout
    tok.save_pretrained(tmp_path / "ref")
    assert len(list((tmp_path / "ref").glob("model-*.safetensors"))) > 2
    return ref, mem, tok


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_from_pretrained_loads_exact_values(tmp_path, tied):
    ref, mem, tok = _pair(tmp_path, tied, torch.bfloat16)
    report = moxkit.extrapolate(
        tmp_path / "ref",
        tmp_path / "mem",
        4.0,
        tmp_path / "out",
        max_shard_size="30KB",
        progress=False,
    )
    assert len(report.shards) > 1
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert out.config.tie_word_embeddings == tied
    if tied:
        assert out.lm_head.weight.data_ptr() == out.model.embed_tokens.weight.data_ptr()
    sd_ref, sd_mem, sd_out = ref.state_dict(), mem.state_dict(), out.state_dict()
    assert set(sd_out) == set(sd_ref)
    for name, value in sd_out.items():
        want = emulate(sd_ref[name], sd_mem[name], 4.0, out_dtype=torch.bfloat16)
        assert torch.equal(value, want), name
    # REF's non-weight files came along
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert loaded_tok("the lazy dog").input_ids == tok("the lazy dog").input_ids
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_dtype_change_updates_config_and_momentum_loads(tmp_path):
    ref, mem, _ = _pair(tmp_path, True, torch.bfloat16)
    moxkit.extrapolate(tmp_path / "ref", tmp_path / "mem", 2.0, tmp_path / "prev", progress=False)
    moxkit.extrapolate(
        tmp_path / "ref",
        tmp_path / "mem",
        2.0,
        tmp_path / "out",
        prev=tmp_path / "prev",
        eta=0.5,
        dtype="fp32",
        progress=False,
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float32"
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert out.dtype == torch.float32
    prev = AutoModelForCausalLM.from_pretrained(
        tmp_path / "prev", dtype=torch.bfloat16
    ).state_dict()
    sd_ref, sd_mem = ref.state_dict(), mem.state_dict()
    for name, value in out.state_dict().items():
        want = emulate(sd_ref[name], sd_mem[name], 2.0, prev[name], 0.5, out_dtype=torch.float32)
        assert torch.equal(value, want), name
