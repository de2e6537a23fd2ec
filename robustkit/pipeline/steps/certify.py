"""``certify``: randomized-smoothing certificates (Cohen et al. 2019) for noise defenses, beside the
empirical adaptive robust accuracy (EOT-PGD L2) at the same radii."""

from __future__ import annotations

from typing import Any

from ...data import to_tensors
from ...errors import ConfigError, InputError
from ...eval.certify import certified_accuracy_plot, certify as certify_images, predict_smoothed, split_smoothing
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
             "robust accuracy; it is measured on single noisy passes, not on the majority vote.")


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
    for name in ("n_samples", "predict_n"):
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
            attack: dict | None = DEFAULT_ATTACK, draws: int = 4) -> None:
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
    samples; ``null`` skips it), scored over ``draws`` draws of the noise.
    Writes a table (certified vs. attacked accuracy per radius), a summary table (abstention
    rate, parameters) and ``certified_accuracy.png``.
    """
    model, data = ctx.require_model("certify"), ctx.require_data("certify")
    path = "certify"
    validate({"defenses": defenses, "n0": n0, "n": n, "alpha": alpha, "batch_size": batch_size, "n_samples": n_samples,
              "predict_n": predict_n, "draws": draws, "radii": radii or DEFAULT_RADII, "attack": attack}, path)
    rs = _radii(radii or DEFAULT_RADII, f"{path}.radii")
    att = _attack(attack, f"{path}.attack")
    x, y = to_tensors(data.test, max_samples=n_samples)
    specs = parse_defenses(defenses, f"{path}.defenses")
    results, summary, empirical = {}, [], {}
    for i, d in enumerate(specs):
        defended = wrap(model, *d.build(ctx.device))
        ctx.log(f"  {d.label}: certifying {x.shape[0]} images (n0={n0}, n={n}, alpha={alpha})")
        res = certify_images(defended, x, y, n0=n0, n=n, alpha=alpha, batch_size=batch_size, seed=ctx.seed,
                             progress=ctx.show_progress, desc=f"{d.label} / certify")
        results[d.label] = res
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
        summary.append(row)
        beyond = [r for r in rs if r > row["max radius"]]
        if beyond:
            ctx.report.notes.append(
                f"'{d.label}': with n={n} draws and alpha={alpha} no radius above {row['max radius']:.3f} can be "
                f"certified (sigma * Phi^-1(alpha^(1/n))), so its certified accuracy at {', '.join(f'{r:g}' for r in beyond)} "
                "is 0 by construction, not a measurement: raise n to certify larger radii.")
        ctx.report.metrics[f"{d.label}/abstention_rate"] = res.abstention_rate
        for r, a in zip(rs, res.certified_accuracy(rs)):
            ctx.report.metrics[f"{d.label}/certified_accuracy@{r:g}"] = a
        ctx.log(f"  {d.label}: certified accuracy " + ", ".join(
            f"{a:.3f} @ {r:g}" for r, a in zip(rs, res.certified_accuracy(rs))) + f"; abstained {res.abstention_rate:.3f}")
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
    rows = []
    for label, res in results.items():
        emp = dict(empirical.get(label, []))
        for r, a in zip(rs, res.certified_accuracy(rs)):
            row = {"defense": label, "sigma": res.sigma, "L2 radius": r, "certified": a}
            if att is not None:  # at r = 0: the clean accuracy of a single noisy pass
                row["attack"] = emp.get(r, "-")
            rows.append(row)
            if r in emp:
                ctx.report.metrics[f"{label}/attack_accuracy@{r:g}"] = emp[r]
    ctx.report.add_table("Certified accuracy vs. L2 radius", rows, note=CERT_NOTE.format(
        n=x.shape[0], n0=n0, n_draws=n, alpha=alpha, attack=attack_name, draws=draws))
    ctx.report.add_table("Certification summary", summary, note=(
        "abstention = CERTIFY abstained (p_A <= 1/2); certified clean = certified accuracy at radius 0; max radius = "
        "the largest radius n draws can certify, sigma * Phi^-1(alpha^(1/n)); predict = PREDICT's accuracy and "
        "abstention (binomial test at alpha) on the same images."))
    if ctx.is_main:
        fig = certified_accuracy_plot(results, ctx.out_path("certified_accuracy.png"), empirical or None)
        ctx.report.figures.append(fig.name)


def _max_radius(sigma: float, n: int, alpha: float) -> float:
    from ...eval.certify import certified_radius, clopper_pearson_lower

    return certified_radius(clopper_pearson_lower(n, n, alpha), sigma)


certify.validate = validate  # type: ignore[attr-defined]
