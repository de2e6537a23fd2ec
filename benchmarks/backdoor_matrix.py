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
- **Attention filter** (SmallViT victims, dim 64, depth 4, 4 heads, patch 4, AdamW lr 1e-3),
  three columns: ``attention_entropy`` = the filter's default (``method="split"``: per-class
  2-means on the per-head CLS-attention entropies, the class picked by its size),
  ``attention_entropy_bye_low`` = BYE's rule as the paper states it (``method="bye"``,
  ``direction="low"``) and ``attention_entropy_bye_both`` = its two-sided variant
  (``method="bye"``, ``direction="both"``). The rows record the split's poisoned class, the
  target class's split (silhouette, orientation gap, flagged share) and ``confident``; BYE's
  rows the layers used and the per-layer GMM gaps. Per victim, the head-averaged and per-head
  entropies with labels and ground truth go to ``<out without .json>/entropy_*.npz``.

    python benchmarks/backdoor_matrix.py --part cnn --datasets digits --threads 1
    python benchmarks/backdoor_matrix.py --part cnn --datasets cifar --data ../shared/data/cifar10_subset.npz
    python benchmarks/backdoor_matrix.py --part vit --datasets digits cifar --data ../shared/data/cifar10_subset.npz
    python benchmarks/backdoor_matrix.py --merge a.json b.json c.json --out benchmarks/reference/backdoor_matrix.json

``--merge`` concatenates the rows of the files in order (a file that is itself a merge is
read run by run); a victim (data, attack, victim recipe, model) found in a later file replaces
every row of that victim from the earlier files, and a run none of whose rows survive moves to
``superseded_runs``. So re-running a part and merging the reference with the new file
replaces exactly the re-run victims.

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
# the attention-entropy filter's columns: its default (the per-class split) and BYE's rule, one- and two-sided
VIT_FILTERS = {
    "attention_entropy": {},
    "attention_entropy_bye_low": {"method": "bye", "direction": "low"},
    "attention_entropy_bye_both": {"method": "bye", "direction": "both"},
}


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
        side, p = VIT["image_size"], VIT["patch_size"]
        base = {"data": dname, "attack": aname, "recipe": f"vit-p{p} {side}x{side} ({(side // p) ** 2} tokens)",
                "model": "small_vit"}
        rows.append({**base, "kind": "victim", "acc": before.acc, "asr": before.asr, "ra": before.ra, "seconds": sec})
        log(f"{dname:6} {aname:8} vit     victim            ACC {100 * before.acc:5.1f} ASR {100 * before.asr:5.1f} {sec:6.1f}s")
        target = int(getattr(atk, "target", 0))
        for fname, fspec in VIT_FILTERS.items():
            res, warns, fsec = _caught(lambda: robustkit.FILTERS.build({"name": "attention_entropy", "progress": False,
                                                                         **fspec}).fit(model, poisoned))
            d = res.details
            row = {**base, "kind": "filter", "method": fname, "spec": dict(fspec),
                   **_filter_row(res.flagged.numpy(), res.scores.numpy(), truth), "seconds": fsec,
                   "warnings": list(d["warnings"]), "confident": bool(d.confident)}
            if d["method"] == "split":
                tc = d["per_class"].get(target, {})
                row.update(poisoned_classes=list(d["poisoned_classes"]), target=target,
                           target_class={k: tc[k] for k in ("n", "silhouette", "suspicious_share", "gap", "evidence_z",
                                                            "flagged") if k in tc})
                what = (f"class(es) {row['poisoned_classes']} target split sil {tc.get('silhouette', float('nan')):.2f} "
                        f"gap {tc.get('gap', float('nan')):.2f}")
            else:
                row.update(layers=d["layers"], fallback=d["fallback"],
                           directions=[r["direction"] for r in d["per_layer"]],
                           layer_gap=[round(r["gap"], 2) for r in d["per_layer"]])
                what = f"layers {d['layer_indices']} {row['directions']} gaps {row['layer_gap']}"
            rows.append(row)
            log(f"{'':24} {fname:26} TPR {100 * row['tpr']:5.1f} FPR {100 * row['fpr']:5.1f} AUROC {row['auroc']:.3f} "
                f"{fsec:5.1f}s {what}" + ("" if row["confident"] else "  [warned]"))
        save_dir.mkdir(parents=True, exist_ok=True)
        np.savez(save_dir / f"entropy_{dname}{side}_{aname}_p{p}.npz", entropy=d["layer_entropy"].numpy(),
                 head_entropy=d["head_entropy"].numpy(), labels=poisoned.labels.numpy(), truth=truth)
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
    vits = [r for r in rows if r["kind"] == "victim" and r["model"] == "small_vit"]
    if vits:
        out.append("")
        out.append("| data | attack | ViT victim | ACC / ASR | training s |")
        out.append("| --- | --- | --- | --- | --- |")
        out += [f"| {r['data']} | {r['attack']} | {r['recipe']} | {_pct(r['acc'])} / {_pct(r['asr'])} | {r['seconds']:.0f} |"
                for r in vits]
    fil = [r for r in rows if r["kind"] == "filter"]
    if fil:
        # CNN feature filters (and their ART peers) first, the ViT attention columns after them;
        # CNN victims' rows before ViT victims' rows, whatever order the merged runs came in
        methods = sorted(dict.fromkeys(r["method"] for r in fil), key=lambda m: m.startswith("attention"))
        vit_keys = {(r["data"], r["attack"], r["recipe"]) for r in fil if r["method"].startswith("attention")}
        out.append("")
        out.append("| data | attack | victim | " + " | ".join(methods) + " |")
        out.append("| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |")
        for key in sorted(dict.fromkeys((r["data"], r["attack"], r["recipe"]) for r in fil), key=lambda k: k in vit_keys):
            cells = []
            for m in methods:
                r = next((r for r in fil if (r["data"], r["attack"], r["recipe"]) == key and r["method"] == m), None)
                cells.append("" if r is None else f"{_pct(r['tpr'])} / {_pct(r['fpr'])} / {r['auroc']:.2f}"
                             + (" (w)" if r.get("warnings") else ""))
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------- merging runs
RUN_MODEL = {"cnn": "preact_resnet18_w8", "vit": "small_vit"}


