"""Reading an evaluation directory in any of the three layouts moxkit knows, as it lies on disk.

- TOFU's released files (locuslab/TOFU), one object per line in `.json` (or `.jsonl` /
  `.parquet`): forget01/05/10_perturbed, retain_perturbed, real_authors_perturbed,
  world_facts_perturbed, with TOFU's fields question, answer, paraphrased_answer,
  perturbed_answer (a list), paraphrased_question. TOFU's own evaluation reads exactly these
  (the plain forget10 / retain90 files are training data and are not read here).
- MUSE's released layout (swj0419/muse_bench `data/<corpus>/`): knowmem/{forget_qa,
  retain_qa, forget_qa_icl, retain_qa_icl}.json ([{question, answer}]), verbmem/forget.json
  ([{prompt, gt}]), privleak/{forget, retain, holdout}.json (lists of texts). raw/*.txt is
  training text and is not read.
- Either benchmark as Hugging Face serves it: each file above may also be Parquet, or the
  hub's parquet shards (`forget_qa-00000-of-00001.parquet`, `forget10_perturbed/*.parquet`).
- moxkit's own (what `moxkit data tofu-mini` writes): forget.jsonl (required), retain.jsonl,
  general.jsonl / real_authors.jsonl / world_facts.jsonl with TOFU's QA fields;
  forget_text.jsonl and holdout_text.jsonl with {text} rows for VerbMem and PrivLeak;
  optionally knowmem_icl.jsonl ({question, answer}) for MUSE-style few-shot KnowMem.

Every set but the forget QA set is cut to its first `max_items` rows (TOFU's ds_size = 300).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import hf
from ..atomic import check_output, tree_inputs
from ..errors import InputError, MoxError, naming
from ..fields import check
from ..records import read_records
from ..sources import shown

TOFU_FORGET_SPLITS = ("forget01", "forget05", "forget10")
SECONDARY_SETS = ("real_authors", "world_facts", "general")  # scored against the answer
ROW_SUFFIXES = (".json", ".jsonl", ".parquet")
MUSE_KNOWMEM = ("forget", "retain")
MUSE_PRIVLEAK = ("forget", "holdout")


@dataclass
class QASet:
    """A TOFU-style QA set: answer probability, truth ratio, ROUGE-L of the greedy answer.
    `base_key` is the field on the true side of the truth ratio: TOFU compares the paraphrased
    answer with the perturbed ones on forget and retain sets, the answer itself on real authors
    and world facts (which have no paraphrase)."""

    rows: list[dict]
    kind: str  # forget | retain | secondary
    base_key: str
    source: str


@dataclass
class KnowMemSet:
    """MUSE's KnowMem: greedy answers to questions, few-shot when `icl` rows are given."""

    rows: list[dict]
    icl: list[dict] | None
    source: str
    qa_set: str | None = None  # zero-shot on a QA set's questions: reuse that set's answers


@dataclass
class EvalData:
    directory: str
    layout: str  # tofu | muse | moxkit
    qa: dict[str, QASet] = field(default_factory=dict)
    knowmem: dict[str, KnowMemSet] = field(default_factory=dict)
    verbmem: list[dict] | None = None  # {prompt, gt} rows, or {text} rows split by tokens
    verbmem_source: str = ""
    texts: dict[str, list[str]] = field(default_factory=dict)  # membership: forget, holdout
    files: list[str] = field(default_factory=list)  # what was read, for the report
    paths: list[Path] = field(default_factory=list)  # what was read, for output checks

    def used(self, path: Path, rows: int, total: int) -> str:
        note = f"{path} ({rows} rows" + (f" of {total})" if rows < total else ")")
        self.files.append(note)
        self.paths += sorted(path.parent.glob(path.name)) if "*" in path.name else [path]
        return note

    def inputs(self) -> list[Path]:
        """The evaluation folder and every file read from it (a file may link elsewhere)."""
        return [Path(self.directory), *self.paths]


def read_rows(path: Path, name: str) -> list[object]:
    """The records of a row file (moxkit.records: JSON Lines, TOFU's JSON-Lines `.json`, a JSON
    list, Parquet, `*` shards)."""
    return [rec for _, rec in read_records(path, name)]


