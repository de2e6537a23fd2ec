"""The backdoor baselines (issue #16) against FineTune at equal data: Fine-Pruning, NAD, ANP, I-BAU,
Neural Cleanse, plus STRIP's detection rates - on the built-in digits and the genuine CIFAR-10 subset.

For each data set (16x16 RGB; digits: 1,347 train / 450 test; "CIFAR-10 subset (5,085 train /
512 test)" downscaled to 16x16) and attack (BadNets 3x3 white patch, Blended alpha 0.2; 10%
all-to-one poisoning, target 0) a SmallCNN (width 16) victim is trained (SGD lr 0.05, batch 64,
``--victim-epochs``), then every defense repairs it from the *same* clean data: a class-balanced
5% of the clean training split (``clean_ratio=0.05``; 67 digits / 254 CIFAR images, minus each
repair's 5% held-out guard split). Columns: ACC / ASR / RA / DER (BackdoorBench) and wall time,
also as a ratio to FineTune's on the same victim. STRIP (its defaults, 10% clean data to
calibrate) reports TPR on the triggered non-target test images and FPR on the clean ones.

    python benchmarks/baselines.py --threads 1 --datasets digits
    python benchmarks/baselines.py --threads 1 --datasets cifar --data ../shared/data/cifar10_subset.npz
    python benchmarks/baselines.py --threads 1 --datasets digits --victim-augment crop --victim-epochs 12

``--victim-augment`` trains the victim on random crops (``crop``; ``crop_flip`` adds the mirror, for
natural images), as the papers' and BackdoorBench's victims are trained; ``--victim-model
preact_resnet18`` swaps the SmallCNN for a width-16 PreActResNet18 (848 BatchNorm neurons for ANP).
``--strip-blend add average`` runs STRIP with the paper's saturated sum and with the mean (docs/baselines.md:
the sum can wash a Blended trigger out); ``--methods`` with no name runs the victims and STRIP only:

    python benchmarks/baselines.py --threads 1 --victim-augment crop --victim-epochs 20 \
        --victim-model preact_resnet18 --methods --strip-blend add average

CPU budget (2 shared cores): the settings are each method's defaults except where listed in
``DEFENSES`` (batch 32 where a default batch would exceed the clean set; ANP's iterations and Neural
Cleanse's epochs per label reduced; NAD's teacher as in docs/baselines.md). Single-threaded.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import _bdata
import _common
import torch

ATTACKS = {
    "badnets": ({"name": "badnets", "size": 3}, 0.10),
    "blended": ({"name": "blended", "alpha": 0.2}, 0.10),
}
VICTIM = {"lr": 0.05, "batch_size": 64, "optimizer": "sgd", "weight_decay": 5e-4, "schedule": "cosine"}
DATA = {"clean_ratio": 0.05}
DEFENSES = {
    # FineTune at equal data and about NAD's number of passes: the reference every paper compares with.
    # Without augmentation (FineTune's default since issue #15 crops), as every baseline here trains
    # and as the reference runs (benchmarks/reference/baselines_*.json) were made.
    "finetune": {"name": "finetune", "epochs": 20, "batch_size": 32, "augment": None, **DATA},
    "fine_pruning": {"name": "fine_pruning", "epochs": 10, "batch_size": 32, **DATA},
    "nad": {"name": "nad", "teacher_epochs": 20, "teacher_lr": 0.02, "epochs": 20, "betas": 20.0, "batch_size": 32, **DATA},
    "anp": {"name": "anp", "iterations": 500, **DATA},
    "i_bau": {"name": "i_bau", **DATA},
    "neural_cleanse": {"name": "neural_cleanse", "epochs_per_label": 15, **DATA},
}
STRIP = {"name": "strip", "n_overlay": 100, "frr": 0.01}


def _caught(fn):
    """``fn()``'s value, the RuntimeWarning texts it raised, and its wall seconds."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always", RuntimeWarning)
        out = fn()
    return out, sorted({str(w.message) for w in got if issubclass(w.category, RuntimeWarning)}), time.perf_counter() - t0


VICTIM_MODELS = {"small_cnn": "small_cnn_w16", "preact_resnet18": "preact_resnet18_w16"}


