"""The backdoor benchmark matrix: attacks x victim recipes x data sets x every repair and filter.

Attacks {BadNets, Blended, SIG, WaNet} (10% all-to-one poisoning, target 0; SIG clean-label)
x victim recipes {SGD lr 0.01, SGD lr 0.05} x {digits, the genuine CIFAR-10 subset} at 16x16.

- **Repairs** (PreActResNet18 width 8 victims): FineTune, FT-SAM and SkipSuppression with their
  defaults except ``batch_size=32`` (5% clean data is 67 digits / 254 CIFAR images; the default
  batch of 256 would be one step per epoch), measured by ACC / ASR / RA / DER, whether the
  collapse guard fired, and wall time.
- **Feature filters** on the same victims' penultimate features: robustkit's activation
  clustering and spectral signatures (``squared`` = the paper, ``signed``), and IBM ART's
  ``ActivationDefence`` / ``SpectralSignatureDefense`` on exactly the same feature matrix
  (benchmark-only peer, benchmarks/_art_peer.py): TPR / FPR / AUROC and wall time.
- **Attention filter** (SmallViT victims, dim 64, depth 4, patch 4, AdamW lr 1e-3): the
  two-sided attention-entropy filter (``direction="both"``) and BYE's one-sided rule
  (``"low"``, the default).

    python benchmarks/backdoor_matrix.py --part cnn --datasets digits --threads 1
    python benchmarks/backdoor_matrix.py --part cnn --datasets cifar --data ../shared/data/cifar10_subset.npz
    python benchmarks/backdoor_matrix.py --part vit --datasets digits cifar --data ../shared/data/cifar10_subset.npz
    python benchmarks/backdoor_matrix.py --merge a.json b.json c.json --out benchmarks/reference/backdoor_matrix.json

Scale (CPU budget: 2 shared cores): 16x16 images, width-8 PreActResNet18, victims trained
``--victim-epochs`` (default 20) epochs, ViTs 20 epochs. Every figure from the CIFAR-10 subset is
on "CIFAR-10 subset (5,085 train / 512 test)" images downscaled to 16x16.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import _common
import numpy as np
import torch

ATTACKS = {
    "badnets": ({"name": "badnets", "size": 2}, 0.10),
    "blended": ({"name": "blended", "alpha": 0.2}, 0.10),
    "sig": ({"name": "sig", "delta": 80 / 255, "frequency": 6}, 0.08),
    "wanet": ({"name": "wanet", "s": 2.0, "k": 4, "noise_mode": False}, 0.10),
}
RECIPES = {"lr0.01": {"lr": 0.01}, "lr0.05": {"lr": 0.05}}
VICTIM = {"batch_size": 64, "optimizer": "sgd", "weight_decay": 5e-4, "schedule": "cosine"}
REPAIRS = {
    "finetune": {"name": "finetune", "batch_size": 32},
    "ft_sam": {"name": "ft_sam", "batch_size": 32},
    "skip_suppression": {"name": "skip_suppression", "batch_size": 32},
}
# extra column on victims trained with another lr than FT-SAM's default 0.01: FT-SAM at the victim's lr
EXTRA_REPAIRS = ("ft_sam_victim_lr",)
VIT = {"name": "small_vit", "image_size": 16, "patch_size": 4, "dim": 64, "depth": 4, "heads": 4}
VIT_RECIPE = {"epochs": 20, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 2}


def _caught(fn):
    """Run ``fn()``; return its value, the RuntimeWarning texts it raised, and the seconds it took."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always", RuntimeWarning)
        out = fn()
    return out, [str(w.message) for w in got if issubclass(w.category, RuntimeWarning)], time.perf_counter() - t0


def _filter_row(flagged, scores, truth) -> dict:
    from sklearn.metrics import roc_auc_score

    f, t = np.asarray(flagged, bool), np.asarray(truth, bool)
    s = f.astype(float) if scores is None else np.asarray(scores, float)
    return {"tpr": float((f & t).sum() / t.sum()), "fpr": float((f & ~t).sum() / (~t).sum()),
            "auroc": float(roc_auc_score(t, s)), "flagged": int(f.sum()), "auroc_from": "mask" if scores is None else "scores"}


