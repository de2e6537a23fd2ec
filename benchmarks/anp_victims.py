"""Does ANP find the backdoor neurons? Victims trained with and without random crops, several victim seeds.

ANP (Wu & Wang, NeurIPS 2021) prunes the BatchNorm neurons whose learned mask falls below 0.2.
On digits victims trained on the bare images it pruned 5-19 neurons and left ASR at 90-100%
(docs/baselines.md). The paper's victims (and BackdoorBench's) are trained on random crops and
flips. This script trains PreActResNet18 (width 16, 848 BN neurons; ``--width``) BadNets victims on grayscale
16x16 digits (3x3 patch, 10% all-to-one poisoning, target 0; SGD lr 0.01, cosine) per victim seed,
on the bare images (``none``, 10 epochs) and on random crops (``crop``, zero padding 2, 20 epochs),
runs ANP at the paper's settings except ``--iterations`` and 5% clean data (67 images), and prunes
the same masks at several thresholds: ACC / ASR per threshold, the paper's 0.2 in the table.

    python benchmarks/anp_victims.py --threads 1 --recipes none
    python benchmarks/anp_victims.py --threads 1 --recipes crop
    python benchmarks/anp_victims.py --threads 1 --recipes crop --mask-lr 0.5
    python benchmarks/anp_victims.py --threads 1 --recipes crop --width 32

Digits only (the CIFAR-10 subset's PreActResNet18 victims are in ``baselines.py --victim-model
preact_resnet18``). One torch thread per run is the setting of the reference JSONs.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import _common
import torch

RECIPES = {"none": {"augment": None, "epochs": 10}, "crop": {"augment": "crop", "epochs": 20}}
VICTIM = {"lr": 0.01, "batch_size": 64, "optimizer": "sgd", "weight_decay": 5e-4, "schedule": "cosine"}
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def prune_below(model: torch.nn.Module, masks: dict[str, list[float]], threshold: float) -> tuple[torch.nn.Module, int]:
    """A copy of ``model`` with the BN weight of every neuron whose mask is below ``threshold`` set to 0."""
    net = copy.deepcopy(model)
    mods, k = dict(net.named_modules()), 0
    with torch.no_grad():
        for name, values in masks.items():
            for i, v in enumerate(values):
                if v < threshold:
                    mods[name].weight[i] = 0.0
                    k += 1
    return net.eval(), k


def main(argv=None) -> int:
    p = _common.parser(__doc__, "benchmarks/results/anp_victims.json", "victim seed 0 only, 100 iterations")
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3])
    p.add_argument("--iterations", type=int, default=1000, help="ANP mask iterations (paper: 2000)")
    p.add_argument("--clean-ratio", type=float, default=0.05)
    p.add_argument("--mask-lr", type=float, default=0.2, help="ANP's mask learning rate (paper: 0.2)")
    p.add_argument("--width", type=int, default=16, help="PreActResNet18 base width (paper's ResNet-18: 64)")
    args = p.parse_args(argv)
    _common.setup(args)

    from robustkit.backdoor import BadNets, backdoor_metrics
    from robustkit.data import digits
    from robustkit.models import PreActResNet18
    from robustkit.repair.anp import ANP
    from robustkit.training import train

    seeds, iterations = ([0], 100) if args.quick else (args.seeds, args.iterations)
    data = digits(size=16)
    atk = BadNets(size=3)
    poisoned = atk.poison(data.train, rate=0.1, seed=0)
    rows, t_all = [], time.perf_counter()
    for rname in args.recipes:
        recipe = RECIPES[rname]
        for seed in seeds:
            torch.manual_seed(seed)
            model = PreActResNet18(in_channels=1, num_classes=10, width=args.width)
            t0 = time.perf_counter()
            train(model, poisoned, progress=False, seed=seed, **VICTIM, **recipe)
            model.eval()
            before = backdoor_metrics(model, atk, data.test)
            t1 = time.perf_counter()
            res = ANP(iterations=iterations, clean_ratio=args.clean_ratio, mask_lr=args.mask_lr).repair(model, data.train, progress=False)
            anp_sec = time.perf_counter() - t1
            sweep = []
            for thr in THRESHOLDS:
                net, k = prune_below(model, res.details.masks, thr)
                m = backdoor_metrics(net, atk, data.test)
                sweep.append({"threshold": thr, "pruned": k, "acc": m.acc, "asr": m.asr})
            paper = next(s for s in sweep if s["threshold"] == 0.2)
            rows.append({"recipe": rname, "seed": seed, "victim_acc": before.acc, "victim_asr": before.asr,
                         "victim_seconds": t1 - t0, "anp_seconds": anp_sec, "neurons": res.details.neurons,
                         "pruned": paper["pruned"], "acc": paper["acc"], "asr": paper["asr"],
                         "collapsed": res.collapsed, "sweep": sweep})
            print(f"{rname:5} seed {seed}: victim ACC {100 * before.acc:5.1f} ASR {100 * before.asr:5.1f} | ANP "
                  f"{iterations} it. ({anp_sec:.0f} s), threshold 0.2: {paper['pruned']} pruned, ACC "
                  f"{100 * paper['acc']:5.1f} ASR {100 * paper['asr']:5.1f}"
                  + ("  COLLAPSED" if res.collapsed else ""), flush=True)
            print("      " + "  ".join(f"{s['threshold']}: {s['pruned']} {100 * s['acc']:.1f}/{100 * s['asr']:.1f}"
                                      for s in sweep), flush=True)
    summary = []
    for rname in dict.fromkeys(r["recipe"] for r in rows):
        rr = [r for r in rows if r["recipe"] == rname]
        summary.append({"recipe": rname, "victims": len(rr),
                        "median ASR @0.2 %": round(100 * statistics.median(r["asr"] for r in rr), 1),
                        "max ASR @0.2 %": round(100 * max(r["asr"] for r in rr), 1),
                        "mean ACC drop @0.2 pts": round(100 * statistics.mean(r["victim_acc"] - r["acc"] for r in rr), 1),
                        "victims < 20% ASR": sum(r["asr"] < 0.2 for r in rr)})
    _common.print_table(summary)
    _common.write_json(args.out, {"benchmark": "anp_victims", "data": "digits 16x16 grayscale (1,347 train / 450 test)",
                                  "attack": "badnets 3x3, 10%, target 0", "victim": VICTIM, "recipes": RECIPES,
                                  "iterations": iterations, "clean_ratio": args.clean_ratio, "mask_lr": args.mask_lr,
                                  "width": args.width, "rows": rows,
                                  "summary": summary, "wall_seconds": time.perf_counter() - t_all,
                                  "threads": args.threads})
    return 0


if __name__ == "__main__":
    sys.exit(main())