def _victim(name: str, data):
    from robustkit.models import PreActResNet18, SmallCNN

    cls = SmallCNN if name == "small_cnn" else PreActResNet18
    return cls(in_channels=data.channels, num_classes=data.num_classes, width=16)


def run(data, dname, attacks, epochs, log, methods=None, strip=True, victim_augment=None, victim_model="small_cnn",
        strip_blends=("add",)):
    import robustkit
    from robustkit.backdoor import backdoor_metrics
    from robustkit.backdoor.metrics import triggered_test_set
    from robustkit.data import to_tensors
    from robustkit.errors import RobustkitError
    from robustkit.filtering import DETECTORS
    from robustkit.repair import repair_and_measure, split_clean
    from robustkit.training import train

    rows = []
    for aname in attacks:
        spec, rate = ATTACKS[aname]
        atk = robustkit.BACKDOORS.build(spec)
        poisoned = atk.poison(data.train, rate=rate, seed=0)
        torch.manual_seed(0)
        model = _victim(victim_model, data)
        _, _, sec = _caught(lambda: train(model, poisoned, progress=False, seed=0, epochs=epochs,
                                          augment=victim_augment, **VICTIM))
        before = backdoor_metrics(model, atk, data.test)
        base = {"data": dname, "attack": aname, "model": VICTIM_MODELS[victim_model],
                "victim_augment": victim_augment or "none"}
        rows.append({**base, "method": "none", "acc": before.acc, "asr": before.asr, "ra": before.ra, "seconds": sec})
        log(f"{dname:6} {aname:8} victim          ACC {100 * before.acc:5.1f} ASR {100 * before.asr:5.1f} {sec:6.1f}s")
        ft_sec = None
        for pname, pspec in DEFENSES.items():
            if methods is not None and pname not in methods:
                continue
            try:
                out, warns, psec = _caught(lambda: repair_and_measure(model, pspec, data.train, data.test, atk,
                                                                      data.num_classes, progress=False))
            except RobustkitError as exc:
                rows.append({**base, "method": pname, "raised": f"{type(exc).__name__}: {exc}"})
                log(f"{'':16} {pname:15} raised {type(exc).__name__}: {exc}")
                continue
            a, d = out.after, out.result.details
            ft_sec = psec if pname == "finetune" else ft_sec
            row = {**base, "method": pname, "acc": a.acc, "asr": a.asr, "ra": a.ra, "der": out.der,
                   "collapsed": out.result.collapsed, "seconds": psec, "time_vs_finetune": psec / ft_sec if ft_sec else None,
                   "warnings": warns}
            for key in ("pruned", "target", "flagged", "teacher_asr"):
                if key in d:
                    row[key] = d.get(key)
            rows.append(row)
            extra = "".join(f" {k}={row[k]}" for k in ("pruned", "target") if k in row)
            log(f"{'':16} {pname:15} ACC {100 * a.acc:5.1f} ASR {100 * a.asr:5.1f} RA {100 * a.ra:5.1f} "
                f"DER {100 * out.der:5.1f} {psec:6.1f}s ({row['time_vs_finetune']:.2f}x FT){extra}"
                + ("  COLLAPSED" if out.result.collapsed else ""))
        if not strip:
            continue
        # STRIP: inference-time detection, once per superimposition rule asked for
        x, _ = to_tensors(data.test)
        xt, _, _ = triggered_test_set(atk, data.test, data.num_classes)
        calibration = split_clean(data.train, 0.10).train
        for blend in strip_blends:
            t0 = time.perf_counter()
            det = DETECTORS.build({**STRIP, "blend": blend}).fit(model, calibration)
            r = det.evaluate(x, xt)
            sec = time.perf_counter() - t0
            rows.append({**base, "method": "strip", "blend": blend, "tpr": r["tpr"], "fpr": r["fpr"],
                         "threshold": det.threshold, "seconds": sec,
                         "time_vs_finetune": sec / ft_sec if ft_sec else None})
            log(f"{'':16} {'strip ' + blend:15} TPR {100 * r['tpr']:5.1f} FPR {100 * r['fpr']:5.1f} {sec:6.1f}s")
    return rows


