"""Poisoned-sample filtering benchmark on the built-in digits: attention entropy vs. feature baselines.

For each attack (BadNets, Blended, WaNet; 10% poisoning, all-to-one target 0, settings of
benchmarks/backdoor.py) a SmallViT (dim 64, depth 4, patch 4 on 32x32; AdamW lr 1e-3, wd 0.05,
30 epochs) is trained on the poisoned training split. Each filter scores that split with the
victim: TPR, FPR, precision, F1 and AUROC against the ground truth. A fresh ViT is then
retrained with the same recipe on the kept samples and its ACC / ASR are reported next to the
victim's ("none").

    python benchmarks/filtering.py           # ~10 minutes on 2 cores
    python benchmarks/filtering.py --quick   # BadNets only, 15 epochs

Filters run with their defaults except spectral signatures, told the true poisoning rate
(expected_rate 0.1, so 15% of every class is removed), as in the paper.

``--entropy-matrix`` (issue #15) compares the attention-entropy rules instead, with no retraining:
SmallViT victims (dim 64, depth 4, 4 heads, patch 4; AdamW lr 1e-3, wd 0.05, 20 epochs, seed 0)
on {16x16 digits, 32x32 digits, the CIFAR-10 subset at 16x16} x {BadNets 2x2 and 3x3 white,
a random 4x4 colour patch, Blended uniform noise alpha 0.1 and 0.2}, 10% all-to-one poisoning
(target 0). Per victim: AUROC over the whole poisoned set and inside the target class, TPR /
FPR of the flags and the warnings of ``method="split"`` (``classes="size"`` and
``"attention"``) and of BYE's rule (``method="bye"``, ``direction`` low / high / both). The
per-layer and per-head entropies are saved next to the JSON (``*_entropy/*.npz``, with the
labels and the ground truth) so rules can be compared offline.

    python benchmarks/filtering.py --entropy-matrix --threads 1 --data ../shared/data/cifar10_subset.npz
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import _common
import torch

ATTACKS = {
    "badnets": ({"name": "badnets", "size": 3}, 0.10),
    "blended": ({"name": "blended", "alpha": 0.2}, 0.10),
    "wanet": ({"name": "wanet", "s": 2.0, "k": 4, "noise_mode": False}, 0.10),
}
FILTERS = {
    "attention_entropy": {"name": "attention_entropy", "progress": False},
    "activation_clustering": {"name": "activation_clustering", "progress": False},
    "spectral_signatures": {"name": "spectral_signatures", "expected_rate": 0.1, "progress": False},
}
VIT = {"name": "small_vit", "image_size": 32, "in_channels": 1, "num_classes": 10, "dim": 64, "depth": 4, "heads": 4,
       "patch_size": 4}
RECIPE = {"epochs": 30, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 2}


def layer_diagnostics(result, truth: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per attention layer: AUROC of the negative entropy alone, and the bimodality test's ratio."""
    from sklearn.metrics import roc_auc_score

    ent = result.details["layer_entropy"].double().numpy()
    auroc = [float(roc_auc_score(truth.numpy(), -ent[:, j])) for j in range(ent.shape[1])]
    sep = [abs(r["means"][1] - r["means"][0]) / (r["stds"][0] + r["stds"][1]) for r in result.details["per_layer"]]
    return auroc, sep


ENTROPY_RULES = {
    "split": {"method": "split", "classes": "size"},
    "split_attention": {"method": "split", "classes": "attention"},
    "bye_low": {"method": "bye", "direction": "low"},
    "bye_high": {"method": "bye", "direction": "high"},
    "bye_both": {"method": "bye", "direction": "both"},
}
MATRIX_VIT = {"name": "small_vit", "patch_size": 4, "dim": 64, "depth": 4, "heads": 4}
MATRIX_RECIPE = {"epochs": 20, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 2}


def matrix_attacks() -> dict:
    from robustkit.backdoor import BadNets, Blended
    import _bdata

    return {"badnets2": lambda: BadNets(size=2), "badnets3": lambda: BadNets(size=3),
            "colour4": lambda: _bdata.colour_patch(4), "blend10": lambda: Blended(alpha=0.1),
            "blend20": lambda: Blended(alpha=0.2)}


