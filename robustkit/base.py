"""The small interfaces every plug-in implements.

Kept deliberately thin, like torchattacks' ``Attack``: a base class checks inputs and
guarantees the contract (range, eps-ball, no mutation), a subclass does the maths.

- :class:`Preprocessor` - an ``nn.Module`` mapping images to images (a defense in front of a model).
- :class:`EvasionAttack` - ``attack(model, x, y) -> x_adv`` inside the eps-ball and [0, 1].
- :class:`BackdoorAttack` - ``apply(x)`` stamps a trigger; ``poison(dataset, ...)`` builds a poisoned set.
- :class:`ModelRepair` - ``repair(model, clean_data) -> RepairResult``; never mutates the input model.
- :class:`DataFilter` - ``fit(model, dataset) -> FilterResult`` with per-sample scores and flags.
"""

from __future__ import annotations

import abc
import copy
import inspect
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .errors import InputError
from .inference import eval_mode
from .validation import check_images, check_labels, check_same_device


class Preprocessor(nn.Module):
    """An image -> image transform placed in front of a classifier.

    Class attributes tell evaluators how to attack it honestly:

    - ``randomized``: output is random (an attack needs Expectation over Transformation).
    - ``differentiable``: autograd gives the true gradient (else use BPDA).

    Randomized preprocessors draw from their own ``torch.Generator`` when seeded
    (``seed=`` in the constructor or :meth:`reseed`), otherwise from torch's global RNG.
    """

    randomized: bool = False
    differentiable: bool = True

    def __init__(self, seed: int | None = None):
        super().__init__()
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def reseed(self, seed: int | None) -> "Preprocessor":
        """Restart the preprocessor's random stream (``None``: use the global RNG)."""
        self._seed = seed
        self._generators.clear()
        return self

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The generator for ``device`` (created on first use from the seed), or ``None``."""
        if self._seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    def extra_repr(self) -> str:
        return f"seed={self._seed}" if self._seed is not None else ""


class EvasionAttack(abc.ABC):
    """Base of test-time (evasion) attacks: ``x_adv = attack(model, x, y)``.

    The base class validates the inputs, switches the model to eval mode for the
    duration (restoring every module's mode after), and checks the result never leaves
    ``[0, 1]`` or the ``eps``-ball of the given ``norm`` - a violated bound is a bug and raises.

    Declared protocol (what evaluators read instead of introspecting):

    - ``eot_samples``: forward passes averaged per gradient (Expectation over Transformation);
      1 = none. ``eot_samples > 1`` makes the attack adaptive against randomized defenses.
    - ``seed``: seed of the attack's own randomness (``None``: torch's global RNG).
    - :meth:`label` / :meth:`family`: how reports name it.
    - :meth:`with_options`: a copy with some settings changed (e.g. ``seed`` per batch).
    - :meth:`describe`: the settings that define the attack's strength (reports record them);
      ``reduced`` is True when the budget is below the attack's published default.
    - :meth:`run`: ``(x_adv, verdict)`` where ``verdict`` is the attack's own per-example
      "still robust" flags when it computes them (AutoAttack), else ``None``. Evaluators never
      count an image robust that the attack itself found broken.
    """

    norm: str = "linf"
    eot_samples: int = 1
    seed: int | None = None

    def __init__(self, eps: float, norm: str = "linf", targeted: bool = False):
        norm = norm.lower()
        if norm not in ("linf", "l2"):
            raise InputError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        self.norm = norm
        self.targeted = bool(targeted)

    @abc.abstractmethod
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return adversarial images for a validated batch (subclasses implement this)."""

    def family(self) -> str:
        """The attack's name without its radius, e.g. ``EOT-PGD-Linf`` (used to group plot curves)."""
        norm = "Linf" if self.norm == "linf" else self.norm.upper()
        return f"{'EOT-' if self.eot_samples > 1 else ''}{type(self).__name__}-{norm}"

    def label(self) -> str:
        """How reports name the attack, e.g. ``EOT-PGD-Linf eps=8/255 EOT=8``."""
        parts = [self.family(), f"eps={format_eps(self.eps, self.norm)}"]
        if self.eot_samples > 1:
            parts.append(f"EOT={self.eot_samples}")
        return " ".join(parts)

    def describe(self) -> dict[str, Any]:
        """Public settings (plain values), plus ``reduced`` (default False)."""
        out = {k: v for k, v in vars(self).items() if not k.startswith("_")
               and isinstance(v, (bool, int, float, str, type(None), list, tuple))}
        out.setdefault("eot_samples", self.eot_samples)
        out["reduced"] = self.reduced
        return out

    @property
    def reduced(self) -> bool:
        """True when the attack runs with less budget than its published setting (default: False)."""
        return False

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x_adv, verdict)``: ``verdict`` is the attack's own per-example robust flags, or None."""
        x_adv = self(model, x, y)
        verdict = getattr(self, "_last_verdict", None)
        self._last_verdict = None
        return x_adv, verdict

    def with_options(self, **changes: Any) -> "EvasionAttack":
        """A shallow copy with the given attributes changed; unknown names raise."""
        new = copy.copy(self)
        for key, value in changes.items():
            if not hasattr(new, key):
                raise InputError(f"{type(self).__name__} has no setting {key!r}")
            setattr(new, key, value)
        return new

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_images(x, "x")
        check_labels(y, x.shape[0], "y")
        check_same_device(x, y, names=("x", "y"))
        for p in model.parameters():
            if p.device != x.device:
                raise InputError(f"model is on {p.device} but x is on {x.device}; move them to one device")
            break
        with eval_mode(model):
            x_adv = self.perturb(model, x.detach(), y.detach())
        self.check_bounds(x, x_adv)
        return x_adv.detach()

    def distance(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Per-sample perturbation size in the attack's norm."""
        delta = (x_adv - x).flatten(1)
        return delta.abs().amax(1) if self.norm == "linf" else delta.norm(p=2, dim=1)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Project onto the eps-ball around ``x`` intersected with ``[0, 1]``."""
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            factor = (self.eps / norms).clamp(max=1.0)
            delta = delta * factor.view(-1, *([1] * (x.dim() - 1)))
        return (x + delta).clamp(0.0, 1.0)

    def check_bounds(self, x: torch.Tensor, x_adv: torch.Tensor) -> None:
        if x_adv.shape != x.shape:
            raise RuntimeError(f"{type(self).__name__} returned shape {tuple(x_adv.shape)} for input {tuple(x.shape)}")
        tol = 1e-5
        if float(x_adv.min()) < -tol or float(x_adv.max()) > 1 + tol:
            raise RuntimeError(f"{type(self).__name__} left [0, 1]")
        dist = float(self.distance(x, x_adv).max())
        if dist > self.eps * (1 + 1e-4) + tol:
            raise RuntimeError(f"{type(self).__name__} left the {self.norm} eps-ball: {dist:.6g} > {self.eps:.6g}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class BackdoorAttack(abc.ABC):
    """A backdoor trigger: ``apply(x)`` stamps it on [0, 1] images.

    ``target`` is the attacker's label (all-to-one); ``all_to_all=True`` maps label ``y``
    to ``(y + 1) % num_classes`` instead.

    Declared protocol: ``clean_label`` (poison only target-class samples, keep labels);
    :meth:`extra_samples` / :meth:`apply_extra` for attacks that also alter some *unpoisoned*
    samples with their labels kept (WaNet's noise mode); :meth:`config` gives the constructor
    arguments that rebuild the exact attack (written to poisoned-data manifests).
    """

    clean_label: ClassVar[bool] = False

    def __init__(self, target: int = 0, all_to_all: bool = False):
        if not isinstance(target, int) or target < 0:
            raise InputError(f"target must be a class index >= 0, got {target!r}")
        self.target = target
        self.all_to_all = bool(all_to_all)

    @abc.abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return a copy of the batch ``x`` (N x C x H x W in [0, 1]) with the trigger."""

    def poison(self, dataset: Dataset, rate: float = 0.1, seed: int = 0, num_classes: int | None = None):
        """A :class:`~robustkit.backdoor.poisoned.PoisonedDataset` with this trigger in ``rate`` of ``dataset``."""
        from .backdoor.poisoned import PoisonedDataset

        return PoisonedDataset(dataset, self, rate=rate, seed=seed, num_classes=num_classes)

    def extra_samples(self, n_poisoned: int) -> int:
        """How many further (label-kept) samples :meth:`apply_extra` alters, given ``n_poisoned`` (default 0)."""
        return 0

    def apply_extra(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Alter the extra samples (only called when :meth:`extra_samples` is > 0)."""
        raise NotImplementedError(f"{type(self).__name__} declares no extra samples")

    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain data) that rebuild this exact attack.

        The default reads each ``__init__`` parameter from the attribute of the same name and
        raises :class:`InputError` if one is missing or not plain data; attacks holding arrays
        override it.
        """
        out: dict[str, Any] = {}
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if not hasattr(self, name):
                raise InputError(f"{type(self).__name__}.config(): no attribute {name!r} to record; override config()")
            out[name] = _plain(getattr(self, name), f"{type(self).__name__}.{name}")
        return out

    def target_labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The labels the backdoor should make the model predict for true labels ``y``."""
        if self.all_to_all:
            return (y + 1) % num_classes
        return torch.full_like(y, self.target)


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise InputError(f"{where} is a {type(value).__name__}, which a manifest cannot record as plain data")


def format_eps(eps: float, norm: str) -> str:
    """``8/255`` for Linf radii that are small fractions of 255, else ``%g``."""
    if norm == "linf":
        frac = Fraction(eps * 255).limit_denominator(8)
        if abs(float(frac) - eps * 255) < 1e-6:
            return f"{frac}/255"
    return f"{eps:g}"


@dataclass
class ResultDetails:
    """Typed details of a :class:`RepairResult` or :class:`FilterResult`.

    Subclasses are dataclasses whose fields say what a defense chose (layers, thresholds,
    sweeps). They render themselves: :meth:`summary` (scalar fields: one report-table row),
    :meth:`tables` (extra named tables) and :meth:`figures` (plots written into a folder).
    Mapping-style reads (``details["layer"]``, ``"sweep" in details``) keep working.
    """

    def summary(self) -> dict[str, Any]:
        """The scalar fields (and short lists of scalars), for one table row."""
        def plain(v: Any) -> bool:
            return isinstance(v, (str, int, float, bool)) or v is None

        return {k: v for k, v in vars(self).items()
                if plain(v) or (isinstance(v, list) and len(v) < 20 and all(plain(e) for e in v))}

    def tables(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """Extra ``(title, rows)`` tables for a report (default: none)."""
        return []

    def figures(self, out_dir: Any) -> list[str]:
        """Write plots into ``out_dir``; return their file names (default: none)."""
        return []

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in vars(self)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def keys(self) -> list[str]:
        return list(vars(self))

    def items(self) -> list[tuple[str, Any]]:
        return list(vars(self).items())


@dataclass
class RepairResult:
    """What a :class:`ModelRepair` returns: the repaired model, per-epoch history, typed details.

    ``collapsed`` is set by a repair whose clean accuracy fell past its bound (see the repair's
    docstring); evaluators and reports must show it loudly.
    """

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    details: ResultDetails = field(default_factory=ResultDetails)
    collapsed: bool = False


class ModelRepair(abc.ABC):
    """A defense that repairs a (possibly backdoored) model with a little clean data."""

    @abc.abstractmethod
    def repair(self, model: nn.Module, clean_data: Dataset, **kwargs: Any) -> RepairResult:
        """Return a repaired copy of ``model``; the caller's model is left untouched."""


@dataclass
class FilterResult:
    """Per-sample suspicion scores and the flagged (suspected poisoned) mask."""

    scores: torch.Tensor
    flagged: torch.Tensor
    details: ResultDetails = field(default_factory=ResultDetails)

    def __post_init__(self) -> None:
        if self.scores.dim() != 1 or self.flagged.shape != self.scores.shape:
            raise InputError(
                f"scores and flagged must be 1-D of equal length, got {tuple(self.scores.shape)} and {tuple(self.flagged.shape)}"
            )
        if self.flagged.dtype != torch.bool:
            f = self.flagged
            if f.is_floating_point() and not torch.isfinite(f).all() or not ((f == 0) | (f == 1)).all():
                raise InputError("flagged must be a boolean mask (or 0/1 values); got other values - "
                                 "threshold the scores first")
            self.flagged = f.bool()

    def kept_indices(self) -> list[int]:
        return torch.nonzero(~self.flagged).flatten().tolist()

    def clean_subset(self, dataset: Dataset) -> Subset:
        """The samples of ``dataset`` that were not flagged."""
        n = len(dataset)  # type: ignore[arg-type]
        if n != self.flagged.numel():
            raise InputError(f"dataset has {n} samples but the filter scored {self.flagged.numel()}")
        return Subset(dataset, self.kept_indices())


class DataFilter(abc.ABC):
    """A defense that flags poisoned samples of a training set."""

    @abc.abstractmethod
    def fit(self, model: nn.Module, dataset: Dataset) -> FilterResult:
        """Score every sample of ``dataset`` with the help of ``model``."""


__all__: Sequence[str] = [
    "Preprocessor",
    "EvasionAttack",
    "BackdoorAttack",
    "ModelRepair",
    "RepairResult",
    "ResultDetails",
    "DataFilter",
    "FilterResult",
]
