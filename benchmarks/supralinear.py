"""The paper's ablation (Stalder et al. 2025, REFERENCES.md section 1): is noise + bilateral
*supralinear*, i.e. better than the sum of its parts?

For each preprocessing - none, noise, bilateral, noise+bilateral, bilateral+noise - and each
training - standard (cross-entropy on preprocessed images) and TRADES (the preprocessor in the
loop with gradients, EOT when randomized: ``robustkit.training.TRADESStep``) - a CNN is trained
WITH that preprocessing and evaluated behind it (``robustkit.eval.evaluate_defenses``): clean
accuracy, PGD and EOT-PGD at an Linf radius (8/255) and an L2 radius (0.5), optionally AutoAttack
``rand`` (``--autoattack``; reported as reduced when its budget is), and per radius the *worst case
per example* over the adaptive attacks. The gain of a defense is its worst-case robust accuracy
minus the undefended model's (same training); the combination is supralinear when
gain(noise+bilateral) > gain(noise) + gain(bilateral). The paper's CIFAR-10 ablation (standard
CNN, clean / Linf PGD / EoT) is printed beside ours: baseline 74.5 / 0.2 / 0.2, noise+bilateral
67.9 / 36.5 / 18.9, bilateral+noise 67.5 / 28.1 / 15.1.

Uncertainty: every accuracy comes with its binomial standard error sqrt(p (1 - p) / n) over the
n attacked test images. The supralinearity margin ``gain(nb) - gain(n) - gain(b)`` =
``A(nb) - A(n) - A(b) + A(none)`` gets two errors: (1) ``independent``: the root of the four
binomial variances, as if the four accuracies came from different images; (2) ``paired``
(the verdict's): the four networks are attacked on the *same* test images, so per image
``m_i = r_nb,i - r_n,i - r_b,i + r_none,i`` (r = the image's worst-case robust flag, averaged over
noise draws) and the margin is ``mean(m_i)``; its error is a bootstrap over test images that
resamples the same image indices for all four defenses (:func:`paired_bootstrap`; also its 95 %
percentile interval). Neither error covers training randomness (one seed per network). The
verdict says "supralinear" only when the margin exceeds 2 paired standard errors,
"sub-additive" when it is below -2 SE, "additive within error" otherwise.

The per-image flags come from :func:`evaluate_per_image`, which runs the same attacks in the same
way as ``robustkit.eval.evaluate_defenses(cascade=False, checks=False)`` (worst case per image
over the adaptive attacks of a radius) but keeps each image's flags, which ``evaluate_defenses``'
rows do not expose.

A run can be split across processes by defense (``--defenses none,noise,bilateral`` in one,
``--defenses noise+bilateral,bilateral+noise`` in the other, both writing their own ``--out``)
and merged: ``--merge A.json B.json --out ALL.json`` recomputes the tests and the plot. The
``.partial.json`` file written after every row carries the same setup, so the finished rows of an
interrupted run can be merged too.

    python benchmarks/supralinear.py --quick                       # digits, standard training, minutes
    # the CPU-sized main run of docs/supralinear.md (two single-threaded processes, then a merge):
    python benchmarks/supralinear.py --data ../shared/data/cifar10_subset.npz --threads 1 --width 32 \\
        --epochs 8 --training standard,trades --trades-init standard --trades-epochs 2 --trades-steps 4 \\
        --trades-alpha 0.0098 --trades-eot 1 --trades-lr 0.01 --n-test 256 --n-clean 512 --draws 2 \\
        --pgd-steps 20 --eot-steps 10 --eot 4 --l2-eot 2 --autoattack --aa-n-iter 10 --aa-eot-iter 2 \\
        --defenses none,noise,bilateral --out benchmarks/results/supralinear_w32_a.json
    #   (this is the docs' run; it was stopped after its standard-training rows, out of wall-clock time)
    #   ... the same with --defenses noise+bilateral,bilateral+noise --out .../supralinear_w32_b.json, then
    python benchmarks/supralinear.py --merge benchmarks/results/supralinear_w32_a.json \\
        benchmarks/results/supralinear_w32_b.json --out benchmarks/results/supralinear_w32.json
    # the earlier, smaller run (width 16, 5 epochs, 200 images):
    python benchmarks/supralinear.py --data ../shared/data/cifar10_subset.npz --threads 1 --width 16 \\
        --epochs 5 --training standard,trades --trades-init standard --trades-epochs 1 --trades-steps 3 \\
        --trades-eot 1 --n-test 200 --draws 1 --pgd-steps 20 --eot-steps 10 --eot 4 \\
        --autoattack --aa-n-iter 10 --aa-eot-iter 4
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NOISE = {"name": "gaussian_noise", "sigma": 0.1}
BILATERAL = {"name": "bilateral", "kernel_size": 5, "sigma_color": 0.1, "sigma_space": 1.5, "iterations": 2,
             "train_iterations": 1}
DEFENSES = {
    "none": [],
    "noise": [NOISE],
    "bilateral": [BILATERAL],
    "noise+bilateral": [NOISE, BILATERAL],
    "bilateral+noise": [BILATERAL, NOISE],
}
PAPER = {  # CIFAR-10, standard CNN: clean / Linf PGD / EoT (REFERENCES.md section 1)
    "none": (74.5, 0.2, 0.2), "noise+bilateral": (67.9, 36.5, 18.9), "bilateral+noise": (67.5, 28.1, 15.1),
}


def plot(result: dict, path: Path) -> None:
    """Bars per defense (one panel per training): clean, PGD, EOT-PGD, AutoAttack rand, worst case per
    example (Linf, L2); error bars are 1 binomial SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustkit.eval.report import save_figure

    rows = result["rows"]
    trainings = list(dict.fromkeys(r["training"] for r in rows))
    aa = "AA-rand" + (" (reduced)" if result.get("autoattack_budget") not in (None, "published") else "")
    fig, axes = plt.subplots(1, len(trainings), figsize=(7 * len(trainings), 3.8), squeeze=False)
    for ax, training in zip(axes[0], trainings):
        sub = [r for r in rows if r["training"] == training]
        keys = [("clean", "clean"), ("pgd_linf", "PGD-Linf"), ("eot_pgd_linf", "EOT-PGD-Linf"), ("autoattack_rand", aa),
                ("worst_linf", "worst Linf"), ("worst_l2", "worst L2")]
        keys = [(k, lab) for k, lab in keys if all(r.get(k) is not None for r in sub)]
        w = 0.8 / len(keys)
        for j, (k, lab) in enumerate(keys):
            ax.bar([i + (j - (len(keys) - 1) / 2) * w for i in range(len(sub))], [100 * r[k] for r in sub], w, label=lab,
                   yerr=[100 * r["se"][k] for r in sub], capsize=2, error_kw={"lw": 0.6})
        ax.set_xticks(range(len(sub)))
        ax.set_xticklabels([r["defense"] for r in sub], fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        extra = (f", TRADES warm-started, {result['trades']['epochs']} ep." if training == "trades" and
                 result.get("trades", {}).get("init") == "standard" else "")
        ax.set_title(f"{result['data']}, {result['model']} w{result.get('width')}, {training} training{extra}\n"
                     f"Linf {result['eps_linf']} / L2 {result['eps_l2']}, n={result['n_test']} (bars: 1 SE)", fontsize=8)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` measured on ``n`` images."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def supralinearity(none: float, a: float, b: float, both: float, n: int, z: float = 2.0) -> tuple[float, float, str]:
    """The supralinearity test on accuracies measured on ``n`` images each.

    ``margin = gain(both) - gain(a) - gain(b)`` with ``gain(d) = acc(d) - acc(none)``, i.e.
    ``both - a - b + none``; its standard error is the root of the summed binomial variances
    (independent-models approximation). Verdict: ``"supralinear"`` when ``margin > z * se``,
    ``"sub-additive"`` when ``margin < -z * se``, else ``"additive within error"``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    for v in (none, a, b, both):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"accuracies must lie in [0, 1], got {v!r}")
    margin = both - a - b + none
    se = math.sqrt(sum(_se(v, n) ** 2 for v in (none, a, b, both)))
    verdict = "supralinear" if margin > z * se else "sub-additive" if margin < -z * se else "additive within error"
    return margin, se, verdict


def paired_bootstrap(none, a, b, both, reps: int = 4000, seed: int = 0, z: float = 2.0) -> dict:
    """The supralinearity margin and its *paired* uncertainty from per-image robust flags.

    ``none``, ``a``, ``b``, ``both``: per test image, its robust flag (or the fraction of noise draws
    in which it was robust) behind each defense, all on the same images in the same order. Per image
    ``m_i = both_i - a_i - b_i + none_i``; the margin is ``mean(m_i)`` (equal to
    :func:`supralinearity`'s margin on the mean accuracies). The bootstrap draws ``reps`` samples of
    n image indices with replacement - the *same* indices for all four defenses, so the correlation
    between the four networks' results on an image is kept - and returns the standard deviation of
    the resampled margins (``se``), their 2.5 / 97.5 percentiles (``ci95``), the plug-in paired error
    ``sd(m_i) / sqrt(n)`` (``se_formula``, population sd: what the bootstrap SE converges to) and the
    verdict of :func:`supralinearity` with ``se``.
    """
    arrs = [np.asarray(v, dtype=np.float64).reshape(-1) for v in (none, a, b, both)]
    n = arrs[0].size
    if n < 1 or any(v.size != n for v in arrs):
        raise ValueError(f"the four per-image arrays must be non-empty and of equal length, got {[v.size for v in arrs]}")
    if any(((v < 0) | (v > 1) | ~np.isfinite(v)).any() for v in arrs):
        raise ValueError("per-image robust flags must lie in [0, 1]")
    if not isinstance(reps, int) or isinstance(reps, bool) or reps < 2:
        raise ValueError(f"reps must be an integer >= 2, got {reps!r}")
    m = arrs[3] - arrs[1] - arrs[2] + arrs[0]
    rng = np.random.default_rng(seed)
    boots = np.empty(reps)
    for start in range(0, reps, 500):  # bounded memory: 500 x n indices at a time
        stop = min(reps, start + 500)
        boots[start:stop] = m[rng.integers(0, n, size=(stop - start, n))].mean(1)
    margin = float(m.mean())
    se = float(boots.std(ddof=1))
    verdict = "supralinear" if margin > z * se else "sub-additive" if margin < -z * se else "additive within error"
    return {"margin": margin, "se": se, "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "se_formula": float(m.std(ddof=0) / math.sqrt(n)), "n": int(n), "reps": reps, "verdict": verdict}


def evaluate_per_image(model, x, y, specs, attacks, *, draws: int, seed: int, n_clean_x=None, n_clean_y=None) -> dict:
    """Clean and robust accuracy of ``model`` behind the preprocessors ``specs``, keeping per-image flags.

    The same protocol as ``robustkit.eval.evaluate_defenses(..., cascade=False, checks=False)``: the
    model wrapped behind the preprocessors (BPDA where one is not differentiable), every attack run on
    every image with ``robust_accuracy`` (batch b seeded ``seed + b``; a randomized defense scored over
    ``draws`` noise draws, an image's flag = the fraction of draws in which it was robust), EOT dropped
    on a deterministic defense (same gradient every pass), and per radius the *worst case per image*
    = its minimum flag over the adaptive attacks (EOT attacks; every attack on a deterministic defense).
    Clean accuracy is measured on ``n_clean_x`` / ``n_clean_y`` when given (more images: it is cheap).
    """
    from robustkit.attacks.bpda import with_bpda
    from robustkit.eval import robust_accuracy
    from robustkit.registry import ATTACKS
    from robustkit.wrap import build_preprocessor, wrap

    device = next(model.parameters()).device
    defended = wrap(model, *[build_preprocessor(s).to(device) for s in specs])
    if not defended.differentiable:
        defended = with_bpda(defended)
    run = dict(batch_size=256, progress=False, seed=seed, draws=draws)
    cx, cy = (x, y) if n_clean_x is None else (n_clean_x, n_clean_y)
    clean = robust_accuracy(defended, None, cx, cy, **run)
    out = {"clean": clean.clean_accuracy, "n_clean": int(cx.shape[0]), "attacks": {}, "per_image": {}, "notes": [],
           "seconds": {"clean": clean.seconds}}
    worst: dict[str, torch.Tensor] = {}
    for spec in attacks:
        spec = dict(spec)
        label = spec.pop("label")
        if spec["name"] == "pgd" and not defended.randomized:
            spec.pop("early_stop", None)  # deterministic: stopping a broken image early changes nothing
        attack = ATTACKS.build(spec)
        if not defended.randomized and attack.eot_samples > 1:
            attack = attack.with_options(eot_samples=1)
        adaptive = (not defended.randomized) or attack.eot_samples > 1
        res = robust_accuracy(defended, attack, x, y, **run)
        out["attacks"][label] = {"accuracy": res.robust_accuracy, "adaptive": adaptive, "norm": attack.norm,
                                 "settings": attack.describe()}
        out["seconds"][label] = res.seconds
        out["per_image"][label] = [round(float(v), 4) for v in res.robust_frac]
        if adaptive:
            worst[attack.norm] = res.robust_frac if attack.norm not in worst else torch.minimum(worst[attack.norm], res.robust_frac)
        else:
            out["notes"].append(f"'{label}' averages no gradients over the defense's randomness (no EOT): an upper bound")
        if attack.reduced:
            out["notes"].append(f"'{label}' ran with a reduced budget ({attack.describe()}): weaker than the published attack")
    for norm, frac in worst.items():
        out["attacks"][f"worst_{norm}"] = {"accuracy": float(frac.mean()), "adaptive": True, "norm": norm}
        out["per_image"][f"worst_{norm}"] = [round(float(v), 4) for v in frac]
    return out


def analyse(rows: list[dict], per_image: dict, trainings: list[str], n_test: int, reps: int = 4000) -> dict:
    """The supralinearity tests (both combinations, both norms, every training) on complete rows."""
    verdicts = {}
    for training in trainings:
        by = {r["defense"]: r for r in rows if r["training"] == training}
        for norm in ("linf", "l2"):
            key = f"worst_{norm}"
            if not {"none", "noise", "bilateral"} <= set(by) or by["none"].get(key) is None:
                continue
            gain = {k: by[k][key] - by["none"][key] for k in by}
            gain_se = {k: math.hypot(by[k]["se"][key], by["none"]["se"][key]) for k in by}
            for combo in [c for c in ("noise+bilateral", "bilateral+noise") if c in by]:
                acc = {k: by[k][key] for k in ("none", "noise", "bilateral", combo)}
                margin, ind_se, ind_verdict = supralinearity(acc["none"], acc["noise"], acc["bilateral"], acc[combo], n_test)
                flags = [per_image.get(f"{training}/{k}", {}).get(key) for k in ("none", "noise", "bilateral", combo)]
                paired = paired_bootstrap(*flags, reps=reps) if all(f is not None for f in flags) else None
                verdict = paired["verdict"] if paired else ind_verdict
                se = paired["se"] if paired else ind_se
                text = (f"{training}, {norm}: gain noise {100 * gain['noise']:+.1f}, bilateral {100 * gain['bilateral']:+.1f}, "
                        f"{combo} {100 * gain[combo]:+.1f} vs sum of parts {100 * (gain['noise'] + gain['bilateral']):+.1f}: "
                        f"margin {100 * margin:+.1f} +- {100 * se:.1f} ({'paired bootstrap' if paired else 'independent'} SE"
                        + (f"; 95% CI {100 * paired['ci95'][0]:+.1f} .. {100 * paired['ci95'][1]:+.1f}; independent SE "
                           f"{100 * ind_se:.1f}" if paired else "") + f") -> {verdict}")
                verdicts[f"{training}/{norm}/{combo}"] = {
                    "training": training, "norm": norm, "combination": combo, "gain": gain, "gain_se": gain_se,
                    "margin": margin, "margin_se": se, "margin_se_independent": ind_se, "paired": paired,
                    "verdict": verdict, "supralinear": verdict == "supralinear", "text": text}
                print(text)
    return verdicts


def finish(result: dict, out: Path) -> None:
    """Tests, table, JSON and plot of a complete (or merged) result."""
    rows = result["rows"]
    trainings = list(dict.fromkeys(r["training"] for r in rows))
    result["verdicts"] = analyse(rows, result.get("per_image", {}), trainings, result["n_test"])
    print("\npaper (CIFAR-10, standard CNN, clean / PGD / EoT):",
          "; ".join(f"{k} {c}/{p_}/{e}" for k, (c, p_, e) in PAPER.items()))
    _common.print_table([{k: v for k, v in r.items() if v is not None and k not in ("se", "notes", "attack_s")} for r in rows])
    _common.write_json(out, result)
    plot(json.loads(out.read_text()), out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def merge(paths: list[str], out: Path) -> int:
    """Combine result files of the same setup run on different defenses (or trainings)."""
    parts = [json.loads(Path(q).read_text()) for q in paths]
    same = ("data", "n_train", "n_test", "epochs", "model", "width", "eps_linf", "eps_l2", "trades", "noise", "bilateral")
    for q, part in zip(paths[1:], parts[1:]):
        diff = [k for k in same if part.get(k) != parts[0].get(k)]
        if diff:
            raise SystemExit(f"{q}: setup differs from {paths[0]} in {diff}; cannot merge")
    result = dict(parts[0])
    seen = set()
    result["rows"], result["per_image"], result["evaluation_rows"], result["load_average"] = [], {}, [], []
    result["merged_from"] = [str(q) for q in paths]
    for part in parts:
        for r in part["rows"]:
            k = (r["training"], r["defense"])
            if k in seen:
                raise SystemExit(f"{k} appears in more than one file; cannot merge")
            seen.add(k)
            result["rows"].append(r)
        result["per_image"].update(part.get("per_image", {}))
        result["evaluation_rows"] += part.get("evaluation_rows", [])
        result["load_average"].append(part.get("load_average"))
    order = list(DEFENSES)
    result["rows"].sort(key=lambda r: (r["training"] != "standard", order.index(r["defense"])))
    finish(result, out)
    return 0


def main(argv=None) -> int:
    p = _common.parser(__doc__, "benchmarks/results/supralinear.json", "fewer epochs and test images")
    _common.add_data_option(p)
    p.add_argument("--training", default="standard", help="comma-separated: standard, trades (default standard)")
    p.add_argument("--eps", default="8/255", help="Linf radius (default 8/255)")
    p.add_argument("--l2-eps", default="0.5", help="L2 radius (default 0.5; 0 skips L2)")
    p.add_argument("--model", default="small_cnn", help="registered model (default small_cnn)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=None, help="default 10 (5 with --quick)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default: all)")
    p.add_argument("--n-test", type=int, default=None, help="test images attacked (default 450, 200 with --quick)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, cosine schedule (default 0.05)")
    p.add_argument("--trades-steps", type=int, default=10)
    p.add_argument("--trades-eot", type=int, default=2, help="EOT passes of the TRADES attack for randomized defenses")
    p.add_argument("--trades-alpha", default=None,
                   help="TRADES attack step (default: TRADESStep's 0.007 at 8/255; with few steps raise it, e.g. "
                        "2.5 * eps / steps, or the attack never reaches the ball's edge)")
    p.add_argument("--trades-epochs", type=int, default=None, help="TRADES epochs (default: --epochs)")
    p.add_argument("--trades-lr", type=float, default=None, help="TRADES learning rate (default: --lr)")
    p.add_argument("--trades-init", default="scratch", choices=("scratch", "standard"),
                   help="TRADES from a fresh network (the paper) or warm-started from this run's standard-trained "
                        "network with the same preprocessing (cheaper; needs 'standard' in --training)")
    p.add_argument("--eot", type=int, default=None, help="EOT passes of the evaluation attacks (default 8, 4 quick)")
    p.add_argument("--pgd-steps", type=int, default=10, help="steps of the PGD rows (default 10)")
    p.add_argument("--eot-steps", type=int, default=None, help="steps of the EOT-PGD rows (default: --pgd-steps)")
    p.add_argument("--draws", type=int, default=4, help="draws of a randomized defense's noise per evaluation (default 4)")
    p.add_argument("--autoattack", action="store_true", help="also AutoAttack version='rand' (slow)")
    p.add_argument("--aa-n-iter", type=int, default=None, help="AutoAttack APGD iterations (default: published 100; "
                                                                "fewer is a reduced, labelled run)")
    p.add_argument("--aa-eot-iter", type=int, default=None, help="AutoAttack rand EOT draws (default: published 20)")
    p.add_argument("--defenses", default=",".join(DEFENSES), help="comma-separated subset of " + ", ".join(DEFENSES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-clean", type=int, default=None, help="test images for clean accuracy (default: --n-test)")
    p.add_argument("--l2-eot", type=int, default=None, help="EOT passes of the L2 EOT-PGD row (default: --eot)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw the plot of an earlier result file")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge result files of the same setup run on different --defenses into --out")
    args = p.parse_args(argv)
    _common.setup(args)
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.replot:
        src = Path(args.replot)
        plot(json.loads(src.read_text()), src.with_suffix(".png"))
        print(f"wrote {src.with_suffix('.png')}")
        return 0

    import robustkit
    from robustkit.data import digits, to_tensors
    from robustkit.data.npz import load_npz
    from robustkit.registry import parse_number
    from robustkit.training import TRADESStep, fit
    from robustkit.training.steps import PlainStep
    from robustkit.wrap import build_preprocessor

    eps, l2 = parse_number(args.eps), parse_number(args.l2_eps)
    trainings = [t.strip() for t in args.training.split(",") if t.strip()]
    bad = [t for t in trainings if t not in ("standard", "trades")]
    if bad:
        p.error(f"unknown training {bad}; use standard, trades")
    defenses = [d.strip() for d in args.defenses.split(",") if d.strip()]
    if not defenses or any(d not in DEFENSES for d in defenses):
        p.error(f"--defenses must name only {', '.join(DEFENSES)} (a run without none is a part for --merge)")
    trades_alpha = None if args.trades_alpha is None else parse_number(args.trades_alpha)
    if args.trades_init == "standard":
        if "standard" not in trainings:
            p.error("--trades-init standard needs 'standard' in --training")
        trainings = ["standard"] + [t for t in trainings if t != "standard"]
    data = load_npz(args.data) if args.data else digits(size=32)
    data_name = "CIFAR-10 subset" if args.data else "digits 32x32"
    epochs = args.epochs or (5 if args.quick else 10)
    n_test = args.n_test or (200 if args.quick else 450)
    eot = args.eot or (4 if args.quick else 8)
    device = torch.device(args.device)
    train = data.train if args.n_train is None else torch.utils.data.Subset(data.train, range(args.n_train))
    x, y = to_tensors(data.test, max_samples=n_test)
    n_clean = args.n_clean or n_test
    cx, cy = to_tensors(data.test, max_samples=n_clean)
    eot_steps = args.eot_steps or args.pgd_steps
    # no per-example early stop on a randomized defense (it raised robust accuracy by 0.3-2.6 points there)
    attacks = [{"name": "pgd", "norm": "linf", "eps": eps, "steps": args.pgd_steps, "early_stop": False, "label": "PGD-Linf"},
               {"name": "pgd", "norm": "linf", "eps": eps, "steps": eot_steps, "eot_samples": eot, "early_stop": False,
                "label": "EOT-PGD-Linf"}]
    if l2 > 0:
        attacks += [{"name": "pgd", "norm": "l2", "eps": l2, "steps": eot_steps, "eot_samples": args.l2_eot or eot,
                     "early_stop": False, "label": "EOT-PGD-L2"}]
    aa_budget = {k: v for k, v in (("n_iter", args.aa_n_iter), ("eot_iter", args.aa_eot_iter)) if v is not None}
    if args.autoattack:
        attacks += [{"name": "autoattack", "norm": "linf", "eps": eps, "version": "rand", **aa_budget,
                     "label": "AutoAttack-rand-Linf"}]
    trades_epochs = args.trades_epochs or epochs
    trades_lr = args.trades_lr or args.lr
    standard_states: dict[str, dict] = {}

    meta = {"machine": _common.machine_info(), "data": data_name, "n_train": len(train),
            "n_test": n_test, "n_clean": n_clean, "epochs": epochs, "model": args.model, "width": args.width,
            "eps_linf": args.eps, "eps_l2": args.l2_eps, "eot_samples": eot, "l2_eot_samples": args.l2_eot or eot,
            "pgd_steps": args.pgd_steps, "eot_steps": eot_steps, "draws": args.draws, "early_stop": False,
            "trades": {"init": args.trades_init, "epochs": trades_epochs, "lr": trades_lr, "steps": args.trades_steps,
                       "alpha": args.trades_alpha, "eot_samples": args.trades_eot, "beta": 6.0},
            "autoattack_budget": aa_budget or "published", "quick": args.quick, "noise": NOISE, "bilateral": BILATERAL,
            "paper_cifar10": PAPER}
    rows, all_rows, per_image = [], [], {}
    print(f"{data_name}: {len(train)} train / {n_test} attacked test images, {args.model}, {epochs} epochs")
    for training in trainings:
        for name in defenses:
            specs = DEFENSES[name]
            torch.manual_seed(args.seed)
            model = robustkit.MODELS.build({"name": args.model, "in_channels": data.channels, "num_classes": data.num_classes,
                                            **({"width": args.width} if "width" in robustkit.MODELS.parameters(args.model) else {})}).to(device)
            pre = torch.nn.Sequential(*[build_preprocessor(s) for s in specs]).to(device)
            pre_or_none = pre if len(pre) else None
            step = (PlainStep(preprocess=pre_or_none) if training == "standard" else
                    TRADESStep(eps=eps, steps=args.trades_steps, alpha=trades_alpha, preprocess=pre_or_none,
                               eot_samples=args.trades_eot))
            if training == "trades" and args.trades_init == "standard":
                model.load_state_dict(standard_states[name])
            t0 = time.perf_counter()
            fit(model, train, step, epochs=epochs if training == "standard" else trades_epochs,
                lr=args.lr if training == "standard" else trades_lr, progress=False, seed=args.seed)
            t_train = time.perf_counter() - t0
            if training == "standard":
                standard_states[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            ev = evaluate_per_image(model, x, y, specs, attacks, draws=args.draws, seed=args.seed, n_clean_x=cx, n_clean_y=cy)
            acc = {k: v["accuracy"] for k, v in ev["attacks"].items()}
            row = {"training": training, "defense": name, "clean": ev["clean"], "n_clean": n_clean,
                   "pgd_linf": acc.get("PGD-Linf"), "eot_pgd_linf": acc.get("EOT-PGD-Linf"),
                   "eot_pgd_l2": acc.get("EOT-PGD-L2"), "autoattack_rand": acc.get("AutoAttack-rand-Linf"),
                   "worst_linf": acc.get("worst_linf"), "worst_l2": acc.get("worst_l2"),
                   "train_s": t_train, "eval_s": time.perf_counter() - t0 - t_train, "attack_s": ev["seconds"]}
            row["se"] = {k: _se(row[k], n_clean if k == "clean" else n_test)
                         for k in ("clean", "pgd_linf", "eot_pgd_linf", "eot_pgd_l2", "autoattack_rand", "worst_linf",
                                   "worst_l2") if row[k] is not None}
            row["notes"] = ev["notes"]
            rows.append(row)
            per_image[f"{training}/{name}"] = ev["per_image"]
            all_rows.append({"training": training, "defense": name, "attacks": ev["attacks"]})
            # self-describing, so that an interrupted run's finished rows can still be --merge'd
            _common.write_json(Path(args.out).with_suffix(".partial.json"),
                               {"load_average": os.getloadavg(), **meta, "rows": rows, "per_image": per_image,
                                "evaluation_rows": all_rows, "partial": True})
            print(f"{training:8} {name:16} clean {100 * row['clean']:5.1f}  worst Linf {100 * (row['worst_linf'] or 0):5.1f}"
                  + (f"  worst L2 {100 * row['worst_l2']:5.1f}" if row["worst_l2"] is not None else "")
                  + f"  ({row['train_s']:.0f} s train, {row['eval_s']:.0f} s eval)", flush=True)

    out = Path(args.out)
    result = {"load_average": os.getloadavg(), **meta, "rows": rows, "per_image": per_image, "evaluation_rows": all_rows}
    finish(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
