"""PEFT LoRA adapters in and out: forget adapters, their momentum form, and a streamed merge.

When θ_mem is a LoRA adapter on a base θ_ref, θ_mem = θ_ref + s·B·A for every adapted module
(s = lora_alpha/r, or lora_alpha/√r with rsLoRA), so the MOX forget model
θ_for = (1+α)·θ_ref − α·θ_mem = θ_ref − α·s·B·A is itself a LoRA adapter on the untouched base,
a few MB that PEFT, vLLM or any multi-LoRA server applies.

The factor −α is folded into the scaling (lora_alpha and alpha_pattern times −α), not into B:
the factor bytes are copied unchanged, so the forget adapter is exact in whatever dtype the
adapter was saved (multiplying a bf16 B by −α would round it again, to 8 bits; even in fp32 it
would add a rounding), and writing it costs one copy of the factors.

Momentum (MOX-Mo) over K snapshots, θ_for = θ_ref − α·Σ_k w_k·s_k·B_k·A_k with
w_k = η(1−η)^(K−k), is a sum of low-rank terms: one adapter of concatenated rank, whose blocks
w_k·s_k·B_k are computed in fp64 and rounded once to fp32; optionally re-compressed to rank r by
a truncated SVD (QR of the stacked factors, SVD of the small core), with the approximation error
reported (Eckart–Young: the best rank-r error, in Frobenius norm).

`merge_adapter` streams BASE + s·B·A into a full model for servers without LoRA: each adapted
weight is produced in row tiles, W_tile + s·(B_rows·A) in fp32 on the CPU or CUDA (torch), one
rounding to the output dtype, under the same memory budget as `moxkit extrapolate`.

Adapters are read strictly: plain LoRA on linear layers (nn.Linear; GPT-2's Conv1D through
fan_in_fan_out) and embeddings. Anything whose effect is not θ_ref + s·B·A (DoRA, trained biases,
PiSSA-style initialisations that rewrite the base, trained modules_to_save copies, trainable
tokens, settings this version does not know) is refused in one line naming the setting. The
config is hostile until checked: pattern keys are matched without a regex engine
(PatternMatcher), numbers must have finite float values, and factors with NaN/inf (or a product
past float32's range) are refused on every path unless allow_nonfinite. Memory budgets are
checked before any factor is read, the same way in a dry run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from threadpoolctl import threadpool_limits

from . import __version__
from .atomic import check_output, staged_dir
from .engine.checkpoint import Checkpoint, FileReader, TensorInfo, open_checkpoint, read_header
from .engine.dtypes import ARITHMETIC_CODES, SIZES, TABLE, parse_dtype, to_float32
from .engine.formula import PAPER_ETA, check_alpha, check_eta
from .engine.options import EngineOptions, alpha_and_out
from .engine.provenance import carry_files
from .engine.writer import OutputTensor, ShardWriter, layout, split_shards, write_index
from .errors import MoxError
from .progress import ByteProgress
from .sources import member, read_json, resolve_model, shown, tree_root
from .units import format_bytes, parse_size

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is a few KB
MAX_PATTERN_KEYS = 4096  # per rank_pattern / alpha_pattern: one per module of a 585-layer model
MAX_PATTERN_KEY_CHARS = 512
MAX_RANK = 1 << 20
FLOAT32_MAX = float(np.finfo(np.float32).max)
KEY_PREFIX = "base_model.model."
_FACTOR_KEY = re.compile(r"base_model\.model\.(.+)\.lora_(embedding_)?([AB])(\.weight)?")
COPY_CHUNK_BYTES = 64 << 20
MAX_TILE_ELEMS = 8 << 20
MIN_TILE_ELEMS = 64 * 1024
RESERVED_BYTES = 64 << 20  # Python objects, torch's allocator slack: outside the tile buffers

# Settings that only say which modules were adapted, how they were trained or which PEFT wrote
# them: once the factors exist they change nothing in θ_ref + s·B·A.
_INERT = frozenset(
    {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config",
        "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out",
        "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform",
        "loftq_config", "lora_alpha", "lora_dropout", "lora_ga_config", "megatron_core",
        "modules_to_save", "peft_type", "peft_version", "qalora_group_size", "r",
        "rank_pattern", "revision", "target_modules", "task_type", "use_rslora",
    }
)  # fmt: skip
# Settings that change what the adapter computes; moxkit refuses them unless off.
_REFUSED = {
    "use_dora": "DoRA rescales the merged weight's columns, so it is not θ_ref + s·B·A",
    "lora_bias": "trained LoRA biases are not low-rank",
    "trainable_token_indices": "trainable token rows are not low-rank",
    "layer_replication": "replicated layers share the base weights",
    "target_parameters": "LoRA on bare parameters (MoE experts) is not supported",
    "use_qalora": "QA-LoRA pools the inputs",
    "alora_invocation_tokens": "aLoRA applies only after its invocation tokens",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
}
# init_lora_weights values under which θ_mem = θ_ref + s·B·A on the untouched base
_PLAIN_INITS = (True, False, "gaussian", "eva")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ΔW = s·B·A (transposed for embeddings and Conv1D)."""

    name: str  # module path in the model, e.g. model.layers.0.self_attn.q_proj
    a: TensorInfo  # (r, in); for an embedding (r, num_embeddings)
    b: TensorInfo  # (out, r); for an embedding (embedding_dim, r)
    scaling: float  # s, as PEFT computes it from the config
    embedding: bool
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"


@dataclass
class Adapter:
    """A validated PEFT LoRA adapter folder."""

    path: Path
    config: dict
    modules: dict[str, LoraModule]
    full: dict[str, TensorInfo]  # full tensors it carries (modules_to_save, embedding layers)
    checkpoint: Checkpoint

    @property
    def total_bytes(self) -> int:
        return self.checkpoint.total_bytes


@dataclass
class AdapterReport:
    """What a run did (or, for a dry run, would do)."""

    out: Path
    kind: str  # "forget adapter" or "merged model"
    formula: str
    n_modules: int
    rank: int
    bytes_written: int
    seconds: float = 0.0
    dry_run: bool = False
    device: str = "cpu"
    n_copied: int = 0
    relative_errors: dict[str, float] = field(default_factory=dict)  # per module, with rank=
    overall_error: float | None = None  # ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F over all modules together
    nonfinite_tensors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = f"{self.n_modules} modules, rank {self.rank}"
        if self.kind == "merged model":
            what = f"{self.n_modules} weights merged, {self.n_copied} copied, on {self.device}"
        if self.dry_run:
            return f"dry run: would write {self.kind} {self.out} ({what}); nothing written"
        text = (
            f"wrote {self.kind} {self.out} ({what}): {format_bytes(self.bytes_written)} "
            f"in {self.seconds:.2f} s"
        )
        if self.overall_error is not None:
            worst = max(self.relative_errors.values(), default=0.0)
            text += (
                f"; rank-{self.rank} approximation error {self.overall_error:.3g} overall "
                f"(relative Frobenius), worst module {worst:.3g}"
            )
        return text

    def plan_text(self) -> str:
        return "\n".join(
            [
                f"OUT = {self.formula}",
                f"{self.kind}: {self.n_modules} adapted modules, rank {self.rank}",
                f"write {format_bytes(self.bytes_written)}",
            ]
        )


