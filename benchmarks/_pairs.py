"""The checkpoint pairs the end-to-end benchmark runs on: random Llama-architecture weights
(REF, and MEM = REF + small noise) in bf16 or fp16, written shard by shard in the exact layout
transformers writes, never whole in memory, and cached under benchmarks/.cache/pairs/."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import struct
from pathlib import Path

import torch
from tqdm import tqdm

CACHE = Path(__file__).resolve().parent / ".cache"
INDEX = "model.safetensors.index.json"
VOCAB = 32000
# the storage dtypes a pair can have: safetensors name, torch name
DTYPES = {"bf16": ("BF16", "bfloat16"), "fp16": ("F16", "float16")}


def parse_count(text: str) -> int:
    """'0.9B', '50M', '1.8e9' -> a parameter count."""
    match = re.fullmatch(r"([0-9.eE+]+)\s*([KMB]?)", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"--params {text!r}: expected e.g. 0.9B, 50M, 1.8e9")
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def llama_config(params: int, dtype: str = "bf16"):
    """A Llama config of about `params` parameters: the widest of a few TinyLlama-like widths
    whose embeddings stay under a third of the model, then as many layers as fit."""
    from transformers import LlamaConfig

    widths = ((2048, 5632), (1024, 2816), (512, 1408), (256, 704))
    hidden, inter = next((w for w in widths if 2 * VOCAB * w[0] <= params / 3), widths[-1])
    embed = 2 * VOCAB * hidden
    heads = hidden // 64
    kv_heads = max(1, heads // 8)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * 64 + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - embed - hidden) / per_layer))
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"], dtype=DTYPES[dtype][1],
    )  # fmt: skip


def llama2_7b_config():
    """Llama-2-7B's shapes (its config.json, by the numbers)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )  # fmt: skip


def state_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the model's state dict, in transformers' order (meta device: free)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def split_shards(tensors: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple]]]:
    """State-dict order cut into consecutive shards of about equal bytes: at least 2, and no
    more than 5 GB each (transformers' default max_shard_size)."""
    total = sum(2 * math.prod(shape) for _, shape in tensors)
    count = max(2, math.ceil(total / 5e9))
    shards: list[list[tuple[str, tuple]]] = [[] for _ in range(count)]
    position = 0
    for name, shape in tensors:
        shards[min(count - 1, int(position * count // total))].append((name, shape))
        position += 2 * math.prod(shape)
    return shards


def shard_header(entries: list[tuple[str, tuple]], dtype: str) -> bytes:
    """A safetensors header exactly as safetensors writes it for 2-byte tensors: names sorted,
    data in that order, compact JSON padded with spaces to a multiple of 8."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in sorted(entries):
        nbytes = 2 * math.prod(shape)
        span = [offset, offset + nbytes]
        meta[name] = {"dtype": DTYPES[dtype][0], "shape": list(shape), "data_offsets": span}
        offset += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def pair_dir(config, dtype: str) -> Path:
    c = config
    name = (
        f"llama-h{c.hidden_size}-i{c.intermediate_size}-l{c.num_hidden_layers}"
        f"-kv{c.num_key_value_heads}-v{c.vocab_size}" + ("" if dtype == "bf16" else f"-{dtype}")
    )
    return CACHE / "pairs" / name


def write_pair(config, dest: Path, dtype: str, seed: int = 0, chunk: int = 1 << 22) -> None:
    """REF ~ N(0, 0.02) (norms ~ 1), MEM = REF + N(0, 0.002), both `dtype`, generated chunk by
    chunk and written straight into shards whose headers go first: never the whole model in
    memory. Noise comes from a fixed random pool at random offsets (half the generation cost)."""
    from transformers import GenerationConfig

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = state_shapes(config)
    shards = split_shards(tensors)
    total = sum(2 * math.prod(shape) for _, shape in tensors)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {
        "metadata": {"total_parameters": total // 2, "total_size": total},
        "weight_map": {n: names[i] for i, shard in enumerate(shards) for n, _ in shard},
    }
    for side in ("ref", "mem"):
        (tmp / side).mkdir(parents=True)
        config.save_pretrained(tmp / side)
        GenerationConfig.from_model_config(config).save_pretrained(tmp / side)
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (tmp / side / INDEX).write_text(text)

    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(4 * chunk, generator=gen).mul_(0.002)
    bar = tqdm(total=2 * total, unit="B", unit_scale=True, desc=f"generating {dest.name}")
    for name, shard in zip(names, shards, strict=True):
        with open(tmp / "ref" / name, "wb") as fr, open(tmp / "mem" / name, "wb") as fm:
            header = shard_header(shard, dtype)
            fr.write(header)
            fm.write(header)
            for tensor_name, shape in sorted(shard):
                numel = math.prod(shape)
                center = 1.0 if tensor_name.endswith("norm.weight") else 0.0
                for start in range(0, numel, chunk):
                    n = min(chunk, numel - start)
                    ref = torch.randn(n, generator=gen).mul_(0.02).add_(center)
                    at = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=gen))
                    mem = ref + pool[at : at + n]
                    store = getattr(torch, DTYPES[dtype][1])
                    fr.write(ref.to(store).view(torch.int16).numpy())
                    fm.write(mem.to(store).view(torch.int16).numpy())
                    bar.update(4 * n)
    bar.close()
    tmp.rename(dest)


def ensure_pair(config, dtype: str = "bf16") -> Path:
    """The cached pair for this config and dtype, generated if missing."""
    dest = pair_dir(config, dtype)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_pair(config, dest, dtype)
    return dest


def weight_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def weight_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(model))
