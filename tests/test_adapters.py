"""LoRA forget adapters (moxkit.adapters) held to independent oracles: PEFT loading and merging
what moxkit writes, and fp64 arithmetic on the dense weights (θ_for = (1+α)·θ_ref − α·θ_mem,
its momentum recursion, the best rank-r approximation by a dense SVD)."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import moxkit.adapters as adapters
from moxkit.adapters import (
    extrapolate_adapter,
    merge_adapter,
    momentum_forget_adapter,
    momentum_weights,
    write_forget_adapter,
)
from moxkit.errors import InputError, ResourceError

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
            )
        )  # fmt: skip
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
            )
        )  # fmt: skip
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4))
    return model.to(dtype).eval()


def save_base(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def lora_adapter(base_model, path: Path, seed: int, **config) -> Path:
    """A PEFT adapter with random, non-zero factors (a trained θ_mem), saved to `path`."""
    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0}
    options.update(config)
    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(**options))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    model.save_pretrained(path)
    return path


def peft_merged(base_model, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's in-memory merge: the reference the streamed merge is held to."""
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dir)
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_close_fp32(actual: torch.Tensor, expected64: torch.Tensor, scale64: torch.Tensor):
    """|actual − expected| within a few fp32 roundings of the magnitudes that were summed."""
    err = (actual.double() - expected64).abs()
    bound = 8 * EPS32 * scale64 + 1e-30
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, bound {bound.max():.3g}"