# --------------------------------------------------------------------------- reading


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a folder (or a hub id whose snapshot is one) holding adapter_config.json,
    what PEFT's save_pretrained writes."""
    try:
        folder = resolve_model(path)
    except MoxError:
        return False  # the caller's own reading of `path` says what is wrong with it
    return folder.is_dir() and os.path.lexists(folder / CONFIG_NAME)


def open_adapter(path: str | os.PathLike) -> Adapter:
    """Read and validate a PEFT LoRA adapter folder; MoxError naming the setting otherwise."""
    path = resolve_model(path)
    if not os.path.lexists(path / CONFIG_NAME):
        raise MoxError(f"{shown(path)}: not a PEFT adapter folder (no {CONFIG_NAME})")
    if not os.path.lexists(path / WEIGHTS_NAME):
        extra = " (only adapter_model.bin: save with safe_serialization=True)"
        raise MoxError(
            f"{shown(path)}: no {WEIGHTS_NAME}"
            + (extra if os.path.lexists(path / "adapter_model.bin") else "")
        )
    root = tree_root(path)
    config_file = member(path, CONFIG_NAME, root)
    config = read_json(config_file, "adapter config", max_bytes=MAX_CONFIG_BYTES)
    config_path = config_file.path
    _check_settings(config_path, config)
    weights_file = member(path, WEIGHTS_NAME, root)
    weights_path = weights_file.path
    tensors, metadata = read_header(weights_file)
    checkpoint = Checkpoint(path, tensors, [weights_path], path, metadata)
    factors: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, bool] = {}
    full: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        match = _FACTOR_KEY.fullmatch(key)
        if match is None:
            if not key.startswith(KEY_PREFIX) or not key.endswith(".weight"):
                raise MoxError(f"{weights_path}: tensor {key!r} is not a LoRA factor")
            full[key] = info
            continue
        module, embedding, side, suffix = match.groups()
        if bool(embedding) == bool(suffix):  # lora_A.weight, or lora_embedding_A (no .weight)
            raise MoxError(f"{weights_path}: tensor {key!r} is not a LoRA factor")
        if info.dtype not in ARITHMETIC_CODES or len(info.shape) != 2:
            raise MoxError(
                f"{weights_path}: tensor {key!r} is {info.dtype} {list(info.shape)}; moxkit reads "
                "2-D F32/F16/BF16 LoRA factors (LoRA on conv layers is not supported)"
            )
        if kinds.setdefault(module, bool(embedding)) != bool(embedding):
            raise MoxError(f"{weights_path}: module {module!r} has both linear and embedding LoRA")
        if side in factors.setdefault(module, {}):
            raise MoxError(f"{weights_path}: module {module!r} has two lora_{side} factors")
        factors[module][side] = info
    if not factors:
        raise MoxError(f"{weights_path}: holds no LoRA factors")
    patterns = _matchers(config_path, config)
    modules = {}
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise MoxError(f"{weights_path}: module {name!r} has no lora_{missing} factor")
        a, b = pair["A"], pair["B"]
        if b.shape[1] != a.shape[0] or a.shape[0] == 0:
            raise MoxError(
                f"{weights_path}: module {name!r}: lora_B {list(b.shape)} and lora_A "
                f"{list(a.shape)} do not multiply"
            )
        rank = _module_rank_alpha(config, name, patterns)[0]
        if rank != a.shape[0]:
            raise MoxError(
                f"{config_path}: module {name!r} has rank {a.shape[0]} in its factors but "
                f"{rank} in the config"
            )
        modules[name] = LoraModule(
            name, a, b, _scaling(config, name, patterns), kinds[name],
            bool(config.get("fan_in_fan_out")),
        )  # fmt: skip
    return Adapter(path, config, modules, full, checkpoint)


def _is_off(value: object) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _check_settings(path: Path, config: dict) -> None:
    """Refuse every setting under which θ_mem is not θ_ref + s·B·A on the untouched base."""
    if config.get("peft_type") != "LORA":
        raise MoxError(f"{path}: peft_type {config.get('peft_type')!r}; moxkit reads LoRA only")
    for key, why in _REFUSED.items():
        if not _is_off(config.get(key)):
            raise MoxError(f"{path}: {key} is set: {why}; moxkit cannot make it exact")
    for key, value in config.items():
        if key not in _INERT and key not in _REFUSED and not _is_off(value):
            raise MoxError(
                f"{path}: setting {key!r} = {str(value)[:60]} is unknown to moxkit and may change "
                "what the adapter computes"
            )
    if config.get("bias", "none") != "none":
        raise MoxError(f"{path}: bias {config['bias']!r}: trained biases are not low-rank")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise MoxError(
            f"{path}: init_lora_weights {init!r} rewrites the base weights, so θ_mem is not "
            "BASE + s·B·A; convert the adapter first (PEFT: path_initial_model_for_weight_"
            "conversion)"
        )
    _nonfinite_in(path, config)
    _check_rank(path, "r", config.get("r"))
    _check_alpha_value(path, "lora_alpha", config.get("lora_alpha"))
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise MoxError(f"{path}: {key} must map module patterns to numbers")
        for name, value in pattern.items():
            where = f"{key}[{_short(name)}]"
            (_check_rank if key == "rank_pattern" else _check_alpha_value)(path, where, value)


def _short(value: object) -> str:
    """repr of a config value for a message: long ones (a 4,000-digit integer) cut short."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "<huge>"
    return text if len(text) <= 64 else text[:60] + "..."


def _check_rank(path: Path, what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise MoxError(f"{path}: {what} {_short(value)} is not an integer from 1 to {MAX_RANK:,}")


def _check_alpha_value(path: Path, what: str, value: object) -> None:
    """A finite number whose float value exists (a 400-digit integer has none)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(float(value))  # type: ignore[arg-type]
    except OverflowError:
        ok = False
    if not ok:
        raise MoxError(f"{path}: {what} {_short(value)} is not a finite number")