def entropy_matrix(args) -> int:
    """The attention-entropy rules on fresh SmallViT victims (see the module docstring)."""
    import warnings

    import numpy as np
    import robustkit
    import _bdata
    from robustkit.backdoor import backdoor_metrics
    from robustkit.filtering import filter_metrics
    from robustkit.filtering.attention_entropy import read_attention_entropies
    from robustkit.training import train
    from sklearn.metrics import roc_auc_score

    out = Path(args.out)
    save_dir = out.with_name(out.stem + "_entropy")
    save_dir.mkdir(parents=True, exist_ok=True)
    sets = [("digits", 16), ("digits", 32)] + ([("cifar", 16)] if args.data else [])
    attacks = matrix_attacks()
    names = args.matrix_attacks or list(attacks)
    rows = []
    for dname, size in sets:
        data, desc = _bdata.load(dname, args.data, size)
        print(desc, flush=True)
        for aname in names:
            atk = attacks[aname]()
            poisoned = atk.poison(data.train, rate=0.1, seed=0)
            truth = poisoned.is_poisoned
            torch.manual_seed(0)
            model = robustkit.MODELS.build({**MATRIX_VIT, "image_size": size, "in_channels": data.channels,
                                            "num_classes": data.num_classes})
            t0 = time.perf_counter()
            train(model, poisoned, progress=False, seed=0, **MATRIX_RECIPE)
            sec = time.perf_counter() - t0
            m = backdoor_metrics(model, atk, data.test)
            model.eval()
            read = read_attention_entropies(model, poisoned, progress=False)
            y = read["labels"].numpy()
            np.savez(save_dir / f"entropy_{dname}{size}_{aname}.npz", layer=read["layer"].numpy(),
                     head=read["head"].numpy(), labels=y, truth=truth.numpy())
            base = {"data": dname, "size": size, "attack": aname, "acc": m.acc, "asr": m.asr, "train_seconds": sec}
            print(f"{dname}{size:<3} {aname:9} victim ACC {100 * m.acc:5.1f} ASR {100 * m.asr:5.1f} ({sec:.0f}s)", flush=True)
            for rname, spec in ENTROPY_RULES.items():
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    res = robustkit.FILTERS.build({"name": "attention_entropy", "progress": False, **spec}).fit(model, poisoned)
                met = filter_metrics(res, truth)
                s = res.scores.numpy()
                t = truth.numpy()
                inside = y == atk.target
                row = {**base, "rule": rname, "auroc": met["auroc"], "tpr": met["tpr"], "fpr": met["fpr"],
                       "auroc_target_class": float(roc_auc_score(t[inside], s[inside])),
                       "warnings": list(res.details["warnings"]), "n_runtime_warnings": len(caught),
                       "poisoned_classes": res.details.get("poisoned_classes", [])}
                rows.append(row)
                print(f"{'':14} {rname:16} AUROC {met['auroc']:.3f} (target class {row['auroc_target_class']:.3f}) "
                      f"TPR {100 * met['tpr']:5.1f} FPR {100 * met['fpr']:5.1f}"
                      + (f"  [warned: {len(row['warnings'])}]" if row["warnings"] else ""), flush=True)
            _common.write_json(out, {"benchmark": "filtering_entropy_matrix", "vit": MATRIX_VIT, "recipe": MATRIX_RECIPE,
                                     "rules": ENTROPY_RULES, "data": args.data, "rows": rows})
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    p = _common.parser(__doc__, "benchmarks/results/filtering.json", "BadNets only, 15 epochs")
    p.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    p.add_argument("--entropy-matrix", action="store_true", help="compare the attention-entropy rules (issue #15)")
    p.add_argument("--matrix-attacks", nargs="*", default=None,
                   choices=["badnets2", "badnets3", "colour4", "blend10", "blend20"])
    _common.add_data_option(p)
    args = p.parse_args(argv)
    _common.setup(args)
    if args.entropy_matrix:
        if args.out == "benchmarks/results/filtering.json":
            args.out = "benchmarks/results/filtering_entropy_matrix.json"
        return entropy_matrix(args)

    import robustkit
    from robustkit.backdoor import backdoor_metrics
    from robustkit.data import digits
    from robustkit.eval.plots import plt
    from robustkit.eval.report import save_figure
    from robustkit.filtering import filter_metrics
    from robustkit.training import train

    data = digits(size=32)
    attacks = ["badnets"] if args.quick else args.attacks
    recipe = dict(RECIPE, epochs=15 if args.quick else RECIPE["epochs"])

    def fit_vit(dataset):
        torch.manual_seed(0)
        model = robustkit.MODELS.build(VIT)
        train(model, dataset, progress=False, seed=0, **recipe)
        return model.eval()

    rows, hists = [], {}
    print(f"{'attack':8} {'filter':22} {'TPR':>6} {'FPR':>6} {'prec':>6} {'F1':>6} {'AUROC':>6} {'kept':>5} "
          f"{'ACC':>6} {'ASR':>6} {'sec':>5}")
    for aname in attacks:
        spec, rate = ATTACKS[aname]
        atk = robustkit.BACKDOORS.build(spec)
        poisoned = atk.poison(data.train, rate=rate, seed=0)
        victim = fit_vit(poisoned)
        m0 = backdoor_metrics(victim, atk, data.test)
        rows.append({"attack": aname, "filter": "none", "kept": len(poisoned), "acc": m0.acc, "asr": m0.asr})
        print(f"{aname:8} {'none':22} {'':>6} {'':>6} {'':>6} {'':>6} {'':>6} {len(poisoned):5d} "
              f"{100 * m0.acc:6.1f} {100 * m0.asr:6.1f}", flush=True)
        for fname, fspec in FILTERS.items():
            t0 = time.perf_counter()
            result = robustkit.FILTERS.build(fspec).fit(victim, poisoned)
            sec = time.perf_counter() - t0
            met = filter_metrics(result, poisoned.is_poisoned)
            kept = result.clean_subset(poisoned)
            retrained = fit_vit(kept)
            m1 = backdoor_metrics(retrained, atk, data.test)
            row = {"attack": aname, "filter": fname, **{k: met[k] for k in ("tpr", "fpr", "precision", "f1", "auroc")},
                   "flagged": met["flagged"], "kept": len(kept), "acc": m1.acc, "asr": m1.asr, "filter_seconds": sec}
            if "layers" in result.details:
                row["layers"] = result.details["layers"]
                row["fallback"] = result.details["fallback"]
                row["layer_auroc"], row["layer_separation"] = layer_diagnostics(result, poisoned.is_poisoned)
            rows.append(row)
            hists[(aname, fname)] = (result.scores.numpy(), poisoned.is_poisoned.numpy(), result.details.get("score", ""))
            print(f"{aname:8} {fname:22} {100 * met['tpr']:6.1f} {100 * met['fpr']:6.1f} {100 * met['precision']:6.1f} "
                  f"{100 * met['f1']:6.1f} {met['auroc']:6.3f} {len(kept):5d} {100 * m1.acc:6.1f} {100 * m1.asr:6.1f} {sec:5.1f}",
                  flush=True)
            if "layer_auroc" in row:
                print(f"{'':31} per layer: AUROC of -H " + " ".join(f"{a:.3f}" for a in row["layer_auroc"])
                      + "; GMM separation |mu1-mu2|/(s1+s2) " + " ".join(f"{r:.2f}" for r in row["layer_separation"])
                      + f" (bimodal if > {result.details.get('separation', 2.0)})", flush=True)

    checks = {}
    for aname in ("badnets", "blended"):
        r = next((r for r in rows if r["attack"] == aname and r["filter"] == "attention_entropy"), None)
        if r is not None:
            checks[f"{aname}_tpr95_at_fpr5"] = r["tpr"] >= 0.95 and r["fpr"] <= 0.05
            checks[f"{aname}_retrained_asr_below_5pct"] = r["asr"] < 0.05
    print("targets:", ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in checks.items()))

    out = Path(args.out)
    fig, axes = plt.subplots(len(attacks), len(FILTERS), figsize=(4 * len(FILTERS), 2.8 * len(attacks)), squeeze=False)
    for i, aname in enumerate(attacks):
        for j, fname in enumerate(FILTERS):
            s, truth, label = hists[(aname, fname)]
            ax = axes[i][j]
            bins = 40
            ax.hist(s[~truth], bins=bins, alpha=0.7, color="tab:blue", label="clean")
            ax.hist(s[truth], bins=bins, alpha=0.7, color="tab:red", label="poisoned")
            ax.set_yscale("log")
            ax.set_title(f"{aname} / {fname}", fontsize=9)
            ax.set_xlabel("score (higher = more suspicious)", fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("SmallViT on digits: filter scores of clean and poisoned training samples", y=1.01)
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"))
    _common.write_json(out, {"benchmark": "filtering", "vit": VIT, "recipe": recipe, "filters": FILTERS,
                             "attacks": {a: ATTACKS[a] for a in attacks}, "rows": rows, "targets": checks})
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
