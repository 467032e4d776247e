"""One train-mem / unlearn call as a value, checked before anything heavy is imported.

Every check that needs no model (settings, which settings the method reads, data files, the
output path, model folders, what `extrapolate_on="disk"` will need later) runs here, in well
under a second, so a typo never costs a torch import or, worse, a training run. No torch here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moxkit.errors import InputError, MismatchError, OutputError
from moxkit.text import Row, load_answers, load_rows

from .config import ExtrapolationConfig, LossConfig, MatchConfig, TrainConfig, parse_target
from .methods import Method

Rows = Sequence[dict]  # rows given directly, as a JSONL file would hold them
Data = str | os.PathLike | Rows
ModelArg = Any  # a model folder, or a transformers PreTrainedModel (then pass tokenizer=)


@dataclass
class Request:
    method: Method
    model: ModelArg
    forget: Data
    retain: Data | None
    out: str | os.PathLike | None
    config: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    extrapolation: ExtrapolationConfig = field(default_factory=ExtrapolationConfig)
    target_answer: str | Sequence[str] | None = None
    init_from: ModelArg | None = None
    save_mem: str | os.PathLike | None = None
    force: bool = False
    revision: str | None = None  # for hub ids (MODEL, init_from) without their own @revision
    target_file: str | os.PathLike | None = None  # replacement answers, one row per forget row
    match: MatchConfig = field(default_factory=MatchConfig)

    def __post_init__(self) -> None:
        self.extrapolation = self.method.extrapolation(self.extrapolation)

    @property
    def targeted(self) -> bool:
        return self.target_answer is not None or self.target_file is not None

    def check(self) -> Checked:
        """Everything that can be known wrong before loading a model; returns the rows."""
        self.config.validate()
        self.loss.validate()
        self.extrapolation.validate()
        self.method.check(self.loss, self.extrapolation, targeted=self.targeted)
        if self.config.merge and not self.config.lora:
            raise InputError("merge: only with lora", params=("merge", "lora"))
        from moxkit.atomic import tree_inputs
        from moxkit.hf import check_model_dir

        inputs: list[Path] = []
        found: dict[str, Any] = {}
        for value, name in ((self.model, "model"), (self.init_from, "init_from")):
            found[name] = value
            if isinstance(value, (str, os.PathLike)):
                found[name] = check_model_dir(value, name, name == "model",
                                              self.revision)  # fmt: skip
                inputs += tree_inputs(found[name])  # its files may link elsewhere
        if self.retain is None and self.method.needs_retain(self.loss):
            raise InputError(f"retain: needed by {self._retain_user()}",
                             params=("retain", "kl_weight"))  # fmt: skip
        forget_rows = load_rows(self.forget, "forget")
        retain_rows = None
        if self.retain is not None:
            retain_rows = load_rows(self.retain, "retain")
        for data in (self.forget, self.retain, self.target_file):
            if isinstance(data, (str, os.PathLike)):
                inputs.append(Path(data))
        targets = self._target_rows(forget_rows)
        match = self._match(inputs)
        self._check_outputs(inputs)
        if self.method.extrapolates and self.extrapolation.extrapolate_on == "disk":
            self._check_disk_extrapolation(found["model"])
        return Checked(found["model"], found["init_from"], forget_rows, retain_rows, targets,
                       *match)  # fmt: skip

    def _match(self, inputs: list[Path]) -> tuple:
        """(match rows, target kind, target value: a level, a checked model folder or rows)
        for matched forgetting; (None, None, None) without it. What a match cannot do yet is
        refused here, before any training."""
        self.match.validate()
        if not self.match.active:
            return None, None, None
        name = "match_rows"
        if self.method.name == "memorize":
            raise InputError(
                f"{name}: for unlearn (train-mem makes no forget model)", params=(name,)
            )
        why, params = None, ()
        if self.method.extrapolates and self.extrapolation.eta is not None:
            why, params = "with eta (momentum)", ("eta",)
        elif self.targeted:
            why = "with replacement answers (targeted MOX)"
        elif self.config.lora:
            why, params = "with lora", ("lora",)
        elif self.method.extrapolates and self.extrapolation.extrapolate_on == "disk":
            why, params = "with extrapolate_on='disk'", ("extrapolate_on",)
        if why is not None:
            raise InputError(f"{name}: matched forgetting does not work {why} yet",
                             params=(name, *params))  # fmt: skip
        rows = load_rows(self.match.match_rows, name)
        if isinstance(self.match.match_rows, (str, os.PathLike)):
            inputs.append(Path(self.match.match_rows))
        kind, value = parse_target(self.match.match_target)
        target_name = "match_target"
        if kind == "model":
            from moxkit.atomic import tree_inputs
            from moxkit.hf import check_model_dir

            value = check_model_dir(value, target_name, True, self.revision)
            inputs += tree_inputs(value)
        elif kind == "unknown":
            inputs.append(Path(value))
            value = load_rows(value, target_name)
        return rows, kind, value

    def _retain_user(self) -> str:
        if self.method.retain_loss == "kl":
            return f"the KL term of {self.method.title} (or set kl_weight to 0)"
        return f"{self.method.title} (its retain NLL term)"

    def _target_rows(self, forget_rows: list[Row]) -> list[Row] | None:
        """Replacement answers: one for all forget rows, or one per row, in order (given,
        or read from target_file)."""
        if not self.targeted:
            return None
        if self.target_answer is not None and self.target_file is not None:
            raise InputError(
                "target_answer and target_file: give one, not both",
                params=("target_answer", "target_file"),
            )
        given, name = self.target_answer, "target_answer"
        if self.target_file is not None:
            name = "target_file"
            given = load_answers(self.target_file, name)
        answers = [given] * len(forget_rows) if isinstance(given, str) else list(given)
        if len(answers) != len(forget_rows):
            raise MismatchError(f"{name}: {len(answers)} replacement answers for "
                                f"{len(forget_rows)} forget rows", params=(name,))  # fmt: skip
        if not all(isinstance(a, str) and a.strip() for a in answers):
            raise InputError(f"{name}: replacement answers must be non-empty text", params=(name,))
        rows = [
            {"prompt": r.prompt, "completion": a} for r, a in zip(forget_rows, answers, strict=True)
        ]
        return [
            Row(r.prompt, new.completion, f"{r.where} (target)")
            for r, new in zip(forget_rows, load_rows(rows, "target_answer"), strict=True)
        ]

    def _check_outputs(self, inputs: list[Path]) -> None:
        from moxkit.atomic import check_output

        outs = [p for p in (self.out, self.save_mem) if p is not None]
        for out in outs:
            check_output(out, force=self.force, inputs=inputs)
        if len(outs) == 2:
            out, mem = (Path(os.path.abspath(p)) for p in outs)
            if out == mem or out in mem.parents or mem in out.parents:
                raise OutputError(f"save_mem {outs[1]}: the same path as the output, inside it or "
                                  "holding it", params=("save_mem",))  # fmt: skip

    def _check_disk_extrapolation(self, model: ModelArg) -> None:
        """What extrapolating on disk will need after training: MODEL as a folder of
        safetensors that the streaming engine can open, and an output to write."""
        if not isinstance(model, Path) or self.out is None:
            raise InputError(
                "extrapolate_on='disk': needs the model as a folder and an output",
                params=("extrapolate_on",),
            )
        from moxkit.engine.checkpoint import open_checkpoint

        open_checkpoint(model)


@dataclass
class Checked:
    """What check() found: the models (local folders, hub ids resolved; in-memory models
    as given) and the rows."""

    model: ModelArg
    init_from: ModelArg | None
    forget: list[Row]
    retain: list[Row] | None
    targets: list[Row] | None
    match_rows: list[Row] | None = None
    target_kind: str | None = None  # "level", "model" or "unknown"
    target: Any = None  # the level, the target model's folder, or rows MODEL does not know
