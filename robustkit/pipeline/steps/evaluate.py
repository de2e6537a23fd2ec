"""``evaluate``: clean and robust accuracy of the model behind each defense under each attack."""

from __future__ import annotations


from ...io import atomic_write_json
from ...data import to_tensors
from ...eval.plots import accuracy_bars, robust_vs_eps
from ...eval.certify import certified_accuracy_plot, split_smoothing
from ...eval.robust import evaluate_defenses, parse_defenses, validate_evaluation
from ...eval.robustbench import robustbench_entry, slug
from ...errors import ConfigError, InputError
from ...registry import STEPS, parse_number
from ...validation import check_int
from ..context import Context
from .certify import DEFAULT_RADII, certify_defense, certify_options

TABLE_NOTE = ("{n} test images. Robust = correct on the clean and on the attacked image. Randomized defenses are "
              "scored over {draws} draws of their randomness: accuracy = mean over draws (the headline), all_draws = "
              "robust in every draw. 'worst case over k attacks' counts the images that survive every adaptive attack "
              "at that radius. adaptive = the attack differentiates through the defense and, for randomized "
              "defenses, uses EOT; gradient = exact, or BPDA (identity backward) through non-differentiable "
              "preprocessors. See docs/evaluation.md.")

CASCADE_NOTE = (" Cascade: per defense and radius the adaptive attacks ran cheapest first, each only on the images "
                "every cheaper one left robust in at least one draw, so an attack's row means robust after it AND "
                "every cheaper attack at that radius; the worst-case row is the same as without the cascade.")


@STEPS.register("evaluate")
def evaluate(ctx: Context, /, attacks: list | None = None, defenses: list | None = None, eps: list | None = None,
             n_samples: int | None = None, batch_size: int = 256, draws: int = 10, checks: bool = True,
             check_images: int = 64, certify: dict | bool | None = None, cascade: bool = False) -> None:
    """Clean and robust accuracy of the model behind each defense under each attack.

    ``defenses``: list of ``{label, preprocessors: [spec, ...]}`` (default: undefended only).
    ``attacks``: list of attack specs (``{name: pgd, eps: 8/255, ..., label: optional}``).
    ``eps``: optional list of radii; every attack then runs at each of them and
    ``robust_vs_eps.png`` plots the curves. ``n_samples``: the first n test images (default: all).
    ``draws``: draws of a randomized defense's randomness per scored image (mean = headline,
    ``all_draws`` beside it). ``checks``: gradient-masking sanity checks, written to the report;
    ``check_images``: at most this many survivors per norm get the stronger re-attack (its cost is
    about 8x the attacked row's per image on a randomized defense: 2x steps, 2 restarts, 2x EOT).
    ``cascade``: per defense and radius run the adaptive attacks cheapest first, each only on the
    images every cheaper one left robust in at least one draw (as AutoAttack does); the worst-case row
    is unchanged, an attack's own row then means "robust after this and every cheaper attack".
    ``certify``: ``true`` or ``{n0, n, alpha, batch_size, radii, predict_n}`` adds randomized-smoothing
    certificates (Cohen et al. 2019) for every defense whose first preprocessor is Gaussian noise, on
    the same images, beside the empirical L2 rows (see :func:`_certify_table` and docs/certify.md).
    See :func:`robustkit.eval.evaluate_defenses` and docs/evaluation.md for the protocol.
    """
    model, data = ctx.require_model("evaluate"), ctx.require_data("evaluate")
    x, y = to_tensors(data.test, max_samples=n_samples)
    ev = evaluate_defenses(model, x, y, defenses, attacks, eps, batch_size=batch_size, seed=ctx.seed,
                           shard=ctx.shard, draws=draws, checks=checks, check_images=check_images,
                           progress=ctx.show_progress, log=ctx.log,
                           cascade=bool(cascade))
    for r in ev.rows:
        key = "clean_accuracy" if r["attack"] == "clean" else f"{r['attack']}/robust_accuracy"
        ctx.report.metrics[f"{r['defense']}/{key}"] = r["accuracy"]
    ctx.report.notes.extend(ev.notes)
    note = TABLE_NOTE.format(n=ev.n, draws=ev.draws)
    if cascade:
        note += CASCADE_NOTE
    ctx.report.add_table("Clean and robust accuracy", ev.table(), note=note)
    if ev.checks:
        ctx.report.add_table("Gradient-masking checks", [c.to_row() for c in ev.checks],
                             note="A warning means the robust accuracy above may be an overestimate.")
    if ctx.is_main:
        for label in ev.defenses():
            path = ctx.out_path(f"robustbench_{slug(label)}.json")
            atomic_write_json(path, robustbench_entry(label, ev.rows, ctx.config, ev.n))
            ctx.report.metrics[f"{label}/robustbench_json"] = path.name
        plot = robust_vs_eps if ev.swept else accuracy_bars
        name = "robust_vs_eps.png" if ev.swept else "accuracy.png"
        ctx.report.figures.append(plot(ev.rows, ctx.out_path(name)).name)
    if certify:
        _certify_table(ctx, model, x, y, defenses, ev.rows, certify_options(certify, "evaluate.certify"))