def _pct(v):
    return "" if v is None else f"{100 * v:.1f}"


def tables(rows: list[dict]) -> str:
    """Markdown tables: one per data set, a row per attack x method."""
    out = []
    for dname in dict.fromkeys(r["data"] for r in rows):
        out.append(f"\n**{dname}**\n")
        out.append("| attack | method | ACC | ASR | RA | DER | seconds | time / FineTune | notes |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r["data"] == dname):
            if "raised" in r:
                out.append(f"| {r['attack']} | {r['method']} | | | | | | | raised: {r['raised']} |")
                continue
            if r["method"] == "strip":
                blend = "" if r.get("blend", "add") == "add" else f", blend {r['blend']}"
                ratio = f"{r['time_vs_finetune']:.2f}x" if r.get("time_vs_finetune") else ""
                out.append(f"| {r['attack']} | STRIP (detection{blend}) | | | | | {r['seconds']:.1f} | "
                           f"{ratio} | TPR {_pct(r['tpr'])}, FPR {_pct(r['fpr'])} |")
                continue
            notes = []
            if r.get("collapsed"):
                notes.append("collapsed (guard)")
            for k in ("pruned", "target", "teacher_asr"):
                if k in r:
                    notes.append(f"{k} {r[k]:.3f}" if isinstance(r[k], float) else f"{k} {r[k]}")
            ratio = f"{r['time_vs_finetune']:.2f}x" if r.get("time_vs_finetune") else ""
            out.append(f"| {r['attack']} | {r['method']} | {_pct(r['acc'])} | {_pct(r['asr'])} | {_pct(r['ra'])} | "
                       f"{_pct(r.get('der'))} | {r['seconds']:.1f} | {ratio} | {', '.join(notes)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = _common.parser(__doc__, "benchmarks/results/baselines.json", "BadNets only, fewer victim epochs")
    _common.add_data_option(p)
    p.add_argument("--datasets", nargs="*", default=["digits"], choices=["digits", "cifar"])
    p.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    p.add_argument("--methods", nargs="*", default=None, choices=list(DEFENSES),
                   help="run only these repairs (default: all; keep finetune for the time ratio)")
    p.add_argument("--no-strip", action="store_true", help="skip STRIP's detection rows")
    p.add_argument("--victim-epochs", type=int, default=None, help="victim epochs (default: digits 6, cifar 15)")
    p.add_argument("--victim-augment", default=None, choices=["crop", "crop_flip"],
                   help="train the victim on random crops (and flips); default: on the images as they are")
    p.add_argument("--victim-model", default="small_cnn", choices=list(VICTIM_MODELS))
    p.add_argument("--strip-blend", nargs="+", default=["add"], choices=["add", "average"],
                   help="STRIP's superimposition: the paper's saturated sum (add) and/or the mean (average)")
    args = p.parse_args(argv)
    _common.setup(args)
    attacks = ["badnets"] if args.quick else args.attacks
    rows, descs = [], {}
    t_all = time.perf_counter()
    load0 = os.getloadavg()
    for dname in args.datasets:
        data, descs[dname] = _bdata.load(dname, args.data)
        epochs = args.victim_epochs or (3 if args.quick else (6 if dname == "digits" else 15))
        print(f"{dname}: {descs[dname]}; victim {VICTIM_MODELS[args.victim_model]}, {epochs} epochs, augment "
              f"{args.victim_augment or 'none'}", flush=True)
        rows += run(data, dname, attacks, epochs, lambda s: print(s, flush=True), args.methods, not args.no_strip,
                    args.victim_augment, args.victim_model, args.strip_blend)
    md = tables(rows)
    print(md)
    victim = {**VICTIM, "model": VICTIM_MODELS[args.victim_model], "augment": args.victim_augment or "none"}
    _common.write_json(args.out, {"benchmark": "baselines", "data": descs, "victim": victim, "defenses": DEFENSES,
                                  "strip": {**STRIP, "blends": args.strip_blend}, "attacks": {a: ATTACKS[a] for a in attacks}, "rows": rows,
                                  "markdown": md, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                                  "wall_seconds": time.perf_counter() - t_all, "threads": args.threads})
    return 0


if __name__ == "__main__":
    sys.exit(main())