def _nonfinite_in(path: Path, config: dict) -> None:
    """Refuse NaN/Infinity anywhere in the config (Python's json reads them; PEFT would copy
    them into the forget adapter's config, which then is not JSON)."""
    stack: list[tuple[str, object]] = [(k, v) for k, v in config.items()]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise MoxError(f"{path}: {where} is {value!r}: not a finite number")
        if isinstance(value, dict):
            stack += [(f"{where}[{_short(k)}]", v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(value)]


class PatternMatcher:
    """PEFT's rank_pattern/alpha_pattern rule (peft.utils.other.get_pattern_key): the first key K
    for which `re.match(rf"(.*\\.)?({K})$", module)` holds. moxkit evaluates it without a regex
    engine, on the subset of keys where that is exact and linear: letters, digits, `_`, `-`, `.`
    (any character, as in the regex), `\\.` (a dot), an optional leading `^` and trailing `$`.
    Such a key matches a fixed number of characters, so only the module path's tail of that
    length, after a `.` or at the start, can match: one dictionary lookup per distinct
    (length, anchoring, wildcard positions) among the keys. Quantifiers, groups, alternation and
    classes are refused in one line: a key like `(a+)+b` takes a backtracking engine
    exponential time on a module path of 40 characters. At most MAX_PATTERN_KEYS keys."""

    def __init__(self, where: str, pattern: dict):
        if len(pattern) > MAX_PATTERN_KEYS:
            raise MoxError(
                f"{where}: {len(pattern):,} keys; moxkit reads at most {MAX_PATTERN_KEYS:,}"
            )
        self.keys = list(pattern)
        self._tables: dict[tuple[int, bool, tuple[int, ...]], dict[str, int]] = {}
        for order, key in enumerate(self.keys):
            length, anchored, wild, text = _parse_pattern_key(where, key)
            self._tables.setdefault((length, anchored, wild), {}).setdefault(text, order)

    def first_match(self, module: str) -> str | None:
        best = None
        for (length, anchored, wild), table in self._tables.items():
            cut = len(module) - length
            if cut < 0 or (cut and (anchored or module[cut - 1] != ".")):
                continue
            tail = module[cut:]
            if wild:
                chars = list(tail)
                for i in wild:
                    chars[i] = "\0"
                tail = "".join(chars)
            order = table.get(tail)
            if order is not None and (best is None or order < best):
                best = order
        return None if best is None else self.keys[best]


def _parse_pattern_key(where: str, key: str) -> tuple[int, bool, tuple[int, ...], str]:
    """(length, anchored, wildcard positions, text with NUL at the wildcards) of a key in
    PatternMatcher's subset; MoxError otherwise."""
    if len(key) > MAX_PATTERN_KEY_CHARS:
        raise MoxError(
            f"{where}: pattern key {_short(key)} is longer than {MAX_PATTERN_KEY_CHARS} characters"
        )
    body, anchored = (key[1:], True) if key.startswith("^") else (key, False)
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    chars: list[str] = []
    wild: list[int] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\" and body[i + 1 : i + 2] in (".", "-", "_"):
            chars.append(body[i + 1])
            i += 2
            continue
        if c == ".":
            wild.append(len(chars))
            chars.append("\0")
        elif c.isascii() and (c.isalnum() or c in "_-"):
            chars.append(c)
        else:
            raise MoxError(
                f"{where}: pattern key {_short(key)} uses {c!r}; moxkit reads module paths or "
                "their tails (letters, digits, _ - . \\. and a leading ^), not quantifiers, "
                "groups, alternation or classes"
            )
        i += 1
    if not chars:
        raise MoxError(f"{where}: pattern key {_short(key)} is empty")
    return len(chars), anchored, tuple(wild), "".join(chars)


def _module_rank_alpha(
    config: dict, module: str, patterns: dict[str, PatternMatcher]
) -> tuple[int, float]:
    """r and lora_alpha of one module, with PEFT's pattern rule (PatternMatcher)."""
    values = []
    for key, default in (("rank_pattern", config["r"]), ("alpha_pattern", config["lora_alpha"])):
        found = patterns[key].first_match(module)
        values.append(default if found is None else config[key][found])
    return values[0], values[1]


def _matchers(path: Path, config: dict) -> dict[str, PatternMatcher]:
    return {
        key: PatternMatcher(f"{path}: {key}", config.get(key) or {})
        for key in ("rank_pattern", "alpha_pattern")
    }


def _scaling(config: dict, module: str, patterns: dict[str, PatternMatcher]) -> float:
    """s as PEFT computes it: lora_alpha / r, or lora_alpha / √r with rsLoRA."""
    rank, alpha = _module_rank_alpha(config, module, patterns)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _folded_config(config: dict, alpha: float) -> dict:
    """The forget adapter's config: every lora_alpha (and alpha_pattern entry) times −α,
    each a finite float (or MoxError: a lora_alpha near the float limit times α is not)."""

    def fold(what: str, value: float) -> float:
        folded = -alpha * float(value)
        if not math.isfinite(folded):
            raise MoxError(
                f"{CONFIG_NAME}: {what} {_short(value)} times -{alpha:g} is not a finite number"
            )
        return folded

    folded = dict(config)
    folded["lora_alpha"] = fold("lora_alpha", config["lora_alpha"])
    if config.get("alpha_pattern"):
        folded["alpha_pattern"] = {
            k: fold(f"alpha_pattern[{_short(k)}]", v) for k, v in config["alpha_pattern"].items()
        }
    return folded


def _read_array(reader: FileReader, info: TensorInfo) -> np.ndarray:
    """A whole (small) tensor widened exactly to fp32: factors are MBs, never GBs."""
    raw = np.empty(info.nbytes, dtype=np.uint8)
    reader.read_into(info.file, info.start, memoryview(raw))
    return to_float32(raw, info.dtype).reshape(info.shape)  # F32: a view of the fresh buffer


def _check_against_base(adapter: Adapter, base: Checkpoint, reader: FileReader) -> None:
    """Every adapted weight exists in BASE with the product's shape, and every full tensor the
    adapter carries (modules_to_save, saved embedding layers) equals BASE's bytes: a trained
    copy would make θ_mem − θ_ref full-rank there."""
    for module in adapter.modules.values():
        weight = base.tensors.get(module.weight_name)
        if weight is None:
            raise MoxError(
                f"{base.path}: BASE has no tensor {module.weight_name!r} that the adapter "
                f"{adapter.path} adapts (another base model, or tied embeddings?)"
            )
        _orientation(module, weight)
    for key, info in adapter.full.items():
        name = key[len(KEY_PREFIX) :].replace(".base_layer.", ".")
        weight = base.tensors.get(name)
        if weight is None or weight.dtype != info.dtype or weight.shape != info.shape:
            raise MoxError(
                f"{adapter.path}: holds a full tensor {key!r} that BASE has no match for "
                "(modules_to_save?): its forget form is not low-rank"
            )
        if not _same_bytes(reader, info, weight):
            raise MoxError(
                f"{adapter.path}: its copy of {name!r} differs from BASE (trained "
                "modules_to_save): the forget model is not low-rank there; moxkit refuses it"
            )


def _same_bytes(reader: FileReader, x: TensorInfo, y: TensorInfo) -> bool:
    for start in range(0, x.nbytes, COPY_CHUNK_BYTES):
        n = min(COPY_CHUNK_BYTES, x.nbytes - start)
        a, b = bytearray(n), bytearray(n)
        reader.read_into(x.file, x.start + start, memoryview(a))
        reader.read_into(y.file, y.start + start, memoryview(b))
        if a != b:
            return False
    return True


def _orientation(module: LoraModule, weight: TensorInfo) -> bool:
    """Whether W holds (B·A)ᵀ (embeddings, GPT-2's Conv1D) rather than B·A. Told by shapes;
    for a square weight by the module kind and fan_in_fan_out, as PEFT does."""
    product = (module.b.shape[0], module.a.shape[1])
    plain, transposed = weight.shape == product, weight.shape == product[::-1]
    if not (plain or transposed):
        raise MoxError(
            f"{weight.file}: tensor {weight.name!r} has shape {list(weight.shape)} but the "
            f"adapter's B·A for {module.name!r} is {list(product)}"
        )
    if plain and transposed:
        return module.embedding or module.fan_in_fan_out
    return transposed


# --------------------------------------------------------------------------- forget adapters


@dataclass
class _LowRank:
    """ΔW = scale·B·A for one module, factors in fp32 (B's blocks already weighted)."""

    module: LoraModule  # the newest input's module: names, kind, orientation
    b: np.ndarray
    a: np.ndarray


def write_forget_adapter(
    source,
    alpha: float,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    options: EngineOptions | None = None,
    **overrides,
) -> AdapterReport:
    """The forget adapter of a LoRA-trained θ_mem: θ_ref − α·s·B·A, as a PEFT adapter folder.

    `source` is an adapter folder or an in-memory PEFT model (what `train-mem --lora` trains;
    it is saved to a temporary folder first). With `base` (the model the adapter was trained
    on), every adapted weight is checked against it, and adapters carrying full tensors
    (modules_to_save) are accepted when those equal the base; without it they are refused.
    Factors with NaN or inf, or whose product s·B·A (or α·s·B·A) may overflow float32, are
    refused unless `allow_nonfinite`; a dry run reads and checks them as the run does. Of the
    EngineOptions (`options`, or its fields as keywords) it uses max_memory, force, fsync,
    allow_nonfinite and dry_run."""
    options = EngineOptions.of(options, overrides, "write_forget_adapter")
    if hasattr(source, "peft_config") and hasattr(source, "save_pretrained"):
        with tempfile.TemporaryDirectory(prefix="moxkit-adapter-") as tmp:
            source.save_pretrained(tmp, safe_serialization=True)
            return write_forget_adapter(tmp, alpha, out, base=base, options=options)
    alpha = check_alpha(alpha, "--alpha")
    budget = _budget(options.max_memory)
    adapter = open_adapter(source)
    out = check_output(out, force=options.force, inputs=[adapter.path] + ([base] if base else []))
    base_ckpt = open_checkpoint(base) if base is not None else None
    _check_budget(budget, _scan_bytes([adapter], base_ckpt), "read and copy the adapter")
    reader = FileReader()
    try:
        if base_ckpt is not None:
            _check_against_base(adapter, base_ckpt, reader)
        elif adapter.full:
            raise MoxError(
                f"{adapter.path}: holds full tensors (modules_to_save); give the base model "
                "to check them against"
            )
        config = _folded_config(adapter.config, alpha)
        if not options.allow_nonfinite:
            for m in adapter.modules.values():
                b, a = _read_array(reader, m.b), _read_array(reader, m.a)
                _check_low_rank(adapter.path, m.name, b, a, max(1.0, alpha) * abs(m.scaling))
        report = AdapterReport(
            out=out,
            kind="forget adapter",
            formula=f"BASE − {alpha:g}·s·B·A (the adapter's factors, lora_alpha × −{alpha:g})",
            n_modules=len(adapter.modules),
            rank=max(m.rank for m in adapter.modules.values()),
            bytes_written=adapter.total_bytes,
            dry_run=options.dry_run,
        )
        if options.dry_run:
            return report
        metadata = _provenance(alpha, None, [adapter.path], base, "folded: lora_alpha *= -alpha")
        tensors = list(adapter.checkpoint.tensors.values())
        started = time.perf_counter()
        named = [(t.name, t) for t in tensors]
        report.bytes_written = _write_adapter(out, options, config, metadata, named, reader)
        report.seconds = time.perf_counter() - started
        return report
    finally:
        reader.close()


def momentum_weights(n: int, eta: float) -> list[float]:
    """w_k = η(1−η)^(n−k), k = 1..n (oldest first): unrolling θ_for ← η·[(1+α)θ_ref − αθ_mem^k]
    + (1−η)·θ_for from θ_for⁰ = θ_ref gives θ_for = θ_ref − α·Σ_k w_k·(θ_mem^k − θ_ref)."""
    return [eta * (1.0 - eta) ** (n - k) for k in range(1, n + 1)]


def momentum_forget_adapter(
    snapshots: Sequence[str | os.PathLike],
    alpha: float,
    out: str | os.PathLike,
    *,
    eta: float = PAPER_ETA,
    rank: int | None = None,
    base: str | os.PathLike | None = None,
    options: EngineOptions | None = None,
    **overrides,
) -> AdapterReport:
    """MOX-Mo over adapter snapshots (oldest first): θ_ref − α·Σ_k w_k·s_k·B_k·A_k, one adapter
    of concatenated rank, or of rank `rank` by a truncated SVD (error in the report). Options
    as write_forget_adapter's."""
    options = EngineOptions.of(options, overrides, "momentum_forget_adapter")
    alpha, eta = check_alpha(alpha, "--alpha"), check_eta(eta, "--eta")
    if not snapshots:
        raise MoxError("momentum: no adapter snapshots given")
    adapters = [open_adapter(p) for p in snapshots]
    terms = list(zip(momentum_weights(len(adapters), eta), adapters, strict=True))
    formula = f"BASE − {alpha:g}·Σ_k w_k·s_k·B_k·A_k over {len(adapters)} snapshots, η = {eta:g}"
    inputs = [a.path for a in adapters]
    return _write_combined(terms, alpha, eta, rank, out, base, formula, inputs, options)


def extrapolate_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    alpha: float,
    out: str | os.PathLike,
    *,
    prev: str | os.PathLike | None = None,
    eta: float = PAPER_ETA,
    rank: int | None = None,
    merge: bool = False,
    options: EngineOptions | None = None,
    **overrides,
) -> AdapterReport:
    """`moxkit extrapolate BASE ADAPTER`: the forget adapter of a LoRA θ_mem, or with `merge`
    the full forget model streamed out of core.

    With prev=PREV (an earlier forget adapter, or BASE itself for the first tick), OUT =
    η·[(1+α)·BASE − α·θ_mem] + (1−η)·PREV, still low-rank: PREV's factors weighted by 1−η
    beside the new ones weighted by η. `rank` re-compresses the sum by a truncated SVD.
    `options` (EngineOptions, or its fields as keywords) as for moxkit.extrapolate; dtype,
    device, max_gpu_memory, max_shard_size and progress apply to `merge` only."""
    alpha, out = alpha_and_out(alpha, out, "extrapolate_adapter")
    options = EngineOptions.of(options, overrides, "extrapolate_adapter")
    alpha = check_alpha(alpha, "--alpha")
    if prev is None and rank is None and not merge:
        if options.dtype is not None:
            raise MoxError("--dtype applies to --merge; a forget adapter keeps the factors' dtype")
        return write_forget_adapter(adapter, alpha, out, base=base, options=options)
    budget = _budget(options.max_memory)
    new = open_adapter(adapter)
    if prev is None:
        terms, eta_used = [(1.0, new)], None
        formula = f"BASE − {alpha:g}·s·B·A"
    else:
        eta_used = check_eta(eta, "--eta")
        terms = [(eta_used, new)]
        if Path(prev).resolve() != Path(base).resolve():
            if not is_adapter_dir(prev):
                raise MoxError(
                    f"{prev}: with an adapter as MEM, --prev PREV must be an earlier "
                    "forget adapter, or BASE itself for the first tick"
                )
            terms.insert(0, (-(1.0 - eta_used) / alpha, open_adapter(prev)))
        formula = f"{eta_used:g}·[BASE − {alpha:g}·s·B·A] + {1 - eta_used:g}·PREV"
    inputs = [t[1].path for t in terms]
    if not merge:
        if options.dtype is not None:
            raise MoxError("--dtype applies to --merge; forget adapters are written in fp32")
        return _write_combined(terms, alpha, eta_used, rank, out, base, formula, inputs, options)
    base_ckpt = open_checkpoint(base)
    single = len(terms) == 1 and rank is None  # PEFT's merge of the forget adapter, op for op
    parts = _combine_parts(terms, rank)
    if single:
        held, transient = sum(4 * _factor_elems(m) for m in new.modules.values()), 0
    else:
        held, transient = _combine_bytes(parts, rank)
    _check_merge_budget(budget, held, transient, [t[1] for t in terms], base_ckpt)
    reader = FileReader()
    try:
        for _, found in terms:
            _check_against_base(found, base_ckpt, reader)
        if single:
            folded = _folded_config(new.config, alpha)
            patterns = _matchers(new.path / CONFIG_NAME, folded)
            scale: float | dict[str, float] = {
                n: _scaling(folded, n, patterns) for n in new.modules
            }
            combined, errors = _raw_factors(new, reader, scale, options.allow_nonfinite), {}
        else:
            combined, errors = _combine(parts, alpha, rank, reader, options.allow_nonfinite)
            scale = -alpha
    finally:
        reader.close()
    report = _merge(base_ckpt, combined, scale, Path(out), formula, inputs, options)
    _attach_errors(report, errors)
    return report


