"""One pipeline, written once: reference → retain-only → unlearn → choose → evaluate, on
tofu-mini.

A base Llama (or a packaged pretrained model) is pretrained on general text, fine-tuned on every
author (θ_ref, the model to unlearn) and on the retain authors only (the retain-only model,
forgetting's gold standard); each method of METHODS unlearns the forget authors over its
strength (α, from one training, for the methods that extrapolate; learning rate × epoch for the
methods that train the forget model itself); the pre-registered rule (moxkit.apps.study) picks
each method's operating point on the validation authors, one point at a time (`Sweep`); the
caller evaluates the chosen models on the test authors. `moxkit demo` (moxkit.apps.demo) and
the research study (moxkit.apps.unlearning_mini) are configurations of it: a Recipe, the seeds,
where the models go and how a point is measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import InputError
from .study import Choice, on_epoch_end

# what each stage trains, as logs name it, and its rows (a path under the data folder; the
# retain-only rows are the split's)
WHAT = {
    "pretrained": "the base model on general text",
    "reference": "the reference model on all authors",
    "retain-only": "the retain-only model",
}


@dataclass(frozen=True)
class Recipe:
    """Sizes, schedules and sweeps of one pipeline. `warmup_epochs` None: a quarter of each
    run, at most one epoch. `base` names a packaged pretrained model (moxkit.apps.real_model)
    that replaces the tiny Llama and its pretraining."""

    split: str
    hidden: int
    layers: int
    pretrain_epochs: float
    pretrain_lr: float
    finetune_epochs: float
    finetune_lr: float
    unlearn_epochs: int
    mox_lr: float
    batch_size: int = 32
    unlearn_batch: int = 32
    warmup_epochs: float | None = 1.0
    progress: bool = False

    @classmethod
    def of(cls, config, **given) -> Recipe:
        """The recipe a configuration holds: its fields of the same names, then `given`."""
        names = [f.name for f in fields(cls) if f.name not in given and hasattr(config, f.name)]
        return cls(**{name: getattr(config, name) for name in names}, **given)


def check_methods(methods: Iterable[str]) -> None:
    """Every method is a row of METHODS that `unlearn` offers."""
    from ..train import UNLEARN_METHODS

    for method in methods:
        if method not in UNLEARN_METHODS:
            raise InputError(f"method {method!r}: expected one of {', '.join(UNLEARN_METHODS)}")


class Pipeline:
    """One pipeline's files and stages. Models go under `models` (a stage's folder is its
    name, unless `names` renames it); a stage already there is reused. `model_seed` builds the
    base model, `train_seed` orders the data of every training that is not given its own."""

    def __init__(
        self,
        recipe: Recipe,
        data: Path,
        models: Path,
        *,
        model_seed: int,
        train_seed: int,
        base: Path | None = None,
        names: dict[str, str] | None = None,
        log: Callable[[str], None] = print,
    ):
        self.recipe, self.data, self.models = recipe, Path(data), Path(models)
        self.model_seed, self.train_seed = model_seed, train_seed
        self.packaged, self.names, self.log = base, names or {}, log
        self.split = self.data / recipe.split
        self.forget = str(self.split / "unlearn_forget.jsonl")
        self.retain = str(self.split / "unlearn_retain.jsonl")
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The tokenizer every model of the pipeline reads (the packaged model's own, or
        tofu-mini's)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.packaged or self.data / "tokenizer"
            )
        return self._tokenizer

    def path(self, stage: str) -> Path:
        return self.models / self.names.get(stage, stage)

    def train_config(
        self, epochs: float, lr: float, seed: int | None = None, batch_size: int | None = None
    ):
        from ..train import TrainConfig

        r = self.recipe
        return TrainConfig(
            epochs=epochs,
            lr=lr,
            batch_size=batch_size or r.batch_size,
            seed=self.train_seed if seed is None else seed,
            warmup_epochs=min(1.0, epochs / 4) if r.warmup_epochs is None else r.warmup_epochs,
            bf16=False,
            progress=r.progress,
        )

    def unlearn_config(self, lr: float, seed: int):
        """An unlearning run's schedule (MOX memorizes at recipe.mox_lr)."""
        r = self.recipe
        return self.train_config(r.unlearn_epochs, lr, seed, r.unlearn_batch)

    def base(self) -> Path:
        """The model every stage starts from: the packaged one, or a tiny Llama built here."""
        if self.packaged is not None:
            return self.packaged
        path = self.path("base")
        if not path.is_dir():
            from .tiny import build_tiny_llama, save_tiny_model

            hidden = self.recipe.hidden
            model = build_tiny_llama(
                len(self.tokenizer),
                hidden_size=hidden,
                num_layers=self.recipe.layers,
                intermediate_size=2 * hidden,
                seed=self.model_seed,
            )
            save_tiny_model(model, self.tokenizer, path)
        return path

    def stage(self, stage: str) -> Path:
        """Train one model of the pipeline unless it is there: "pretrained" (on general text),
        then "reference" (all authors) and "retain-only" (the retain authors) from it."""
        from ..train import finetune

        path = self.path(stage)
        if path.is_dir():
            self.log(f"reusing {WHAT[stage]} ({path})")
            return path
        r = self.recipe
        base = self.base()
        self.log(f"training {WHAT[stage]}")
        if stage == "pretrained":
            config = self.train_config(r.pretrain_epochs, r.pretrain_lr)
            finetune(base, str(self.data / "pretrain.jsonl"), path, config=config)
            return path
        start = self.path("pretrained") if r.pretrain_epochs > 0 else base
        rows = (
            self.data / "full.jsonl"
            if stage == "reference"
            else self.split / "train_retain_only.jsonl"
        )
        config = self.train_config(r.finetune_epochs, r.finetune_lr)
        finetune(start, str(rows), path, config=config)
        return path

    def stages(self) -> list[str]:
        """The stages in training order."""
        return (["pretrained"] if self.recipe.pretrain_epochs > 0 else []) + [
            "reference",
            "retain-only",
        ]


