"""Where a model comes from, and what in it may be trusted.

A model is named by a local path (a folder or a .safetensors file, a Hugging Face cache
snapshot included) or by a hub id `org/name` (optionally `org/name@revision`), resolved through
huggingface_hub: the local cache first, a download of only the files a model needs when online,
one clear line when offline and not cached.

Everything found inside a model folder is hostile until checked here, once:
- names an index gives must be plain file names (no separators, no '..', not absolute);
- links are followed only where the target stays inside the model's own tree: the folder
  itself, or for a hub cache snapshot (models--ORG--NAME/snapshots/REV/, whose files link into
  ../../blobs) that snapshot and its own repository's blobs/; symlink loops and dangling links
  are refused;
- only regular files are read (a FIFO named *.safetensors must not hang the run, and
  /proc files or devices must never be copied into an output);
- every JSON file is read through read_json: a size cap, a depth cap, Python's cap on the
  digits of an integer, an object at the top, duplicate keys refused, one-line errors.
- the model files besides the weights (model_files: config, tokenizer, generation config,
  chat template) are the MODEL_FILE_PATTERNS names only; one that breaks a rule is left out
  with a warning naming it; one a loader reads whole must pass check_loadable (JSON within
  read_json's bounds, anything else at most MAX_MODEL_FILE_BYTES).
A file is remembered as a ModelFile (device, inode, size), so a reader can tell when it was
replaced or truncated after it was checked.

A hub id is resolved here, not by huggingface_hub, whose cache reader follows whatever the
cache holds (a ref holding a path, a snapshot linking elsewhere, a FIFO, a device): the
revision must be a commit hash or a plain ref name (check_revision); a ref file must be a
small regular file of the repository itself, opened without following links or blocking,
holding exactly a commit hash in ASCII; the snapshot must be the folder
models--ORG--NAME/snapshots/COMMIT itself, not a link. Offline, nothing else in the cache is
read (huggingface_hub's trees/*.json listings never are); online, the parts of the cache the
hub library reads itself (the ref, snapshots/, trees/) are checked before it is called, and
what it downloaded is resolved again by the same rules.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, MoxError
from .units import check_headroom

log = logging.getLogger("moxkit")

MAX_JSON_BYTES = 100_000_000  # safetensors' own header limit; no model's JSON comes near
MAX_JSON_DEPTH = 64  # configs nest a handful of levels; Python's recursion limit is ~1000
JSON_PARSE_FACTOR = 7  # peak bytes per JSON byte: 6.0 measured on a 1.3M-tensor index
# a model file besides the weights that a loader reads whole (tokenizer.model, merges.txt;
# the largest tokenizer files known are ~35 MB); JSON is bounded by MAX_JSON_BYTES
MAX_MODEL_FILE_BYTES = 100_000_000
MAX_REF_BYTES = 4096  # a cache ref holds a 40-digit commit hash; room for whitespace only

# files of a model besides its weights: what a hub download fetches and what OUT carries over
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "adapter_config.json",
)

# org/name[@revision]; the revision is checked by check_revision, which names what is wrong
_HUB_ID = re.compile(
    r"([A-Za-z0-9][\w.-]{0,95})/([A-Za-z0-9][\w.-]{0,95})(?:@(.+))?", re.ASCII | re.DOTALL
)
_COMMIT = re.compile(r"[0-9a-f]{40}")
# one '/'-separated part of a ref name: what git and the hub allow, minus anything that could
# act as a path ('.', '..', empty parts) or look like an option
_REF_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", re.ASCII)
MAX_REVISION_CHARS = 128


def shown(path: str | os.PathLike) -> str:
    """A path as it may appear in a one-line message: quoted when it holds a newline, a
    control character or bytes that are not UTF-8 (which could forge a second line)."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    return text if text.isprintable() else ascii(text)