def run_cnn(data, dname, attacks, recipes, epochs, log, save=lambda rows: None):
    import robustkit
    from robustkit.backdoor import backdoor_metrics
    from robustkit.errors import RepairError
    from robustkit.filtering.common import penultimate_features
    from robustkit.models import PreActResNet18
    from robustkit.repair import repair_and_measure
    from robustkit.training import train

    import _art_peer

    art = _art_peer.available()
    rows = []
    for aname in attacks:
        spec, rate = ATTACKS[aname]
        atk = robustkit.BACKDOORS.build(spec)
        poisoned = atk.poison(data.train, rate=rate, seed=0)
        truth = poisoned.is_poisoned.numpy()
        for rname in recipes:
            torch.manual_seed(0)
            model = PreActResNet18(in_channels=data.channels, num_classes=data.num_classes, width=8)
            _, _, sec = _caught(lambda: train(model, poisoned, progress=False, seed=0, epochs=epochs,
                                              **VICTIM, **RECIPES[rname]))
            before = backdoor_metrics(model, atk, data.test)
            base = {"data": dname, "attack": aname, "recipe": rname, "model": "preact_resnet18_w8"}
            rows.append({**base, "kind": "victim", "acc": before.acc, "asr": before.asr, "ra": before.ra, "seconds": sec})
            log(f"{dname:6} {aname:8} {rname:7} victim            ACC {100 * before.acc:5.1f} ASR {100 * before.asr:5.1f} {sec:6.1f}s")
            # ---- feature filters (robustkit and ART on the same features)
            filters = {
                "activation_clustering": {"name": "activation_clustering", "progress": False},
                "spectral_squared": {"name": "spectral_signatures", "expected_rate": rate, "progress": False},
                "spectral_signed": {"name": "spectral_signatures", "expected_rate": rate, "score": "signed",
                                    "progress": False},
            }
            for fname, fspec in filters.items():
                res, warns, fsec = _caught(lambda: robustkit.FILTERS.build(fspec).fit(model, poisoned))
                notes = list(res.details.get("warnings", []) if "warnings" in res.details else [])
                rows.append({**base, "kind": "filter", "method": fname, **_filter_row(res.flagged.numpy(), res.scores.numpy(), truth),
                             "seconds": fsec, "warnings": sorted(set(warns + notes))})
                r = rows[-1]
                log(f"{'':24} {fname:22} TPR {100 * r['tpr']:5.1f} FPR {100 * r['fpr']:5.1f} AUROC {r['auroc']:.3f} {fsec:5.1f}s"
                    + ("  [warned]" if r["warnings"] else ""))
            if art:
                t0 = time.perf_counter()
                feats, labels = penultimate_features(model, poisoned, progress=False)
                fsec = time.perf_counter() - t0
                f, y = feats.numpy(), labels.numpy()
                for fname, fn in (("art_activation_defence", lambda: _art_peer.activation_defence(f, y, data.num_classes)),
                                  ("art_spectral_signature", lambda: _art_peer.spectral_signature(f, y, data.num_classes, rate))):
                    out, _, asec = _caught(fn)
                    rows.append({**base, "kind": "filter", "method": fname, **_filter_row(out["flagged"], out["scores"], truth),
                                 "seconds": asec + fsec})
                    r = rows[-1]
                    log(f"{'':24} {fname:22} TPR {100 * r['tpr']:5.1f} FPR {100 * r['fpr']:5.1f} AUROC {r['auroc']:.3f} {asec + fsec:5.1f}s")
            # ---- repairs
            repairs = dict(REPAIRS)
            if RECIPES[rname]["lr"] != 0.01:  # FT-SAM at the victim's own learning rate (see docs/repair.md)
                repairs["ft_sam_victim_lr"] = {**REPAIRS["ft_sam"], "lr": RECIPES[rname]["lr"]}
            for pname, pspec in repairs.items():
                try:
                    outcome, warns, psec = _caught(lambda: repair_and_measure(model, pspec, data.train, data.test, atk,
                                                                              data.num_classes, progress=False))
                except RepairError as exc:
                    rows.append({**base, "kind": "repair", "method": pname, "raised": str(exc)})
                    log(f"{'':24} {pname:22} raised RepairError: {exc}")
                    continue
                a, d = outcome.after, outcome.result.details
                rows.append({**base, "kind": "repair", "method": pname, "acc": a.acc, "asr": a.asr, "ra": a.ra,
                             "der": outcome.der, "collapsed": outcome.result.collapsed, "seconds": psec,
                             "holdout_acc_before": d.get("holdout_acc_before"), "holdout_acc_after": d.get("holdout_acc_after"),
                             "layer": d.get("layer") if "layer" in d else None, "warnings": warns})
                log(f"{'':24} {pname:22} ACC {100 * a.acc:5.1f} ASR {100 * a.asr:5.1f} RA {100 * a.ra:5.1f} "
                    f"DER {100 * outcome.der:5.1f} {psec:6.1f}s" + ("  COLLAPSED" if outcome.result.collapsed else ""))
                save(rows)
    return rows


