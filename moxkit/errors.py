"""The exceptions a user can cause. The CLI prints the message as a single line and exits
non-zero; anything else escaping is a bug in moxkit and keeps its traceback.

MoxError is the one type to catch for "the user's input or environment is wrong"; its
subclasses say which part, for a caller that handles them apart (as safetensors' error has a
variant per cause):

    InputError      a bad argument value or a bad, corrupt or hostile input file or folder
    MismatchError   inputs that are each fine but disagree (REF and MEM names, shapes or
                    dtypes; an adapter and its base model; a file and the rows it must match)
    OutputError     the output cannot be written where asked (exists, inside an input, no
                    permission, no space)
    ResourceError   the machine or a budget cannot do it (max_memory too small, no CUDA)

Messages name the Python API's parameters (`max_memory`, `allow_nonfinite=True`), never a
command-line flag: `params` lists the ones a message names, and the CLI shows each as its flag
(moxkit.cli.main), so API callers and CLI users both read the words they typed.
"""

from __future__ import annotations

from collections.abc import Iterable


class MoxError(Exception):
    """A problem with the user's input or environment: bad path, corrupt file, mismatched
    checkpoints, bad option. The message names the file or tensor concerned, and any API
    parameter it names is listed in `params` (as `name`, or `name=value` for a value to pass)."""

    def __init__(self, message: str = "", *, params: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.params: tuple[str, ...] = tuple(dict.fromkeys(params))


class InputError(MoxError):
    """A bad argument value, or an input file or folder that is missing, corrupt or hostile."""


class MismatchError(MoxError):
    """Inputs that are each valid but do not fit together (REF, MEM and PREV; an adapter and
    its base model; replacement answers and the forget rows)."""


class OutputError(MoxError):
    """The output cannot be written where it was asked to go."""


class ResourceError(MoxError):
    """The machine or a budget cannot do what was asked: memory, a device, a build."""


def naming(exc: MoxError, param: str) -> MoxError:
    """`exc`, noting that its message names `param`: for a function that passed `param` as
    the label of a message raised deeper (a row file's errors start with its parameter)."""
    exc.params = tuple(dict.fromkeys((*exc.params, param)))
    return exc
