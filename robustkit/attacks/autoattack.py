"""AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020) through the real package.

robustbench pulls AutoAttack from PyPI as ``pyautoattack``, whose API differs from upstream
(keyword-only ``attacks=``/``batch_size=``, no ``log_path``), while ``robustbench.eval`` imports
``autoattack`` and calls the upstream API. :func:`install_upstream_shim` registers a small module
named ``autoattack`` that translates the upstream calls, so ``robustbench.eval.benchmark`` runs
unchanged; :class:`AutoAttack` is robustkit's ``EvasionAttack`` over the same package.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..base import EvasionAttack, format_eps
from ..errors import InputError
from ..registry import ATTACKS
from ..validation import check_choice, check_int

VERSIONS = ("standard", "rand", "plus", "custom")
DEFAULT_N_ITER = 100  # APGD / FAB iterations in every published version
DEFAULT_EOT_ITER = 20  # EOT draws of the 'rand' version
KNOWN_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
_NORMS = {"linf": "Linf", "l2": "L2"}


def _import_pyautoattack():
    try:
        import pyautoattack
    except ImportError as exc:  # pragma: no cover - it is a dependency via robustbench
        raise InputError("AutoAttack needs the 'pyautoattack' package (pip install robustbench pulls it)") from exc
    return pyautoattack


@ATTACKS.register("autoattack")
class AutoAttack(EvasionAttack):
    """AutoAttack as a robustkit attack.

    Args:
        eps: radius (8/255 Linf or 0.5 L2 on CIFAR-10).
        norm: ``"linf"`` or ``"l2"``.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square), ``"rand"`` (APGD-CE and
            APGD-DLR with EOT over 20 draws, for randomized defenses), ``"plus"`` or ``"custom"``.
        attacks: with ``version="custom"``, the list to run, e.g. ``["apgd-ce", "apgd-t"]``.
        seed: seed of the attacks' randomness.
        batch_size: AutoAttack's internal batch size.
        n_iter: override the iterations of the APGD / FAB attacks (100 in every published version;
            Square gets ``10 * n_iter`` queries). APGD's step-size checkpoints are recomputed for
            the new budget. Fewer than 100 marks the attack *reduced*: reports label it so and it
            never fills RobustBench's ``autoattack_acc``.
        eot_iter: EOT draws per APGD gradient in ``rand`` (published: 20). Evaluators set 1 for a
            deterministic defense, where extra draws only repeat the same gradient; a user value
            below 20 on a randomized defense marks the attack reduced.
    """

    def __init__(self, eps: float = 8 / 255, norm: str = "linf", version: str = "standard",
                 attacks: list | None = None, seed: int | None = 0, batch_size: int = 250, n_iter: int | None = None,
                 eot_iter: int | None = None):
        super().__init__(eps=eps, norm=norm)
        for name, v in (("n_iter", n_iter), ("eot_iter", eot_iter)):
            if v is not None:
                check_int(v, name, minimum=1)
        if eot_iter is not None and version != "rand":
            raise InputError("eot_iter applies to version='rand' only (the other versions use no EOT)")
        self.eot_iter = eot_iter
        self._deterministic_target = False
        check_choice(version, "version", VERSIONS)
        if version == "custom":
            if not attacks:
                raise InputError("version='custom' needs a non-empty attacks list, e.g. ['apgd-ce', 'apgd-t']")
            bad = [a for a in attacks if a not in KNOWN_ATTACKS]
            if bad:
                raise InputError(f"unknown AutoAttack attack(s) {bad}; known: {', '.join(KNOWN_ATTACKS)}")
        elif attacks:
            raise InputError(f"attacks is only used with version='custom' (version={version!r} fixes its own list)")
        self.version, self.attacks, self.seed, self.batch_size, self.n_iter = version, list(attacks or []), seed, batch_size, n_iter

    @property
    def eot_samples(self) -> int:
        """'rand' averages gradients over 20 draws (EOT): the adaptive choice for randomized defenses."""
        if self.version != "rand":
            return 1
        return self.eot_iter if self.eot_iter is not None else DEFAULT_EOT_ITER

    @eot_samples.setter
    def eot_samples(self, value: int) -> None:
        if self.version != "rand":
            if value != 1:
                raise InputError(f"AutoAttack version {self.version!r} uses no EOT")
            return
        self.eot_iter = int(value)
        self._deterministic_target = int(value) == 1  # set by evaluators for deterministic defenses

    @property
    def reduced(self) -> bool:
        """Fewer APGD/FAB iterations than published, or fewer EOT draws than 20 chosen by the user."""
        few_iters = self.n_iter is not None and self.n_iter < DEFAULT_N_ITER
        few_draws = (self.version == "rand" and self.eot_iter is not None and self.eot_iter < DEFAULT_EOT_ITER
                     and not self._deterministic_target)
        return few_iters or few_draws

    def family(self) -> str:
        norm = "Linf" if self.norm == "linf" else self.norm.upper()
        reduced = " (reduced)" if self.reduced else ""
        return f"AutoAttack-{self.version}-{norm}{reduced}"

    def label(self) -> str:
        parts = [f"AutoAttack-{self.version}-{'Linf' if self.norm == 'linf' else self.norm.upper()}",
                 f"eps={format_eps(self.eps, self.norm)}"]
        if self.version == "rand":
            parts.append(f"EOT={self.eot_samples}")
        if self.reduced:
            parts.append(f"(reduced: n_iter={self.n_iter or DEFAULT_N_ITER}"
                         + (f", EOT={self.eot_samples})" if self.version == "rand" else ")"))
        return " ".join(parts)

    def describe(self) -> dict[str, Any]:
        """Version, attacks run, iterations, restarts, EOT draws, and whether the budget is reduced."""
        adversary = self.build(nn.Identity(), torch.device("cpu"))
        return {"version": self.version, "attacks": list(adversary.attacks_to_run), "n_iter": adversary.apgd.n_iter,
                "restarts": adversary.apgd.n_restarts, "eot_iter": adversary.apgd.eot_iter,
                "square_queries": adversary.square.n_queries, "eps": self.eps, "norm": self.norm, "seed": self.seed,
                "reduced": self.reduced}

    def build(self, model: nn.Module, device: torch.device) -> Any:
        pa = _import_pyautoattack()
        adversary = pa.AutoAttack(model, attacks=self.attacks if self.version == "custom" else None, device=device,
                                  eps=self.eps, norm=_NORMS[self.norm], seed=self.seed, version=self.version)
        adversary.verbose = False
        if self.n_iter is not None:
            n = int(self.n_iter)
            for apgd in (adversary.apgd, adversary.apgd_targeted):
                apgd.n_iter = n
                # APGD fixes its step-size checkpoints from n_iter in __init__ (0.22 / 0.06 / 0.03 of the
                # budget); recompute them, or a lowered n_iter keeps the 100-iteration schedule.
                apgd.n_iter_2 = max(int(0.22 * n), 1)
                apgd.n_iter_min = max(int(0.06 * n), 1)
                apgd.size_decr = max(int(0.03 * n), 1)
            adversary.fab.n_iter = n
            adversary.square.n_queries = max(n * 10, 10)
        if self.version == "rand" and self.eot_iter is not None:
            adversary.apgd.eot_iter = int(self.eot_iter)
        return adversary

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        adversary = self.build(model, x.device)
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=self.batch_size)
        # pyautoattack's own verdict: correct on its clean check and never broken by any of its attacks
        self._last_verdict = (y_adv.to(y.device) == y).detach()
        # AutoAttack projects onto the ball; remove float round-off so the base check holds exactly
        return self.project(x_adv.to(x.dtype), x)


# ----------------------------------------------------------------------------- upstream shim
class _UpstreamAutoAttack:
    """The upstream ``autoattack.AutoAttack`` signature, implemented with ``pyautoattack``."""

    def __init__(self, model: nn.Module, norm: str = "Linf", eps: float = 0.3, seed: int | None = None,
                 verbose: bool = True, attacks_to_run: Sequence[str] = (), version: str = "standard",
                 is_tf_model: bool = False, device: str = "cuda", log_path: str | None = None):
        if is_tf_model:
            raise InputError("TensorFlow models are not supported by this AutoAttack adapter")
        pa = _import_pyautoattack()
        self._inner = pa.AutoAttack(model, attacks=list(attacks_to_run) if version == "custom" else None,
                                    device=device, eps=eps, norm=norm, seed=seed, version=version)
        self._inner.verbose = verbose
        logger = logging.getLogger("auto-attack")
        if log_path is not None:
            handler = logging.FileHandler(log_path)
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)

    def __getattr__(self, name: str) -> Any:  # apgd, fab, square, attacks_to_run, ...
        return getattr(self._inner, name)

    def run_standard_evaluation(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int = 250,
                                return_labels: bool = False, state_path: Path | None = None):
        x_adv, y_adv = self._inner.run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state_path)
        return (x_adv, y_adv) if return_labels else x_adv


def install_upstream_shim(force: bool = False) -> types.ModuleType:
    """Register ``autoattack`` (and ``autoattack.state``) backed by ``pyautoattack``.

    Does nothing if a real upstream ``autoattack`` is importable (unless ``force``). Call it
    before ``import robustbench.eval``; :mod:`robustkit.eval.robustbench` does.
    """
    if not force and "autoattack" in sys.modules:
        return sys.modules["autoattack"]
    if not force:
        try:
            import autoattack  # type: ignore[import-not-found]  # noqa: F401

            return sys.modules["autoattack"]
        except ImportError:
            pass
    pa = _import_pyautoattack()
    from pyautoattack import state as pa_state

    mod = types.ModuleType("autoattack", "robustkit's upstream-API shim over pyautoattack")
    mod.AutoAttack = _UpstreamAutoAttack  # type: ignore[attr-defined]
    mod.state = pa_state  # type: ignore[attr-defined]
    mod.__version__ = getattr(pa, "__version__", "unknown")  # type: ignore[attr-defined]
    sys.modules["autoattack"] = mod
    sys.modules["autoattack.state"] = pa_state
    return mod
