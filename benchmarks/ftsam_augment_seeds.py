"""Do random crops help FT-SAM? The benchmark matrix's victims, FT-SAM with and without crops, several repair seeds.

FT-SAM and FineTune crop the clean batches by default since issue #15's last round
(``augment="crop"``, docs/repair.md). The matrix (one repair seed) found the crops better on the
CIFAR-10 subset and mixed on digits. This script repeats FT-SAM on the matrix's CNN victims (same
attacks, recipes and victim training as ``backdoor_matrix.py``: PreActResNet18 width 8, 16x16) with
``augment="crop"`` and ``augment=None`` for several repair seeds (the seed draws the clean 5% share,
the batch order and the crops), and reports per victim and recipe the mean and spread of ACC and
ASR and the paired difference crop - none.

    python benchmarks/ftsam_augment_seeds.py --threads 1 --recipes lr0.01
    python benchmarks/ftsam_augment_seeds.py --threads 1 --data ../shared/data/cifar10_subset.npz --attacks badnets blended
"""

from __future__ import annotations

import statistics
import sys
import time

import _common
import torch

from backdoor_matrix import ATTACKS, RECIPES, REPAIRS, VICTIM


def main(argv=None) -> int:
    p = _common.parser(__doc__, "benchmarks/results/ftsam_augment_seeds.json", "BadNets only, seeds 0 and 1")
    _common.add_data_option(p)
    p.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--victim-epochs", type=int, default=None, help="default: the matrix's (digits 15, CIFAR 12)")
    args = p.parse_args(argv)
    _common.setup(args)

    import robustkit
    from robustkit.backdoor import backdoor_metrics
    from robustkit.models import PreActResNet18
    from robustkit.training import train

    import _bdata

    data, dname = _bdata.load("cifar" if args.data else "digits", args.data)
    epochs = args.victim_epochs or (12 if args.data else 15)
    attacks, seeds = (["badnets"], [0, 1]) if args.quick else (args.attacks, args.seeds)
    rows, summary = [], []
    print(dname, flush=True)
    for aname in attacks:
        spec, rate = ATTACKS[aname]
        atk = robustkit.BACKDOORS.build(spec)
        poisoned = atk.poison(data.train, rate=rate, seed=0)
        for rname in args.recipes:
            torch.manual_seed(0)
            model = PreActResNet18(in_channels=data.channels, num_classes=data.num_classes, width=8)
            train(model, poisoned, progress=False, seed=0, epochs=epochs, **VICTIM, **RECIPES[rname])
            before = backdoor_metrics(model, atk, data.test)
            print(f"{aname:8} {rname:7} victim ACC {100 * before.acc:5.1f} ASR {100 * before.asr:5.1f}", flush=True)
            got: dict = {}
            for augment in (None, "crop"):
                for seed in seeds:
                    t0 = time.perf_counter()
                    rep = robustkit.REPAIRS.build({**REPAIRS["ft_sam"], "augment": augment, "seed": seed})
                    import warnings

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        res = rep.repair(model, data.train, progress=False)
                    after = backdoor_metrics(res.model, atk, data.test)
                    sec = time.perf_counter() - t0
                    row = {"data": dname, "attack": aname, "recipe": rname, "augment": augment or "none", "seed": seed,
                           "victim_acc": before.acc, "victim_asr": before.asr, "acc": after.acc, "asr": after.asr,
                           "ra": after.ra, "lr": res.details["lr"], "collapsed": res.collapsed, "seconds": sec}
                    rows.append(row)
                    got[(augment or "none", seed)] = row
                    print(f"  {augment or 'none':5} seed {seed}: lr {res.details['lr']:.4f} ACC {100 * after.acc:5.1f} "
                          f"ASR {100 * after.asr:5.1f} {sec:5.1f}s", flush=True)
            d_acc = [got[("crop", s)]["acc"] - got[("none", s)]["acc"] for s in seeds]
            d_asr = [got[("crop", s)]["asr"] - got[("none", s)]["asr"] for s in seeds]
            summ = {"data": dname, "attack": aname, "recipe": rname, "victim_acc": before.acc, "seeds": seeds}
            for aug in ("none", "crop"):
                accs = [got[(aug, s)]["acc"] for s in seeds]
                asrs = [got[(aug, s)]["asr"] for s in seeds]
                summ[aug] = {"acc_mean": statistics.mean(accs), "acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                             "asr_mean": statistics.mean(asrs), "asr_sd": statistics.stdev(asrs) if len(asrs) > 1 else 0.0}
            summ["crop_minus_none"] = {"acc_mean": statistics.mean(d_acc), "asr_mean": statistics.mean(d_asr),
                                       "acc_per_seed": d_acc, "asr_per_seed": d_asr}
            summary.append(summ)
            _common.write_json(args.out, {"benchmark": "ftsam_augment_seeds", "data": dname, "victim_epochs": epochs,
                                          "rows": rows, "summary": summary})
    print(table(summary))
    return 0


def table(summary: list) -> str:
    """Markdown: per victim, ACC / ASR mean +- sd (%) without and with crops, and the paired difference."""
    out = ["| data | attack | victim | victim ACC | FT-SAM no crops ACC / ASR | FT-SAM crops ACC / ASR | crops - none: ACC / ASR (per seed) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        n, c, d = s["none"], s["crop"], s["crop_minus_none"]
        per = ", ".join(f"{100 * a:+.1f}" for a in d["acc_per_seed"])
        out.append(f"| {s['data'].split()[0]} | {s['attack']} | {s['recipe']} | {100 * s['victim_acc']:.1f} | "
                   f"{100 * n['acc_mean']:.1f} +- {100 * n['acc_sd']:.1f} / {100 * n['asr_mean']:.1f} +- {100 * n['asr_sd']:.1f} | "
                   f"{100 * c['acc_mean']:.1f} +- {100 * c['acc_sd']:.1f} / {100 * c['asr_mean']:.1f} +- {100 * c['asr_sd']:.1f} | "
                   f"{100 * d['acc_mean']:+.1f} ({per}) / {100 * d['asr_mean']:+.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
