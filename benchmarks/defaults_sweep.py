"""Defaults of the noise + bilateral defense by a documented sweep: noise sigma, kernel size,
sigma_color, sigma_space and the a/b iteration schedule, one factor at a time, each network
trained WITH its preprocessing and attacked behind it with an adaptive attack.

Method (one-factor-at-a-time around a base point; the base is robustkit's defaults unless
``--base`` says otherwise): for every setting that changes *training* (sigma, kernel size,
sigma_color, sigma_space, train iterations ``a``) a fresh network is trained with standard
training (cross-entropy on preprocessed images, ``robustkit.training.fit`` + ``PlainStep``) for
``--epochs`` epochs; settings that change only the *test-time* iterations ``b`` reuse the network
trained with the same ``a`` (that is what the a/b schedule means: train with ``a``, deploy with
``b``). Every setting is evaluated with :func:`robustkit.eval.evaluate_defenses`: clean accuracy
on ``--n-clean`` test images and EOT-PGD (``--steps`` steps, ``--eot`` EOT passes, one draw of
the noise) at each Linf radius of ``--eps`` on the first ``--n-attack`` of them. An undefended
network trained the same way is the reference. Every accuracy carries its binomial standard
error; a clean-vs-robust plot marks the Pareto front.

The *recommended* setting maximizes the mean of clean accuracy and the robust accuracies (all
radii), among the settings whose clean accuracy is within ``--max-clean-drop`` of the undefended
network's. Differences below about two standard errors are not resolved by this sweep.

    python benchmarks/defaults_sweep.py --quick                                   # digits, minutes
    python benchmarks/defaults_sweep.py --data ../shared/data/cifar10_subset.npz --threads 1   # CIFAR-10 subset
    # one factor only, split over two processes and merged (the sigma re-check of docs/supralinear.md):
    python benchmarks/defaults_sweep.py --data ../shared/data/cifar10_subset.npz --threads 1 --width 32 --epochs 8 \\
        --grid '{"sigma": [0.1, 0.2]}' --only undefended,base --out benchmarks/results/sigma_a.json
    python benchmarks/defaults_sweep.py ... --only sigma=0.1,sigma=0.2 --out benchmarks/results/sigma_b.json
    python benchmarks/defaults_sweep.py --merge benchmarks/results/sigma_a.json benchmarks/results/sigma_b.json \\
        --out benchmarks/results/sigma.json
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

#: robustkit's defaults (GaussianNoise / BilateralFilter / NoiseBilateral) when this sweep was written.
BASE = {"sigma": 0.05, "kernel_size": 5, "sigma_color": 0.1, "sigma_space": 1.5, "train_iterations": 1, "iterations": 1}
GRID = {
    "sigma": [0.02, 0.1, 0.2],
    "kernel_size": [3, 7],
    "sigma_color": [0.05, 0.3],
    "sigma_space": [0.8, 3.0],
    "ab": [(1, 2), (1, 4), (2, 4)],
}
QUICK_GRID = {"sigma": [0.1], "kernel_size": [3], "sigma_color": [0.3], "sigma_space": [3.0], "ab": [(1, 2)]}
TRAIN_KEYS = ("sigma", "kernel_size", "sigma_color", "sigma_space", "train_iterations")


def settings(base: dict, grid: dict) -> list[tuple[str, dict]]:
    """``(label, params)`` of the base point and every one-factor change of it."""
    out = [("base", dict(base))]
    for factor, values in grid.items():
        for v in values:
            p = dict(base)
            if factor == "ab":
                p["train_iterations"], p["iterations"] = v
                label = f"a/b={v[0]}/{v[1]}"
            else:
                p[factor] = v
                label = f"{factor}={v}"
            if p != base:
                out.append((label, p))
    return out


def preprocessors(p: dict) -> list[dict]:
    spec = [{"name": "bilateral", "kernel_size": p["kernel_size"], "sigma_color": p["sigma_color"],
             "sigma_space": p["sigma_space"], "iterations": p["iterations"], "train_iterations": p["train_iterations"]}]
    return ([{"name": "gaussian_noise", "sigma": p["sigma"]}] if p["sigma"] > 0 else []) + spec


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Whether each (clean, robust) point is on the Pareto front (no other point is >= in both and > in one)."""
    return [not any(c2 >= c and r2 >= r and (c2 > c or r2 > r) for c2, r2 in points) for c, r in points]


