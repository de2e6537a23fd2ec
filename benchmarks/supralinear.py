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
n attacked test images; the supralinearity margin ``gain(nb) - gain(n) - gain(b)`` =
``A(nb) - A(n) - A(b) + A(none)`` gets sqrt of the sum of the four variances (the four models are
trained separately; the shared test images make this an approximation, not an exact paired
error). The verdict says "supralinear" only when the margin exceeds 2 standard errors,
"sub-additive" when it is below -2 SE, "additive within error" otherwise.

    python benchmarks/supralinear.py --quick                       # digits, standard training, minutes
    python benchmarks/supralinear.py --data ../shared/data/cifar10_subset.npz --training standard,trades \\
        --epochs 15 --n-test 512 --autoattack                       # CIFAR-10 subset (hours on 2 cores)
    # the CPU-sized run of docs/supralinear.md (about 40 CPU-minutes on one core):
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
    p.add_argument("--trades-alpha", type=float, default=None,
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
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw the plot of an earlier result file")
    args = p.parse_args(argv)
    _common.setup(args)
    if args.replot:
        src = Path(args.replot)
        plot(json.loads(src.read_text()), src.with_suffix(".png"))
        print(f"wrote {src.with_suffix('.png')}")
        return 0

    import robustkit
    from robustkit.data import digits, to_tensors
    from robustkit.data.npz import load_npz
    from robustkit.eval.robust import evaluate_defenses
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
    if any(d not in DEFENSES for d in defenses) or "none" not in defenses:
        p.error(f"--defenses must include none and name only {', '.join(DEFENSES)}")
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
    eot_steps = args.eot_steps or args.pgd_steps
    attacks = [{"name": "pgd", "norm": "linf", "eps": eps, "steps": args.pgd_steps, "label": "PGD-Linf"},
               {"name": "pgd", "norm": "linf", "eps": eps, "steps": eot_steps, "eot_samples": eot, "label": "EOT-PGD-Linf"}]
    if l2 > 0:
        attacks += [{"name": "pgd", "norm": "l2", "eps": l2, "steps": args.pgd_steps, "label": "PGD-L2"},
                    {"name": "pgd", "norm": "l2", "eps": l2, "steps": eot_steps, "eot_samples": eot, "label": "EOT-PGD-L2"}]
    aa_budget = {k: v for k, v in (("n_iter", args.aa_n_iter), ("eot_iter", args.aa_eot_iter)) if v is not None}
    if args.autoattack:
        attacks += [{"name": "autoattack", "norm": "linf", "eps": eps, "version": "rand", **aa_budget,
                     "label": "AutoAttack-rand-Linf"}]
    trades_epochs = args.trades_epochs or epochs
    trades_lr = args.trades_lr or args.lr
    standard_states: dict[str, dict] = {}

    rows, all_rows = [], []
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
                    TRADESStep(eps=eps, steps=args.trades_steps, alpha=args.trades_alpha, preprocess=pre_or_none,
                               eot_samples=args.trades_eot))
            if training == "trades" and args.trades_init == "standard":
                model.load_state_dict(standard_states[name])
            t0 = time.perf_counter()
            fit(model, train, step, epochs=epochs if training == "standard" else trades_epochs,
                lr=args.lr if training == "standard" else trades_lr, progress=False, seed=args.seed)
            t_train = time.perf_counter() - t0
            if training == "standard":
                standard_states[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            ev = evaluate_defenses(model, x, y, defenses=[{"label": name, "preprocessors": specs}], attacks=attacks,
                                   draws=args.draws, checks=False, progress=False, seed=args.seed)
            by_attack = {r["attack"]: r["accuracy"] for r in ev.rows}
            worst = {r["norm"]: r["accuracy"] for r in ev.rows if r.get("kind") == "worst_case"}
            row = {"training": training, "defense": name, "clean": by_attack["clean"],
                   "pgd_linf": by_attack.get("PGD-Linf"), "eot_pgd_linf": by_attack.get("EOT-PGD-Linf"),
                   "pgd_l2": by_attack.get("PGD-L2"), "eot_pgd_l2": by_attack.get("EOT-PGD-L2"),
                   "autoattack_rand": by_attack.get("AutoAttack-rand-Linf"),
                   "worst_linf": worst.get("linf"), "worst_l2": worst.get("l2"),
                   "train_s": t_train, "eval_s": time.perf_counter() - t0 - t_train}
            row["se"] = {k: _se(row[k], n_test) for k in ("clean", "pgd_linf", "eot_pgd_linf", "pgd_l2", "eot_pgd_l2",
                                                            "autoattack_rand", "worst_linf", "worst_l2") if row[k] is not None}
            row["notes"] = list(ev.notes)
            rows.append(row)
            all_rows += [{"training": training, **r} for r in ev.table()]
            _common.write_json(Path(args.out).with_suffix(".partial.json"), {"rows": rows, "argv_note": "partial"})
            print(f"{training:8} {name:16} clean {100 * row['clean']:5.1f}  worst Linf {100 * (row['worst_linf'] or 0):5.1f}"
                  + (f"  worst L2 {100 * row['worst_l2']:5.1f}" if row["worst_l2"] is not None else "")
                  + f"  ({row['train_s']:.0f} s train, {row['eval_s']:.0f} s eval)", flush=True)

    verdicts = {}
    for training in trainings:
        by = {r["defense"]: r for r in rows if r["training"] == training}
        for norm in ("linf", "l2"):
            key = f"worst_{norm}"
            if by["none"][key] is None or not {"noise", "bilateral", "noise+bilateral"} <= set(by):
                continue
            gain = {k: by[k][key] - by["none"][key] for k in by}
            gain_se = {k: math.hypot(by[k]["se"][key], by["none"]["se"][key]) for k in by}
            combos = [c for c in ("noise+bilateral", "bilateral+noise") if c in by]
            for combo in combos:
                acc = {k: by[k][key] for k in ("none", "noise", "bilateral", combo)}
                margin, margin_se, verdict = supralinearity(acc["none"], acc["noise"], acc["bilateral"], acc[combo], n_test)
                verdicts[f"{training}/{norm}/{combo}"] = {
                    "training": training, "norm": norm, "combination": combo, "gain": gain, "gain_se": gain_se,
                    "margin": margin, "margin_se": margin_se, "verdict": verdict, "supralinear": verdict == "supralinear",
                    "text": (f"{training}, {norm}: gain noise {100 * gain['noise']:+.1f}, bilateral {100 * gain['bilateral']:+.1f}, "
                             f"{combo} {100 * gain[combo]:+.1f} vs sum of parts {100 * (gain['noise'] + gain['bilateral']):+.1f}: "
                             f"margin {100 * margin:+.1f} +- {100 * margin_se:.1f} (1 SE) -> {verdict}")}
                print(verdicts[f"{training}/{norm}/{combo}"]["text"])
    print("\npaper (CIFAR-10, standard CNN, clean / PGD / EoT):",
          "; ".join(f"{k} {c}/{p_}/{e}" for k, (c, p_, e) in PAPER.items()))
    _common.print_table([{k: v for k, v in r.items() if v is not None and k not in ("se", "notes")} for r in rows])

    out = Path(args.out)
    _common.write_json(out, {"load_average": os.getloadavg(), "data": data_name, "n_train": len(train), "n_test": n_test, "epochs": epochs,
                             "model": args.model, "width": args.width, "eps_linf": args.eps, "eps_l2": args.l2_eps,
                             "eot_samples": eot, "pgd_steps": args.pgd_steps, "eot_steps": eot_steps, "draws": args.draws,
                             "trades": {"init": args.trades_init, "epochs": trades_epochs, "lr": trades_lr,
                                        "steps": args.trades_steps, "alpha": args.trades_alpha, "eot_samples": args.trades_eot, "beta": 6.0},
                             "autoattack_budget": aa_budget or "published", "quick": args.quick, "noise": NOISE, "bilateral": BILATERAL, "rows": rows,
                             "evaluation_rows": all_rows, "verdicts": verdicts, "paper_cifar10": PAPER})

    plot(json.loads(out.read_text()), out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