def run_vit(data, dname, attacks, epochs, log, save_dir: Path, save=lambda rows: None):
    import robustkit
    from robustkit.backdoor import backdoor_metrics
    from robustkit.training import train

    rows = []
    for aname in attacks:
        spec, rate = ATTACKS[aname]
        atk = robustkit.BACKDOORS.build(spec)
        poisoned = atk.poison(data.train, rate=rate, seed=0)
        truth = poisoned.is_poisoned.numpy()
        torch.manual_seed(0)
        model = robustkit.MODELS.build({**VIT, "in_channels": data.channels, "num_classes": data.num_classes})
        _, _, sec = _caught(lambda: train(model, poisoned, progress=False, seed=0, **dict(VIT_RECIPE, epochs=epochs)))
        before = backdoor_metrics(model, atk, data.test)
        base = {"data": dname, "attack": aname, "recipe": f"vit-p{VIT['patch_size']}", "model": "small_vit"}
        rows.append({**base, "kind": "victim", "acc": before.acc, "asr": before.asr, "ra": before.ra, "seconds": sec})
        log(f"{dname:6} {aname:8} vit     victim            ACC {100 * before.acc:5.1f} ASR {100 * before.asr:5.1f} {sec:6.1f}s")
        for fname, fspec in (("attention_entropy", {"direction": "both"}), ("attention_entropy_low", {"direction": "low"})):
            res, warns, fsec = _caught(lambda: robustkit.FILTERS.build({"name": "attention_entropy", "progress": False,
                                                                         **fspec}).fit(model, poisoned))
            d = res.details
            rows.append({**base, "kind": "filter", "method": fname, **_filter_row(res.flagged.numpy(), res.scores.numpy(), truth),
                         "seconds": fsec, "warnings": list(d["warnings"]), "layers": d["layers"], "fallback": d["fallback"],
                         "directions": [r["direction"] for r in d["per_layer"]],
                         "layer_gap": [round(r["gap"], 2) for r in d["per_layer"]]})
            r = rows[-1]
            log(f"{'':24} {fname:22} TPR {100 * r['tpr']:5.1f} FPR {100 * r['fpr']:5.1f} AUROC {r['auroc']:.3f} "
                f"layers {d['layer_indices']} {r['directions']} gaps {r['layer_gap']}" + ("  [warned]" if r["warnings"] else ""))
        save_dir.mkdir(parents=True, exist_ok=True)
        np.savez(save_dir / f"entropy_{dname}{data.image_size[0]}_{aname}_p{VIT['patch_size']}.npz",
                 entropy=res.details["layer_entropy"].numpy(), truth=truth)
        save(rows)
    return rows