def _victim_key(row: dict) -> tuple:
    return row["data"], row["attack"], row["recipe"], row["model"]


def _argv_values(run: dict, flag: str) -> list[str] | None:
    """The values a run's command line gave ``flag`` (None when it was not given)."""
    argv = list(run.get("argv") or [])
    if flag not in argv:
        return None
    values = []
    for a in argv[argv.index(flag) + 1:]:
        if a.startswith("--"):
            break
        values.append(a)
    return values


def _row_in_run(row: dict, run: dict) -> bool:
    """Whether ``row`` can come from ``run`` (its part's model, its data set, the attacks and victim
    recipes its command line selected and, for a ViT, its image and patch size)."""
    if RUN_MODEL.get(run.get("part")) != row["model"] or row["data"] not in run.get("data", {}):
        return False
    attacks = _argv_values(run, "--attacks")
    if attacks is not None and row["attack"] not in attacks:
        return False
    if row["model"] == "small_vit":
        side, p = run["vit"]["image_size"], run["vit"]["patch_size"]
        return row["recipe"].startswith(f"vit-p{p} {side}x{side}")
    recipes = _argv_values(run, "--recipes")
    return recipes is None or row["recipe"] in recipes


def _runs_of(doc: dict) -> list[tuple[dict, list[dict]]]:
    """``(run metadata, its rows)`` of one JSON file: a run of this script, or an earlier merge."""
    if "runs" not in doc:
        return [({k: v for k, v in doc.items() if k != "rows"}, list(doc["rows"]))]
    out = [(dict(run), []) for run in doc["runs"]]
    for r in doc["rows"]:
        fits = [rows for run, rows in out if _row_in_run(r, run)]
        if len(fits) != 1:
            raise SystemExit(f"cannot tell which run of the merged file holds the row {_victim_key(r)} ({len(fits)} fit)")
        fits[0].append(r)
    return out


def merge(docs: list[dict]) -> dict:
    """Rows of ``docs`` in order; a victim in a later file replaces all of its rows from earlier files."""
    kept: list[tuple[dict, list[dict]]] = []
    superseded: list[dict] = []
    for doc in docs:
        superseded += doc.get("superseded_runs", [])
        new = _runs_of(doc)
        keys = {_victim_key(r) for _, rows in new for r in rows}
        for _, rows in kept:
            rows[:] = [r for r in rows if _victim_key(r) not in keys]
        kept += new
    return {"benchmark": "backdoor_matrix", "runs": [run for run, rows in kept if rows],
            "superseded_runs": superseded + [run for run, rows in kept if not rows],
            "rows": [r for _, rows in kept for r in rows]}


def provenance(runs: list[dict]) -> str:
    """One line per run: part, data, date, machine, load - for the head of the Markdown tables."""
    out = []
    for run in runs:
        m = run.get("machine", {})
        vit = (f", ViT {run['vit']['image_size']}x{run['vit']['image_size']} patch {run['vit']['patch_size']}, "
               f"{run['vit_recipe']['epochs']} epochs") if run.get("part") == "vit" else f", victims {run.get('victim_epochs')} epochs"
        load = run.get("loadavg")
        out.append(f"- {run.get('part')}: {'; '.join(run.get('data', {}).values())}{vit}; {run.get('date', 'date not recorded')}; "
                   f"{m.get('cpu_count', '?')}-vCPU {m.get('cpu_model', '?')}, {m.get('cpu_threads', '?')} torch thread(s)"
                   + (f", load average {load[0]:.1f} (loaded)" if load else ""))
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
    p.add_argument("--merge", nargs="*", default=None,
                   help="JSON files of earlier runs or merges: merge them into --out (later victims replace earlier ones) "
                        "and print the tables")
    p.add_argument("--md", default=None, help="also write the tables, headed by each run's data, date and machine, here")
    p.add_argument("--note", default="", help="a line for the head of --md (e.g. what the machine is beyond its CPU name)")
    args = p.parse_args(argv)
    if args.merge:
        merged = merge([json.loads(Path(f).read_text()) for f in args.merge])
        text = tables(merged["rows"])
        print(text)
        _common.write_json(args.out, merged)
        if args.md:
            from robustkit.io import atomic_write_text

            atomic_write_text(args.md, "Generated by `python benchmarks/backdoor_matrix.py --merge ...` from these runs "
                              "(single-threaded):\n\n" + provenance(merged["runs"]) + "\n\n"
                              + (args.note + "\n\n" if args.note else "") + text + "\n")
        return 0
    _common.setup(args)
    import _bdata

    attacks = ["badnets", "blended"] if args.quick else args.attacks
    recipes = ["lr0.05"] if args.quick else args.recipes
    rows, descs = [], {}
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    import _art_peer

    def log(msg):
        print(msg, flush=True)

    def save(new_rows):
        _common.write_json(args.out, {"benchmark": "backdoor_matrix", "part": args.part, "data": descs, "date": date,
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
