"""Adversarial training and its monitor from config mappings (the ``train`` step's ``adversarial`` /
``monitor`` keys), validated completely before anything runs.

::

    adversarial: {method: trades, eps: 8/255, steps: 10, beta: 6}       # TRADES (alpha 0.007 at 8/255)
    adversarial: {method: pgd, eps: 8/255, steps: 10, alpha: 2/255}     # PGD-AT (Madry)
    monitor: {n_samples: 256, steps: 10}                                # per-epoch clean / PGD accuracy
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Mapping

from torch import nn

from ..errors import ConfigError, InputError
from ..registry import parse_number
from .adversarial import ATTACK_MODES, NORMS, PGDATStep, TRADESStep

METHODS = {"pgd": PGDATStep, "pgd_at": PGDATStep, "madry": PGDATStep, "trades": TRADESStep}

COMMON_KEYS = {
    "method": "pgd (PGD-AT, Madry et al.) or trades (Zhang et al.)",
    "eps": "radius of the training attack, e.g. 8/255",
    "steps": "attack iterations per batch (default 10)",
    "alpha": "attack step size (default: 2.5 * eps / steps for pgd, 0.007 * eps / (8/255) for trades)",
    "norm": "linf or l2",
    "eot_samples": "gradient passes per attack step (default: 1, or 4 when the preprocessor is randomized)",
    "attack_mode": "eval (default) or train: the network's mode while the attack runs",
    "seed": "seed of the attack's random start (default: the run's seed)",
}
METHOD_KEYS = {
    PGDATStep: {"random_start": "start uniformly inside the ball (default true)"},
    TRADESStep: {"beta": "weight of the KL term (default 6)", "init_std": "std of the start noise (default 0.001)"},
}
MONITOR_KEYS = {
    "n_samples": "test images measured every epoch (default 256; the first n of the test split)",
    "eps": "radius of the monitor's PGD (default: the adversarial eps, else 8/255)",
    "steps": "PGD steps (default 10)",
    "alpha": "PGD step size (default 2.5 * eps / steps)",
    "norm": "linf or l2 (default: the adversarial norm, else linf)",
    "eot_samples": "EOT passes for a randomized defense (default 8)",
    "draws": "draws of a randomized defense per image (default 4)",
    "every": "measure every this many epochs (default 1; always after the last)",
}


def _unknown(key: Any, accepted: Mapping[str, str], path: str) -> ConfigError:
    close = difflib.get_close_matches(str(key), list(accepted), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown key.{hint} Accepted: {', '.join(accepted)}", f"{path}.{key}")


def _int(value: Any, where: str, low: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"expected an integer >= {low}, got {value!r}", where)
    return value


def _number(value: Any, where: str, positive: bool) -> float:
    v = parse_number(value, where)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ConfigError(f"expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}", where)
    return v


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ConfigError(f"expected one of {', '.join(choices)}, got {value!r}", where)
    return value.lower()


def check_adversarial(spec: Any, path: str = "adversarial") -> dict[str, Any] | None:
    """Validate an ``adversarial`` mapping; return it normalized (numbers parsed, method lower-case), or None."""
    if spec is None or spec is False:
        return None
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"expected a mapping such as {{method: trades, eps: 8/255}}, got {spec!r}", path)
    if "method" not in spec:
        raise ConfigError("needs 'method': pgd (PGD-AT) or trades", path)
    method = spec["method"]
    if not isinstance(method, str) or method.lower() not in METHODS:
        close = difflib.get_close_matches(str(method).lower(), list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown adversarial training method {method!r}.{hint} Use pgd or trades", f"{path}.method")
    cls = METHODS[method.lower()]
    accepted = {**COMMON_KEYS, **METHOD_KEYS[cls]}
    out: dict[str, Any] = {"method": "trades" if cls is TRADESStep else "pgd"}
    for key, value in spec.items():
        where = f"{path}.{key}"
        if key not in accepted:
            other = next((m for m, keys in METHOD_KEYS.items() if key in keys), None)
            if other is not None:
                raise ConfigError(f"only applies to method {'trades' if other is TRADESStep else 'pgd'}, not {out['method']}", where)
            raise _unknown(key, accepted, path)
        if key == "method":
            continue
        if key in ("eps", "init_std", "beta"):
            out[key] = _number(value, where, positive=False)
        elif key == "alpha":
            out[key] = None if value is None else _number(value, where, positive=True)
        elif key == "steps":
            out[key] = _int(value, where, 1)
        elif key == "eot_samples":
            out[key] = None if value is None else _int(value, where, 1)
        elif key == "seed":
            out[key] = None if value is None else _int(value, where, 0)
        elif key == "norm":
            out[key] = _choice(value, NORMS, where)
        elif key == "attack_mode":
            out[key] = _choice(value, ATTACK_MODES, where)
        elif key == "random_start":
            if not isinstance(value, bool):
                raise ConfigError(f"expected true or false, got {value!r}", where)
            out[key] = value
    if out.get("norm", "linf") == "linf" and out.get("eps", 8 / 255) > 1:
        raise ConfigError(f"a Linf radius above 1 is meaningless for [0, 1] images (got {out['eps']}); "
                          "did you mean eps: 8/255?", f"{path}.eps")
    try:
        adversarial_step(out, None, path)
    except InputError as exc:  # anything the constructors check beyond the above
        raise ConfigError(str(exc), path) from None
    return out


def adversarial_step(spec: Mapping[str, Any], preprocess: nn.Module | None = None, path: str = "adversarial",
                     label_smoothing: float = 0.0) -> PGDATStep | TRADESStep:
    """A :class:`PGDATStep` or :class:`TRADESStep` from a (checked) ``adversarial`` mapping, with ``preprocess`` in front."""
    spec = dict(spec)
    method = str(spec.pop("method", "")).lower()
    if method not in METHODS:
        raise ConfigError(f"unknown adversarial training method {method!r}; use pgd or trades", f"{path}.method")
    cls = METHODS[method]
    return cls(**spec, preprocess=preprocess, label_smoothing=label_smoothing)


def check_monitor(spec: Any, adversarial: Mapping[str, Any] | None, path: str = "monitor") -> dict[str, Any] | None:
    """Validate a ``monitor`` setting: ``true`` / ``false`` / a mapping; ``None`` means "on when adversarial".

    Returns the monitor's keyword arguments for :class:`~robustkit.training.RobustAccuracy`
    (eps and norm default to the adversarial ones), or ``None`` when off.
    """
    if spec is None:
        spec = adversarial is not None
    if spec is False:
        return None
    if spec is True:
        spec = {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"expected true, false or a mapping such as {{n_samples: 256, steps: 10}}, got {spec!r}", path)
    out: dict[str, Any] = {"eps": (adversarial or {}).get("eps", 8 / 255), "norm": (adversarial or {}).get("norm", "linf")}
    for key, value in spec.items():
        where = f"{path}.{key}"
        if key not in MONITOR_KEYS:
            raise _unknown(key, MONITOR_KEYS, path)
        if key == "eps":
            out[key] = _number(value, where, positive=False)
        elif key == "alpha":
            out[key] = None if value is None else _number(value, where, positive=True)
        elif key == "norm":
            out[key] = _choice(value, NORMS, where)
        elif key == "eot_samples":
            out[key] = None if value is None else _int(value, where, 1)
        else:
            out[key] = _int(value, where, 1)
    return out
