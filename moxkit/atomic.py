"""Staged output: every output appears whole or not at all, and the process can be
interrupted at any moment without leaving anything behind.

The one way moxkit writes an output (a model folder, a data set, a report, a plot):

    out = check_output(out, force=force, inputs=[ref, mem])   # early: fail before any work
    with staged_dir(out, force=force, fsync=fsync) as tmp:     # or staged_file(...)
        ... write everything under tmp ...
    # here OUT is complete; on any exception or interrupt nothing is left

- check_output: the single place that refuses an output: "OUT: already exists (use force=True
  to replace it)", an OUT that is, contains or lies inside an input (compared by device and
  inode, so bind mounts and links are caught; tree_inputs lists a folder's entries so that
  what they link to counts too), `-o .`, an OUT under a regular file or in a folder we
  cannot write (tried, not asked: access() says yes to root on /sys), a folder where a file
  goes, a name too long once the temp prefix is added, a dangling link. An OUT that is a
  link is followed: the link's target is what gets replaced.
- staged_dir / staged_file: build in `.OUT.moxkit-tmp-XXXX` beside OUT (same file system,
  mode from the umask) and rename into place on a clean exit. The temp is locked (flock on
  the temp itself, released by the kernel when its process dies, even by SIGKILL), so a later
  run removes the temps of dead runs and never a live run's. Without force, OUT is published
  with RENAME_NOREPLACE (a file that appeared meanwhile is never overwritten); with force, by
  RENAME_EXCHANGE, so there is no moment with neither the old nor the new OUT (where the file
  system lacks it: two renames, with signals held in between). fsync=True syncs the files and
  folders before and after the rename, so a finished OUT survives a power loss. Files and
  folders in a staged folder get at least the modes the umask allows (libraries that write
  through private temporaries leave 0600 behind).
- Signals: inside interruptible() (which staged_* enter, and the CLI enters for a whole
  command) SIGTERM acts like Ctrl-C: the first SIGINT/SIGTERM raises KeyboardInterrupt;
  any later one, and any that arrives inside shielded() (cleanup, publishing), is held, so
  cleanup always runs to the end. A signal held while OUT was being published raises
  KeyboardInterrupt once OUT is in place; `published` lists the outputs completed, so the
  CLI can say that OUT is complete rather than merely "interrupted". An output put in place
  inside a folder being staged or marked scratch() (a momentum tick, a sweep's forget
  model) is an intermediate, not an output: it is not listed.
- Test hook: reached(point) marks a named point of the work; tests set HOOK (in process) or
  MOXKIT_TEST_SIGNALS="point:SIGNAL[,point:SIGNAL...]" (read at import, for subprocesses) to
  have a signal sent to the process the first time each point is reached.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import InputError, OutputError

TEMP_MARK = ".moxkit-tmp-"  # temp names: f".{OUT name}{TEMP_MARK}{random}[suffix]"
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


published: list[Path] = []  # outputs this process put in place, for "interrupted" messages
_scratch: list[Path] = []  # folders whose contents are intermediates (staged temps, scratch())


# ---------------------------------------------------------------------------------- checks


def check_output(
    out: str | os.PathLike, *, force: bool, inputs: Iterable = (), folder: bool = True
) -> Path:
    """The output path to write (a link is followed to its target), or MoxError saying in
    one line why OUT cannot be written. `inputs` are paths (files or folders) that OUT must
    neither be, contain, nor lie inside. A folder output may be named with a trailing slash
    (`-o out/`); a file output may not."""
    given = Path(out)
    if given.name in ("", ".", "..") or (not folder and str(out).endswith(os.sep)):
        raise OutputError(f"{out}: not a name for a new output (name a file or folder to create)")
    path = Path(os.path.abspath(given))
    if os.path.islink(path):  # False, not OSError, for a name past NAME_MAX
        target = Path(os.path.realpath(path))
        if not os.path.lexists(target):
            raise OutputError(
                f"{given}: a link to {target}, which does not exist (remove the link or "
                "choose another output)"
            )
        path = target
    existing = _first_existing(path.parent)
    if not existing.is_dir():
        raise OutputError(f"{given}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{given}: cannot write in {existing} (permission denied)")
    name_max = _name_max(existing)
    longest = len(os.fsencode(_temp_name(path, "x" * 16)))
    if longest > name_max:
        room = name_max - (longest - len(os.fsencode(path.name)))
        raise OutputError(
            f"{given}: name too long ({len(os.fsencode(path.name))} bytes; at most {room} "
            "here, to leave room for the temporary name)"
        )
    cwd = os.getcwd()
    if cwd == str(path) or cwd.startswith(str(path).rstrip(os.sep) + os.sep):
        raise OutputError(f"{given}: would replace the current folder or one above it")
    _check_against_inputs(given, path, inputs)
    if not folder and os.path.isdir(path):
        raise OutputError(f"{given}: is a folder; the output is a file (name a file)")
    if os.path.lexists(path) and not force:
        raise OutputError(
            f"{given}: already exists (use force=True to replace it)", params=("force",)
        )
    _try_writing(given, existing)
    return path


def _try_writing(given: Path, folder: Path) -> None:
    """Create and remove a file in `folder`: a read-only file system, /sys or /proc (where
    access() tells root yes) or an immutable folder is found now, not after the work."""
    probe = folder / f".moxkit-probe-{secrets.token_hex(8)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise OutputError(f"{given}: cannot write in {folder} ({exc.strerror})") from None
    with contextlib.suppress(OSError):
        os.unlink(probe)


MAX_TREE_ENTRIES = 100_000  # a folder with more entries is no model or data folder


def tree_inputs(*paths: str | os.PathLike | None) -> list[Path]:
    """Each path and, for a folder, each entry in it, for check_output's `inputs`: an
    entry that links elsewhere (a hub cache snapshot's files link into ../../blobs) makes
    its target an input too, since inputs are compared by what they resolve to."""
    found: list[Path] = []
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        found.append(path)
        if not path.is_dir():
            continue
        try:
            with os.scandir(path) as entries:
                for i, entry in enumerate(entries):
                    if i >= MAX_TREE_ENTRIES:
                        raise InputError(f"{path}: more than {MAX_TREE_ENTRIES:,} entries")
                    found.append(Path(entry.path))
        except OSError as exc:
            raise InputError(f"{path}: cannot list the folder ({exc.strerror})") from None
    return found


def _first_existing(folder: Path) -> Path:
    while not os.path.lexists(folder):
        folder = folder.parent
    return folder


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _folders_above(path: Path) -> set[tuple[int, int]]:
    """Identities of the folders above `path`, both as written and with links resolved."""
    chains = {path, Path(os.path.realpath(path))}
    return {_identity(p) for start in chains for p in start.parents} - {None}


def _check_against_inputs(given: Path, out: Path, inputs: Iterable) -> None:
    items = [(Path(p), _identity(p)) for p in inputs]
    items = [(p, ident) for p, ident in items if ident is not None]
    out_id = _identity(out)
    for item, ident in items:
        if ident == out_id:
            raise OutputError(f"{given}: the output would overwrite the input {item}")
    above_out = _folders_above(out)
    for item, ident in items:
        if ident in above_out:
            raise OutputError(f"{given}: the output would lie inside the input {item}")
        if out_id is not None and out_id in _folders_above(item):
            raise OutputError(
                f"{given}: the output would replace a folder holding the input {item}"
            )


# ---------------------------------------------------------------------------------- signals


class _SignalState:
    depth = 0  # interruptible() contexts open in the main thread
    held = 0  # shielded() contexts open in the main thread
    interrupted = False  # KeyboardInterrupt already raised: later signals are only noted
    pending: list[int] = []
    previous: dict[int, object] = {}


_state = _SignalState()


def _on_signal(signum: int, frame) -> None:
    if _state.interrupted or _state.held:
        _state.pending.append(signum)
        return
    _state.interrupted = True
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interruptible(final: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt, once; later ones wait until the block is
    left (cleanup is never cut short). Outside the main thread it does nothing: Python runs
    signal handlers in the main thread only. `final`: the process ends with the block (a
    command's entry point), so the signals are ignored from then on instead of going back to
    their defaults: a burst of SIGTERMs after "interrupted" was printed must not kill the
    process by the signal in the moment between the two."""
    if not _main_thread():
        yield
        return
    if _state.depth == 0:
        _state.previous = {s: signal.getsignal(s) for s in _SIGNALS}
        for s, handler in _state.previous.items():
            if handler is not signal.SIG_IGN:  # a signal ignored by our parent stays so
                signal.signal(s, _on_signal)
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0:
            for s, handler in _state.previous.items():
                signal.signal(s, signal.SIG_IGN if final else handler)
            _state.interrupted = False
            _state.pending.clear()


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Signals arriving inside are held; if one did and the block ends normally, it is
    raised then as KeyboardInterrupt. Use around cleanup and anything that must not stop
    half-way. Effective inside interruptible(), in the main thread."""
    if not _main_thread() or _state.depth == 0:
        yield
        return
    _state.held += 1
    try:
        yield
    finally:
        _state.held -= 1
    if not _state.held and _state.pending and not _state.interrupted:
        _state.pending.clear()
        _state.interrupted = True
        raise KeyboardInterrupt


def settle() -> None:
    """The outcome is decided (an error or interrupt is being reported): from now until the
    interruptible() block ends, signals are only noted, so the report is not cut short."""
    if _main_thread() and _state.depth:
        _state.interrupted = True


HOOK: Callable[[str], None] | None = None  # tests: called with each point reached


def reached(point: str) -> None:
    """Mark a named point of the work, for tests that deliver signals there (see HOOK)."""
    if HOOK is not None:
        HOOK(point)


def signal_at(plan: str) -> Callable[[str], None]:
    """A HOOK sending signals at points: "point:SIGNAL[,point:SIGNAL...]", each once, in the
    order listed (a point may be listed twice: the second fires the second time)."""
    steps = [tuple(step.split(":")) for step in plan.split(",") if step]

    def hook(point: str) -> None:
        if steps and steps[0][0] == point:
            os.kill(os.getpid(), getattr(signal, steps.pop(0)[1]))

    return hook


if os.environ.get("MOXKIT_TEST_SIGNALS"):
    HOOK = signal_at(os.environ["MOXKIT_TEST_SIGNALS"])


# ---------------------------------------------------------------------------------- staging


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, *, force: bool, fsync: bool = False) -> Iterator[Path]:
    """A new empty folder beside OUT; renamed to OUT when the block ends without an
    exception, removed (with any parent folders made for it) when it does not."""
    with _staged(out, force, fsync, directory=True) as tmp:
        yield tmp


@contextlib.contextmanager
def staged_file(out: str | os.PathLike, *, force: bool, fsync: bool = False) -> Iterator[Path]:
    """A path beside OUT (an empty file, ending in OUT's suffix so writers that go by the
    extension work) to write OUT's content into; renamed to OUT on a clean exit, removed
    otherwise. Write into this file; do not replace it (the lock lives on it)."""
    with _staged(out, force, fsync, directory=False) as tmp:
        yield tmp


@contextlib.contextmanager
def _staged(out, force: bool, fsync: bool, directory: bool) -> Iterator[Path]:
    out = check_output(out, force=force, folder=directory)
    with interruptible():
        created: list[Path] = []
        lock = -1
        tmp: Path | None = None
        try:
            reached("staging")
            with shielded():  # what is made is recorded before a signal can stop us
                _make_parents(out.parent, created)
            remove_stale_temps(out)
            with shielded():
                tmp, lock = _new_temp(out, directory)
                _scratch.append(tmp)
            yield tmp
            _state.held += _main_thread()
            try:
                reached("publish")
                if directory:
                    _umask_modes(tmp)
                if fsync:
                    _fsync_tree(tmp)
                move_into_place(tmp, out, force)
                _scratch.remove(tmp)
                tmp = None
                if fsync:
                    _fsync_published(out)
            finally:
                _state.held -= _main_thread()
        except BaseException:
            _state.held += _main_thread()
            try:
                reached("cleanup")
                if tmp is not None:
                    _scratch.remove(tmp)
                    _remove(tmp)
                for folder in reversed(created):
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            finally:
                _state.held -= _main_thread()
                if lock >= 0:
                    os.close(lock)
            raise
        os.close(lock)
        _record_published(out)
        if _main_thread() and _state.pending and not _state.interrupted:
            _state.pending.clear()
            _state.interrupted = True
            raise KeyboardInterrupt  # held while publishing; OUT is complete (see published)


@contextlib.contextmanager
def scratch(folder: str | os.PathLike) -> Iterator[None]:
    """Outputs put in place under `folder` while the block runs are intermediates of the
    work (removed by it), not outputs: an interrupt message never names them."""
    folder = Path(os.path.abspath(folder))
    _scratch.append(folder)
    try:
        yield
    finally:
        _scratch.remove(folder)


def _record_published(out: Path) -> None:
    out = Path(os.path.abspath(out))
    if not any(out == f or f in out.parents for f in _scratch):
        published.append(out)


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _umask_modes(root: Path) -> None:
    """Add the permission bits the umask allows to every file (0o666) and folder (0o777)
    under `root`: what a plain open() or mkdir() would have given them."""
    allowed = ~_umask()
    for folder, dirs, files in os.walk(root):
        for name, bits in [(n, 0o777) for n in dirs] + [(n, 0o666) for n in files]:
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                mode = st.st_mode & 0o7777
                if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                    if mode | (bits & allowed) != mode:
                        os.chmod(path, mode | (bits & allowed))


def _temp_name(out: Path, token: str) -> str:
    suffix = out.suffix if len(out.suffix) <= 16 else ""
    return f".{out.name}{TEMP_MARK}{token}{suffix}"


def _make_parents(folder: Path, created: list[Path]) -> None:
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # made by someone else meanwhile: not ours to remove
        except OSError as exc:
            raise OutputError(f"{folder}: cannot create the folder: {exc.strerror}") from None
        created.append(folder)


def _new_temp(out: Path, directory: bool) -> tuple[Path, int]:
    """Create and lock a fresh temp beside OUT. The lock is taken on the temp itself; if a
    stale-temp sweep by another run got to it first, try another name."""
    while True:
        tmp = out.with_name(_temp_name(out, secrets.token_hex(8)))
        try:
            if directory:
                tmp.mkdir()
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
            else:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"{out}: cannot write beside it: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, tmp):
                return tmp, fd
        except BlockingIOError:
            pass  # a sweep holds it and will remove it
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    st = os.fstat(fd)
    try:
        other = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)


def remove_stale_temps(out: str | os.PathLike) -> list[Path]:
    """Remove the temps beside OUT left by runs that died (their lock is free); returns
    what was removed. A live run holds its temp's lock, so its temp is never touched."""
    out = Path(out)
    prefix = f".{out.name}{TEMP_MARK}"
    removed = []
    try:
        entries = [e for e in os.scandir(out.parent) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        try:
            flags = os.O_RDONLY | (os.O_DIRECTORY if entry.is_dir(follow_symlinks=False) else 0)
            fd = os.open(path, flags | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, path):
                _remove(path)
                removed.append(path)
        except BlockingIOError:
            continue  # a live run
        finally:
            os.close(fd)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_published(out: Path) -> None:
    """fsync OUT's folder entry after the rename. OUT is complete and in place by now, so a
    failure here must not read as a failed write: it says what is and is not durable."""
    try:
        _fsync_path(out.parent)
    except OSError as exc:
        raise OutputError(
            f"{out}: written and in place, but syncing its folder {out.parent} failed "
            f"({exc.strerror or exc}): the new name may not survive a power loss"
        ) from None


def _fsync_tree(root: Path) -> None:
    if not root.is_dir():
        _fsync_path(root)
        return
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder, name))
        _fsync_path(Path(folder))