# --------------------------------------------------------------------------- tables
def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def tables(rows: list[dict]) -> str:
    out = []
    victims = {(r["data"], r["attack"], r["recipe"]): r for r in rows if r["kind"] == "victim"}
    rep = [r for r in rows if r["kind"] == "repair"]
    if rep:
        out.append("| data | attack | victim | none ACC / ASR | FineTune ACC / ASR / RA (DER) | FT-SAM ACC / ASR / RA (DER) | SkipSuppression ACC / ASR / RA (DER) | FT-SAM at the victim's lr |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for key, v in victims.items():
            if v["model"] != "preact_resnet18_w8":
                continue
            cells = []
            for m in (*REPAIRS, *EXTRA_REPAIRS):
                r = next((r for r in rep if (r["data"], r["attack"], r["recipe"]) == key and r["method"] == m), None)
                if r is None:
                    cells.append("-")
                elif "raised" in r:
                    cells.append("raised RepairError")
                else:
                    cells.append(f"{_pct(r['acc'])} / {_pct(r['asr'])} / {_pct(r['ra'])} ({_pct(r['der'])})"
                                 + (" **collapsed**" if r["collapsed"] else ""))
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | {_pct(v['acc'])} / {_pct(v['asr'])} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("| repair | data | victim | mean ACC drop | mean ASR | worst ASR | collapsed | mean s |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for m in (*REPAIRS, *EXTRA_REPAIRS):
            for dn in sorted({k[0] for k in victims}):
                for rc in sorted({k[2] for k in victims if k[2] in RECIPES}):
                    rs = [r for r in rep if r["method"] == m and r["data"] == dn and r["recipe"] == rc and "raised" not in r]
                    if not rs:
                        continue
                    drop = np.mean([victims[(r["data"], r["attack"], r["recipe"])]["acc"] - r["acc"] for r in rs])
                    out.append(f"| {m} | {dn} | {rc} | {100 * drop:.1f} | {100 * np.mean([r['asr'] for r in rs]):.1f} | "
                               f"{100 * max(r['asr'] for r in rs):.1f} | {sum(r['collapsed'] for r in rs)}/{len(rs)} | "
                               f"{np.mean([r['seconds'] for r in rs]):.0f} |")
    fil = [r for r in rows if r["kind"] == "filter"]
    if fil:
        methods = list(dict.fromkeys(r["method"] for r in fil))
        out.append("")
        out.append("| data | attack | victim | " + " | ".join(methods) + " |")
        out.append("| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |")
        for key in dict.fromkeys((r["data"], r["attack"], r["recipe"]) for r in fil):
            cells = []
            for m in methods:
                r = next((r for r in fil if (r["data"], r["attack"], r["recipe"]) == key and r["method"] == m), None)
                cells.append("" if r is None else f"{_pct(r['tpr'])} / {_pct(r['fpr'])} / {r['auroc']:.2f}"
                             + (" (w)" if r.get("warnings") else ""))
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = _common.parser(__doc__, "benchmarks/results/backdoor_matrix.json", "BadNets and Blended, lr 0.05 victims only")
    _common.add_data_option(p)
    p.add_argument("--part", choices=["cnn", "vit"], default="cnn")
    p.add_argument("--datasets", nargs="*", default=["digits"], choices=["digits", "cifar"])
    p.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--victim-epochs", type=int, default=20)
    p.add_argument("--size", type=int, default=16, help="image side (default 16, the CPU budget)")
    p.add_argument("--vit-epochs", type=int, default=VIT_RECIPE["epochs"])
    p.add_argument("--vit-patch", type=int, default=VIT["patch_size"], help="ViT patch size (2 on 16x16: 64 patch tokens)")
    p.add_argument("--merge", nargs="*", default=None, help="JSON files of earlier runs: merge them into --out and print the tables")
    args = p.parse_args(argv)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for run in runs for r in run["rows"]]
        print(tables(rows))
        _common.write_json(args.out, {"benchmark": "backdoor_matrix", "runs": [{k: v for k, v in run.items() if k != "rows"}
                                                                              for run in runs], "rows": rows})
        return 0
    _common.setup(args)
    import _bdata

    attacks = ["badnets", "blended"] if args.quick else args.attacks
    recipes = ["lr0.05"] if args.quick else args.recipes
    rows, descs = [], {}
    import _art_peer

    def log(msg):
        print(msg, flush=True)

    def save(new_rows):
        _common.write_json(args.out, {"benchmark": "backdoor_matrix", "part": args.part, "data": descs,
                                      "victim_epochs": args.victim_epochs, "victim": VICTIM, "recipes": RECIPES,
                                      "repairs": REPAIRS, "vit": VIT, "vit_recipe": dict(VIT_RECIPE, epochs=args.vit_epochs),
                                      "attacks": ATTACKS, "art": _art_peer.available(), "loadavg": os.getloadavg(),
                                      "rows": rows + new_rows})

    for dname in args.datasets:
        data, descs[dname] = _bdata.load(dname, args.data, args.size)
        log(descs[dname])
        if args.part == "cnn":
            rows += run_cnn(data, dname, attacks, recipes, args.victim_epochs, log, save)
        else:
            VIT["patch_size"], VIT["image_size"] = args.vit_patch, args.size
            rows += run_vit(data, dname, attacks, args.vit_epochs, log, Path(args.out).with_suffix(""), save)
    print(tables(rows))
    save([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
