"""``certify``: randomized-smoothing certificates (Cohen et al. 2019) for noise defenses, beside the
empirical adaptive robust accuracy (EOT-PGD L2) at the same radii."""

from __future__ import annotations

from typing import Any

from ...data import to_tensors
from ...errors import ConfigError, InputError
from ...eval.certify import (
    certified_accuracy_plot,
    predict_smoothed,
    smoothed_vote,
    split_smoothing,
)
from ...eval.certify import certify as certify_images
from ...eval.robust import AttackSpec, evaluate_defenses, parse_defenses
from ...registry import STEPS, parse_number
from ...wrap import wrap
from ..context import Context

DEFAULT_RADII = [0.0, 0.25, 0.5, 0.75, 1.0]
DEFAULT_ATTACK = {"name": "pgd", "norm": "l2", "steps": 20, "eot_samples": 8, "label": "EOT-PGD-L2"}

CERT_NOTE = ("{n} test images. certified = CERTIFY (Cohen et al. 2019) predicts the label with an L2 radius >= r "
             "(n0={n0} selection draws, n={n_draws} estimation draws, alpha={alpha}; abstentions count as wrong): a "
             "lower bound, with probability >= 1 - alpha per image, on the accuracy of the smoothed classifier "
             "(the majority vote over the noise) under ANY L2 attack of norm < r. attack = the adaptive "
             "{attack} on the noisy defended model (mean over {draws} draws of the noise), an upper bound on its "
             "robust accuracy, measured on single noisy passes; attack (vote) = the same attack's points scored by the "
             "majority vote of {vote_n} draws (correct on the clean and the attacked image): an upper bound on the "
             "robust accuracy of exactly the smoothed classifier the certificate is about (certified <= true <= "
             "attack (vote), up to sampling error).")


def _radii(radii: Any, path: str) -> list[float]:
    if not isinstance(radii, (list, tuple)) or not radii:
        raise ConfigError(f"expected a non-empty list of L2 radii, got {radii!r}", path)
    out = [parse_number(r, f"{path}[{i}]") for i, r in enumerate(radii)]
    for i, r in enumerate(out):
        if not r >= 0:
            raise ConfigError(f"a radius must be >= 0, got {r!r}", f"{path}[{i}]")
    return sorted(set(out))


def _attack(attack: Any, path: str) -> AttackSpec | None:
    if attack is None or attack is False:
        return None
    if not isinstance(attack, dict):
        raise ConfigError(f"expected an attack spec such as {DEFAULT_ATTACK} (or null for none), got {attack!r}", path)
    spec = dict(attack)
    label = spec.pop("label", None)
    a = AttackSpec(spec, None if label is None else str(label))
    built = a.build(path=path)
    if built.norm != "l2":
        raise ConfigError(f"the certificate is an L2 radius: the attack must have norm: l2, got {built.norm!r}", path)
    return a


def _check_int(v: Any, name: str, path: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"expected an integer >= 1, got {v!r}", f"{path}.{name}")
    return v


CERTIFY_OPTIONS = {"n0": 100, "n": 1000, "alpha": 0.001, "batch_size": 500, "radii": None, "predict_n": 100}


