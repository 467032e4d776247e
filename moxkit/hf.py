"""One way to load a Hugging Face model and tokenizer, for training and evaluation alike.

transformers never sees the model folder itself: it loads from a checked view (checked_view),
a temporary folder of links to exactly the files that passed moxkit.sources' trust rules (the
weights moxkit.engine.checkpoint validated, and the model files of sources.model_files, every JSON
one read through read_json first). A tokenizer file or chat template linking to
/proc/self/environ or to a private file, a FIFO, or a file transformers would choke on never
reaches the loader, so it can never be re-saved into an output either (training writes the
tokenizer and generation config from what was loaded, not by copying). adapter_config.json
is left out of the view: transformers would load the base model it names, from anywhere.

Every failure a user can cause (a folder that is not a model, a broken tokenizer, weights
transformers refuses) becomes a MoxError naming the input; transformers raises many exception
types for these, so loading catches them all and keeps the first line of the message. The
device is resolved once, here, with the same rule for every command.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, MoxError, ResourceError
from .sources import member

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# model files a loader must not see: transformers follows adapter_config.json to the base
# model it names (any path), instead of the folder it was given
NOT_LOADED = ("adapter_config.json",)


@dataclass
class Loaded:
    """A model and its tokenizer, where they came from and the dtype the weights were stored
    in (outputs derived from the model, such as a forget model, are saved in it)."""

    model: Any
    tokenizer: Any
    directory: Path | None  # None: the model was given in memory
    stored_dtype: torch.dtype


def resolve_device(device: str = "auto") -> torch.device:
    """ "auto" is the first CUDA device when there is one, else the CPU; asking for CUDA
    without one is an error, not a silent fallback."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"device {device!r}: expected auto, cpu, cuda or cuda:N",
                         params=("device",)) from None  # fmt: skip
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ResourceError(f"device {device!r}: no CUDA device is available", params=("device",))
    return dev


def check_model_dir(
    path: str | os.PathLike, name: str, need_tokenizer: bool = True, revision: str | None = None
) -> Path:
    """The model folder `path` names: a local folder, or a hub id (org/name[@revision]) found
    in the Hugging Face cache or downloaded (moxkit.sources.resolve_model). Only cheap checks,
    without importing transformers: commands run them before anything heavy so that a typo
    is reported at once."""
    p = Path(path)
    if not os.path.lexists(p):
        from .sources import resolve_model

        try:
            p = resolve_model(path, revision)
        except MoxError as exc:
            raise type(exc)(f"{name} {exc}", params=(name, *exc.params)) from None
    if not p.is_dir():
        what = "no such folder" if not p.exists() else "not a folder"
        raise InputError(
            f"{name} {p}: {what} (expected a transformers model folder)", params=(name,)
        )
    if not os.path.lexists(p / "config.json"):
        raise InputError(f"{name} {p}: no config.json (not a transformers model folder)",
                         params=(name,))  # fmt: skip
    try:
        member(p, "config.json")
    except MoxError as exc:
        raise type(exc)(f"{name} {exc}", params=(name, *exc.params)) from None
    if need_tokenizer and not any(os.path.lexists(p / f) for f in TOKENIZER_FILES):
        raise InputError(f"{name} {p}: no tokenizer files ({', '.join(TOKENIZER_FILES)})",
                         params=(name,))  # fmt: skip
    return p


def checked_view(folder: Path, name: str, weights: bool = True) -> tempfile.TemporaryDirectory:
    """A temporary folder of links to the files of the model `folder` that transformers may
    load: with `weights`, its weights as moxkit.engine.checkpoint validated them (the index too when
    sharded), and the model files that pass the trust rules (others are left out with a
    warning; one a loader could not read whole within bounds, sources.check_loadable, is
    MoxError naming the file). Links point at the checked files with every link resolved,
    so nothing is followed again."""
    from .engine.checkpoint import INDEX_NAME, SINGLE_NAME, open_checkpoint
    from .sources import check_loadable, model_files

    files = [f for f in model_files(folder, "not loaded") if f.name not in NOT_LOADED]
    try:
        for file in files:
            check_loadable(file)
        if weights:
            checkpoint = open_checkpoint(folder)
            files += {t.file.name: t.file for t in checkpoint.tensors.values()}.values()
            if not os.path.lexists(folder / SINGLE_NAME) and os.path.lexists(folder / INDEX_NAME):
                files.append(member(folder, INDEX_NAME))
    except MoxError as exc:
        raise type(exc)(f"{name} {exc}", params=(name, *exc.params)) from None
    view = tempfile.TemporaryDirectory(prefix="moxkit-model-")
    try:
        for file in files:
            os.symlink(file.real, os.path.join(view.name, file.name))
    except OSError as exc:
        view.cleanup()
        raise InputError(f"{name} {folder}: cannot prepare it for loading: {exc}",
                         params=(name,)) from None  # fmt: skip
    return view