def default_families(point: dict) -> list[str]:
    return [point["method"]]


class Sweep:
    """Every operating point of one unlearning run, measured as it comes, and the rule's
    choice within each family of points (a method; `families` may add more, such as one per
    η). Only the models the rule may still choose are kept rebuildable (`makers`): a sweep over
    a large model must not hold every checkpoint."""

    def __init__(
        self,
        reference_utility: float,
        measure: Callable[[Any], dict],
        families: Callable[[dict], list[str]] = default_families,
    ):
        self.reference_utility, self.measure, self.families = reference_utility, measure, families
        self.points: list[dict] = []
        self.makers: list[Callable[[], Any] | None] = []
        self.choices: dict[str, Choice] = {}
        self.settled: set[str] = set()

    def add(self, point: dict, model, maker: Callable[[], Any]) -> None:
        """One point: its knobs, its model (measured now; "val" is what the rule reads) and
        how to rebuild that model if it is chosen."""
        self.points.append({**point, **self.measure(model)})
        self.makers.append(maker)
        for family in self.families(self.points[-1]):
            self.choices.setdefault(family, Choice(self.reference_utility))
            self.choices[family].offer(len(self.points) - 1, self.points[-1]["val"])
        self._prune()

    def settle(self, take: Callable[[str, int, bool, Callable[[], Any]], None]) -> None:
        """The rule's choice for every family whose sweep has ended: take(family, index,
        qualified, maker) for each, then the models no family can choose are dropped."""
        for family, choice in self.choices.items():
            if family not in self.settled:
                self.settled.add(family)
                i, ok = choice.result()
                take(family, i, ok, self.makers[i])
        self._prune()

    def _prune(self) -> None:
        alive = set().union(
            *(c.candidates for f, c in self.choices.items() if f not in self.settled)
        )
        for j in range(len(self.makers)):
            if j not in alive:
                self.makers[j] = None


def sweep_method(
    pl: Pipeline,
    method: str,
    sweep: Sweep,
    ref_model,
    *,
    seed: int,
    alphas: Sequence[float] = (),
    lrs: Sequence[float] = (),
    eta: float | None = None,
    callbacks: Sequence[Any] = (),
):
    """Unlearn the pipeline's reference with one method over its strength, offering every
    point to `sweep`; the METHODS row says how. A method that extrapolates is trained once at
    recipe.mox_lr and extrapolated at every α (with momentum: trained at α = 1, whose θ_for
    gives the averaged θ_mem, train.momentum.averaged_mem); one that trains with replacement answers
    (targeted MOX) is trained once per α, the α its target term reads; the others are trained
    at each learning rate and measured after every epoch. `callbacks` go to the θ_mem training.
    Returns θ_mem of a plain extrapolating method, else None."""
    from ..eval.evaluate import load_model
    from ..train import METHODS, ExtrapolationConfig, LossConfig, extrapolate_model, train_mem
    from ..train import unlearn as unlearn_with
    from ..train.momentum import averaged_mem
    from .tofu_mini import REFUSAL

    check_methods([method])
    row, ref_dir = METHODS[method], pl.path("reference")
    ul = pl.unlearn_config(pl.recipe.mox_lr, seed)

    def unlearn(**options):
        return unlearn_with(ref_dir, pl.forget, pl.retain, None, method=method, **options).model

    if not row.extrapolates:
        for lr in lrs:

            def keep(model, epoch, lr=lr):
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}

                def checkpoint(state=state):
                    m = load_model(ref_dir, "cpu")[0]
                    m.load_state_dict(state)
                    return m

                sweep.add({"method": method, "lr": lr, "epoch": epoch}, model, checkpoint)

            unlearn(config=pl.unlearn_config(lr, seed), callbacks=[on_epoch_end(keep)])
        return None
    knobs: dict = {"method": method}
    if row.needs_target:
        for alpha in alphas:
            targeted = unlearn(config=ul, extrapolation=ExtrapolationConfig(alpha=alpha),
                               target_answer=REFUSAL)  # fmt: skip
            point = {**knobs, "alpha": alpha, "lr": pl.recipe.mox_lr}
            sweep.add(point, targeted, lambda targeted=targeted: targeted)
        return None
    if row.momentum:
        one = unlearn(config=ul, extrapolation=ExtrapolationConfig(alpha=1.0, eta=eta))
        mem, knobs["eta"] = averaged_mem(ref_model, one), eta
    else:
        kl = row.retain_loss == "kl"
        mem = train_mem(ref_dir, pl.forget, pl.retain if kl else None, None, config=ul,
                        loss=LossConfig(kl_weight=1.0 if kl else 0.0),
                        callbacks=callbacks).model  # fmt: skip
    for alpha in alphas:

        def extrapolated(alpha=alpha):
            return extrapolate_model(ref_model, mem, alpha)

        sweep.add({**knobs, "alpha": alpha, "lr": pl.recipe.mox_lr}, extrapolated(), extrapolated)
    return None if row.momentum else mem
