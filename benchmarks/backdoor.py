"""Backdoor benchmark on the built-in digits: does each attack really implant its backdoor?

For each model (SmallCNN, SmallViT) a clean model and one victim per attack (BadNets, Blended,
SIG, WaNet; 10% poisoning, all-to-one target 0) are trained with the same recipe; the table
gives clean accuracy (ACC), attack success rate (ASR, triggered non-target test images
classified as 0), robust accuracy (RA) and the ACC drop against the clean model.

    python benchmarks/backdoor.py             # ~6 minutes on 2 cores
    python benchmarks/backdoor.py --quick     # SmallCNN only, fewer epochs

Attack settings are BackdoorBench's CIFAR-10 defaults except where the digits need otherwise
(see docs/backdoor.md for the measurements behind each change): WaNet s = 2.0 without noise
mode, SIG delta = 80/255 at 9% poisoning (clean label: 10% is more than all training zeros).
"""

from __future__ import annotations

import sys
import time

import _common
import torch

ATTACKS = {
    "badnets": ({"name": "badnets", "size": 3}, 0.10),
    "blended": ({"name": "blended", "alpha": 0.2}, 0.10),
    "sig": ({"name": "sig", "delta": 80 / 255, "frequency": 6}, 0.09),
    "wanet": ({"name": "wanet", "s": 2.0, "k": 4, "noise_mode": False}, 0.10),
}
MODELS = {
    "small_cnn": ({"name": "small_cnn"}, {"epochs": 20, "lr": 0.05, "optimizer": "sgd", "weight_decay": 5e-4}),
    "small_vit": ({"name": "small_vit", "dim": 64, "depth": 4, "heads": 4, "patch_size": 4},
                  {"epochs": 30, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 2}),
}


def main(argv=None) -> int:
    p = _common.parser(__doc__, "benchmarks/results/backdoor.json", "SmallCNN only, 8 epochs")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args(argv)
    _common.setup(args)

    import robustkit
    from robustkit.backdoor import backdoor_metrics
    from robustkit.data import digits
    from robustkit.eval.plots import plt
    from robustkit.eval.report import save_figure
    from robustkit.pipeline import build_model

    data = digits(size=32)
    models = ["small_cnn"] if args.quick else args.models
    rows = []
    print(f"{'model':10} {'attack':8} {'rate':>5} {'ACC':>6} {'ASR':>6} {'RA':>6} {'dACC':>6} {'sec':>5}")
    for mname in models:
        mspec, recipe = MODELS[mname]
        recipe = dict(recipe, epochs=8 if args.quick else recipe["epochs"])
        clean_acc = None
        for aname in ["none", *ATTACKS]:
            torch.manual_seed(0)
            model = build_model(mspec, data)
            t0 = time.perf_counter()
            if aname == "none":
                res = robustkit.train(model, data.train, data.test, progress=False, **recipe)
                clean_acc = res.metrics["val_acc"]
                row = {"model": mname, "attack": "none", "rate": 0.0, "acc": clean_acc, "asr": None, "ra": None}
            else:
                spec, rate = ATTACKS[aname]
                attack = robustkit.BACKDOORS.build(spec)
                poisoned = attack.poison(data.train, rate=rate, seed=0)
                robustkit.train(model, poisoned, None, progress=False, **recipe)
                m = backdoor_metrics(model, attack, data.test)
                row = {"model": mname, "attack": aname, "rate": rate, "acc": m.acc, "asr": m.asr, "ra": m.ra, "params": spec}
            row["acc_drop"] = clean_acc - row["acc"]
            row["seconds"] = time.perf_counter() - t0
            row["implanted"] = None if aname == "none" else bool(row["asr"] >= 0.9 and row["acc_drop"] <= 0.03)
            rows.append(row)
            fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"
            print(f"{mname:10} {aname:8} {row['rate']:5.2f} {fmt(row['acc']):>6} {fmt(row['asr']):>6} {fmt(row['ra']):>6} "
                  f"{fmt(row['acc_drop']):>6} {row['seconds']:5.0f}", flush=True)

    out = _common.write_json(args.out, {"benchmark": "backdoor", "quick": args.quick, "rows": rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, mname in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == mname and r["attack"] != "none"]
        xs = range(len(rs))
        ax.bar([i - 0.2 for i in xs], [100 * r["acc"] for r in rs], 0.4, label="ACC")
        ax.bar([i + 0.2 for i in xs], [100 * r["asr"] for r in rs], 0.4, label="ASR")
        clean = next(r["acc"] for r in rows if r["model"] == mname and r["attack"] == "none")
        ax.axhline(100 * clean, color="k", ls=":", lw=1, label="clean ACC")
        ax.axhline(90, color="r", ls="--", lw=0.8, label="ASR target")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["attack"] for r in rs])
        ax.set_ylim(0, 105)
        ax.set_title(mname)
        ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