def _write_combined(
    terms: list[tuple[float, Adapter]],
    alpha: float,
    eta: float | None,
    rank: int | None,
    out: str | os.PathLike,
    base: str | os.PathLike | None,
    formula: str,
    inputs: list[Path],
    options: EngineOptions,
) -> AdapterReport:
    """θ_ref − α·Σ weight·s·B·A over the terms as one adapter (scaling −α, blocks weighted)."""
    budget = _budget(options.max_memory)
    out = check_output(out, force=options.force, inputs=inputs + ([base] if base else []))
    parts = _combine_parts(terms, rank)
    base_ckpt = open_checkpoint(base) if base is not None else None
    held, transient = _combine_bytes(parts, rank)
    scan = _scan_bytes([t[1] for t in terms], base_ckpt)
    _check_budget(budget, held + max(transient, scan), "combine the adapters")
    reader = FileReader()
    try:
        newest = terms[-1][1]
        full = newest.full
        if base_ckpt is not None:
            for _, found in terms:
                _check_against_base(found, base_ckpt, reader)
        elif any(found.full for _, found in terms):
            raise MoxError(
                f"{newest.path}: holds full tensors (modules_to_save); give the base model "
                "to check them against"
            )
        combined, errors = _combine(parts, alpha, rank, reader, options.allow_nonfinite)
        out_rank = max(c.a.shape[0] for c in combined.values())
        config = _combined_config(newest.config, combined, out_rank, alpha)
        named: list[tuple[str, TensorInfo | np.ndarray]] = [(k, v) for k, v in full.items()]
        for name, c in sorted(combined.items()):
            b, a = _pad_rank(c.b, c.a, out_rank)
            kind = "lora_embedding_" if c.module.embedding else "lora_"
            suffix = "" if c.module.embedding else ".weight"
            named += [
                (f"{KEY_PREFIX}{name}.{kind}A{suffix}", np.ascontiguousarray(a, np.float32)),
                (f"{KEY_PREFIX}{name}.{kind}B{suffix}", np.ascontiguousarray(b, np.float32)),
            ]
        report = AdapterReport(
            out=out,
            kind="forget adapter",
            formula=formula,
            n_modules=len(combined),
            rank=out_rank,
            bytes_written=sum(_nbytes(v) for _, v in named),
            dry_run=options.dry_run,
        )
        _attach_errors(report, errors)
        if options.dry_run:
            return report
        started = time.perf_counter()
        metadata = _provenance(alpha, eta, inputs, base, formula)
        report.bytes_written = _write_adapter(out, options, config, metadata, named, reader)
        report.seconds = time.perf_counter() - started
        return report
    finally:
        reader.close()


