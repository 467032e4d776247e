"""What each unlearning method is, in one table: its loss terms, what it needs, what it allows,
and whether θ_mem is extrapolated afterwards (with momentum, with replacement answers). A row
names its forget and retain terms, which moxkit.train.objectives computes (FORGET_TERMS,
RETAIN_TERMS); the trainer adds them up, and the API checks, the CLI choices and the apps
pipeline read METHODS instead of comparing method names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from moxkit.errors import InputError

if TYPE_CHECKING:
    from .config import ExtrapolationConfig, LossConfig
    from .objectives import LossSpec


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    forget_loss: str  # "memorize" (nll or floored negated NPO, per LossConfig.objective),
    #                   "neg_nll" (gradient ascent), "npo", "simnpo"
    retain_loss: str | None  # "kl" (from the frozen θ_ref), "nll", or None
    extrapolates: bool  # θ_for = (1+α)·θ_ref − α·θ_mem after training
    targeted: bool = False  # accepts replacement answers (targeted MOX)
    user_method: bool = True  # offered by `unlearn --method`
    momentum: bool = False  # θ_for averaged over ticks during training (MOX-Mo; η defaults)
    needs_target: bool = False  # replacement answers required, not only accepted

    @property
    def title(self) -> str:
        """How messages name it."""
        return "memorization (train-mem)" if self.name == "memorize" else f"method {self.name}"

    @property
    def memorizes(self) -> bool:
        return self.forget_loss == "memorize"

    def allows(self) -> frozenset[str]:
        """The LossConfig / ExtrapolationConfig fields this method reads; setting any other
        away from its default is refused, so a knob never silently does nothing."""
        names = set()
        if self.memorizes:
            names |= {"objective", "npo_beta", "npo_floor"}
        if self.retain_loss == "kl":
            names |= {"kl_weight", "kl_positions"}
        if self.retain_loss == "nll":
            names.add("retain_weight")
        if self.forget_loss == "npo":
            names.add("npo_beta")
        if self.forget_loss == "simnpo":
            names |= {"simnpo_beta", "simnpo_gamma"}
        if self.targeted:
            names.add("target_weight")
        if self.extrapolates:
            names |= {"alpha", "eta", "extrapolate_every", "extrapolate_on"}
        return frozenset(names)

    def check(self, *configs: LossConfig | ExtrapolationConfig, targeted: bool = False) -> None:
        """Refuse settings this method would ignore."""
        if targeted and not self.targeted:
            takes = ", ".join(m.name for m in _ALL if m.targeted and m.user_method)
            raise InputError(
                f"target_answer: only for methods {takes} (or train-mem), not {self.name}",
                params=("target_answer",),
            )
        if self.needs_target and not targeted:
            raise InputError(f"target_answer: needed by {self.title}", params=("target_answer",))
        allowed = self.allows() | ({"alpha"} if targeted else set())  # the target's θ_for
        for config in configs:
            default = type(config)()
            for f in fields(config):
                value = getattr(config, f.name)
                if f.name not in allowed and value != getattr(default, f.name):
                    raise InputError(
                        f"{f.name} {value}: not used by {self.title}", params=(f.name,)
                    )

    def loss_spec(self, loss: LossConfig, alpha: float, targeted: bool) -> LossSpec:
        """The trainer's terms for this method with these settings."""
        from .objectives import LossSpec

        forget = self.forget_loss
        if self.memorizes:
            forget = "nll" if loss.objective == "nll" else "npo_mem"
        retain = self.retain_loss
        if retain == "kl" and loss.kl_weight == 0:
            retain = None
        return LossSpec(
            forget=forget,
            retain=retain,
            retain_weight=loss.kl_weight if retain == "kl" else loss.retain_weight,
            kl_positions=loss.kl_positions,
            target_weight=loss.target_weight if targeted else 0.0,
            target_alpha=alpha,
            npo_beta=loss.npo_beta,
            npo_floor=loss.npo_floor,
            simnpo_beta=loss.simnpo_beta,
            simnpo_gamma=loss.simnpo_gamma,
        )

    def extrapolation(self, ext: ExtrapolationConfig) -> ExtrapolationConfig:
        """The settings this method extrapolates with: a momentum method without η takes the
        paper's."""
        if self.momentum and ext.eta is None:
            from moxkit.engine.formula import PAPER_ETA

            return replace(ext, eta=PAPER_ETA)
        return ext

    def needs_retain(self, loss: LossConfig) -> bool:
        return self.retain_loss == "nll" or (self.retain_loss == "kl" and loss.kl_weight > 0)


_ALL = (
    Method("memorize", "θ_mem: memorize the forget set, KL to θ_ref on retain (train-mem)",
           "memorize", "kl", extrapolates=False, targeted=True, user_method=False),
    Method("mox", "memorize, then θ_for = (1+α)·θ_ref − α·θ_mem (optionally with momentum)",
           "memorize", "kl", extrapolates=True, targeted=True),
    Method("task-vector", "NLL on the forget set, then the same extrapolation (no KL)",
           "memorize", None, extrapolates=True),
    Method("ga", "gradient ascent on the forget NLL", "neg_nll", None, extrapolates=False),
    Method("graddiff", "gradient ascent on forget + NLL on retain", "neg_nll", "nll",
           extrapolates=False),
    Method("npo", "NPO against θ_ref on forget + NLL on retain", "npo", "nll",
           extrapolates=False),
    Method("simnpo", "SimNPO (length-normalised, reference-free, margin γ) on forget + NLL "
           "on retain", "simnpo", "nll", extrapolates=False),
    Method("mox-momentum", "MOX-Mo: θ_for = η·[(1+α)·θ_ref − α·θ_mem] + (1−η)·θ_for, ticked "
           "during training (η: the paper's unless given)", "memorize", "kl", extrapolates=True,
           momentum=True),
    Method("mox-targeted", "MOX with replacement answers (target_answer): their NLL at θ_for "
           "is trained with θ_mem", "memorize", "kl", extrapolates=True, targeted=True,
           needs_target=True),
)  # fmt: skip
METHODS: dict[str, Method] = {m.name: m for m in _ALL}
UNLEARN_METHODS = tuple(name for name, m in METHODS.items() if m.user_method)


def get_method(name: str) -> Method:
    """A method `unlearn` offers, by name."""
    if name not in UNLEARN_METHODS:
        raise InputError(f"method {name!r}: expected one of {', '.join(UNLEARN_METHODS)}")
    return METHODS[name]
