"""Why does FT-SAM remove a backdoor from one victim recipe and not another? A controlled study.

Issue #15: FT-SAM removed a BadNets patch backdoor from a PreActResNet18 trained with SGD lr 0.01
(30 epochs) but not from the same network trained with lr 0.05 (ASR 99.8 -> 98.0). This script
trains victims that differ only in their learning rate and repairs each with FT-SAM and vanilla
fine-tuning while changing one factor at a time: the repair's learning rate, rho, the step budget
(epochs x steps per epoch), label smoothing, the clean subset size, and BatchNorm handling.
The default variant set is the before/after of ``lr="auto"`` (FT-SAM's default since issue #15):
the paper's lr 0.01, ``lr="auto"``, FineTune at the same budget with either, and 20% clean data
at the same number of steps. ``--variants`` with every name gives the older one-factor study.
Each victim row also records its top Hessian eigenvalue on the 5% clean share (the quantity
``lr="auto"`` reads).

    python benchmarks/ftsam_recipe.py --threads 1                       # digits 16x16, ~8 CPU-minutes
    python benchmarks/ftsam_recipe.py --threads 1 --data ../shared/data/cifar10_subset.npz

Scale (CPU budget, stated wherever the numbers are used): PreActResNet18 width 8 on 16x16 images,
victims trained 30 epochs (SGD, batch 64, wd 5e-4, cosine), 10% all-to-one poisoning, target 0,
defender holds 5% class-balanced clean data (digits: 67 images; CIFAR-10 subset: 254 images).
"""

from __future__ import annotations

import sys
import time

import _common
import torch

VICTIM_LRS = (0.01, 0.05)
BASE = {"epochs": 100, "lr": 0.01, "batch_size": 32, "clean_ratio": 0.05, "eval_every": 100, "augment": None}
VARIANTS = {
    # name: (repair, overrides)
    "ft_sam paper (batch 256)": ("ft_sam", {"batch_size": 256}),
    "ft_sam batch 32": ("ft_sam", {}),
    "ft_sam auto lr": ("ft_sam", {"lr": "auto"}),
    "ft_sam auto lr, 20% clean, same steps": ("ft_sam", {"lr": "auto", "clean_ratio": 0.2, "epochs": 25}),
    "ft_sam lr 0.02": ("ft_sam", {"lr": 0.02}),
    "ft_sam lr 0.03": ("ft_sam", {"lr": 0.03}),
    "ft_sam rho 8": ("ft_sam", {"rho": 8.0}),
    "ft_sam no label smoothing": ("ft_sam", {"label_smoothing": 0.0}),
    "ft_sam 3x epochs": ("ft_sam", {"epochs": 300}),
    "ft_sam 20% clean": ("ft_sam", {"clean_ratio": 0.2}),
    "ft_sam lr 0.05": ("ft_sam", {"lr": 0.05}),
    "ft_sam lr 0.05 rho 8": ("ft_sam", {"lr": 0.05, "rho": 8.0}),
    "finetune batch 32": ("finetune", {}),
    "finetune lr 0.05": ("finetune", {"lr": 0.05}),
    "finetune auto lr": ("finetune", {"lr": "auto"}),
    "finetune auto lr, 20% clean, same steps": ("finetune", {"lr": "auto", "clean_ratio": 0.2, "epochs": 25}),
    # the fine-tuning transform of BackdoorBench's FT-SAM / FT code: random crop (+ flip on CIFAR-10)
    "ft_sam auto lr, crop": ("ft_sam", {"lr": "auto", "augment": "crop"}),
    "ft_sam auto lr, crop+flip": ("ft_sam", {"lr": "auto", "augment": "crop_flip"}),
    "ft_sam lr 0.01, crop+flip": ("ft_sam", {"augment": "crop_flip"}),
    "ft_sam lr 0.01, crop": ("ft_sam", {"augment": "crop"}),
    "finetune lr 0.01, crop": ("finetune", {"augment": "crop"}),
    "finetune auto lr, crop": ("finetune", {"lr": "auto", "augment": "crop"}),
    "finetune auto lr, crop+flip": ("finetune", {"lr": "auto", "augment": "crop_flip"}),
    "finetune lr 0.01, crop+flip": ("finetune", {"augment": "crop_flip"}),
}
#: The run recorded in docs/repair.md ("lr='auto'"): before (the paper's lr) / after (the new default),
#: FineTune at the same budget with either lr, the clean-subset size at equal steps.
DEFAULT_VARIANTS = ("ft_sam batch 32", "ft_sam auto lr", "finetune batch 32", "finetune auto lr",
                    "ft_sam auto lr, 20% clean, same steps", "finetune auto lr, 20% clean, same steps")