_Parts = dict[str, list[tuple[float, "LoraModule", Path]]]


def _combine_parts(terms: list[tuple[float, Adapter]], rank: int | None) -> _Parts:
    """module -> [(weight, module of one input, that input's folder)], the terms' modules
    checked to agree in kind and shape; no factor read yet."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MoxError(f"--rank {rank!r}: must be a positive integer")
    parts: _Parts = {}
    for weight, found in terms:
        for name, module in found.modules.items():
            known = parts.setdefault(name, [(weight, module, found.path)])[0][1]
            if known is not module and (
                known.embedding != module.embedding
                or (known.b.shape[0], known.a.shape[1]) != (module.b.shape[0], module.a.shape[1])
            ):
                raise MoxError(
                    f"{found.path}: module {name!r} differs in kind or shape from the other "
                    "adapters'"
                )
            if known is not module:
                parts[name].append((weight, module, found.path))
    return parts


def _combine(
    parts: _Parts, alpha: float, rank: int | None, reader: FileReader, allow_nonfinite: bool
) -> tuple[dict[str, _LowRank], dict[str, tuple[float, float]]]:
    """Σ_parts weight·s·B·A per module as B_cat·A_cat (the caller's scaling −α outside):
    blocks weight·s·B computed in fp64 and rounded once to fp32. With `rank`, each sum is
    replaced by its best rank-`rank` approximation (fp64 from the fp32 blocks); errors maps
    module -> (‖ΔW−ΔW_r‖_F², ‖ΔW‖_F²). Non-finite blocks, or a sum −α·B·A that may overflow
    float32, are refused unless `allow_nonfinite`; with `rank` non-finite blocks always are."""
    combined, errors = {}, {}
    for name, items in parts.items():
        newest = items[-1][1]
        total = sum(m.rank for _, m, _ in items)
        b = np.empty((newest.b.shape[0], total), np.float32)
        a = np.empty((total, newest.a.shape[1]), np.float32)
        col = 0
        for weight, m, _ in items:  # each block: fp64 product, one rounding into place
            block = slice(col, col + m.rank)
            factor = weight * m.scaling
            with np.errstate(over="ignore", invalid="ignore"):  # inf is checked below
                np.multiply(_read_array(reader, m.b), factor, out=b[:, block], dtype=np.float64)
            a[block] = _read_array(reader, m.a)
            col += m.rank
        where = items[-1][2]
        if not allow_nonfinite:
            _check_low_rank(where, name, b, a, alpha, "weighted factors w·s·B, A")
        if rank is not None and not (np.isfinite(b).all() and np.isfinite(a).all()):
            raise MoxError(
                f"{where}: module {name!r}: the weighted factors have non-finite values (NaN or "
                "inf); --rank cannot re-compress them"
            )
        if rank is not None:
            with threadpool_limits(1):  # 48-wide panels: BLAS threads only add spinning
                b64, a64, errors[name] = _truncate(b.astype(np.float64), a.astype(np.float64), rank)
            b, a = b64.astype(np.float32), a64.astype(np.float32)
        combined[name] = _LowRank(newest, b, a)
    return combined, errors


def _raw_factors(
    adapter: Adapter, reader: FileReader, scale: dict[str, float], allow_nonfinite: bool
) -> dict[str, _LowRank]:
    """Each module's factors as they are (fp32), checked as write_forget_adapter checks them."""
    found = {}
    for name, m in adapter.modules.items():
        b, a = _read_array(reader, m.b), _read_array(reader, m.a)
        if not allow_nonfinite:
            _check_low_rank(adapter.path, name, b, a, abs(scale[name]))
        found[name] = _LowRank(m, b, a)
    return found


def _factor_elems(m: LoraModule) -> int:
    return m.a.numel + m.b.numel


def _check_low_rank(
    where: Path, name: str, b: np.ndarray, a: np.ndarray, scale: float, what: str = "factors"
) -> None:
    """MoxError if B or A holds NaN/inf, or if scale·B·A may leave float32's range: its entries
    are at most |scale| · (largest row sum of |B|) · (largest |A|), bounded in fp64."""
    why = f"non-finite {what} (NaN or inf"
    why += "; lora_alpha/r too large for float32?)" if what != "factors" else ")"
    if np.isfinite(b).all() and np.isfinite(a).all():
        if not b.size or not a.size:
            return
        row = float(np.abs(b).sum(axis=1, dtype=np.float64).max())
        bound = abs(scale) * row * float(np.abs(a).max())
        if bound <= FLOAT32_MAX:
            return
        why = f"a product that may overflow float32 to non-finite values (up to {bound:.3g})"
    raise MoxError(f"{where}: module {name!r} has {why}; pass --allow-nonfinite to keep them")


# --------------------------------------------------------------------------- budgets


def _budget(max_memory: str | int | None) -> int | None:
    return parse_size(max_memory, "--max-memory") if max_memory is not None else None


def _check_budget(budget: int | None, extra: int, doing: str) -> None:
    """Refuse before any work when what a stage will allocate, beside what the process holds
    and RESERVED_BYTES of slack, does not fit under --max-memory."""
    if budget is None:
        return
    resident = psutil.Process().memory_info().rss
    need = extra + RESERVED_BYTES
    if resident + need > budget:
        raise MoxError(
            f"--max-memory {format_bytes(budget)} is too small to {doing}: it needs about "
            f"{format_bytes(need)} beside the {format_bytes(resident)} this process holds; "
            f"allow at least {format_bytes(resident + need)}"
        )


def _scan_bytes(found: list[Adapter], base: Checkpoint | None) -> int:
    """What reading one module's factors (raw bytes, widened to fp32, the checks' temporaries:
    16 bytes an element) or comparing and copying tensors in chunks costs at once."""
    scan = max((16 * _factor_elems(m) for f in found for m in f.modules.values()), default=0)
    largest = max((i.nbytes for f in found for i in f.checkpoint.tensors.values()), default=0)
    if base is not None:
        largest = max([largest, *(base.tensors[n].nbytes for f in found for n in _full_names(f)
                                  if n in base.tensors)])  # fmt: skip
    return max(scan, 2 * min(COPY_CHUNK_BYTES, largest))


def _full_names(found: Adapter) -> list[str]:
    return [k[len(KEY_PREFIX) :].replace(".base_layer.", ".") for k in found.full]


def _combine_bytes(parts: _Parts, rank: int | None) -> tuple[int, int]:
    """(held, transient) bytes of _combine and of writing its result: every module's fp32
    factors (and their copies padded to one rank) are held; one module at a time needs its
    fp32 blocks and, with `rank`, their fp64 copies, both QR factorizations, the core's SVD."""
    ranks = {}
    for name, items in parts.items():
        m = items[-1][1]
        total = sum(i[1].rank for i in items)
        ranks[name] = min(rank, total, m.b.shape[0], m.a.shape[1]) if rank else total
    out_rank = max(ranks.values(), default=0)
    held = transient = 0
    for name, items in parts.items():
        m = items[-1][1]
        rows_cols = m.b.shape[0] + m.a.shape[1]
        held += 4 * rows_cols * (ranks[name] + out_rank)
        total = sum(i[1].rank for i in items)
        need = 4 * rows_cols * total + max(16 * _factor_elems(i[1]) for i in items)
        if rank:
            need += 8 * (3 * rows_cols * total + 5 * total * total)
        transient = max(transient, need)
    return held, transient


def _check_merge_budget(
    budget: int | None, held: int, transient: int, found: list[Adapter], base: Checkpoint
) -> None:
    """The merge's budget, checked before any factor is read, the same in a dry run: torch
    (imported first, as the merge needs it), the factors it holds, the larger of reading them
    and the smallest tile (64 Ki elements, 16 bytes each) or copy chunk."""
    if budget is None:
        return
    import torch  # noqa: F401  (what the real merge holds before its first tile)

    scan = _scan_bytes(found, base)
    _check_budget(budget, held + max(transient, scan, 16 * MIN_TILE_ELEMS), "merge the adapter")


def _truncate(
    b: np.ndarray, a: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Best rank-`rank` factors of B·A (fp64): B = Q_B·R_B, Aᵀ = Q_A·R_A, SVD of the small
    core R_B·R_Aᵀ = U·S·Vᵀ, then B' = Q_B·U_r·√S_r, A' = √S_r·V_rᵀ·Q_Aᵀ. The discarded
    singular values give the error exactly (Eckart–Young)."""
    try:
        q_b, r_b = np.linalg.qr(b)
        q_a, r_a = np.linalg.qr(a.T)
        u, s, vt = np.linalg.svd(r_b @ r_a.T)
    except np.linalg.LinAlgError as exc:  # finite input converges; kept as a one-line error
        raise MoxError(f"--rank {rank}: the truncated SVD failed ({exc})") from None
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    new_b = (q_b @ u[:, :k]) * root
    new_a = (root[:, None] * vt[:k]) @ q_a.T
    return new_b, new_a, (float(np.sum(s[k:] ** 2)), float(np.sum(s**2)))


def _pad_rank(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero columns of B and rows of A up to `rank`: exact, and one rank for every module
    (vLLM ignores rank_pattern, PEFT needs the config's r to match the tensors)."""
    missing = rank - a.shape[0]
    if missing == 0:
        return b, a
    return (
        np.concatenate([b, np.zeros((b.shape[0], missing), b.dtype)], axis=1),
        np.concatenate([a, np.zeros((missing, a.shape[1]), a.dtype)], axis=0),
    )


def _attach_errors(report: AdapterReport, errors: dict[str, tuple[float, float]]) -> None:
    if not errors:
        return
    report.relative_errors = {
        name: math.sqrt(lost / total) if total else 0.0 for name, (lost, total) in errors.items()
    }
    lost = sum(e[0] for e in errors.values())
    total = sum(e[1] for e in errors.values())
    report.overall_error = math.sqrt(lost / total) if total else 0.0


def _combined_config(
    template: dict, combined: dict[str, _LowRank], rank: int, alpha: float
) -> dict:
    """The newest adapter's config with one rank, scaling −α (lora_alpha = −α·r, no rsLoRA),
    and the modules listed by name."""
    config = dict(template)
    config.update(
        r=rank,
        lora_alpha=-alpha * rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=sorted(combined),
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
    )
    return config


# --------------------------------------------------------------------------- writing


def _provenance(
    alpha: float, eta: float | None, inputs: list[Path], base, how: str
) -> dict[str, str]:
    meta = {
        "format": "pt",
        "moxkit_version": __version__,
        "moxkit_alpha": repr(alpha),
        "moxkit_adapters": json.dumps([str(p.resolve()) for p in inputs]),
        "moxkit_formula": how,
    }
    if base is not None:
        meta["moxkit_base"] = str(Path(base).resolve())
    if eta is not None:
        meta["moxkit_eta"] = repr(eta)
    return meta


def _nbytes(value: TensorInfo | np.ndarray) -> int:
    return value.nbytes


def _write_adapter(
    out: Path,
    options: EngineOptions,
    config: dict,
    metadata: dict[str, str],
    named: list[tuple[str, TensorInfo | np.ndarray]],
    reader: FileReader,
) -> int:
    """adapter_config.json + adapter_model.safetensors; tensors from input byte ranges
    (copied as they are) or fp32 arrays."""
    outputs = [
        OutputTensor(
            name, v.dtype if isinstance(v, TensorInfo) else "F32", tuple(v.shape), v.nbytes
        )
        for name, v in named
    ]
    (shard,) = layout([outputs], metadata, [WEIGHTS_NAME])
    try:  # strict JSON: the checks above leave no NaN or inf in a config moxkit writes
        text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as exc:
        raise MoxError(f"{out}: the forget adapter's config is not strict JSON ({exc})") from None
    with staged_dir(out, force=options.force, fsync=options.fsync) as tmp:
        writer = ShardWriter([shard], [tmp / shard.filename])
        try:
            for name, value in named:
                if isinstance(value, np.ndarray):
                    writer.write(name, 0, memoryview(value).cast("B"))
                    continue
                for start in range(0, value.nbytes, COPY_CHUNK_BYTES):
                    buf = bytearray(min(COPY_CHUNK_BYTES, value.nbytes - start))
                    reader.read_into(value.file, value.start + start, memoryview(buf))
                    writer.write(name, start, memoryview(buf))
        finally:
            writer.close()
        (tmp / CONFIG_NAME).write_text(text)
    return shard.file_size + len(text.encode())


# --------------------------------------------------------------------------- streamed merge


def merge_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    options: EngineOptions | None = None,
    **overrides,
) -> AdapterReport:
    """BASE + s·B·A for every module of `adapter` (a forget adapter, or any LoRA adapter),
    streamed into a full model folder as save_pretrained writes it: what PEFT's
    merge_and_unload gives, without holding the model in memory. `options` as for
    moxkit.extrapolate, except that without them no progress bar is shown."""
    options = EngineOptions.of(options or EngineOptions(progress=False), overrides, "merge_adapter")
    base_ckpt = open_checkpoint(base)
    found = open_adapter(adapter)
    held = sum(4 * _factor_elems(m) for m in found.modules.values())
    _check_merge_budget(_budget(options.max_memory), held, 0, [found], base_ckpt)
    scales = {name: m.scaling for name, m in found.modules.items()}
    reader = FileReader()
    try:
        _check_against_base(found, base_ckpt, reader)
        combined = _raw_factors(found, reader, scales, options.allow_nonfinite)
    finally:
        reader.close()
    return _merge(base_ckpt, combined, scales, Path(out), "BASE + s·B·A", [found.path], options)


def _merge(
    base: Checkpoint,
    combined: dict[str, _LowRank],
    scale: float | dict[str, float],
    out: Path,
    formula: str,
    inputs: list[Path],
    options: EngineOptions,
) -> AdapterReport:
    """Write BASE's tensors, adapted weights as W + scale·B·A computed in row tiles."""
    out_dtype = parse_dtype(options.dtype)
    budget = _budget(options.max_memory)
    shard_limit = parse_size(options.max_shard_size, "--max-shard-size")
    max_gpu_memory = options.max_gpu_memory
    gpu_budget = parse_size(max_gpu_memory, "--max-gpu-memory") if max_gpu_memory else None
    out = check_output(out, force=options.force, inputs=[base.path, *inputs])
    by_weight = {c.module.weight_name: c for c in combined.values()}
    outputs = []
    for name, info in base.tensors.items():
        code = out_dtype if (out_dtype and info.dtype in ARITHMETIC_CODES) else info.dtype
        if name in by_weight and info.dtype not in ARITHMETIC_CODES:
            raise MoxError(
                f"{info.file}: tensor {name!r} is {info.dtype}; merging needs F32/F16/BF16"
            )
        outputs.append(OutputTensor(name, code, info.shape, info.numel * SIZES[code]))
    shards = layout(split_shards(outputs, shard_limit), _merge_metadata(formula, inputs, base))
    report = AdapterReport(
        out=out,
        kind="merged model",
        formula=formula,
        n_modules=len(by_weight),
        rank=max((c.a.shape[0] for c in combined.values()), default=0),
        bytes_written=sum(s.file_size for s in shards),
        dry_run=options.dry_run,
        n_copied=len(base.tensors) - len(by_weight),
    )
    if options.dry_run:
        return report
    import torch  # the merge's arithmetic; the adapter paths above never import it

    target = _merge_device(options.device)
    report.device = target.type
    started = time.perf_counter()
    reader = FileReader()
    bar = ByteProgress(report.bytes_written, enabled=options.progress, desc="merge")
    try:
        with (
            staged_dir(out, force=options.force, fsync=options.fsync) as tmp,
            _full_fp32_matmul(torch),
        ):
            writer = ShardWriter(shards, [tmp / s.filename for s in shards])
            try:
                tile_elems = _tile_elems(budget)
                if target.type == "cuda" and gpu_budget:  # fp32 tile, product, output
                    tile_elems = max(1024, min(tile_elems, gpu_budget // 16))
                for t in (t for s in shards for t in s.tensors):
                    info = base.tensors[t.name]
                    low = by_weight.get(t.name)
                    if low is None:
                        _copy_tensor(reader, writer, info, t.dtype, tile_elems, torch)
                    else:
                        s = scale[low.module.name] if isinstance(scale, dict) else scale
                        merge = _TileMerge(low, s, _orientation(low.module, info), target, torch)
                        if not merge.run(reader, writer, info, t.dtype, tile_elems):
                            if not options.allow_nonfinite:
                                raise MoxError(
                                    f"tensor {t.name!r}: the merge has non-finite values (NaN "
                                    "or inf); pass --allow-nonfinite to keep them"
                                )
                            report.nonfinite_tensors.append(t.name)
                    bar.update(t.nbytes)
            finally:
                writer.close()
            write_index(tmp, shards)
            if base.directory is not None:
                carry_files(base.directory, tmp, out_dtype)
    finally:
        reader.close()
        bar.close()
    report.seconds = time.perf_counter() - started
    return report


@contextlib.contextmanager
def _full_fp32_matmul(torch):
    """True fp32 products on CUDA (no TF32, whatever the process set before)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _merge_metadata(formula: str, inputs: list[Path], base: Checkpoint) -> dict[str, str]:
    return {
        "format": "pt",
        "moxkit_version": __version__,
        "moxkit_formula": formula,
        "moxkit_base": str(base.path.resolve()),
        "moxkit_adapters": json.dumps([str(p.resolve()) for p in inputs]),
    }


def _merge_device(device: str):
    """The merge runs on the CPU or the first CUDA device only; moxkit.hf decides which."""
    from .hf import resolve_device

    if device not in ("auto", "cpu", "cuda"):
        raise MoxError(f"--device {device!r}: expected auto, cpu or cuda")
    return resolve_device(device)


def _tile_elems(budget: int | None) -> int:
    """Elements per tile: each costs its input bytes, an fp32 copy, the fp32 product and the
    output (≤ 16 bytes), from what the budget leaves after what the process already holds."""
    if budget is None:
        return MAX_TILE_ELEMS
    resident = psutil.Process().memory_info().rss
    elems = min(MAX_TILE_ELEMS, (budget - resident - RESERVED_BYTES) // 16)
    if elems < MIN_TILE_ELEMS:
        raise MoxError(
            f"--max-memory {format_bytes(budget)} is too small: this process already holds "
            f"{format_bytes(resident)}; allow at least "
            f"{format_bytes(resident + RESERVED_BYTES + 16 * MIN_TILE_ELEMS)}"
        )
    return elems


def _load_rows(reader: FileReader, info: TensorInfo, row0: int, rows: int, torch):
    cols = info.numel // info.shape[0] if info.shape and info.shape[0] else 0
    raw = bytearray(rows * cols * info.itemsize)
    reader.read_into(info.file, info.start + row0 * cols * info.itemsize, memoryview(raw))
    return torch.frombuffer(raw, dtype=getattr(torch, TABLE[info.dtype].torch)).view(rows, cols)


class _TileMerge:
    """W + scale·(B·A), or W + scale·(B·A)ᵀ, tile by tile of rows, in PEFT's op order: the
    product in fp32, times the scaling, added to W in fp32, then one rounding to the output."""

    def __init__(self, low: _LowRank, scale: float, transposed: bool, target, torch):
        b = torch.from_numpy(low.b).to(target)
        a = torch.from_numpy(low.a).to(target)
        self.left, self.right = (a.T, b.T) if transposed else (b, a)  # (B·A)ᵀ = Aᵀ·Bᵀ
        self.scale, self.target, self.torch = scale, target, torch

    def run(self, reader, writer, info: TensorInfo, out_code: str, tile_elems: int) -> bool:
        """Write the merged tensor; False if any value is non-finite."""
        torch = self.torch
        rows, cols = info.shape
        step = max(1, tile_elems // max(cols, 1))
        out_type = getattr(torch, TABLE[out_code].torch)
        finite = True
        for row0 in range(0, rows, step):
            n = min(step, rows - row0)
            w = _load_rows(reader, info, row0, n, torch).to(self.target, torch.float32)
            delta = self.left[row0 : row0 + n] @ self.right
            delta.mul_(self.scale)
            w.add_(delta)
            del delta
            finite &= bool(torch.isfinite(w).all())
            result = w.to(out_type).cpu().contiguous()
            writer.write(info.name, row0 * cols * SIZES[out_code], _bytes_of(result, torch))
        return finite


def _copy_tensor(reader, writer, info: TensorInfo, out_code: str, tile_elems: int, torch) -> None:
    """Unadapted tensors: bytes copied, or (with --dtype) converted chunk by chunk; a chunk
    costs what a tile may (16 bytes an element)."""
    if out_code == info.dtype:
        chunk = min(COPY_CHUNK_BYTES, 16 * tile_elems)
        for start in range(0, info.nbytes, chunk):
            buf = bytearray(min(chunk, info.nbytes - start))
            reader.read_into(info.file, info.start + start, memoryview(buf))
            writer.write(info.name, start, memoryview(buf))
        return
    flat = TensorInfo(info.name, info.dtype, (info.numel, 1), info.file, info.start, info.nbytes)
    out_type = getattr(torch, TABLE[out_code].torch)
    for row0 in range(0, info.numel, tile_elems):
        n = min(tile_elems, info.numel - row0)
        chunk = _load_rows(reader, flat, row0, n, torch).to(out_type).contiguous()
        writer.write(info.name, row0 * SIZES[out_code], _bytes_of(chunk, torch))


def _bytes_of(t, torch) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")