def _checked(path: Path, records: list[object], fields: tuple[str, ...]) -> list[dict]:
    """Records that are objects with `fields`; perturbed_answer normalised to a list."""
    rows = []
    for i, row in enumerate(records, 1):
        if not isinstance(row, dict):
            raise InputError(f"{path}: row {i}: expected a JSON object")
        missing = [f for f in fields if f not in row]
        if missing:
            raise InputError(f"{path}: row {i}: missing field(s) {', '.join(missing)}")
        bad = [f for f in fields if f != "perturbed_answer" and not isinstance(row[f], str)]
        if bad:
            raise InputError(f"{path}: row {i}: {', '.join(bad)} must be text")
        if "perturbed_answer" in fields:
            pert = row["perturbed_answer"]
            if isinstance(pert, str):
                pert = [pert]
            if not (isinstance(pert, list) and pert and all(isinstance(p, str) for p in pert)):
                raise InputError(
                    f"{path}: row {i}: perturbed_answer must be a string or a "
                    "non-empty list of them"
                )
            row = {**row, "perturbed_answer": pert}
        rows.append(row)
    if not rows:
        raise InputError(f"{path} has no rows")
    return rows


def _texts(path: Path, records: list[object]) -> list[str]:
    """MUSE's privleak files are lists of strings; {text} objects are taken too."""
    out = []
    for i, rec in enumerate(records, 1):
        text = rec.get("text") if isinstance(rec, dict) else rec
        if not isinstance(text, str):
            raise InputError(f'{path}: row {i}: expected a text or a {{"text": ...}} object')
        out.append(text)
    if not out:
        raise InputError(f"{path} has no rows")
    return out


def _find(d: Path, stem: str) -> Path | None:
    """The rows called `stem` in `d`: `stem` with a row-file suffix, else Hugging Face's parquet
    shards of it (`stem-00000-of-00001.parquet`, or `stem/*.parquet` as the hub's parquet
    conversion writes them), as a pattern read_rows expands."""
    for suffix in ROW_SUFFIXES:
        if (d / f"{stem}{suffix}").is_file():
            return d / f"{stem}{suffix}"
    for pattern in (d / f"{stem}-*.parquet", d / stem / "*.parquet"):
        if any(p.is_file() for p in pattern.parent.glob(pattern.name)):
            return pattern
    return None


def detect_layout(d: Path) -> str:
    """tofu, muse or moxkit, from the files present; a clear error when none fits."""
    if not d.is_dir():
        raise InputError(f"data_dir {d}: not a directory", params=("data_dir",))
    if _find(d, "forget"):
        return "moxkit"
    if any(_find(d, f"{s}_perturbed") for s in TOFU_FORGET_SPLITS):
        return "tofu"
    if (d / "knowmem").is_dir() or (d / "verbmem").is_dir() or (d / "privleak").is_dir():
        return "muse"
    raise InputError(
        f"data_dir {d}: no evaluation set found (expected forget.jsonl, TOFU's "
        "forget*_perturbed.json, or MUSE's knowmem/verbmem/privleak folders)"
    )


QA_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
SECONDARY_FIELDS = ("question", "answer", "perturbed_answer")


def _load_tofu(d: Path, data: EvalData, split: str | None, max_items: int | None) -> None:
    present = [s for s in TOFU_FORGET_SPLITS if _find(d, f"{s}_perturbed")]
    if split is None:
        if len(present) > 1:
            raise InputError(
                f"data_dir {d}: TOFU's {', '.join(present)} are all here; choose the "
                "forget set with split",
                params=("data_dir", "split"),
            )
        split = present[0]
    if split not in present:
        raise InputError(
            f"split {split}: {d} has no {split}_perturbed file (has: {', '.join(present)})",
            params=("split",),
        )
    path = _find(d, f"{split}_perturbed")
    rows = _checked(path, read_rows(path, "data_dir"), QA_FIELDS)
    data.qa["forget"] = QASet(
        rows, "forget", "paraphrased_answer", data.used(path, len(rows), len(rows))
    )
    for name, stem, fields, kind, base in (
        ("retain", "retain_perturbed", QA_FIELDS, "retain", "paraphrased_answer"),
        ("real_authors", "real_authors_perturbed", SECONDARY_FIELDS, "secondary", "answer"),
        ("world_facts", "world_facts_perturbed", SECONDARY_FIELDS, "secondary", "answer"),
    ):
        path = _find(d, stem)
        if path is not None:
            every = _checked(path, read_rows(path, "data_dir"), fields)
            kept = every[:max_items]
            data.qa[name] = QASet(kept, kind, base, data.used(path, len(kept), len(every)))