def weight_stats(model) -> dict:
    """Norms the victim's learning rate changes: conv/linear weight norm and BN scale."""
    conv = [p for n, p in model.named_parameters() if p.dim() > 1]
    bn = [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return {"conv_weight_norm": float(torch.sqrt(sum((p.detach() ** 2).sum() for p in conv))),
            "bn_gamma_mean_abs": float(torch.cat([g.detach().abs() for g in bn]).mean())}


def main(argv=None) -> int:
    p = _common.parser(__doc__, "benchmarks/results/ftsam_recipe.json", "two variants only")
    _common.add_data_option(p)
    p.add_argument("--victim-lrs", nargs="*", type=float, default=list(VICTIM_LRS))
    p.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                   help="repair variants (default: the lr='auto' before/after set; the older study: all of them)")
    p.add_argument("--victim-epochs", type=int, default=30)
    args = p.parse_args(argv)
    _common.setup(args)

    import os
    import robustkit
    from robustkit.backdoor import BadNets, backdoor_metrics, defense_effectiveness_rating
    from robustkit.models import PreActResNet18
    from robustkit.repair.finetune import top_hessian_eigenvalue
    from robustkit.repair.guard import split_clean
    from robustkit.training import train

    import _bdata
    data, dname = _bdata.load("cifar" if args.data else "digits", args.data)
    variants = list(DEFAULT_VARIANTS)[:2] if args.quick else args.variants
    atk = BadNets(size=3)
    poisoned = atk.poison(data.train, rate=0.10, seed=0)
    rows = []
    print(dname)
    for vlr in args.victim_lrs:
        torch.manual_seed(0)
        model = PreActResNet18(in_channels=data.channels, num_classes=data.num_classes, width=8)
        train(model, poisoned, progress=False, seed=0, epochs=args.victim_epochs, lr=vlr, batch_size=64,
              optimizer="sgd", weight_decay=5e-4)
        before = backdoor_metrics(model, atk, data.test)
        ws = weight_stats(model)
        sub = split_clean(data.train, BASE["clean_ratio"], seed=0).train  # the share every 5% repair trains on
        ws["sharpness_ls0.1"] = top_hessian_eigenvalue(model, sub, batch_size=32, label_smoothing=0.1)
        ws["sharpness_ls0"] = top_hessian_eigenvalue(model, sub, batch_size=32)
        print(f"victim lr {vlr}: ACC {100 * before.acc:.1f} ASR {100 * before.asr:.1f}  {ws}", flush=True)
        rows.append({"victim_lr": vlr, "variant": "none", "acc": before.acc, "asr": before.asr, "ra": before.ra, **ws})
        for vname in variants:
            kind, over = VARIANTS[vname]
            spec = {"name": kind, **BASE, **({"rho": 2.0, "label_smoothing": 0.1} if kind == "ft_sam" else {}), **over}
            t0 = time.perf_counter()
            res = robustkit.REPAIRS.build(spec).repair(model, data.train, progress=False)
            sec = time.perf_counter() - t0
            after = backdoor_metrics(res.model, atk, data.test)
            der = defense_effectiveness_rating(before, after)
            rows.append({"victim_lr": vlr, "variant": vname, "spec": spec, "acc": after.acc, "asr": after.asr,
                         "ra": after.ra, "der": der, "seconds": sec, "collapsed": res.collapsed,
                         "steps": res.details["steps_per_epoch"] * spec["epochs"], "lr_used": res.details["lr"],
                         "sharpness": res.details["sharpness"], "holdout_acc": [res.details["holdout_acc_before"],
                                                                                res.details["holdout_acc_after"]],
                         **weight_stats(res.model)})
            print(f"  {vname:40} lr {res.details['lr']:.4f} ACC {100 * after.acc:5.1f} ASR {100 * after.asr:5.1f} RA {100 * after.ra:5.1f} "
                  f"DER {100 * der:5.1f} steps {rows[-1]['steps']:4d} {sec:5.1f}s", flush=True)
    _common.write_json(args.out, {"benchmark": "ftsam_recipe", "data": dname, "attack": "badnets 3x3 white, 10%",
                                  "model": "preact_resnet18 width 8", "victim_epochs": args.victim_epochs,
                                  "base": BASE, "rows": rows, "loadavg": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