def load_tokenizer(path: str | os.PathLike, name: str) -> Any:
    p = check_model_dir(path, name)
    return _tokenizer(checked_view(p, name, weights=False), p, name)


def _tokenizer(view: tempfile.TemporaryDirectory, folder: Path, name: str) -> Any:
    """The tokenizer in `view`; the view lives as long as the tokenizer does (a slow
    tokenizer reopens its vocabulary file when it is saved)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(view.name)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        view.cleanup()
        error = loading_error(exc, f"{name} {folder}: cannot load the tokenizer")
        raise InputError(str(error).replace(view.name, str(folder))) from None
    weakref.finalize(tokenizer, view.cleanup)
    return tokenizer


def load_model(
    model: Any,
    name: str,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> Loaded:
    """A model folder or hub id, or a transformers model given in memory (then pass
    tokenizer=; it is deep-copied, so the caller's model is never modified), as `dtype` on
    `device`, in eval mode. Training wants fp32 (updates at lr 1e-5 vanish in bf16 weights);
    "auto" keeps the stored dtype. Imports torch only when called: check_model_dir is all a
    command needs to report a wrong folder at once."""
    import torch

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if not isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            raise InputError(f"{name}: a model given in memory needs tokenizer=", params=(name,))
        stored = next(model.parameters()).dtype
        copied = copy.deepcopy(model)
        if dtype != "auto":
            copied = copied.to(dtype)
        return Loaded(copied.to(dev).eval(), tokenizer, None, stored)

    path = check_model_dir(model, name, need_tokenizer=tokenizer is None, revision=revision)
    view = checked_view(path, name)
    own_tokenizer = tokenizer is None
    if own_tokenizer:
        tokenizer = _tokenizer(view, path, name)
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(view.name)
        with no_transformers_bars():
            loaded = AutoModelForCausalLM.from_pretrained(view.name, dtype=dtype)
    except Exception as exc:  # OSError, ValueError, KeyError, safetensors errors, ...
        view.cleanup()
        error = loading_error(exc, f"{name} {path}: cannot load the model")
        raise InputError(str(error).replace(view.name, str(path))) from None
    if not own_tokenizer:
        view.cleanup()  # the model is in memory; only a tokenizer may reopen its files
    return Loaded(loaded.to(dev).eval(), tokenizer, path, stored_dtype(config))


def stored_dtype(config: Any) -> torch.dtype:
    """The dtype a config says the weights are stored in (fp32 when it does not say)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def loading_error(exc: BaseException, doing: str) -> MoxError:
    """The error for a loader that failed. A package that fails to import while transformers
    loads (a missing extra, or a folder in the working directory shadowing an installed
    package) is the environment's fault, not the input's: say which package and where Python
    found it, instead of blaming the model or its tokenizer."""
    cause = import_failure(exc)
    if cause is None:
        return InputError(f"{doing}: {first_line(exc)}")
    package = cause.name or "a package"
    if isinstance(cause, ModuleNotFoundError):
        where = "not installed"
    else:
        where = f"found at {cause.path}" if cause.path else "found"
    return ResourceError(
        f"{doing}: a Python package failed to import ({package}, {where}): "
        f"{first_line(cause)}; this is the environment, not the input"
    )


def import_failure(exc: BaseException | None) -> ImportError | None:
    """The ImportError in `exc`'s chain (transformers re-raises some inside its own types)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ImportError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def no_transformers_bars():
    """transformers' per-file load/save bars would interleave with moxkit's own progress."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
