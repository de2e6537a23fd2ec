"""Evaluate defenses against attacks: the adaptive policy in one library function.

:func:`evaluate_defenses` is what the pipeline's ``evaluate`` step, the notebooks and the
benchmarks call. For each defense (a list of preprocessors in front of the model) and attack
it measures clean and robust accuracy (robust = correct on the clean and on the attacked
image, the RobustBench convention), with this policy:

- non-differentiable defenses are attacked through BPDA (straight-through gradients);
- a deterministic defense gains nothing from EOT, so EOT attacks run with one draw there;
- a randomized defense attacked without EOT is marked *not adaptive*: its number is an upper
  bound, and a note says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..attacks.bpda import with_bpda
from ..base import EvasionAttack, format_eps
from ..errors import ConfigError
from ..preprocessing import build_preprocessor
from ..registry import ATTACKS, PREPROCESSORS
from ..validation import check_int
from ..wrap import Defended, wrap
from .checks import Check, check_stronger_attack, sanity_checks
from .metrics import AttackResult, robust_accuracy


@dataclass
class DefenseSpec:
    """A named defense: preprocessors (modules or registered specs) in front of the model."""

    label: str
    preprocessors: list[Any] = field(default_factory=list)

    def build(self, device: torch.device | None = None, path: str = "defenses") -> list[nn.Module]:
        mods = [build_preprocessor(p, f"{path}[{self.label}][{i}]") for i, p in enumerate(self.preprocessors)]
        return [m.to(device) for m in mods] if device is not None else mods


@dataclass
class AttackSpec:
    """An attack spec (registered name / mapping, or an :class:`EvasionAttack`) with an optional label."""

    spec: Any
    label: str | None = None

    def build(self, eps: float | None = None, path: str = "attacks") -> EvasionAttack:
        if isinstance(self.spec, EvasionAttack):
            return self.spec if eps is None else self.spec.with_options(eps=float(eps))
        if eps is None:
            return ATTACKS.build(self.spec, path)
        name, params = ATTACKS.split_spec(self.spec, path)
        return ATTACKS.build({**params, "name": name, "eps": eps}, path)

    def name(self, attack: EvasionAttack, swept: bool) -> str:
        if self.label and swept:
            return f"{self.label} eps={format_eps(attack.eps, attack.norm)}"
        return self.label or attack.label()


def parse_defenses(defenses: Sequence[Any] | None, path: str = "defenses") -> list[DefenseSpec]:
    """``[{label, preprocessors}, ...]`` (YAML form) or :class:`DefenseSpec` objects; ``None``: undefended only."""
    if defenses is None:
        return [DefenseSpec("undefended")]
    if not isinstance(defenses, (list, tuple)) or not defenses:
        raise ConfigError("must be a non-empty list of {label: ..., preprocessors: [...]}", path)
    out = []
    for i, d in enumerate(defenses):
        p = f"{path}[{i}]"
        if isinstance(d, DefenseSpec):
            out.append(d)
            continue
        if not isinstance(d, dict):
            raise ConfigError("each defense must be a mapping {label: ..., preprocessors: [...]}", p)
        unknown = set(d) - {"label", "preprocessors"}
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)}; a defense has 'label' and 'preprocessors'", p)
        pre = d.get("preprocessors") or []
        if not isinstance(pre, list):
            raise ConfigError("must be a list of preprocessor specs", f"{p}.preprocessors")
        label = d.get("label") or ("+".join(PREPROCESSORS.split_spec(s, p)[0] for s in pre) or "undefended")
        out.append(DefenseSpec(str(label), list(pre)))
    return out


def parse_attacks(attacks: Sequence[Any] | None, path: str = "attacks") -> list[AttackSpec]:
    """Attack specs (``{name: pgd, eps: 8/255, label: optional}``), attacks or :class:`AttackSpec` objects."""
    if attacks is None:
        return []
    if not isinstance(attacks, (list, tuple)):
        raise ConfigError("must be a list of attack specs", path)
    out = []
    for spec in attacks:
        if isinstance(spec, AttackSpec):
            out.append(spec)
        elif isinstance(spec, dict) and "label" in spec:
            spec = dict(spec)
            out.append(AttackSpec(spec, str(spec.pop("label"))))
        else:
            out.append(AttackSpec(spec))
    return out


def validate_evaluation(defenses: Any, attacks: Any, path: str = "evaluate") -> None:
    """Build every preprocessor and attack once so a bad spec fails before anything runs."""
    for d in parse_defenses(defenses, f"{path}.defenses"):
        d.build(path=f"{path}.defenses")
    for i, a in enumerate(parse_attacks(attacks, f"{path}.attacks")):
        a.build(path=f"{path}.attacks[{i}]")


@dataclass
class Evaluation:
    """Rows of :func:`evaluate_defenses` (one per defense x condition, plus one worst-case row per
    defense and radius) and the notes a report needs."""

    rows: list[dict[str, Any]]
    notes: list[str]
    n: int
    swept: bool
    draws: int = 1
    checks: list[Check] = field(default_factory=list)

    def defenses(self) -> list[str]:
        return list(dict.fromkeys(r["defense"] for r in self.rows))

    def table(self) -> list[dict[str, Any]]:
        """The rows as a report shows them (without plot-only and per-setting keys)."""
        hidden = {"family", "settings", "kind", "attacked"}
        return [{k: v for k, v in r.items() if k not in hidden} for r in self.rows]


def worst_case_name(k: int) -> str:
    return f"worst case over {k} attack{'s' if k != 1 else ''}"


def _worst_case_rows(label: str, results: list[tuple[dict[str, Any], Any]]) -> list[dict[str, Any]]:
    """Per radius: the images that survive *every* adaptive attack (AutoAttack's ensemble rule)."""
    rows = []
    by_eps: dict[tuple[str, float], list[Any]] = {}
    for row, res in results:
        if row["adaptive"] is True:
            by_eps.setdefault((row["norm"], row["eps"]), []).append(res)
    for (norm, eps), group in by_eps.items():
        frac = torch.stack([r.robust_frac for r in group]).min(0).values  # per image: its worst attack
        all_draws = torch.stack([r.robust_correct for r in group]).all(0)
        rows.append({"defense": label, "attack": worst_case_name(len(group)) + f" eps={format_eps(eps, norm)}",
                     "norm": norm, "eps": eps, "accuracy": float(frac.mean()), "all_draws": float(all_draws.float().mean()),
                     "draws": group[0].draws, "adaptive": True, "gradient": "-", "seconds": sum(r.seconds for r in group),
                     "family": worst_case_name(len(group)), "kind": "worst_case", "settings": {}})
    return rows


def attack_cost(attack: EvasionAttack, model: nn.Module) -> float:
    """Forward+backward passes per image the attack spends at most (the cascade runs cheapest first).

    PGD: steps x restarts x EOT passes (one on a deterministic model). AutoAttack: its APGD / FAB
    iterations x restarts x EOT draws per attack it runs, plus Square's queries (forward only, counted
    as a third of a pass). Other attacks: an ``attack.cost`` attribute, else infinite (they run last).
    """
    randomized = bool(getattr(model, "randomized", False))
    if all(hasattr(attack, k) for k in ("steps", "restarts")):
        return float(attack.steps * attack.restarts * (attack.eot_samples if randomized else 1))
    if hasattr(attack, "version") and hasattr(attack, "build"):
        s = attack.describe()
        total = 0.0
        for name in s["attacks"]:
            if name == "square":
                total += s["square_queries"] / 3
            else:
                eot = s["eot_iter"] if name.startswith("apgd") and randomized else 1
                total += s["n_iter"] * s["restarts"] * eot
        return total
    return float(getattr(attack, "cost", float("inf")))


def _same_attack(a: EvasionAttack, b: EvasionAttack) -> bool:
    """Same settings on a deterministic defense (where early stop on randomized models means nothing)."""
    def key(atk: EvasionAttack) -> dict[str, Any]:
        return {k: v for k, v in atk.describe().items() if k != "early_stop_randomized"}

    return type(a) is type(b) and key(a) == key(b)


def _names(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _on_subset(model: nn.Module, attack: EvasionAttack, x: torch.Tensor, y: torch.Tensor, subset: torch.Tensor,
               *, desc: str, n_draws: int, **run: Any) -> AttackResult:
    """``robust_accuracy`` on ``x[subset]`` only, as a result over all of ``x``: the images left out
    count as not robust (a cheaper attack already broke them in every draw)."""
    n = int(x.shape[0])
    frac = torch.zeros(n)
    correct = torch.zeros(n, dtype=torch.bool)
    clean = torch.zeros(n, dtype=torch.bool)
    seconds, draws = 0.0, n_draws
    if subset.numel():
        part = robust_accuracy(model, attack, x[subset], y[subset], desc=desc, **run)
        frac[subset] = part.robust_frac.float()
        correct[subset] = part.robust_correct
        clean[subset] = part.clean_correct
        seconds, draws = part.seconds, part.draws
    return AttackResult(clean_accuracy=float("nan"), robust_accuracy=float(frac.mean()), n=n, seconds=seconds,
                        clean_correct=clean, robust_correct=correct, draws=draws, robust_frac=frac,
                        robust_all_draws=float(correct.float().mean()))


def evaluate_defenses(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    defenses: Sequence[Any] | None = None,
    attacks: Sequence[Any] | None = None,
    eps: Sequence[Any] | None = None,
    *,
    batch_size: int = 256,
    seed: int | None = 0,
    shard: tuple[int, int] | None = None,
    draws: int = 10,
    checks: bool = True,
    check_images: int = 64,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    cascade: bool = False,
) -> Evaluation:
    """Clean and robust accuracy of ``model`` behind each defense under each attack.

    ``eps``: optional radii; each attack then runs at each of them (its own ``eps`` is
    overridden). A randomized defense is scored over ``draws`` draws of its randomness: the
    ``accuracy`` column is the mean over draws (the headline), ``all_draws`` counts an image
    only if it was robust in every draw. Per defense and radius a *worst case* row counts the
    images that survive every adaptive attack (per image, its worst attack). Batch ``b`` is
    attacked with seed ``seed + b``, so the result is the same under ``torchrun`` sharding.
    ``checks``: run the gradient-masking sanity checks (:mod:`robustkit.eval.checks`) per defense,
    including a stronger PGD on (at most ``check_images`` of) the images that survived the strongest
    adaptive PGD row of each norm.

    ``cascade``: per defense and radius, run the adaptive attacks cheapest first (:func:`attack_cost`),
    each only on the images that every cheaper one left robust in at least one draw (on a deterministic
    defense, also only on the clean-correct ones), as AutoAttack does inside its ensemble. The worst-case
    row is unchanged for deterministic attacks (an image broken in every draw stays at 0 whatever runs
    after); attacks with a random start (or a randomized defense's draws) see other random streams on a
    subset of a batch than on the whole batch, so there the worst case equals the separate runs' in
    distribution, not bit for bit (seen: 2 of 24 images apart for a 2-step PGD). An attack's own row
    then means "robust after this attack and every cheaper one at this radius", and a note says so.
    Non-adaptive rows always run on every image.
    """
    from ..registry import parse_number

    say = log or (lambda _msg: None)
    check_int(check_images, "check_images", minimum=1)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    radii: list[float | None] = [None] if not eps else [parse_number(e, "eps") for e in eps]
    attack_specs = parse_attacks(attacks)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    run = dict(batch_size=batch_size, progress=progress, seed=seed, shard=shard, draws=draws)
    n_draws = 1
    all_checks: list[Check] = []
    for d in parse_defenses(defenses):
        defended: Defended = wrap(model, *d.build(device))
        bpda = not defended.differentiable
        if bpda:  # same forward; straight-through gradients for the non-differentiable parts
            defended = with_bpda(defended)
        res = robust_accuracy(defended, None, x, y, desc=f"{d.label} / clean", **run)
        n_draws = max(n_draws, res.draws)
        say(f"  {d.label}: clean accuracy {res.clean_accuracy:.3f} on {x.shape[0]} test images"
            + (f" (mean over {res.draws} draws)" if res.draws > 1 else ""))
        rows.append({"defense": d.label, "attack": "clean", "norm": "-", "eps": "-", "accuracy": res.clean_accuracy,
                     "all_draws": res.clean_all_draws, "draws": res.draws, "adaptive": "-", "gradient": "-",
                     "seconds": res.seconds, "family": "clean", "kind": "clean", "settings": {}})
        done: set[str] = set()
        planned: list[tuple[int, str, EvasionAttack, bool, Any]] = []  # (order, name, attack, adaptive, spec)
        for i, a in enumerate(attack_specs):
            for radius in radii:
                attack = a.build(radius, f"attacks[{i}]")
                dropped_eot = not defended.randomized and attack.eot_samples > 1
                if dropped_eot:
                    # a deterministic model gives the same gradient on every EOT pass: one is enough
                    attack = attack.with_options(eot_samples=1)
                name = a.name(attack, radius is not None)
                if name in done and dropped_eot and any(_same_attack(attack, p[2]) for p in planned):
                    notes.append(f"'{d.label}': '{name}' ran once; the same attack with EOT adds nothing on a "
                                 "deterministic defense")
                    continue
                if name in done:
                    name = f"{name} #{sum(1 for n in done if n == name or n.startswith(name + ' #')) + 1}"
                done.add(name)
                adaptive = (not defended.randomized) or attack.eot_samples > 1
                planned.append((len(planned), name, attack, adaptive, a))
        # execution order: with the cascade, per radius the adaptive attacks run cheapest first, each on
        # the images every cheaper one left robust in at least one draw; rows keep the config's order
        order = list(planned)
        if cascade:
            order.sort(key=lambda p: (not p[3], (p[2].norm, p[2].eps) if p[3] else ("", 0.0), attack_cost(p[2], defended)))
        survivors: dict[tuple[str, float], torch.Tensor] = {}
        cheaper: dict[tuple[str, float], list[str]] = {}
        clean_ok = res.robust_frac > 0  # deterministic: exactly the clean-correct images
        outcome: dict[int, tuple[dict[str, Any], Any, EvasionAttack]] = {}
        for pos, name, attack, adaptive, a in order:
            key = (attack.norm, attack.eps)
            subset = None
            if cascade and adaptive:
                alive = survivors.get(key, clean_ok if not defended.randomized else torch.ones_like(clean_ok))
                if not bool(alive.all()):
                    subset = torch.nonzero(alive).flatten()
            if subset is None:
                res_a = robust_accuracy(defended, attack, x, y, desc=f"{d.label} / {name}", **run)
            else:
                res_a = _on_subset(defended, attack, x, y, subset, desc=f"{d.label} / {name}",
                                   n_draws=res.draws, **run)
                notes.append(f"'{d.label}' / '{name}': cascade - attacked only the {subset.numel()} of {x.shape[0]} "
                             f"images left robust by {_names(cheaper.get(key, [])) or 'the clean check'}; the row "
                             "counts the others as broken (robust accuracy after this attack and every cheaper one "
                             "at this radius).")
            if cascade and adaptive:
                survivors[key] = res_a.robust_frac > 0
                cheaper.setdefault(key, []).append(name)
            row = {"defense": d.label, "attack": name, "norm": attack.norm, "eps": attack.eps,
                   "accuracy": res_a.robust_accuracy, "all_draws": res_a.robust_all_draws, "draws": res_a.draws,
                   "adaptive": adaptive, "gradient": "BPDA" if bpda else "exact", "seconds": res_a.seconds,
                   "family": a.label or attack.family(), "kind": type(attack).__name__.lower(),
                   "settings": attack.describe(), "attacked": int(x.shape[0] if subset is None else subset.numel())}
            outcome[pos] = (row, res_a, attack)
            say(f"  {d.label} / {name}: robust accuracy {res_a.robust_accuracy:.3f} ({res_a.seconds:.1f} s"
                + (f", {subset.numel()} of {x.shape[0]} images attacked" if subset is not None else "") + ")")
        results: list[tuple[dict[str, Any], Any]] = []
        attacks_run: list[EvasionAttack] = []
        for pos in sorted(outcome):
            row, res_a, attack = outcome[pos]
            rows.append(row)
            results.append((row, res_a))
            attacks_run.append(attack)
            if not row["adaptive"]:
                notes.append(
                    f"'{d.label}' is randomized but '{row['attack']}' averages no gradients over its randomness (no "
                    "EOT): its robust accuracy is an upper bound, not evidence of robustness.")
            if attack.reduced:
                notes.append(f"'{row['attack']}' ran with a reduced budget ({attack.describe()}): it is a weaker "
                             "attack than the published one and its number is not an AutoAttack result.")
        worst = _worst_case_rows(d.label, results)
        rows.extend(worst)
        for w in worst:
            say(f"  {d.label} / {w['attack']}: robust accuracy {w['accuracy']:.3f}")
        if checks:
            found = sanity_checks(d.label, defended, x.to(device), y.to(device), defended.randomized)
            pgd = [(row, res, atk) for (row, res), atk in zip(results, attacks_run)
                   if row["adaptive"] is True and hasattr(atk, "steps")]
            for norm in dict.fromkeys(r["norm"] for r, _, _ in pgd):  # per threat model: its largest radius
                mine = [p for p in pgd if p[0]["norm"] == norm]
                top_eps = max(r["eps"] for r, _, _ in mine)
                row, res, atk = min((p for p in mine if p[0]["eps"] == top_eps), key=lambda p: p[0]["accuracy"])
                stronger = check_stronger_attack(d.label, defended, atk, x, y, res.robust_frac, seed=seed,
                                                 draws=draws, batch_size=batch_size, shard=shard,
                                                 max_images=check_images)
                if stronger is not None:
                    found.append(stronger)
            all_checks.extend(found)
            for c in found:
                if c.result == "warning":
                    notes.append(f"gradient-masking check '{c.check}' on '{d.label}': {c.detail}")
                    say(f"  warning: {c.check}: {c.detail}")
    return Evaluation(rows, notes, int(x.shape[0]), swept=len(radii) > 1, draws=n_draws, checks=all_checks)