def _load_muse(d: Path, data: EvalData, max_items: int | None) -> None:
    for name in MUSE_KNOWMEM:
        qa, icl = _find(d / "knowmem", f"{name}_qa"), _find(d / "knowmem", f"{name}_qa_icl")
        if qa is not None:
            every = _checked(qa, read_rows(qa, "data_dir"), ("question", "answer"))
            kept = every[:max_items]
            source = data.used(qa, len(kept), len(every))
            shots = None
            if icl is not None:
                shots = _checked(icl, read_rows(icl, "data_dir"), ("question", "answer"))
                data.used(icl, len(shots), len(shots))
            data.knowmem[name] = KnowMemSet(kept, shots, source)
    verb = _find(d / "verbmem", "forget")
    if verb is not None:
        every = _checked(verb, read_rows(verb, "data_dir"), ("prompt", "gt"))
        data.verbmem = every[:max_items]
        data.verbmem_source = data.used(verb, len(data.verbmem), len(every))
    for name in MUSE_PRIVLEAK:
        path = _find(d / "privleak", name)
        if path is not None:
            every = _texts(path, read_rows(path, "data_dir"))
            data.texts[name] = every[:max_items]
            data.used(path, len(data.texts[name]), len(every))
    if not (data.knowmem or data.verbmem or data.texts):
        raise InputError(
            f"data_dir {d}: MUSE layout without knowmem/*_qa.json, verbmem/forget.json "
            "or privleak/*.json"
        )


def _load_moxkit(d: Path, data: EvalData, max_items: int | None) -> None:
    path = _find(d, "forget")
    rows = _checked(path, read_rows(path, "data_dir"), QA_FIELDS)
    data.qa["forget"] = QASet(
        rows, "forget", "paraphrased_answer", data.used(path, len(rows), len(rows))
    )
    for name in ("retain", *SECONDARY_SETS):
        path = _find(d, name)
        if path is not None:
            secondary = name != "retain"
            every = _checked(
                path, read_rows(path, "data_dir"), SECONDARY_FIELDS if secondary else QA_FIELDS
            )
            kept = every[:max_items]
            data.qa[name] = QASet(
                kept,
                "secondary" if secondary else "retain",
                "answer" if secondary else "paraphrased_answer",
                data.used(path, len(kept), len(every)),
            )
    icl_path = _find(d, "knowmem_icl")
    icl = None
    if icl_path is not None:
        icl = _checked(icl_path, read_rows(icl_path, "data_dir"), ("question", "answer"))
        data.used(icl_path, len(icl), len(icl))
    for name in ("forget", "retain"):
        if name in data.qa:
            qa = data.qa[name]
            data.knowmem[name] = KnowMemSet(qa.rows, icl, qa.source, qa_set=None if icl else name)
    for name in ("forget", "holdout"):
        path = _find(d, f"{name}_text")
        if path is not None:
            every = _texts(path, read_rows(path, "data_dir"))
            data.texts[name] = every[:max_items]
            data.used(path, len(data.texts[name]), len(every))
    if "forget" in data.texts:
        data.verbmem = [{"text": t} for t in data.texts["forget"]]
        data.verbmem_source = f"{_find(d, 'forget_text')} (each text split by tokens)"


def load_eval_data(
    data_dir: str | Path, *, split: str | None = None, max_items: int | None = None
) -> EvalData:
    """The evaluation sets of `data_dir`, whichever layout it is in (see the module docstring);
    `split` picks TOFU's forget set when several are present."""
    d = Path(data_dir)
    layout = detect_layout(d)
    data = EvalData(str(d), layout)
    if split is not None and layout != "tofu":
        raise InputError(
            f"split {split}: only TOFU's released layout has several forget sets "
            f"({d} is in the {layout} layout)"
        )
    if layout == "tofu":
        _load_tofu(d, data, split, max_items)
    elif layout == "muse":
        _load_muse(d, data, max_items)
    else:
        _load_moxkit(d, data, max_items)
    return data


def resolve_model(name_or_path: str | Path, revision: str | None, name: str) -> Path:
    """A model folder or hub id as a local folder (moxkit.sources), errors naming the input."""
    from ..sources import resolve_model as resolve

    try:
        return resolve(name_or_path, revision)
    except MoxError as exc:
        raise type(exc)(f"{name} {exc}", params=(name, *exc.params)) from None


