"""The paper's ablation (Stalder et al. 2025, REFERENCES.md section 1) on the built-in digits:
is noise + bilateral *supralinear*, i.e. better than the sum of its parts?

For each preprocessing - none, noise, bilateral, noise+bilateral, bilateral+noise - a SmallCNN
is trained WITH that preprocessing (as in the paper) and evaluated behind it: clean accuracy,
PGD-Linf, and EOT-PGD-Linf (the adaptive attack; for deterministic defenses it equals PGD).
The gain of a defense is its robust accuracy minus the baseline's; the combination is
supralinear when gain(noise+bilateral) > gain(noise) + gain(bilateral).

    python benchmarks/supralinear.py            # ~5 minutes on 2 cores
    python benchmarks/supralinear.py --quick    # ~1.5 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

NOISE = {"name": "gaussian_noise", "sigma": 0.1}
BILATERAL = {"name": "bilateral", "kernel_size": 5, "sigma_color": 0.1, "sigma_space": 1.5, "iterations": 2}
DEFENSES = {
    "none": [],
    "noise": [NOISE],
    "bilateral": [BILATERAL],
    "noise+bilateral": [NOISE, BILATERAL],
    "bilateral+noise": [BILATERAL, NOISE],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--eps", default="8/255")
    p.add_argument("--out", default="benchmarks/results/supralinear.json")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

    import robustkit
    from robustkit.attacks import PGD
    from robustkit.data import digits, to_tensors
    from robustkit.eval import robust_accuracy
    from robustkit.eval.report import save_figure
    from robustkit.registry import parse_number
    from robustkit.wrap import build_preprocessor

    eps = parse_number(args.eps)
    data = digits(size=32)
    n = 200 if args.quick else 450
    epochs = 5 if args.quick else 10
    eot = 4 if args.quick else 8
    x, y = to_tensors(data.test, max_samples=n)
    rows = []
    print(f"{'defense':16} {'clean':>6} {'PGD':>6} {'EOT-PGD':>8} {'sec':>5}")
    for name, specs in DEFENSES.items():
        torch.manual_seed(0)
        model = robustkit.MODELS.build({"name": "small_cnn", "in_channels": 1, "num_classes": 10})
        pre = torch.nn.Sequential(*[build_preprocessor(s) for s in specs])
        t0 = time.perf_counter()
        robustkit.train(model, data.train, epochs=epochs, lr=0.05, preprocess=pre if len(pre) else None, progress=False)
        defended = robustkit.wrap(model, *pre).eval()
        pgd = robust_accuracy(defended, PGD(eps=eps, steps=10), x, y, progress=False, seed=0)
        eot_res = pgd if not defended.randomized else robust_accuracy(
            defended, PGD(eps=eps, steps=10, eot_samples=eot), x, y, progress=False, seed=0)
        row = {"defense": name, "clean": pgd.clean_accuracy, "pgd": pgd.robust_accuracy, "eot_pgd": eot_res.robust_accuracy,
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name:16} {100 * row['clean']:6.1f} {100 * row['pgd']:6.1f} {100 * row['eot_pgd']:8.1f} {row['seconds']:5.0f}", flush=True)

    by = {r["defense"]: r for r in rows}
    gain = {k: by[k]["eot_pgd"] - by["none"]["eot_pgd"] for k in by}
    supralinear = gain["noise+bilateral"] > gain["noise"] + gain["bilateral"]
    verdict = (f"gain under EOT-PGD: noise {100 * gain['noise']:+.1f}, bilateral {100 * gain['bilateral']:+.1f}, "
               f"noise+bilateral {100 * gain['noise+bilateral']:+.1f} (sum of parts {100 * (gain['noise'] + gain['bilateral']):+.1f}) "
               f"-> {'supralinear' if supralinear else 'NOT supralinear'} here; "
               f"bilateral+noise {100 * gain['bilateral+noise']:+.1f}")
    print("\n" + verdict)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"eps": args.eps, "quick": args.quick, "n_test": n, "epochs": epochs, "eot_samples": eot,
                               "noise": NOISE, "bilateral": BILATERAL, "rows": rows, "gain_eot_pgd": gain,
                               "supralinear": supralinear, "verdict": verdict}, indent=2))
    os.replace(tmp, out)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(by)
    for j, (key, lab) in enumerate([("clean", "clean"), ("pgd", "PGD-Linf"), ("eot_pgd", "EOT-PGD-Linf (adaptive)")]):
        ax.bar([i + (j - 1) * 0.27 for i in range(len(names))], [100 * by[k][key] for k in names], 0.27, label=lab)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Digits, SmallCNN trained with its preprocessing, eps={args.eps}")
    ax.legend(fontsize=7)
    save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
