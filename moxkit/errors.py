"""The one exception type a user can cause. The CLI prints its message as a single line and
exits non-zero; anything else escaping is a bug in moxkit and keeps its traceback."""


class MoxError(Exception):
    """A problem with the user's input or environment: bad path, corrupt file, mismatched
    checkpoints, bad option. The message names the file or tensor concerned."""
