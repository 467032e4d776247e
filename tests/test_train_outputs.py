"""What train-mem and unlearn leave on disk: MODEL's key names kept (a GPT-2 checkpoint in the
hub's legacy layout pairs with its θ_mem in `moxkit extrapolate`), nothing left behind after
SIGTERM, and bad arguments reported before torch is even imported."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, save_tiny_model, tiny_facts

FORGET, RETAIN = tiny_facts(4, offset=0), tiny_facts(8, offset=4)
FAST = ["--max-steps", "2", "--lr", "1e-3", "--batch-size", "2", "--warmup-epochs", "0", "-q"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    tok = build_word_tokenizer([f"{r['question']} {r['answer']}" for r in FORGET + RETAIN])
    save_tiny_model(build_tiny_llama(len(tok), hidden_size=16, num_heads=2, intermediate_size=32),
                    tok, root / "llama")  # fmt: skip
    _save_legacy_gpt2(tok, root / "gpt2")
    for name, rows in (("forget", FORGET), ("retain", RETAIN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _save_legacy_gpt2(tok, folder):
    """A tiny GPT-2 as the hub stores gpt2: no `transformer.` prefix, h.N.attn.bias buffers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    folder.mkdir()
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
             if k.startswith("transformer.")}  # fmt: skip
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def data(root):
    return ["--forget", root / "forget.jsonl", "--retain", root / "retain.jsonl"]


def test_gpt2_legacy_layout_pairs_with_extrapolate(root, cli, tmp_path):
    mem, out = tmp_path / "mem", tmp_path / "forget-model"
    result = cli("train-mem", root / "gpt2", *data(root), "-o", mem, *FAST)
    assert result.code == 0, result.err
    ref_w = load_file(root / "gpt2" / "model.safetensors")
    mem_w = load_file(mem / "model.safetensors")
    assert mem_w.keys() == ref_w.keys()  # MODEL's names, its buffers carried
    assert torch.equal(mem_w["h.0.attn.bias"], ref_w["h.0.attn.bias"])
    assert not torch.equal(mem_w["h.0.mlp.c_fc.weight"], ref_w["h.0.mlp.c_fc.weight"])
    result = cli("extrapolate", root / "gpt2", mem, "--alpha", "2", "-o", out, "-q")
    assert result.code == 0, result.err
    got = load_file(out / "model.safetensors")["h.1.mlp.c_proj.weight"].double()
    want = 3 * ref_w["h.1.mlp.c_proj.weight"].double() - 2 * mem_w["h.1.mlp.c_proj.weight"].double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(mem)  # and transformers reads θ_mem back