def resolve_retain(retain_model: str | Path, revision: str | None = None) -> Path:
    """retain_model as a local path: a saved report or model folder as given, else a hub id
    resolved through moxkit.sources (a missing .json stays a missing file)."""
    path = Path(retain_model)
    if path.exists() or path.suffix.lower() == ".json":
        return path
    return resolve_model(retain_model, revision, "retain_model")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def retain_summary(report: object, where: str) -> dict:
    """What a retain-only model's `moxkit eval` report (parsed) offers for comparison,
    checked: its summary (numbers only), its forget-set truth ratios (finite, positive;
    None without a forget set) and membership AUC (in [0, 1]; None without one). A report
    is a file from elsewhere: a string where a number belongs must not reach the KS test."""
    bad = f"{where}: not a `moxkit eval` report"
    if not isinstance(report, dict):
        raise InputError(bad)
    summary, sets = report.get("summary"), report.get("sets")
    if not isinstance(summary, dict) or not isinstance(sets, dict):
        raise InputError(f"{bad} (no summary and sets objects)")
    for key, value in summary.items():
        if not _number(value):
            raise InputError(f"{where}: summary {key!r} is {type(value).__name__}, not a number")
    auc = summary.get("mia_auc")
    if auc is not None and not 0 <= auc <= 1:
        raise InputError(f"{where}: summary 'mia_auc' is {auc!r}, not an AUC in [0, 1]")
    forget = sets.get("forget")
    ratios = None
    if forget is not None:
        items = forget.get("items") if isinstance(forget, dict) else None
        if not isinstance(items, list):
            raise InputError(f"{bad} (sets.forget has no list of items)")
        ratios = []
        for i, item in enumerate(items, 1):
            ratio = item.get("truth_ratio") if isinstance(item, dict) else None
            if not (_number(ratio) and math.isfinite(ratio) and ratio > 0):
                raise InputError(f"{where}: sets.forget item {i}: truth_ratio {ratio!r:.40} is "
                               "not a finite positive number")  # fmt: skip
            ratios.append(float(ratio))
    return {"truth_ratios": ratios, "mia_auc": auc, "summary": summary}


def read_retain_report(path: str | os.PathLike) -> dict:
    """A saved `moxkit eval` report, read within moxkit's JSON bounds (size, nesting, a
    regular file) and checked by retain_summary."""
    from ..sources import read_json, user_file

    where = f"retain_model {shown(path)}"
    try:
        report = read_json(user_file(Path(path)), "report")
    except MoxError as exc:
        raise type(exc)(f"retain_model {exc}", params=("retain_model",)) from None
    try:
        return retain_summary(report, where)
    except MoxError as exc:
        raise naming(exc, "retain_model") from None


def check_retain_source(retain: str | Path) -> dict | None:
    """The checked comparison values of a saved `moxkit eval` report (see retain_summary),
    or None for a model folder (checked, not loaded); otherwise one clear line."""
    path = Path(retain)
    if path.is_dir():
        hf.check_model_dir(path, "retain_model")
        return None
    if os.path.lexists(path):
        return read_retain_report(path)
    raise InputError(
        f"retain_model {shown(path)}: no such file or directory", params=("retain_model",)
    )


def preflight(
    model: str | Path,
    data_dir: str | Path,
    retain_model: str | Path | None,
    cfg,
    revision: str | None = None,
    model_name: str = "model",
    out: str | Path | None = None,
    force: bool = False,
) -> tuple[EvalData, Path, Path | None]:
    """Every check that needs no model, before anything heavy is imported or loaded: the
    settings, the evaluation sets, then MODEL and retain_model (hub ids resolved through
    moxkit.sources, so a download happens only once the cheap checks passed), and the
    report file `out` against everything read (see moxkit.atomic.check_output). Returns the
    sets and the two local paths."""
    check(cfg)
    data = load_eval_data(data_dir, split=cfg.split, max_items=cfg.max_items)
    model_dir = hf.check_model_dir(resolve_model(model, revision, model_name), model_name)
    retain = None
    if retain_model is not None:
        retain = resolve_retain(retain_model, revision)
        check_retain_source(retain)
    if out is not None:
        check_output(out, force=force, inputs=inputs_of(data, model_dir, retain), folder=False)
    return data, model_dir, retain


def inputs_of(data: EvalData, *models: Path | None) -> list[Path]:
    """Every path an evaluation reads: the sets' folder and files, each model folder (or
    report file) with its entries."""
    return [*data.inputs(), *tree_inputs(*models)]
