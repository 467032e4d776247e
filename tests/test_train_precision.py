"""bf16 autocast on CPUs that compute bf16 natively, and how the frozen reference is held:
detection from the CPU's flags (mocked), the setting reaching autocast (forward hooks read
torch's autocast state inside training), --bf16 / --no-bf16, the refusal where the CPU would
emulate bf16, and the reference modes giving the same loss."""

import json

import pytest
import torch

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, save_tiny_model, tiny_facts
from moxkit.errors import MoxError
from moxkit.train import TrainConfig, precision, train_mem
from moxkit.train.precision import cpu_has_bf16, default_bf16, frozen_reference, reference_mode

FORGET = tiny_facts(4, offset=0)
RETAIN = tiny_facts(4, offset=4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer([f"{r['question']} {r['answer']}" for r in FORGET + RETAIN])


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_llama(len(tok), hidden_size=32, num_heads=2, intermediate_size=64)


# --- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, native",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, True),  # Cooper Lake, Zen 4 and later
        ({"avx512f", "amx_bf16", "amx_tile"}, True),  # Sapphire Rapids lists both; AMX alone
        ({"avx2", "avx512f", "avx512bw", "avx512_fp16"}, False),  # AVX-512 without bf16
        ({"avx2", "fma", "f16c"}, False),
    ],
)
def test_native_bf16_is_read_from_the_flags(flags, native, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: not native)
    assert cpu_has_bf16(flags) is native
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    assert cpu_has_bf16() is native
    assert default_bf16(use_cuda=False) is False  # measured: not the CPU default (precision)
    monkeypatch.setattr(precision, "CPU_BF16_DEFAULT", True)
    assert default_bf16(use_cuda=False) is native


def test_without_cpu_flags_torch_probes_the_instructions(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: set())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for supported in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda s=supported: s)
        assert cpu_has_bf16() is supported


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")  # fmt: skip
    assert precision.flags_in(info) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert precision.flags_in(tmp_path / "missing") == set()
    assert cpu_has_bf16(precision.flags_in(info))


# --- the setting reaches autocast --------------------------------------------------------------