def is_model_file(name: str) -> bool:
    """Whether `name` is one of the non-weight files a model folder needs."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILE_PATTERNS)


# ------------------------------------------------------------------------------ model files


@dataclass(frozen=True)
class ModelFile:
    """A regular file of a model as it was when checked: reopen it with open_checked, which
    refuses a file replaced or truncated since."""

    path: Path  # as the user or the index named it: what messages show
    real: str  # with links resolved: what is opened
    size: int
    dev: int
    ino: int

    def __fspath__(self) -> str:
        return self.real

    def __str__(self) -> str:
        return shown(self.path)

    @property
    def name(self) -> str:
        return self.path.name


def tree_root(folder: Path) -> Path:
    """The tree links inside `folder` may point into: the folder itself, or for a hub cache
    snapshot (models--ORG--NAME/snapshots/REV) the repo folder that holds blobs/ (member
    then narrows it to the snapshot itself and blobs/)."""
    real = Path(_realpath(folder))
    snapshots, repo = real.parent, real.parent.parent
    if snapshots.name == "snapshots" and repo.name.startswith("models--"):
        if (repo / "blobs").is_dir():
            return repo
    return real


def check_file_name(name: object, where: str) -> str:
    """`name` if it is a plain file name of the folder (what an index may name), else
    MoxError: no separators, no '..', not absolute, no NUL, no lone surrogates."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or not _encodable(name)
    ):
        raise InputError(
            f"{where}: {_quote(name)} is not a plain file name in the model folder "
            "(an index may not point outside the model directory)"
        )
    return name


def member(folder: Path, name: str, root: Path | None = None) -> ModelFile:
    """The regular file `name` of `folder`, where any link it goes through stays inside
    `root` (default: tree_root(folder))."""
    root = root if root is not None else tree_root(folder)
    path = folder / name
    real = _realpath(path)
    snapshot = _snapshot_in(folder, root)
    if snapshot is not None:
        if not (_inside(real, root / "blobs") or _inside(real, snapshot)):
            raise InputError(
                f"{shown(path)}: links to {shown(real)}, outside this cache snapshot and its "
                "repository's blobs/; moxkit follows links only into them"
            )
    elif not _inside(real, root):
        raise InputError(
            f"{shown(path)}: links to {shown(real)}, outside the model's folder; moxkit "
            "follows links only within it"
        )
    return _checked(path, real)


def _snapshot_in(folder: Path, root: Path) -> Path | None:
    """`folder` (links resolved) when it is a snapshot of the hub cache repository `root`."""
    if not root.name.startswith("models--"):
        return None
    real = Path(os.path.realpath(folder))
    return real if real.parent == root / "snapshots" else None


def model_files(folder: Path, left_out: str) -> list[ModelFile]:
    """The files of `folder` besides its weights that a model needs (MODEL_FILE_PATTERNS),
    checked: each that breaks a rule is named in a warning saying it is `left_out` ("not
    carried over") and skipped, so that nothing it links to is ever read."""
    root = tree_root(folder)
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise InputError(f"{shown(folder)}: cannot list: {exc.strerror or exc}") from None
    files = []
    for name in filter(is_model_file, names):
        try:
            files.append(member(folder, name, root))
        except MoxError as exc:
            log.warning("moxkit: warning: %s: %s", left_out, exc)
    return files


def check_loadable(file: ModelFile) -> None:
    """MoxError unless a loader may read `file` whole: JSON within read_json's bounds, any
    other file at most MAX_MODEL_FILE_BYTES."""
    if file.name.endswith(".json"):
        read_json(file, "model file")
    elif file.size > MAX_MODEL_FILE_BYTES:
        raise InputError(
            f"{file}: {file.size:,} bytes; moxkit loads model files besides the weights up "
            f"to {MAX_MODEL_FILE_BYTES:,} bytes"
        )


def user_file(path: Path) -> ModelFile:
    """A file the user named directly: links are followed wherever they go (the user chose
    the path), but it must be a regular file."""
    return _checked(path, _realpath(path))