def adapter_products(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """weight name -> (s·B·A, |s|·|B|·|A|) in fp64 (transposed for Conv1D/embeddings as PEFT
    does), from the files alone: PEFT's scaling rule re-derived from the config. The second
    is the magnitude a product's fp32 rounding errors scale with (its terms may cancel)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if ".lora_A" not in key and ".lora_embedding_A" not in key:
            continue
        b = tensors[key.replace("_A", "_B")]
        module = key[len("base_model.model.") :].rsplit(".lora_", 1)[0]
        r = a.shape[0]
        s = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        product = s * (b.double() @ a.double())
        magnitude = abs(s) * (b.double().abs() @ a.double().abs())
        if "embedding" in key or config.get("fan_in_fan_out") and "c_" in module:
            product, magnitude = product.T, magnitude.T
        out[f"{module}.weight"] = (product, magnitude)
    return out


# ------------------------------------------------------------------- forget adapter


@pytest.mark.parametrize(
    "arch, lora",
    [
        ("llama", {}),
        ("qwen2", {"use_rslora": True, "r": 6, "lora_alpha": 5}),
        ("llama", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3}}),
    ],
)
def test_forget_adapter_is_the_extrapolation(tmp_path, arch, lora):
    alpha = 2.5
    base = tiny_model(arch)
    mem_dir = lora_adapter(base, tmp_path / "mem", seed=1, **lora)
    save_base(base, tmp_path / "base")
    report = write_forget_adapter(mem_dir, alpha, tmp_path / "forget", base=tmp_path / "base")
    assert report.n_modules == 14 and report.rank == lora.get("r", 4)

    # the factors are the memorization adapter's, byte for byte; only the scaling changed
    mem_t = load_file(mem_dir / "adapter_model.safetensors")
    for_t = load_file(tmp_path / "forget" / "adapter_model.safetensors")
    assert mem_t.keys() == for_t.keys() and all(torch.equal(mem_t[k], for_t[k]) for k in mem_t)
    config = json.loads((tmp_path / "forget" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == -alpha * lora.get("lora_alpha", 8)
    if "alpha_pattern" in lora:
        assert config["alpha_pattern"] == {"down_proj": -alpha * 3}

    # PEFT loads it, and base + forget adapter = (1+α)·base − α·θ_mem (θ_mem merged by PEFT)
    forget = peft_merged(base, tmp_path / "forget")
    mem = peft_merged(base, mem_dir)
    ref = weights(base)
    for name, w in ref.items():
        expected = (1 + alpha) * w.double() - alpha * mem[name].double()
        scale = (1 + alpha) * w.double().abs() + alpha * mem[name].double().abs()
        assert_close_fp32(forget[name], expected, scale)

    # served unmerged, the adapter gives the forget model's outputs
    dense = copy.deepcopy(base)
    dense.load_state_dict(forget)
    served = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "forget").eval()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)

    # and the streamed merge of MEM (extrapolated on the fly) is PEFT's merge of the adapter
    extrapolate_adapter(tmp_path / "base", mem_dir, alpha, tmp_path / "merged", merge=True)
    streamed = load_file(tmp_path / "merged" / "model.safetensors")
    for name, w in ref.items():
        scale = (1 + alpha) * w.double().abs() + alpha * mem[name].double().abs()
        assert_close_fp32(streamed[name], forget[name].double(), scale)


def test_forget_adapter_from_a_peft_model_in_memory(tmp_path):
    base = tiny_model("llama")
    mem_dir = lora_adapter(base, tmp_path / "mem", seed=2)
    live = PeftModel.from_pretrained(copy.deepcopy(base), mem_dir)
    write_forget_adapter(live, 4.0, tmp_path / "forget")
    for_t = load_file(tmp_path / "forget" / "adapter_model.safetensors")
    mem_t = load_file(mem_dir / "adapter_model.safetensors")
    assert all(torch.equal(mem_t[k], for_t[k]) for k in mem_t)
    assert (
        json.loads((tmp_path / "forget" / "adapter_config.json").read_text())["lora_alpha"] == -32
    )


# ------------------------------------------------------------------- streamed merge


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_streamed_merge_equals_peft_merge(tmp_path, monkeypatch, arch):
    monkeypatch.setattr(adapters.merge, "MAX_TILE_ELEMS", 200)  # many row tiles per weight
    base = tiny_model(arch)
    save_base(base, tmp_path / "base")
    lora = {"target_modules": ["c_attn", "c_proj", "c_fc"]} if arch == "gpt2" else {}
    if arch == "llama":  # an embedding LoRA too: PEFT stores the embedding beside its factors
        lora = {"target_modules": ["q_proj", "down_proj", "embed_tokens"]}
    mem_dir = lora_adapter(base, tmp_path / "mem", seed=3, **lora)
    write_forget_adapter(mem_dir, 3.0, tmp_path / "forget", base=tmp_path / "base")
    report = merge_adapter(tmp_path / "base", tmp_path / "forget", tmp_path / "merged")
    assert report.n_modules > 0 and report.device == "cpu"
    streamed = load_file(tmp_path / "merged" / "model.safetensors")
    expected = peft_merged(base, tmp_path / "forget")
    ref = weights(base)
    products = adapter_products(tmp_path / "forget")
    assert set(products) <= set(streamed)
    for name, value in streamed.items():
        if name not in products:
            assert torch.equal(value, ref[name]), name  # unadapted: copied bytes
            continue
        # PEFT's merge within fp32 rounding, and both near the fp64 value
        product, magnitude = products[name]
        exact = ref[name].double() + product
        scale = ref[name].double().abs() + magnitude
        assert_close_fp32(value, expected[name].double(), scale)
        assert_close_fp32(value, exact, scale)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(dict(loaded.named_parameters())[name], streamed[name])


def test_bf16_merge_rounds_once(tmp_path, monkeypatch):
    """bf16 base: fp32 arithmetic, one rounding to bf16: within one bf16 ulp of the fp64 value
    (PEFT rounds the product to bf16 before adding, so it is not the oracle here)."""
    monkeypatch.setattr(adapters.merge, "MAX_TILE_ELEMS", 300)
    base = tiny_model("llama", dtype=torch.bfloat16)
    save_base(base, tmp_path / "base")
    mem_dir = lora_adapter(base, tmp_path / "mem", seed=4)
    report = extrapolate_adapter(tmp_path / "base", mem_dir, 2.0, tmp_path / "out", merge=True)
    assert report.kind == "merged model"
    streamed = load_file(tmp_path / "out" / "model.safetensors")
    ref = weights(base)
    for name, (product, _) in adapter_products(mem_dir).items():
        exact = ref[name].double() - 2.0 * product
        err = (streamed[name].double() - exact).abs()
        ulp = exact.abs().clamp_min(1e-30) * 2.0**-8
        assert streamed[name].dtype == torch.bfloat16 and bool((err <= ulp).all()), name


# ------------------------------------------------------------------- momentum and rank


def dense_momentum(ref, mems, alpha, eta):
    """The MOX-Mo recursion on dense fp64 weights, from θ_for⁰ = θ_ref."""
    forget = {k: v.double() for k, v in ref.items()}
    for mem in mems:
        for k in forget:
            new = (1 + alpha) * ref[k].double() - alpha * mem[k].double()
            forget[k] = eta * new + (1 - eta) * forget[k]
    return forget


def test_momentum_over_snapshots_and_its_chained_form(tmp_path):
    alpha, eta = 2.0, 0.6
    base = tiny_model("llama")
    save_base(base, tmp_path / "base")
    snaps = [lora_adapter(base, tmp_path / f"s{k}", seed=10 + k) for k in range(3)]
    report = momentum_forget_adapter(snaps, alpha, tmp_path / "mo", eta=eta, base=tmp_path / "base")
    assert report.rank == 12  # concatenated, exact
    got = peft_merged(base, tmp_path / "mo")
    mems = [peft_merged(base, s) for s in snaps]
    expected = dense_momentum(weights(base), mems, alpha, eta)
    ref = weights(base)
    products = [adapter_products(s) for s in snaps]
    for name, value in got.items():
        # each θ_mem carries its own fp32 merge rounding, which the recursion scales by α
        scale = (1 + alpha) * ref[name].double().abs()
        for mem, prod in zip(mems, products, strict=True):
            extra = prod[name][1] if name in prod else 0.0
            scale = scale + alpha * (mem[name].double().abs() + extra)
        assert_close_fp32(value, expected[name], scale)

    # the CLI's chained form: PREV = BASE for the first tick, then the previous forget adapter
    prev = tmp_path / "base"
    for k, snap in enumerate(snaps):
        extrapolate_adapter(tmp_path / "base", snap, alpha, tmp_path / f"c{k}", prev=prev, eta=eta)
        prev = tmp_path / f"c{k}"
    chained = peft_merged(base, prev)
    for name, value in chained.items():
        torch.testing.assert_close(value, got[name], rtol=1e-5, atol=1e-6)
    assert momentum_weights(3, eta) == pytest.approx([eta * 0.4**2, eta * 0.4, eta])


def test_rank_recompression_is_the_best_rank_r_approximation(tmp_path):
    alpha, eta, rank = 3.0, 0.675, 5
    base = tiny_model("qwen2")
    save_base(base, tmp_path / "base")
    snaps = [lora_adapter(base, tmp_path / f"s{k}", seed=20 + k) for k in range(3)]
    report = momentum_forget_adapter(
        snaps, alpha, tmp_path / "r5", eta=eta, rank=rank, base=tmp_path / "base"
    )
    assert report.rank == rank and report.overall_error is not None
    got = peft_merged(base, tmp_path / "r5")
    ref = weights(base)
    deltas = [adapter_products(s) for s in snaps]
    lost = total = 0.0
    for name in deltas[0]:
        w = momentum_weights(3, eta)
        exact = -alpha * sum(wk * d[name][0] for wk, d in zip(w, deltas, strict=True))
        magnitude = alpha * sum(wk * d[name][1] for wk, d in zip(w, deltas, strict=True))
        u, s, vt = np.linalg.svd(exact.numpy())
        best = torch.from_numpy((u[:, :rank] * s[:rank]) @ vt[:rank])
        scale = ref[name].double().abs() + magnitude
        assert_close_fp32(got[name], ref[name].double() + best, 16 * scale)
        relative = math.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2))
        module = name.removesuffix(".weight")
        assert report.relative_errors[module] == pytest.approx(relative, rel=1e-6)
        lost, total = lost + np.sum(s[rank:] ** 2), total + np.sum(s**2)
    assert report.overall_error == pytest.approx(math.sqrt(lost / total), rel=1e-6)
    assert 0 < report.overall_error < 1


# ------------------------------------------------------------------- bad adapters


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


BAD_CONFIGS = [
    ({"use_dora": True}, "use_dora is set: DoRA"),
    ({"bias": "all"}, "bias 'all'"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"some_future_setting": 3}, "'some_future_setting' = 3 is unknown"),
    ({"r": 8}, "has rank 4 in its factors but 8 in the config"),
    ({"lora_alpha": "eight"}, "lora_alpha 'eight' is not a finite number"),
    ({"rank_pattern": {"q_proj": 2}}, "has rank 4 in its factors but 2 in the config"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("good")
    base = tiny_model("llama")
    save_base(base, root / "base")
    return root / "base", lora_adapter(base, root / "mem", seed=5)


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("changes, message", BAD_CONFIGS)
def test_refused_settings_are_one_line_and_write_nothing(tmp_path, good, cli, changes, message):
    base, mem = good
    bad = _copy_adapter(mem, tmp_path / "bad")
    _edit_config(bad, **changes)
    before = _snapshot(bad)
    result = cli("extrapolate", base, bad, "--alpha", "2", "-o", tmp_path / "out")
    assert result.code == 1 and message in result.err, result.err
    assert result.err.startswith("moxkit: error: ") and result.err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no OUT, no temp
    assert _snapshot(bad) == before


def _bad_files(tmp_path: Path, mem: Path, base: Path, case: str) -> tuple[Path, Path]:
    bad = _copy_adapter(mem, tmp_path / "bad")
    if case == "config not json":
        (bad / "adapter_config.json").write_text("{not json")
    elif case == "config too large":
        (bad / "adapter_config.json").write_text(" " * (adapters.MAX_CONFIG_BYTES + 1))
    elif case == "no weights":
        (bad / "adapter_model.safetensors").unlink()
    elif case in ("missing B", "trained modules_to_save", "factors do not multiply"):
        tensors = load_file(bad / "adapter_model.safetensors")
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        if case == "missing B":
            del tensors[key]
        elif case == "factors do not multiply":
            tensors[key] = torch.zeros(32, 3)
        else:
            tensors["base_model.model.lm_head.weight"] = torch.ones(96, 32)
            _edit_config(bad, modules_to_save=["lm_head"])
        save_file(tensors, bad / "adapter_model.safetensors")
    elif case == "another base":
        other = tiny_model("qwen2")
        base = save_base(other, tmp_path / "other")
    return bad, base


BAD_FILES = {
    "config not json": "adapter config is not valid JSON",
    "config too large": "moxkit reads JSON files up to 1,048,576 bytes",
    "no weights": "no adapter_model.safetensors",
    "missing B": "has no lora_B factor",
    "factors do not multiply": "do not multiply",
    "trained modules_to_save": "its copy of 'lm_head.weight' differs from BASE",
    "another base": "has shape",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_adapter_files_are_one_line(tmp_path, good, cli, case):
    base, mem = good
    bad, base = _bad_files(tmp_path, mem, base, case)
    before = _snapshot(bad)
    for extra in ([], ["--merge"]):
        result = cli("extrapolate", base, bad, "--alpha", "2", "-o", tmp_path / "out", *extra)
        assert result.code == 1 and BAD_FILES[case] in result.err, result.err
        assert result.err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert _snapshot(bad) == before
    assert not [p for p in os.listdir(tmp_path) if "moxkit-tmp" in p]


def test_options_that_do_not_apply_are_refused(tmp_path, good):
    base, mem = good
    with pytest.raises(InputError, match="dtype applies to merge=True") as caught:
        extrapolate_adapter(base, mem, 2.0, tmp_path / "out", dtype="bf16")
    assert caught.value.params == ("dtype", "merge")
    with pytest.raises(InputError, match="rank 0: must be a positive integer") as caught:
        extrapolate_adapter(base, mem, 2.0, tmp_path / "out", prev=base, rank=0)
    assert caught.value.params == ("rank",)
    with pytest.raises(InputError, match="prev must be an earlier forget adapter, or BASE"):
        extrapolate_adapter(base, mem, 2.0, tmp_path / "out", prev=tmp_path)
    with pytest.raises(InputError, match="alpha"):
        write_forget_adapter(mem, -1.0, tmp_path / "out")
    with pytest.raises(InputError, match=r"device 'tpu': expected cpu, cuda or auto"):
        extrapolate_adapter(base, mem, 2.0, tmp_path / "out", merge=True, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ResourceError, match="device 'cuda': no CUDA device is available"):
            extrapolate_adapter(base, mem, 2.0, tmp_path / "out", merge=True, device="cuda")
    assert not list(tmp_path.iterdir())


def test_cli_forget_adapter_merge_and_existing_output(tmp_path, good, cli):
    base, mem = good
    result = cli("extrapolate", base, mem, "--alpha", "4", "-o", tmp_path / "forget")
    assert result.code == 0 and "forget adapter" in result.out, result.err
    again = cli("extrapolate", base, mem, "--alpha", "4", "-o", tmp_path / "forget")
    assert again.code == 1 and "already exists (use --force" in again.err
    merged = cli("extrapolate", base, mem, "--alpha", "4", "--merge", "-o", tmp_path / "full")
    assert merged.code == 0, merged.err
    assert (tmp_path / "full" / "config.json").is_file()
    card = (tmp_path / "full" / "README.md").read_text()  # the engine's model card
    assert "merging LoRA adapters" in card and f"`{Path(mem).resolve()}`" in card
    direct = tmp_path / "direct"
    merge_adapter(base, tmp_path / "forget", direct)
    a, b = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(direct / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)  # one op order, whichever way it is reached
    ranked = cli(
        "extrapolate", base, mem, "--alpha", "4", "--prev", base, "--rank", "2",
        "-o", tmp_path / "r2",
    )  # fmt: skip
    assert ranked.code == 0 and "approximation error" in ranked.out, ranked.err


@pytest.mark.gpu
def test_cuda_merge_equals_cpu_merge(tmp_path):
    base = tiny_model("llama")
    save_base(base, tmp_path / "base")
    mem_dir = lora_adapter(base, tmp_path / "mem", seed=6)
    for device in ("cpu", "cuda"):
        extrapolate_adapter(
            tmp_path / "base", mem_dir, 4.0, tmp_path / device, merge=True, device=device
        )
    cpu = load_file(tmp_path / "cpu" / "model.safetensors")
    cuda = load_file(tmp_path / "cuda" / "model.safetensors")
    ref = weights(base)
    for name, (_, magnitude) in adapter_products(mem_dir).items():
        scale = ref[name].double().abs() + 4.0 * magnitude
        assert_close_fp32(cuda[name], cpu[name].double(), scale)
    assert all(torch.equal(cpu[k], cuda[k]) for k in cpu if k not in adapter_products(mem_dir))
