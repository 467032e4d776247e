"""Which optional part of moxkit brings which package. The core install runs `moxkit extrapolate`
(numpy and the C loop); training, evaluation, LoRA, GPU and the packaged model are extras
(pyproject.toml), so a command that needs a package the install lacks says which extra adds it
instead of ending in a traceback."""

from __future__ import annotations

# top-level import name -> the extra that installs it
EXTRA_OF = {
    "torch": "train",
    "transformers": "train",
    "accelerate": "train",
    "tokenizers": "train",
    "safetensors": "train",
    "huggingface_hub": "hub",
    "scipy": "eval",
    "matplotlib": "eval",
    "pyarrow": "eval",
    "nltk": "eval",
    "peft": "lora",
    "triton": "gpu",
    "gguf": "real",
}


def missing_extra(exc: BaseException) -> str | None:
    """For a ModuleNotFoundError of a package an extra provides, the one-line fix; else None
    (any other missing module is a bug or a broken environment, and keeps its traceback)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    return (f"this needs the Python package {top}, which is not installed: "
            f"pip install 'moxkit[{extra}]'")  # fmt: skip