def _empirical_l2(rows: list[dict], label: str) -> dict[float, tuple[str, float]]:
    """Per L2 radius, the strongest adaptive evidence the evaluation has for ``label``: its
    worst-case row when there is one, else the lowest adaptive L2 attack row."""
    worst: dict[float, tuple[str, float]] = {}
    single: dict[float, tuple[str, float]] = {}
    for r in rows:
        if r["defense"] != label or r.get("norm") != "l2":
            continue
        eps, entry = float(r["eps"]), (str(r["attack"]), float(r["accuracy"]))
        if r.get("kind") == "worst_case":
            worst[eps] = entry
        elif r.get("adaptive") is True and (eps not in single or entry[1] < single[eps][1]):
            single[eps] = entry
    return {**single, **worst}


def _certifiable(defenses: list | None, path: str) -> tuple[list, list[tuple[str, str]]]:
    """The defense specs that are Gaussian smoothing (first preprocessor Gaussian noise) and, for the
    others, ``(label, why not)``; a ConfigError when none is."""
    eligible, skipped = [], []
    for d in parse_defenses(defenses, f"{path}.defenses"):
        try:
            split_smoothing(d.build(path=f"{path}.defenses"))
            eligible.append(d)
        except InputError as e:
            skipped.append((d.label, str(e)))
    if not eligible:
        raise ConfigError("no defense here starts with Gaussian noise, so nothing can be certified; drop "
                          "'certify' or add a gaussian_noise / noise_bilateral defense", f"{path}.certify")
    return eligible, skipped


def _certify_table(ctx: Context, model, x, y, defenses: list | None, rows: list[dict], opts: dict) -> None:
    """Certified L2 accuracy of each noise defense next to the empirical adaptive L2 accuracy the
    evaluation measured at the same radii. Defenses that are not Gaussian smoothing are named in a
    note, not certified."""
    eligible, skipped = _certifiable(defenses, "evaluate")
    ctx.report.notes.extend(f"'{label}' is not certified: {why}" for label, why in skipped)
    radii = opts["radii"]
    if radii is None:
        attacked = sorted({float(r["eps"]) for r in rows if r.get("norm") == "l2"})
        radii = sorted({0.0, *attacked}) if attacked else DEFAULT_RADII
    results, summary, table, empirical = {}, [], [], {}
    for d in eligible:
        res, row = certify_defense(ctx, model, d, x, y, n0=opts["n0"], n=opts["n"], alpha=opts["alpha"],
                                   batch_size=opts["batch_size"], radii=radii, predict_n=opts["predict_n"])
        results[d.label] = res
        summary.append(row)
        emp = empirical[d.label] = _empirical_l2(rows, d.label)
        for r, a in zip(radii, res.certified_accuracy(radii)):
            attack, acc = emp.get(r, ("-", "-"))
            table.append({"defense": d.label, "sigma": res.sigma, "L2 radius": r, "certified": a,
                          "empirical (adaptive)": acc, "from": attack})
    ctx.report.add_table("Certified vs. empirical L2 accuracy", table, note=(
        f"{x.shape[0]} test images. certified = CERTIFY (Cohen et al. 2019; n0={opts['n0']}, n={opts['n']}, "
        f"alpha={opts['alpha']}, abstentions count as wrong): a lower bound, with probability >= 1 - alpha per image, "
        "on the accuracy of the smoothed classifier (majority vote over the noise) under ANY L2 attack of norm < r. "
        "empirical = the adaptive L2 row of the table above at that radius (its worst case when there is one; mean "
        "over draws of single noisy passes): an upper bound on the robust accuracy of one noisy pass. See docs/certify.md."))
    ctx.report.add_table("Certification summary", summary, note=(
        "abstention = CERTIFY abstained (p_A <= 1/2); max radius = the largest radius n draws can certify."))
    if ctx.is_main:
        curves = {label: {"empirical (adaptive)": sorted((r, a) for r, (_, a) in emp.items())}
                  for label, emp in empirical.items()}
        fig = certified_accuracy_plot(results, ctx.out_path("certified_accuracy.png"), curves)
        ctx.report.figures.append(fig.name)


def _validate(params: dict, path: str) -> None:
    validate_evaluation(params.get("defenses"), params.get("attacks"), path)
    eps = params.get("eps")
    if eps is not None:
        if not isinstance(eps, list) or not eps:
            raise ConfigError("must be a non-empty list of radii, e.g. [2/255, 4/255, 8/255]", f"{path}.eps")
        for i, e in enumerate(eps):
            if not parse_number(e, f"{path}.eps[{i}]") >= 0:
                raise ConfigError(f"a radius must be >= 0, got {e!r}", f"{path}.eps[{i}]")
    for key in ("n_samples", "batch_size", "draws", "check_images"):
        if params.get(key) is not None:
            check_int(params[key], f"{path}.{key}", minimum=1, error=ConfigError)
    if "cascade" in params and not isinstance(params["cascade"], bool):
        raise ConfigError(f"expected true or false, got {params['cascade']!r}", f"{path}.cascade")
    if params.get("certify"):
        certify_options(params["certify"], f"{path}.certify")
        _certifiable(params.get("defenses"), path)


evaluate.validate = _validate  # type: ignore[attr-defined]