def test_sigterm_mid_training_leaves_nothing(root, cli, tmp_path):
    """SIGTERM at the first training step: exit 130, no OUT, no temp beside it, no trainer
    scratch in TMPDIR."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "mem"
    env = {"MOXKIT_TEST_SIGNALS": "train-step:SIGTERM", "TMPDIR": str(scratch),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = cli.run("train-mem", root / "llama", *data(root), "-o", out, *FAST, env=env)
    assert result.code == 130, result.err
    assert "moxkit: interrupted" in result.err and "Traceback" not in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    assert list(scratch.iterdir()) == []


def test_argument_errors_come_before_torch(root, tmp_path):
    """Missing files, an existing OUT, bad options and what --extrapolate-on disk will need
    are all reported without importing torch or transformers (so at once)."""
    exists = tmp_path / "exists"
    exists.mkdir()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / f).write_bytes((root / "llama" / f).read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    llama, d = str(root / "llama"), [str(a) for a in data(root)]
    cases = [
        (
            ["train-mem", str(tmp_path / "nope"), *d, "-o", str(tmp_path / "o")],
            "no such file or directory",
        ),
        (
            ["train-mem", llama, "--forget", "missing.jsonl", *d[2:], "-o", str(tmp_path / "o")],
            "--forget missing.jsonl: no such file",
        ),
        (["train-mem", llama, *d, "-o", str(exists)], "already exists"),
        (
            ["train-mem", llama, d[0], d[1], "-o", str(tmp_path / "o")],
            "--retain: needed by the KL term of memorization (train-mem) (or set --kl-weight to 0)",
        ),
        (["unlearn", llama, *d, "-o", str(tmp_path / "o"), "--lr", "-1"], "--lr -1.0: must be"),
        (
            ["unlearn", llama, *d, "-o", str(tmp_path / "o"), "--method", "ga", "--eta", "0.5"],
            "--eta 0.5: not used by method ga",
        ),
        (
            ["unlearn", str(pickled), *d, "-o", str(tmp_path / "o"), "--extrapolate-on", "disk"],
            "only PyTorch pickle weights",
        ),
    ]
    script = (
        "import json, sys\nfrom moxkit.cli.main import main\ncodes = []\n"
        f"for argv in {json.dumps([c for c, _ in cases])}:\n"
        "    try:\n        main(argv)\n    except SystemExit as exc:\n"
        "        codes.append(exc.code)\n"
        "heavy = sorted({'torch', 'transformers', 'accelerate'} & set(sys.modules))\n"
        "print(json.dumps([codes, heavy]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    codes, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moxkit: error:")]
    assert codes == [1] * len(cases), proc.stderr
    assert len(errors) == len(cases), proc.stderr
    for line, (_, message) in zip(errors, cases, strict=True):
        assert message in line
    assert heavy == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "pickled"]


def test_momentum_flag_still_works(root, cli, tmp_path):
    out = tmp_path / "forget-model"
    result = cli("unlearn", root / "llama", *data(root), "-o", out, "--momentum", "0.5",
                 "--extrapolate-every", "1", *FAST)  # fmt: skip
    assert result.code == 0, result.err
    assert result.err.count("--momentum is deprecated; use --eta") == 1
    log = [json.loads(x) for x in (out / "moxkit_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("event") == "momentum"] == [1]
    assert json.loads((out / "moxkit_args.json").read_text())["extrapolation"]["eta"] == 0.5


def test_hub_id_from_the_cache(root, cli, tmp_path, monkeypatch):
    """MODEL as a hub id, found offline in a hand-built Hugging Face cache (links into
    blobs/), at the revision given."""
    from test_sources import REV, hub_cache

    cache = tmp_path / "hf-cache"
    hub_cache(cache, "org/tiny", root / "llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mem = tmp_path / "mem"
    result = cli("train-mem", "org/tiny", "--revision", REV, *data(root), "-o", mem, *FAST)
    assert result.code == 0, result.err
    assert load_file(mem / "model.safetensors").keys() == load_file(
        root / "llama" / "model.safetensors").keys()  # fmt: skip
    args = json.loads((mem / "moxkit_args.json").read_text())
    assert args["model"] == "org/tiny"
    result = cli("train-mem", "org/other", *data(root), "-o", tmp_path / "m2", *FAST)
    assert result.code == 1 and "MODEL org/other: no such local path" in result.err


def test_lora_hands_back_adapters(root, cli, tmp_path):
    """--lora: train-mem writes θ_mem's adapter, unlearn the forget adapter θ_ref − α·s·B·A
    (base + it equals (1+α)·base − α·merged θ_mem), --merge a full model."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    lora = ["--lora", "2", "--alpha", "2"]
    forget, mem = tmp_path / "forget-adapter", tmp_path / "mem-adapter"
    result = cli("unlearn", root / "llama", *data(root), "-o", forget, "--save-mem", mem,
                 *lora, *FAST)  # fmt: skip
    assert result.code == 0, result.err
    for folder in (forget, mem):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
        assert not (folder / "model.safetensors").exists()

    def merged(adapter):
        base = AutoModelForCausalLM.from_pretrained(root / "llama")
        return peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()

    base = AutoModelForCausalLM.from_pretrained(root / "llama").state_dict()
    got, theta_mem = merged(forget), merged(mem)
    moved = 0.0
    for name, b in base.items():
        want = 3 * b.double() - 2 * theta_mem[name].double()
        torch.testing.assert_close(got[name].double(), want, rtol=0, atol=1e-6)
        moved = max(moved, (got[name] - b).abs().max().item())
    assert moved > 1e-5  # the adapter did something

    full = tmp_path / "forget-full"
    result = cli("unlearn", root / "llama", *data(root), "-o", full, "--merge", *lora, *FAST)
    assert result.code == 0, result.err
    full_w = load_file(full / "model.safetensors")
    for name, w in full_w.items():  # the same run, merged: the same forget model
        torch.testing.assert_close(w, got[name], rtol=0, atol=1e-6)

    momentum = tmp_path / "momentum-adapter"
    result = cli("unlearn", root / "llama", *data(root), "-o", momentum, "--eta", "0.5",
                 "--extrapolate-every", "1", *lora, *FAST)  # fmt: skip
    assert result.code == 0, result.err
    config = json.loads((momentum / "adapter_config.json").read_text())
    assert config["r"] == 4  # two ticks of rank 2, concatenated
    merged(momentum)  # PEFT applies it


def test_run_failing_on_entry_publishes_nothing(tmp_path, monkeypatch):
    """A failure inside Run.__enter__ (after the output is staged) must discard the staged
    folder, not publish it half-built."""
    from moxkit.train.config import TrainConfig
    from moxkit.train.session import Run

    def broken_barrier(self):
        raise RuntimeError("process group failed")

    monkeypatch.setattr(Run, "barrier", broken_barrier)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="process group failed"):
        with Run(out, False, TrainConfig(max_steps=1), n_rows=4):
            pass
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
