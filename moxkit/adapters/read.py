"""Reading a PEFT LoRA adapter folder, strictly: plain LoRA on linear layers (nn.Linear;
GPT-2's Conv1D through fan_in_fan_out) and embeddings. Anything whose effect is not
θ_ref + s·B·A (DoRA, trained biases, PiSSA-style initialisations that rewrite the base, trained
modules_to_save copies, trainable tokens, settings this version does not know) is refused in one
line naming the setting. The config is hostile until checked: pattern keys are matched without
a regex engine (PatternMatcher), numbers must have finite float values."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.checkpoint import Checkpoint, FileReader, TensorInfo, read_header
from ..engine.dtypes import ARITHMETIC_CODES, to_float32
from ..errors import InputError, MismatchError, MoxError
from ..sources import member, read_json, resolve_model, shown, tree_root

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is a few KB
MAX_PATTERN_KEYS = 4096  # per rank_pattern / alpha_pattern: one per module of a 585-layer model
MAX_PATTERN_KEY_CHARS = 512
MAX_RANK = 1 << 20
KEY_PREFIX = "base_model.model."
_FACTOR_KEY = re.compile(r"base_model\.model\.(.+)\.lora_(embedding_)?([AB])(\.weight)?")
COPY_CHUNK_BYTES = 64 << 20

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
        raise InputError(f"{shown(path)}: not a PEFT adapter folder (no {CONFIG_NAME})")
    if not os.path.lexists(path / WEIGHTS_NAME):
        extra = " (only adapter_model.bin: save with safe_serialization=True)"
        raise InputError(
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
                raise InputError(f"{weights_path}: tensor {key!r} is not a LoRA factor")
            full[key] = info
            continue
        module, embedding, side, suffix = match.groups()
        if bool(embedding) == bool(suffix):  # lora_A.weight, or lora_embedding_A (no .weight)
            raise InputError(f"{weights_path}: tensor {key!r} is not a LoRA factor")
        if info.dtype not in ARITHMETIC_CODES or len(info.shape) != 2:
            raise InputError(
                f"{weights_path}: tensor {key!r} is {info.dtype} {list(info.shape)}; moxkit reads "
                "2-D F32/F16/BF16 LoRA factors (LoRA on conv layers is not supported)"
            )
        if kinds.setdefault(module, bool(embedding)) != bool(embedding):
            raise InputError(
                f"{weights_path}: module {module!r} has both linear and embedding LoRA"
            )
        if side in factors.setdefault(module, {}):
            raise InputError(f"{weights_path}: module {module!r} has two lora_{side} factors")
        factors[module][side] = info
    if not factors:
        raise InputError(f"{weights_path}: holds no LoRA factors")
    patterns = _matchers(config_path, config)
    modules = {}
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise InputError(f"{weights_path}: module {name!r} has no lora_{missing} factor")
        a, b = pair["A"], pair["B"]
        if b.shape[1] != a.shape[0] or a.shape[0] == 0:
            raise InputError(
                f"{weights_path}: module {name!r}: lora_B {list(b.shape)} and lora_A "
                f"{list(a.shape)} do not multiply"
            )
        rank = _module_rank_alpha(config, name, patterns)[0]
        if rank != a.shape[0]:
            raise InputError(
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
        raise InputError(f"{path}: peft_type {config.get('peft_type')!r}; moxkit reads LoRA only")
    for key, why in _REFUSED.items():
        if not _is_off(config.get(key)):
            raise InputError(f"{path}: {key} is set: {why}; moxkit cannot make it exact")
    for key, value in config.items():
        if key not in _INERT and key not in _REFUSED and not _is_off(value):
            raise InputError(
                f"{path}: setting {key!r} = {str(value)[:60]} is unknown to moxkit and may change "
                "what the adapter computes"
            )
    if config.get("bias", "none") != "none":
        raise InputError(f"{path}: bias {config['bias']!r}: trained biases are not low-rank")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise InputError(
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
            raise InputError(f"{path}: {key} must map module patterns to numbers")
        for name, value in pattern.items():
            where = f"{key}[{_short(name)}]"
            (_check_rank if key == "rank_pattern" else _check_alpha_value)(path, where, value)


def _short(value: object) -> str:
    """repr of a config value for a message: long ones (a 4,000-digit integer) cut short."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "<huge>"
    return text if len(text) <= 64 else text[:60] + "..."


def _check_rank(path: Path, what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise InputError(f"{path}: {what} {_short(value)} is not an integer from 1 to {MAX_RANK:,}")


def _check_alpha_value(path: Path, what: str, value: object) -> None:
    """A finite number whose float value exists (a 400-digit integer has none)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(float(value))  # type: ignore[arg-type]
    except OverflowError:
        ok = False
    if not ok:
        raise InputError(f"{path}: {what} {_short(value)} is not a finite number")


def _nonfinite_in(path: Path, config: dict) -> None:
    """Refuse NaN/Infinity anywhere in the config (Python's json reads them; PEFT would copy
    them into the forget adapter's config, which then is not JSON)."""
    stack: list[tuple[str, object]] = [(k, v) for k, v in config.items()]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{path}: {where} is {value!r}: not a finite number")
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
            raise InputError(
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
        raise InputError(
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
            raise InputError(
                f"{where}: pattern key {_short(key)} uses {c!r}; moxkit reads module paths or "
                "their tails (letters, digits, _ - . \\. and a leading ^), not quantifiers, "
                "groups, alternation or classes"
            )
        i += 1
    if not chars:
        raise InputError(f"{where}: pattern key {_short(key)} is empty")
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
            raise InputError(
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
            raise MismatchError(
                f"{base.path}: BASE has no tensor {module.weight_name!r} that the adapter "
                f"{adapter.path} adapts (another base model, or tied embeddings?)"
            )
        _orientation(module, weight)
    for key, info in adapter.full.items():
        name = key[len(KEY_PREFIX) :].replace(".base_layer.", ".")
        weight = base.tensors.get(name)
        if weight is None or weight.dtype != info.dtype or weight.shape != info.shape:
            raise MismatchError(
                f"{adapter.path}: holds a full tensor {key!r} that BASE has no match for "
                "(modules_to_save?): its forget form is not low-rank"
            )
        if not _same_bytes(reader, info, weight):
            raise MismatchError(
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
        raise MismatchError(
            f"{weight.file}: tensor {weight.name!r} has shape {list(weight.shape)} but the "
            f"adapter's B·A for {module.name!r} is {list(product)}"
        )
    if plain and transposed:
        return module.embedding or module.fan_in_fan_out
    return transposed