def autocast_seen(model, tok, config, monkeypatch, flags):
    """Train two steps; what torch's CPU autocast state was inside each forward, per model
    (the trained one and the frozen reference)."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    seen: dict[str, set] = {"trained": set(), "reference": set()}
    from moxkit.train import trainer

    def state() -> tuple[bool, torch.dtype]:
        return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    original = trainer.MoxTrainer._forward
    current = []

    def forward(self, m, inputs, group):
        current.append("reference" if m is self.reference else "trained")
        try:
            return original(self, m, inputs, group)
        finally:
            current.pop()

    def linear_called(module, args):  # inside the model's forward, however it was wrapped
        if current and isinstance(module, torch.nn.Linear):
            seen[current[-1]].add(state())

    monkeypatch.setattr(trainer.MoxTrainer, "_forward", forward)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(linear_called)
    try:
        train_mem(model, FORGET, RETAIN, config=config, tokenizer=tok)
    finally:
        hook.remove()
    return seen


BF16 = {(True, torch.bfloat16)}


@pytest.mark.parametrize("bf16, flags, expected", [
    (None, {"avx512f", "avx512_bf16"}, False),  # off by default on a CPU
    (True, {"avx512f", "avx512_bf16"}, True),  # --bf16 where the CPU computes bf16
    (True, {"amx_bf16"}, True),
    (False, {"avx512_bf16"}, False),  # --no-bf16
])  # fmt: skip
def test_bf16_setting_reaches_autocast(model, tok, monkeypatch, bf16, flags, expected):
    config = TrainConfig(max_steps=2, batch_size=4, bf16=bf16, reference="stored", progress=False)
    seen = autocast_seen(model, tok, config, monkeypatch, flags)
    if expected:
        assert seen["trained"] == seen["reference"] == BF16
    else:
        assert {on for on, _ in seen["trained"] | seen["reference"]} == {False}


def test_bf16_refused_where_the_cpu_would_emulate_it(model, tok, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    config = TrainConfig(max_steps=1, batch_size=4, bf16=True, progress=False)
    with pytest.raises(MoxError, match="AVX512-BF16"):
        train_mem(model, FORGET, RETAIN, config=config, tokenizer=tok)


def test_bf16_reference_runs_under_autocast_even_in_fp32_training(model, tok, monkeypatch):
    config = TrainConfig(max_steps=2, batch_size=4, bf16=False, reference="bf16", progress=False)
    seen = autocast_seen(model, tok, config, monkeypatch, {"avx512_bf16"})
    assert {on for on, _ in seen["trained"]} == {False}
    assert seen["reference"] == BF16


def test_no_bf16_on_the_command_line(cli, tmp_path, model, tok, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    folder = save_tiny_model(model, tok, tmp_path / "m")
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FORGET))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RETAIN))
    common = [folder, "--forget", tmp_path / "f.jsonl", "--retain", tmp_path / "r.jsonl",
              "--max-steps", "1", "--batch-size", "4", "-q"]  # fmt: skip
    from moxkit.train import trainer

    made = []
    original = trainer.training_arguments

    def spy(config, n_rows):
        args = original(config, n_rows)
        made.append(args.bf16)
        return args

    monkeypatch.setattr("moxkit.train.session.training_arguments", spy)
    assert cli("train-mem", *common, "--bf16", "-o", tmp_path / "a").code == 0
    assert cli("train-mem", *common, "--no-bf16", "-o", tmp_path / "b").code == 0
    assert made == [True, False]
    args = json.loads((tmp_path / "b" / "moxkit_args.json").read_text())
    assert args["config"]["bf16"] is False


# --- the reference's modes ---------------------------------------------------------------------


def test_reference_modes():
    assert reference_mode("auto", bf16=True, separate_copy=True, targeted=False) == "bf16"
    assert reference_mode("auto", bf16=False, separate_copy=True, targeted=False) == "stored"
    assert reference_mode("auto", bf16=True, separate_copy=False, targeted=False) == "stored"
    assert reference_mode("auto", bf16=True, separate_copy=True, targeted=True) == "stored"
    assert reference_mode("stored", bf16=True, separate_copy=True, targeted=False) == "stored"
    with pytest.raises(MoxError, match="targeted"):
        reference_mode("bf16", bf16=True, separate_copy=True, targeted=True)


def test_bf16_reference_holds_half_and_keeps_tied_embeddings(model):
    ref = frozen_reference(model, torch.float32, "bf16", copy_it=True)
    dtypes = {n: p.dtype for n, p in ref.named_parameters()}
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # tied to lm_head: kept
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    assert dtypes["model.norm.weight"] == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model untouched
    assert not any(p.requires_grad for p in ref.parameters())
    assert not ref.training


def reference_logits(ref, ids, autocast: bool):
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return ref(input_ids=ids).logits.float()


def test_bf16_reference_equals_fp32_reference_under_autocast(model, tok):
    """Under bf16 autocast an fp32 reference's linear layers round their weights to bf16 on
    every call; the bf16 reference holds them rounded: the same logits, bit for bit."""
    ids = torch.tensor([tok(r["question"] + " " + r["answer"])["input_ids"] for r in RETAIN[:1]])
    stored = frozen_reference(model, torch.float32, "stored", copy_it=True)
    half = frozen_reference(model, torch.float32, "bf16", copy_it=True)
    torch.testing.assert_close(
        reference_logits(half, ids, True), reference_logits(stored, ids, True), rtol=0, atol=0
    )


def test_reference_modes_give_the_same_loss(model, tok):
    """fp32 training with the bf16 reference: the KL term moves by bf16 rounding only, and the
    loss (forget NLL + KL) agrees with the fp32 reference's to 1e-3 of its value."""
    losses = {}
    for mode in ("stored", "bf16"):
        config = TrainConfig(max_steps=3, batch_size=4, lr=1e-3, bf16=False, reference=mode,
                             warmup_epochs=0, progress=False)  # fmt: skip
        done = train_mem(model, FORGET, RETAIN, config=config, tokenizer=tok)
        losses[mode] = [(r["loss"], r["retain_kl"]) for r in done.log if "loss" in r]
    for (a, kl_a), (b, kl_b) in zip(losses["stored"], losses["bf16"], strict=True):
        assert a == pytest.approx(b, rel=1e-3)
        assert abs(kl_a - kl_b) < 1e-3
    assert losses["stored"][0][1] == 0.0  # θ = θ_ref at the first step: no divergence