def certify_options(opts: Any, path: str) -> dict[str, Any]:
    """The ``evaluate`` step's ``certify:`` option, checked and with defaults filled in: ``true`` or a
    mapping with any of n0, n, alpha, batch_size, radii (default: 0 and the L2 radii the step
    attacks, else 0, 0.25, 0.5, 0.75, 1), predict_n."""
    if opts is True:
        opts = {}
    if not isinstance(opts, dict):
        raise ConfigError(f"expected true or a mapping with keys {sorted(CERTIFY_OPTIONS)}, got {opts!r}", path)
    unknown = sorted(set(opts) - set(CERTIFY_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown certify option(s) {unknown}; expected some of {sorted(CERTIFY_OPTIONS)}", path)
    out = {**CERTIFY_OPTIONS, **opts}
    for name in ("n0", "n", "batch_size"):
        _check_int(out[name], name, path)
    if out["predict_n"] != 0:
        _check_int(out["predict_n"], "predict_n", path)
    a = out["alpha"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1:
        raise ConfigError(f"expected a number in (0, 1), got {a!r}", f"{path}.alpha")
    if out["radii"] is not None:
        out["radii"] = _radii(out["radii"], f"{path}.radii")
    return out


def validate(params: dict[str, Any], path: str) -> None:
    """Build the defenses (each must start with Gaussian noise), the attack and the radii before the run."""
    if params.get("defenses") is None:
        raise ConfigError("certify needs defenses: [{label, preprocessors: [gaussian_noise or noise_bilateral, ...]}]",
                          f"{path}.defenses")
    for d in parse_defenses(params["defenses"], f"{path}.defenses"):
        try:
            split_smoothing(d.build(path=f"{path}.defenses"))
        except InputError as e:
            raise ConfigError(str(e), f"{path}.defenses[{d.label}]") from None
    for name in ("n0", "n", "batch_size"):
        if name in params:
            _check_int(params[name], name, path)
    for name in ("n_samples", "predict_n", "vote_n"):
        if params.get(name) is not None and params[name] != 0:
            _check_int(params[name], name, path)
    if "draws" in params:
        _check_int(params["draws"], "draws", path)
    if "alpha" in params:
        a = params["alpha"]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1:
            raise ConfigError(f"expected a number in (0, 1), got {a!r}", f"{path}.alpha")
    _radii(params.get("radii", DEFAULT_RADII), f"{path}.radii")
    _attack(params.get("attack", DEFAULT_ATTACK), f"{path}.attack")


@STEPS.register("certify")
def certify(ctx: Context, /, defenses: list | None = None, n0: int = 100, n: int = 1000, alpha: float = 0.001,
            batch_size: int = 500, n_samples: int | None = 100, radii: list | None = None, predict_n: int = 100,
            attack: dict | None = DEFAULT_ATTACK, draws: int = 4, vote_n: int = 100) -> None:
    """Certified L2 accuracy of each noise defense (randomized smoothing) and, beside it, the accuracy
    an adaptive attack leaves at the same radii.

    ``defenses``: ``[{label, preprocessors: [...]}]`` whose first preprocessor is Gaussian noise
    (``gaussian_noise``, ``noise_bilateral``, a ``compose`` starting with it); sigma is the noise's.
    ``n0`` / ``n`` / ``alpha``: CERTIFY's selection draws, estimation draws and failure
    probability (the paper: 100 / 100,000 / 0.001; ``n`` bounds the largest radius,
    ``sigma * Phi^-1(alpha^(1/n))``). ``batch_size``: noisy copies per forward.
    ``n_samples``: the first n test images. ``radii``: L2 radii of the table (default
    0, 0.25, 0.5, 0.75, 1). ``predict_n``: draws of PREDICT (the smoothed classifier's clean
    accuracy and abstention; 0 skips it). ``attack``: an L2 attack spec run at every radius > 0
    through :func:`robustkit.eval.evaluate_defenses` (default EOT-PGD L2, 20 steps, 8 EOT
    samples; ``null`` skips it), scored over ``draws`` draws of the noise (column ``attack``) and,
    with ``vote_n`` > 0, also against the smoothed classifier itself (column ``attack (vote)``: the
    same attack's points scored by the majority vote of ``vote_n`` draws, correct on the clean and
    the attacked image); that column is an empirical upper bound on exactly what the certificate
    lower-bounds.
    Writes a table (certified vs. attacked accuracy per radius), a summary table (abstention
    rate, parameters) and ``certified_accuracy.png``.
    """
    model, data = ctx.require_model("certify"), ctx.require_data("certify")
    path = "certify"
    validate({"defenses": defenses, "n0": n0, "n": n, "alpha": alpha, "batch_size": batch_size, "n_samples": n_samples,
              "predict_n": predict_n, "vote_n": vote_n, "draws": draws, "radii": radii or DEFAULT_RADII, "attack": attack}, path)
    rs = _radii(radii or DEFAULT_RADII, f"{path}.radii")
    att = _attack(attack, f"{path}.attack")
    x, y = to_tensors(data.test, max_samples=n_samples)
    specs = parse_defenses(defenses, f"{path}.defenses")
    results, summary, empirical, votes = {}, [], {}, {}
    for d in specs:
        results[d.label], row = certify_defense(ctx, model, d, x, y, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                                                radii=rs, predict_n=predict_n)
        summary.append(row)
    attacked = [r for r in rs if r > 0]
    attack_name = "-"
    if att is not None and attacked:
        ev = evaluate_defenses(model, x, y, specs, [att], attacked, batch_size=batch_size, seed=ctx.seed,
                               draws=draws, progress=ctx.show_progress, log=ctx.log)
        attack_name = att.label or att.build().family()
        for r in ev.rows:
            if r["kind"] == "clean":
                empirical.setdefault(r["defense"], []).append((0.0, r["accuracy"]))
            elif r["kind"] != "worst_case":
                empirical.setdefault(r["defense"], []).append((float(r["eps"]), r["accuracy"]))
        ctx.report.notes.extend(n for n in ev.notes if n not in ctx.report.notes)
        if vote_n:
            for d in specs:
                votes[d.label] = _vote_attack(ctx, model, d, att, attacked, x, y, vote_n, batch_size)
    rows = []
    for label, res in results.items():
        emp = dict(empirical.get(label, []))
        for r, a in zip(rs, res.certified_accuracy(rs)):
            row = {"defense": label, "sigma": res.sigma, "L2 radius": r, "certified": a}
            if att is not None:  # at r = 0: the clean accuracy of a single noisy pass
                row["attack"] = emp.get(r, "-")
            if label in votes:  # at r = 0: the clean accuracy of the vote
                row["attack (vote)"] = votes[label].get(r, "-")
                if r in votes[label]:
                    ctx.report.metrics[f"{label}/vote_attack_accuracy@{r:g}"] = votes[label][r]
            rows.append(row)
            if r in emp:
                ctx.report.metrics[f"{label}/attack_accuracy@{r:g}"] = emp[r]
    ctx.report.add_table("Certified accuracy vs. L2 radius", rows, note=CERT_NOTE.format(
        n=x.shape[0], n0=n0, n_draws=n, alpha=alpha, attack=attack_name, draws=draws, vote_n=vote_n))
    ctx.report.add_table("Certification summary", summary, note=(
        "abstention = CERTIFY abstained (p_A <= 1/2); certified clean = certified accuracy at radius 0; max radius = "
        "the largest radius n draws can certify, sigma * Phi^-1(alpha^(1/n)); predict = PREDICT's accuracy and "
        "abstention (binomial test at alpha) on the same images."))
    if ctx.is_main:
        curves = {label: {f"{attack_name} (single pass)": pts} for label, pts in empirical.items()}
        for label, v in votes.items():
            curves.setdefault(label, {})[f"{attack_name} (vote)"] = sorted(v.items())
        fig = certified_accuracy_plot(results, ctx.out_path("certified_accuracy.png"), curves or None)
        ctx.report.figures.append(fig.name)



def certify_defense(ctx: Context, model: Any, d: Any, x: Any, y: Any, *, n0: int, n: int, alpha: float,
                    batch_size: int, radii: list[float], predict_n: int) -> tuple[Any, dict[str, Any]]:
    """CERTIFY (and PREDICT when ``predict_n`` > 0) for one defense spec: the result, its summary row,
    report metrics, and a note where a radius lies beyond what ``n`` draws can certify. Shared by the
    ``certify`` step and the ``evaluate`` step's ``certify:`` option."""
    defended = wrap(model, *d.build(ctx.device))
    ctx.log(f"  {d.label}: certifying {x.shape[0]} images (n0={n0}, n={n}, alpha={alpha})")
    res = certify_images(defended, x, y, n0=n0, n=n, alpha=alpha, batch_size=batch_size, seed=ctx.seed,
                         progress=ctx.show_progress, desc=f"{d.label} / certify")
    row: dict[str, Any] = {"defense": d.label, "sigma": res.sigma, "base classifier": res.base,
                           "images": int(x.shape[0]), "n0": n0, "n": n, "alpha": alpha,
                           "max radius": _max_radius(res.sigma, n, alpha),
                           "abstention": res.abstention_rate, "certified clean": res.certified_accuracy(0.0)}
    if predict_n:
        pred = predict_smoothed(defended, x, y, n=predict_n, alpha=alpha, batch_size=batch_size,
                                seed=ctx.seed + 1_000_003, progress=ctx.show_progress, desc=f"{d.label} / predict")
        row.update({"predict n": predict_n, "predict accuracy": pred.accuracy,
                    "predict abstention": pred.abstention_rate})
        ctx.report.metrics[f"{d.label}/smoothed_accuracy"] = pred.accuracy
    row["seconds"] = round(res.seconds, 1)
    beyond = [r for r in radii if r > row["max radius"]]
    if beyond:
        ctx.report.notes.append(
            f"'{d.label}': with n={n} draws and alpha={alpha} no radius above {row['max radius']:.3f} can be "
            f"certified (sigma * Phi^-1(alpha^(1/n))), so its certified accuracy at {', '.join(f'{r:g}' for r in beyond)} "
            "is 0 by construction, not a measurement: raise n to certify larger radii.")
    ctx.report.metrics[f"{d.label}/abstention_rate"] = res.abstention_rate
    for r, a in zip(radii, res.certified_accuracy(radii)):
        ctx.report.metrics[f"{d.label}/certified_accuracy@{r:g}"] = a
    ctx.log(f"  {d.label}: certified accuracy " + ", ".join(
        f"{a:.3f} @ {r:g}" for r, a in zip(radii, res.certified_accuracy(radii))) + f"; abstained {res.abstention_rate:.3f}")
    return res, row


def _vote_attack(ctx: Context, model: Any, d: Any, att: AttackSpec, radii: list[float], x: Any, y: Any,
                 vote_n: int, batch_size: int) -> dict[float, float]:
    """Accuracy of the smoothed classifier (majority vote of ``vote_n`` draws) on the clean images
    (radius 0) and on the attack's points at each radius: correct on both."""
    import torch

    from ...utils import batches

    defended = wrap(model, *d.build(ctx.device))
    xd, yd = x.to(ctx.device), y.to(ctx.device)
    clean = smoothed_vote(defended, xd, n=vote_n, batch_size=batch_size, seed=ctx.seed) == y
    out = {0.0: float(clean.float().mean())}
    for r in radii:
        attack = att.build(r)
        if getattr(attack, "seed", 1) is None:
            attack = attack.with_options(seed=ctx.seed)
        adv = torch.cat([attack(defended, xd[s], yd[s]).detach() for s in batches(len(xd), batch_size)])
        ok = clean & (smoothed_vote(defended, adv, n=vote_n, batch_size=batch_size, seed=ctx.seed + 1) == y)
        out[r] = float(ok.float().mean())
        ctx.log(f"  {d.label} / {att.label or attack.family()} eps={r:g}: accuracy of the vote on the attack's points "
                f"{out[r]:.3f}")
    return out


def _max_radius(sigma: float, n: int, alpha: float) -> float:
    from ...eval.certify import certified_radius, clopper_pearson_lower

    return certified_radius(clopper_pearson_lower(n, n, alpha), sigma)


certify.validate = validate  # type: ignore[attr-defined]
