"""``evaluate``: clean and robust accuracy of the model behind each defense under each attack."""

from __future__ import annotations


from ...io import atomic_write_json
from ...data import to_tensors
from ...eval.plots import accuracy_bars, robust_vs_eps
from ...eval.robust import evaluate_defenses, validate_evaluation
from ...eval.robustbench import robustbench_entry, slug
from ...errors import ConfigError
from ...registry import STEPS, parse_number
from ...validation import check_int
from ..context import Context

TABLE_NOTE = ("{n} test images. Robust = correct on the clean and on the attacked image. Randomized defenses are "
              "scored over {draws} draws of their randomness: accuracy = mean over draws (the headline), all_draws = "
              "robust in every draw. 'worst case over k attacks' counts the images that survive every adaptive attack "
              "at that radius. adaptive = the attack differentiates through the defense and, for randomized "
              "defenses, uses EOT; gradient = exact, or BPDA (identity backward) through non-differentiable "
              "preprocessors. See docs/evaluation.md.")


@STEPS.register("evaluate")
def evaluate(ctx: Context, /, attacks: list | None = None, defenses: list | None = None, eps: list | None = None,
             n_samples: int | None = None, batch_size: int = 256, draws: int = 10, checks: bool = True) -> None:
    """Clean and robust accuracy of the model behind each defense under each attack.

    ``defenses``: list of ``{label, preprocessors: [spec, ...]}`` (default: undefended only).
    ``attacks``: list of attack specs (``{name: pgd, eps: 8/255, ..., label: optional}``).
    ``eps``: optional list of radii; every attack then runs at each of them and
    ``robust_vs_eps.png`` plots the curves. ``n_samples``: the first n test images (default: all).
    ``draws``: draws of a randomized defense's randomness per scored image (mean = headline,
    ``all_draws`` beside it). ``checks``: gradient-masking sanity checks, written to the report.
    See :func:`robustkit.eval.evaluate_defenses` and docs/evaluation.md for the protocol.
    """
    model, data = ctx.require_model("evaluate"), ctx.require_data("evaluate")
    x, y = to_tensors(data.test, max_samples=n_samples)
    ev = evaluate_defenses(model, x, y, defenses, attacks, eps, batch_size=batch_size, seed=ctx.seed,
                           shard=ctx.shard, draws=draws, checks=checks, progress=ctx.show_progress, log=ctx.log)
    for r in ev.rows:
        key = "clean_accuracy" if r["attack"] == "clean" else f"{r['attack']}/robust_accuracy"
        ctx.report.metrics[f"{r['defense']}/{key}"] = r["accuracy"]
    ctx.report.notes.extend(ev.notes)
    ctx.report.add_table("Clean and robust accuracy", ev.table(), note=TABLE_NOTE.format(n=ev.n, draws=ev.draws))
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


def _validate(params: dict, path: str) -> None:
    validate_evaluation(params.get("defenses"), params.get("attacks"), path)
    eps = params.get("eps")
    if eps is not None:
        if not isinstance(eps, list) or not eps:
            raise ConfigError("must be a non-empty list of radii, e.g. [2/255, 4/255, 8/255]", f"{path}.eps")
        for i, e in enumerate(eps):
            if not parse_number(e, f"{path}.eps[{i}]") >= 0:
                raise ConfigError(f"a radius must be >= 0, got {e!r}", f"{path}.eps[{i}]")
    for key in ("n_samples", "batch_size", "draws"):
        if params.get(key) is not None:
            check_int(params[key], f"{path}.{key}", minimum=1, error=ConfigError)


evaluate.validate = _validate  # type: ignore[attr-defined]