# ---------------------------------------------------------------------------------- renames


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) with `flags`; False where the system or file system lacks it."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(-100, os.fsencode(src), -100, os.fsencode(dst), flags) == 0:  # -100: AT_FDCWD
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


_LIBC: list = []


def _libc_renameat2():
    if not _LIBC:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
            fn.argtypes += [ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (AttributeError, OSError):
            fn = None
        _LIBC.append(fn)
    return _LIBC[0]


def move_into_place(src: Path, dst: Path, force: bool) -> None:
    """Rename the finished `src` to `dst`. Without force an existing `dst` is refused, even
    one that appeared a moment ago; with force it is swapped out atomically and removed
    only once the new output is in place (call with signals held: see shielded)."""
    src, dst = Path(src), Path(dst)
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        if not force:
            raise OutputError(
                f"{dst}: appeared while writing (another run?); not replaced"
            ) from None
        _replace(src, dst)
        return
    except OSError as exc:
        raise OutputError(f"{dst}: cannot put the output in place: {exc.strerror}") from None
    # no renameat2: a hard link refuses an existing name for files; folders check first
    if os.path.lexists(dst):
        if not force:
            raise OutputError(f"{dst}: appeared while writing (another run?); not replaced")
        _replace(src, dst)
    elif src.is_dir():
        os.rename(src, dst)
    else:
        try:
            os.link(src, dst)
            os.unlink(src)
        except FileExistsError:
            raise OutputError(
                f"{dst}: appeared while writing (another run?); not replaced"
            ) from None
        except OSError:
            os.rename(src, dst)


def _replace(src: Path, dst: Path) -> None:
    """Put `src` in the place of the existing `dst`, then remove the old one."""
    try:
        if _renameat2(src, dst, _RENAME_EXCHANGE):
            _remove(src)  # now holds the old output
            return
    except OSError as exc:
        raise OutputError(f"{dst}: cannot replace it: {exc.strerror}") from None
    # kept under a name no sweep removes: only SIGKILL or a crash between the two renames
    # could leave it, and then it is the user's previous output
    old = dst.with_name(f".{dst.name}.moxkit-old-{secrets.token_hex(8)}")
    os.rename(dst, old)
    reached("renamed-aside")
    os.rename(src, dst)
    _remove(old)