def plot(result: dict, path: Path) -> None:
    """Clean vs EOT-PGD accuracy per radius (error bars: 1 binomial SE), that radius's Pareto front in
    blue, the undefended network in black, the recommended setting in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustkit.eval.report import save_figure

    rows, radii = result["rows"], result["radii"]
    defended = [r for r in rows if r["params"] is not None]
    best = result["recommended"]["label"]
    fig, axes = plt.subplots(1, len(radii), figsize=(5.5 * len(radii), 4.4), squeeze=False)
    for ax, e in zip(axes[0], radii):
        front = pareto([(r["clean"], r["robust"][e]) for r in defended])
        on_front = {r["label"] for r, f in zip(defended, front) if f}
        for r in rows:
            color = ("black" if r["params"] is None else "tab:red" if r["label"] == best else
                     "tab:blue" if r["label"] in on_front else "tab:gray")
            ax.errorbar(100 * r["clean"], 100 * r["robust"][e], xerr=100 * r["clean_se"], yerr=100 * r["robust_se"][e],
                        fmt="o", color=color, ms=4, lw=0.6, capsize=1.5)
            ax.annotate(r["label"], (100 * r["clean"], 100 * r["robust"][e]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        fr = sorted((100 * r["clean"], 100 * r["robust"][e]) for r in defended if r["label"] in on_front)
        ax.plot([c for c, _ in fr], [v for _, v in fr], "--", color="tab:blue", lw=0.7)
        ax.set_xlabel(f"clean accuracy (%), n={result['n_clean']}")
        ax.set_ylabel(f"EOT-PGD accuracy at Linf {e} (%), n={result['n_attack']}")
        ax.set_title(f"{result['data']}, {result['model']} w{result['width']}, {result['epochs']} epochs each\n"
                     "blue: Pareto front at this radius, red: recommended, black: undefended", fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = _common.parser(__doc__, "benchmarks/results/defaults_sweep.json", "digits, a 6-setting grid, fewer images")
    _common.add_data_option(p)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=None, help="standard-training epochs per setting (default 2; 2 quick)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--n-clean", type=int, default=None, help="test images for clean accuracy (default 512; 200 quick)")
    p.add_argument("--n-attack", type=int, default=None, help="test images attacked (default 128; 64 quick)")
    p.add_argument("--eps", default="2/255,8/255", help="comma-separated Linf radii (default 2/255,8/255)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eot", type=int, default=4)
    p.add_argument("--max-clean-drop", type=float, default=0.10,
                   help="a recommended setting keeps clean accuracy within this of the undefended network (default 0.10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw the plot of an earlier result file")
    p.add_argument("--base", default=None, metavar="JSON", help="changes to the base point, e.g. '{\"iterations\": 2}'")
    p.add_argument("--grid", default=None, metavar="JSON",
                   help="the factors and values to sweep instead of the full grid, e.g. '{\"sigma\": [0.1, 0.2]}'")
    p.add_argument("--only", default=None, help="comma-separated setting labels to run (undefended, base, sigma=0.1, "
                                                 "...): a part of the sweep for --merge")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge result files of parts of the same sweep (--only) into --out")
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
    from robustkit.eval.robust import evaluate_defenses
    from robustkit.registry import parse_number
    from robustkit.training import fit
    from robustkit.training.steps import PlainStep
    from robustkit.wrap import build_preprocessor

    data = load_npz(args.data) if args.data else digits(size=32)
    data_name = "CIFAR-10 subset (5,085 train / 512 test)" if args.data else "digits 32x32"
    epochs = args.epochs or 2
    n_clean = min(args.n_clean or (200 if args.quick else 512), len(data.test))
    n_attack = min(args.n_attack or (64 if args.quick else 128), n_clean)
    radii = [e.strip() for e in args.eps.split(",") if e.strip()]
    xc, yc = to_tensors(data.test, max_samples=n_clean)
    xa, ya = xc[:n_attack], yc[:n_attack]
    # no per-example early stop: on a randomized defense it raised robust accuracy by 0.3-2.6 points
    attacks = [{"name": "pgd", "norm": "linf", "eps": parse_number(e), "steps": args.steps, "eot_samples": args.eot,
                "early_stop": False, "label": f"EOT-PGD {e}"} for e in radii]
    grid = QUICK_GRID if args.quick else GRID
    base = dict(BASE)
    try:
        if args.grid:
            grid = {k: [tuple(v) if k == "ab" else v for v in vs] for k, vs in json.loads(args.grid).items()}
        if args.base:
            base.update(json.loads(args.base))
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        p.error(f"--grid / --base must be JSON mappings: {exc}")
    if set(grid) - set(GRID) or set(base) != set(BASE):
        p.error(f"--grid factors must be among {sorted(GRID)}; --base keys among {sorted(BASE)}")
    todo = settings(base, grid)
    only = None if args.only is None else {o.strip() for o in args.only.split(",") if o.strip()}
    known = {"undefended"} | {lab for lab, _ in todo}
    if only is not None and only - known:
        p.error(f"--only names unknown settings {sorted(only - known)}; known: {sorted(known)}")

    def train(specs: list[dict]) -> tuple[torch.nn.Module, float]:
        torch.manual_seed(args.seed)
        kw = {"width": args.width} if "width" in robustkit.MODELS.parameters(args.model) else {}
        model = robustkit.MODELS.build({"name": args.model, "in_channels": data.channels,
                                        "num_classes": data.num_classes, **kw})
        pre = torch.nn.Sequential(*[build_preprocessor(s) for s in specs]) if specs else None
        t0 = time.perf_counter()
        fit(model, data.train, PlainStep(preprocess=pre), epochs=epochs, lr=args.lr, progress=False, seed=args.seed)
        return model, time.perf_counter() - t0

    def evaluate(model, label: str, specs: list[dict]) -> dict:
        t0 = time.perf_counter()
        clean = evaluate_defenses(model, xc, yc, defenses=[{"label": label, "preprocessors": specs}], attacks=[],
                                  draws=1, checks=False, progress=False, seed=args.seed)
        rob = evaluate_defenses(model, xa, ya, defenses=[{"label": label, "preprocessors": specs}], attacks=attacks,
                                draws=1, checks=False, progress=False, seed=args.seed)
        acc = {r["attack"]: r["accuracy"] for r in rob.rows}
        out = {"clean": clean.rows[0]["accuracy"], "clean_se": _se(clean.rows[0]["accuracy"], n_clean),
               "robust": {e: acc[f"EOT-PGD {e}"] for e in radii},
               "robust_se": {e: _se(acc[f"EOT-PGD {e}"], n_attack) for e in radii},
               "clean_on_attacked": acc["clean"], "eval_s": time.perf_counter() - t0}
        return out

    print(f"{data_name}: {len(data.train)} train, clean on {n_clean} / EOT-PGD on {n_attack} test images, "
          f"{args.model} width {args.width}, {epochs} standard-training epochs per setting, {len(todo)} settings")
    rows = []
    if only is None or "undefended" in only:
        ref_model, t_ref = train([])
        ref = {"label": "undefended", "params": None, **evaluate(ref_model, "undefended", []), "train_s": t_ref,
               "trained": True}
        rows.append(ref)
        print(f"undefended          clean {100 * ref['clean']:5.1f}  " +
              "  ".join(f"{e} {100 * ref['robust'][e]:5.1f}" for e in radii), flush=True)
    cache: dict[tuple, torch.nn.Module] = {}
    for label, params in todo:
        if only is not None and label not in only:
            continue
        key = tuple(params[k] for k in TRAIN_KEYS)
        trained = key not in cache
        t_train = 0.0
        if trained:
            cache[key], t_train = train(preprocessors(params))
        res = evaluate(cache[key], label, preprocessors(params))
        row = {"label": label, "params": params, **res, "train_s": t_train, "trained": trained}
        rows.append(row)
        print(f"{label:18}  clean {100 * row['clean']:5.1f}  " + "  ".join(f"{e} {100 * row['robust'][e]:5.1f}" for e in radii)
              + f"  ({t_train:.0f} s train{'' if trained else ', reused network'}, {row['eval_s']:.0f} s eval)", flush=True)
        _common.write_json(Path(args.out).with_suffix(".partial.json"), {"rows": rows})

    result = {"load_average": os.getloadavg(), "machine": _common.machine_info(), "data": data_name,
              "n_train": len(data.train), "n_clean": n_clean, "n_attack": n_attack,
              "model": args.model, "width": args.width, "epochs": epochs, "lr": args.lr,
              "training": "standard (cross-entropy on preprocessed images)", "radii": radii,
              "attack": {"name": "pgd", "norm": "linf", "steps": args.steps, "eot_samples": args.eot, "draws": 1,
                         "early_stop": False},
              "base": base, "grid": {k: [list(v) if isinstance(v, tuple) else v for v in vs] for k, vs in grid.items()},
              "max_clean_drop": args.max_clean_drop, "rows": rows, "only": sorted(only) if only else None}
    return finish(result, Path(args.out))


def finish(result: dict, out: Path) -> int:
    """Score, Pareto front and recommendation of a complete (or merged) sweep; table, JSON and plot."""
    rows, radii = result["rows"], result["radii"]
    refs = [r for r in rows if r["params"] is None]
    if not refs or len(rows) < 2:  # a part without the undefended network or without settings: rows only
        _common.write_json(out, {**result, "recommended": None})
        print(f"wrote {out} (a part: no recommendation without the undefended network and a setting; --merge the parts)")
        return 0
    ref = refs[0]
    rows = [ref] + [r for r in rows if r["params"] is not None]
    result["rows"] = rows
    defended = rows[1:]
    for r in defended:
        r["score"] = (r["clean"] + sum(r["robust"].values())) / (1 + len(radii))
        r["eligible"] = r["clean"] >= ref["clean"] - result["max_clean_drop"]
    front = pareto([(r["clean"], sum(r["robust"].values()) / len(radii)) for r in defended])
    for r, f in zip(defended, front):
        r["pareto"] = f
    pool = [r for r in defended if r["eligible"]] or defended
    best = max(pool, key=lambda r: r["score"])
    print(f"\nrecommended: {best['label']} {best['params']} (score {best['score']:.3f}; rule: max mean of clean and "
          f"robust accuracies, clean within {result['max_clean_drop']:.2f} of undefended {ref['clean']:.3f})")
    _common.print_table([{"setting": r["label"], "clean": r["clean"], **{f"eot_pgd_{e}": r["robust"][e] for e in radii},
                          "pareto": r.get("pareto", "-"), "score": r.get("score", "-")} for r in rows])
    result["recommended"] = {"label": best["label"], "params": best["params"]}
    _common.write_json(out, result)
    plot(json.loads(out.read_text()), out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")
    return 0


def merge(paths: list[str], out: Path) -> int:
    """Combine parts (``--only``) of the same sweep: same data, model, epochs, attack, base and grid."""
    parts = [json.loads(Path(q).read_text()) for q in paths]
    same = ("data", "n_clean", "n_attack", "model", "width", "epochs", "lr", "radii", "attack", "base", "grid")
    for q, part in zip(paths[1:], parts[1:]):
        diff = [k for k in same if part.get(k) != parts[0].get(k)]
        if diff:
            raise SystemExit(f"{q}: setup differs from {paths[0]} in {diff}; cannot merge")
    labels = [r["label"] for part in parts for r in part["rows"]]
    if len(labels) != len(set(labels)):
        raise SystemExit(f"a setting appears in more than one file: {labels}")
    result = {**parts[0], "rows": [r for part in parts for r in part["rows"]],
              "load_average": [part.get("load_average") for part in parts], "merged_from": [str(q) for q in paths],
              "only": None}
    return finish(result, out)


if __name__ == "__main__":
    sys.exit(main())