def open_checked(file: ModelFile) -> int:
    """A read-only descriptor of `file`, refused if the file was replaced or truncated
    since it was checked (compared by device, inode and size)."""
    try:
        fd = os.open(file.real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(f"{file}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (file.dev, file.ino):
            raise InputError(f"{file}: replaced by another file since moxkit checked it")
        check_size(file, st.st_size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_size(file: ModelFile, size: int) -> None:
    """MoxError unless `size` (an fstat taken now) is the size the file had when checked."""
    if size != file.size:
        raise InputError(
            f"{file}: changed on disk while moxkit was using it ({size} bytes, "
            f"{file.size} when it was checked)"
        )


def _checked(path: Path, real: str) -> ModelFile:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(f"{shown(path)}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{shown(path)}: not a regular file; moxkit reads only regular files")
    return ModelFile(path, real, st.st_size, st.st_dev, st.st_ino)


def _realpath(path: Path) -> str:
    try:
        return os.path.realpath(path, strict=True)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise InputError(f"{shown(path)}: symlink loop") from None
        raise InputError(f"{shown(path)}: {exc.strerror or exc}") from None


def _inside(real: str, root: Path) -> bool:
    root_text = str(root)
    return real == root_text or real.startswith(root_text.rstrip(os.sep) + os.sep)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _quote(value: object) -> str:
    return ascii(value) if isinstance(value, str) else f"{type(value).__name__} {value!r:.60}"


# ------------------------------------------------------------------------------ JSON


def read_json(
    file: ModelFile, what: str, *, max_bytes: int = MAX_JSON_BYTES, budget: int | None = None
) -> dict:
    """The JSON object in `file`, read within bounds: at most max_bytes, at most
    MAX_JSON_DEPTH levels, duplicate keys refused, strict UTF-8 (no BOM, no UTF-16), and
    room for it under the memory `budget`. `what` names the file in errors ("index")."""
    if file.size > max_bytes:
        raise InputError(
            f"{file}: {what} is {file.size:,} bytes; moxkit reads JSON files up to "
            f"{max_bytes:,} bytes"
        )
    check_headroom(budget, file.size * JSON_PARSE_FACTOR, f"{file}: reading the {what}")
    fd = open_checked(file)
    try:
        raw = read_exactly(fd, 0, file.size, file)
    finally:
        os.close(fd)
    return parse_json(raw, f"{file}: {what}")


def parse_json(raw: bytes, where: str) -> dict:
    """A JSON object from bytes, with read_json's bounds (but no size cap)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{where} is not UTF-8 text") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise InputError(f"{where} is nested too deeply") from None
    except _DuplicateKey as exc:
        raise InputError(f"{where} names {exc.args[0]} twice") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise InputError(f"{where} is not usable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{where} is not a JSON object")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise InputError(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep")
    return data


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(ascii(key))
            seen.add(key)
    return obj


def json_depth(value: object) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest if isinstance(value, (dict, list)) else 0


def read_exactly(fd: int, offset: int, nbytes: int, file: ModelFile) -> bytes:
    """`nbytes` from `offset`, or MoxError if the file ends first (truncated meanwhile)."""
    parts = []
    done = 0
    while done < nbytes:
        try:
            chunk = os.pread(fd, min(nbytes - done, 1 << 26), offset + done)
        except OSError as exc:
            raise InputError(f"{file}: cannot read: {exc.strerror or exc}") from None
        if not chunk:
            raise InputError(f"{file}: ends at byte {offset + done}; truncated while being read?")
        parts.append(chunk)
        done += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


# ------------------------------------------------------------------------------ hub ids


def resolve_model(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local path of a model: `name_or_path` itself when it exists, else a hub id
    `org/name[@revision]` found in the Hugging Face cache (HF_HUB_CACHE, HF_HOME) or, when
    online, downloaded (only the files a model needs: safetensors weights, index, config,
    tokenizer, generation config, chat template; never .bin or .pth pickles). `revision`
    (a branch, tag or commit) applies to hub ids that do not carry their own."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if os.path.lexists(path):
        if revision is not None and _HUB_ID.fullmatch(text) is None:
            log.debug("revision %s ignored for the local path %s", revision, text)
        return path
    match = _HUB_ID.fullmatch(text)
    if match is None or ".." in match[1] + "/" + match[2]:
        raise InputError(f"{shown(text)}: no such file or directory")
    repo_id = f"{match[1]}/{match[2]}"
    revision = match[3] if match[3] is not None else revision
    if revision is not None:
        check_revision(revision, repo_id)
    return _hub_snapshot(repo_id, revision)


def check_revision(revision: object, where: str) -> str:
    """`revision` if it is a commit hash or a ref name (a branch, a tag, refs/pr/N): at
    most MAX_REVISION_CHARS, '/'-separated parts of ASCII letters, digits and `_ . + -`,
    each starting with a letter, digit or '_', none ending in '.' or '.lock', no '..'.
    Anything else (a path, '..', an empty part, a control character) is MoxError: the
    revision names a file under refs/, and must never name one elsewhere."""
    ok = (
        isinstance(revision, str)
        and 0 < len(revision) <= MAX_REVISION_CHARS
        and all(
            _REF_PART.fullmatch(part) and ".." not in part and not part.endswith((".", ".lock"))
            for part in revision.split("/")
        )
    )
    if not ok:
        given = (
            revision[:80] + "..." if isinstance(revision, str) and len(revision) > 80 else revision
        )
        raise InputError(
            f"{where}: revision {_quote(given)} is not a commit hash or a ref name (a branch "
            "or tag: letters, digits and _ . + - in '/'-separated parts, no '..')"
        )
    return revision


def _cache_dir() -> str:
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return explicit
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    cache = _cache_dir()
    label = f"{repo_id}" + (f"@{revision}" if revision else "")
    cached = _cached_snapshot(_CacheRepo(cache, repo_id, label), revision or "main")
    if cached is not None and _has_weights(cached):
        return cached
    if _offline():
        state = "only partly downloaded" if cached is not None else "not in the cache"
        raise InputError(
            f"{label}: no such local path, and the Hugging Face hub model is {state} "
            f"({cache}) while HF_HUB_OFFLINE=1 forbids downloading"
        )
    return _download(repo_id, revision, cache, label)


@dataclass(frozen=True)
class _CacheRepo:
    """A model's folder in the hub cache, models--ORG--NAME, and how errors name it."""

    cache: str
    repo_id: str
    label: str

    @property
    def path(self) -> Path:
        return Path(self.cache) / ("models--" + self.repo_id.replace("/", "--"))

    def real(self) -> str | None:
        """The folder with links resolved (the cache itself may live behind a link), or
        None when the cache does not hold this model."""
        if not os.path.lexists(self.path):
            return None
        real = _realpath(self.path)
        if not os.path.isdir(real):
            raise InputError(f"{self.label}: {shown(self.path)} is not a folder")
        return real

    def own(self, path: Path, root: str) -> None:
        """MoxError unless `path` is where it claims to be in the repository: no link on
        the way (a refs/ or snapshots/ linking elsewhere, a snapshot linking to a folder
        outside the cache)."""
        real = _realpath(path)
        expected = os.path.join(root, os.path.relpath(path, self.path))
        if real != expected:
            raise InputError(
                f"{self.label}: {shown(path)} leads to {shown(real)} through a link; moxkit "
                f"reads the hub cache only as huggingface_hub lays it out in {shown(self.path)}"
            )


def _cached_snapshot(repo: _CacheRepo, revision: str) -> Path | None:
    """The snapshot folder of `revision` (a checked revision) in the local cache, or None
    when the cache does not hold it; MoxError when what it holds breaks the rules."""
    root = repo.real()
    if root is None:
        return None
    commit = revision if _COMMIT.fullmatch(revision) else _read_ref(repo, root, revision)
    if commit is None:
        return None
    snapshot = repo.path / "snapshots" / commit
    if not os.path.lexists(snapshot):
        return None
    repo.own(snapshot, root)
    if not os.path.isdir(snapshot):
        raise InputError(f"{repo.label}: {shown(snapshot)} is not a folder")
    return snapshot


def _read_ref(repo: _CacheRepo, root: str, revision: str) -> str | None:
    """The commit hash refs/`revision` holds, or None when there is no such ref. Opened
    without following links and without blocking (a FIFO), fstat'ed before reading (a
    device, a huge file), decoded strictly: whatever it holds, one line."""
    ref = repo.path / "refs" / revision
    if not os.path.lexists(ref):
        return None
    repo.own(ref.parent, root)
    where = f"{repo.label}: {shown(ref)}"
    try:
        fd = os.open(ref, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{where} is a link; a ref is a file holding a commit hash") from None
        raise InputError(f"{where}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{where}: not a regular file; a ref is a file holding a commit hash")
        if st.st_size > MAX_REF_BYTES:
            raise InputError(f"{where} is {st.st_size:,} bytes; a ref holds a 40-digit commit hash")
        raw = os.read(fd, MAX_REF_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{where}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InputError(f"{where} is not ASCII text; a ref holds a commit hash") from None
    if len(raw) > MAX_REF_BYTES or not _COMMIT.fullmatch(text):
        raise InputError(f"{where} holds {ascii(text[:60])}, not a commit hash (40 hex digits)")
    return text


def _check_before_hub(repo: _CacheRepo, revision: str) -> None:
    """What huggingface_hub reads in the repository by itself when it downloads, checked
    first by moxkit's rules: the ref it updates, the snapshot folders it writes links into
    (real folders, no links elsewhere) and its tree listings trees/*.json (regular files of
    the repository, bounded JSON)."""
    root = repo.real()
    if root is None:
        return
    if not _COMMIT.fullmatch(revision):
        _read_ref(repo, root, revision)
    for sub in ("snapshots", "trees", "blobs"):
        if os.path.lexists(repo.path / sub):
            repo.own(repo.path / sub, root)
    if os.path.lexists(repo.path / "snapshots"):
        for name in os.listdir(repo.path / "snapshots"):
            repo.own(repo.path / "snapshots" / name, root)
    if os.path.lexists(repo.path / "trees"):
        for name in sorted(os.listdir(repo.path / "trees")):
            try:
                read_json(member(repo.path / "trees", name, Path(root)), "tree listing")
            except MoxError as exc:
                raise type(exc)(f"{repo.label}: {exc}", params=exc.params) from None


def _download(repo_id: str, revision: str | None, cache: str, label: str) -> Path:
    """Fetch the model's small files first, then exactly the weights its index names."""
    import huggingface_hub

    repo = _CacheRepo(cache, repo_id, label)
    patterns = [*MODEL_FILE_PATTERNS, "*.safetensors.index.json"]
    snapshot = _fetch(huggingface_hub, repo, revision, patterns)
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(member(snapshot, index.name), "index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{label}: model.safetensors.index.json has no 'weight_map' object")
        where = f"{label}: model.safetensors.index.json"
        weights = sorted({check_file_name(shard, where) for shard in weight_map.values()})
    else:
        weights = ["model.safetensors", "adapter_model.safetensors"]
    _fetch(huggingface_hub, repo, revision, weights)
    if not _has_weights(snapshot):
        raise InputError(
            f"{label}: no safetensors weights on the hub (moxkit never downloads .bin or "
            ".pth pickles; convert the model with save_pretrained(safe_serialization=True))"
        )
    return snapshot


def _fetch(hub, repo: _CacheRepo, revision: str | None, patterns) -> Path:
    """Let huggingface_hub download into the cache (after checking what it will read
    there), then find the snapshot again by moxkit's own rules, not by the path it returns."""
    from huggingface_hub import errors as hub_errors

    label = repo.label
    _check_before_hub(repo, revision or "main")
    try:
        hub.snapshot_download(
            repo.repo_id, revision=revision, cache_dir=repo.cache, allow_patterns=list(patterns)
        )
    except hub_errors.RepositoryNotFoundError:
        raise InputError(f"{label}: no such model on the Hugging Face hub (or private)") from None
    except hub_errors.RevisionNotFoundError:
        raise InputError(f"{label}: no such revision on the Hugging Face hub") from None
    except hub_errors.GatedRepoError:
        raise InputError(f"{label}: gated model; log in with `hf auth login` first") from None
    except (hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{label}: download failed: {first}") from None
    snapshot = _cached_snapshot(repo, revision or "main")
    if snapshot is None:
        raise InputError(f"{label}: downloaded, but the cache holds no snapshot for it")
    return snapshot


def _has_weights(snapshot: Path) -> bool:
    """Whether a cached snapshot holds weights, all the shards its index names included."""
    index = snapshot / "model.safetensors.index.json"
    if os.path.lexists(index):
        try:
            weight_map = read_json(member(snapshot, index.name), "index").get("weight_map")
            if not isinstance(weight_map, dict):
                return True
            shards = {check_file_name(s, "index") for s in weight_map.values()}
        except MoxError:
            return True  # broken: let the checkpoint reader say so, naming the file
        return all(os.path.exists(snapshot / s) for s in shards)
    return any(name.endswith(".safetensors") for name in os.listdir(snapshot))
