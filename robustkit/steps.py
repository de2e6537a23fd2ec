"""Pipeline steps: ``train``, ``evaluate``, ``save_model``, ``load_model``.

Each step is a function ``step(ctx, /, **params)`` registered in ``STEPS``; its keyword
parameters are what the YAML step accepts. An optional ``step.validate(params, path)``
checks nested specs (attacks, preprocessors) before the run starts.
"""

from __future__ import annotations

import copy
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .io import atomic_write_json
from .eval.metrics import robust_accuracy
from .eval.plots import accuracy_bars, training_curves
from .pipeline import Context
from .registry import ATTACKS, BACKDOORS, FILTERS, PREPROCESSORS, REPAIRS, STEPS, parse_number
from .wrap import Defended, wrap


def _preprocessor_stack(specs: list[Any] | None, path: str) -> list[torch.nn.Module]:
    return [PREPROCESSORS.build(spec, f"{path}[{i}]") for i, spec in enumerate(specs or [])]


# --------------------------------------------------------------------------- train
@STEPS.register("train")
def train(
    ctx: Context,
    /,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 64,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    label_smoothing: float = 0.0,
    warmup_epochs: float = 0.0,
    preprocessors: list | None = None,
    checkpoint_every: int = 0,
) -> None:
    """Train the run's model on the training split (``preprocessors``: train-time defense).

    After a ``poison`` step the training split is the poisoned one and every epoch also
    records the backdoor's ASR and RA on the test split. ``checkpoint_every`` > 0 writes
    ``checkpoints/epoch_XXX.pt`` every that many epochs (and at the end) plus ``last.pt``.
    """
    from .training import train as train_model

    model = ctx.require_model("train")
    data = ctx.require_data("train")
    pre = torch.nn.Sequential(*_preprocessor_stack(preprocessors, "train.preprocessors")).to(ctx.device)
    result = train_model(
        model, data.train, data.test, backdoor=ctx.artifacts.get("backdoor"),
        checkpoint_dir=ctx.out_dir / "checkpoints" if checkpoint_every > 0 and ctx.is_main else None,
        checkpoint_every=checkpoint_every,
        model_name=ctx.config["model"]["name"],
        epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
        weight_decay=weight_decay, schedule=schedule, label_smoothing=label_smoothing, warmup_epochs=warmup_epochs,
        preprocess=pre if len(pre) else None, seed=ctx.seed, progress=ctx.progress and ctx.is_main,
    )
    history = result.history
    last = history[-1]
    ctx.report.add_table("Training", [dict(h) for h in history])
    ctx.report.metrics.update(train_accuracy=last["train_acc"], test_accuracy=last["val_acc"])
    if "asr" in last:
        ctx.report.metrics.update(asr=last["asr"], ra=last["ra"])
    if ctx.is_main:
        fig = training_curves(history, ctx.out_dir / "training.png", title=f"Training {ctx.config['model']['name']}")
        ctx.report.figures.append(fig.name)
    msg = f"train acc {last['train_acc']:.3f}, test acc {last['val_acc']:.3f}"
    if "asr" in last:
        msg += f", ASR {last['asr']:.3f}"
    ctx.log(f"  trained {epochs} epochs in {sum(h['seconds'] for h in history):.1f} s: {msg}")


def _validate_train(params: dict[str, Any], path: str) -> None:
    _preprocessor_stack(params.get("preprocessors"), f"{path}.preprocessors")


train.validate = _validate_train  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- evaluate
def _eps_label(eps: float, norm: str) -> str:
    if norm == "linf":
        frac = Fraction(eps * 255).limit_denominator(8)
        if abs(float(frac) - eps * 255) < 1e-6:
            return f"{frac}/255"
    return f"{eps:g}"


def attack_label(attack: Any, spec: Any) -> str:
    if isinstance(spec, dict) and spec.get("label"):
        return str(spec["label"])
    name = type(attack).__name__
    parts = [f"{name}-{attack.norm.capitalize() if attack.norm == 'linf' else attack.norm.upper()}",
             f"eps={_eps_label(attack.eps, attack.norm)}"]
    if getattr(attack, "eot_samples", 1) > 1:
        parts[0] = "EOT-" + parts[0]
        parts.append(f"EOT={attack.eot_samples}")
    return " ".join(parts)


def _split_label(spec: Any) -> tuple[Any, str | None]:
    if isinstance(spec, dict) and "label" in spec:
        spec = dict(spec)
        return spec, str(spec.pop("label"))
    return spec, None


def _defense_list(defenses: list | None, path: str) -> list[tuple[str, list[Any]]]:
    if defenses is None:
        return [("undefended", [])]
    if not isinstance(defenses, list) or not defenses:
        raise ConfigError("must be a non-empty list of {label: ..., preprocessors: [...]}", path)
    out = []
    for i, d in enumerate(defenses):
        p = f"{path}[{i}]"
        if not isinstance(d, dict):
            raise ConfigError("each defense must be a mapping {label: ..., preprocessors: [...]}", p)
        unknown = set(d) - {"label", "preprocessors"}
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)}; a defense has 'label' and 'preprocessors'", p)
        pre = d.get("preprocessors") or []
        if not isinstance(pre, list):
            raise ConfigError("must be a list of preprocessor specs", f"{p}.preprocessors")
        label = d.get("label") or ("+".join(PREPROCESSORS.split_spec(s, p)[0] for s in pre) or "undefended")
        out.append((str(label), pre))
    return out


@STEPS.register("evaluate")
def evaluate(
    ctx: Context,
    /,
    attacks: list | None = None,
    defenses: list | None = None,
    eps: list | None = None,
    n_samples: int | None = None,
    batch_size: int = 256,
) -> None:
    """Clean and robust accuracy of the model behind each defense under each attack.

    ``defenses``: list of ``{label, preprocessors: [spec, ...]}`` (default: undefended only).
    ``attacks``: list of attack specs (``{name: pgd, eps: 8/255, ..., label: optional}``).
    ``eps``: optional list of radii; every attack then runs at each of them (its own ``eps``
    is overridden) and ``robust_vs_eps.png`` plots the curves.
    ``n_samples``: evaluate on the first n test images (default: all).

    Batch ``b`` is attacked with seed ``seed + b`` (attack and defense randomness), so the
    result is the same under ``torchrun`` sharding, which splits batches across ranks.
    """
    model = ctx.require_model("evaluate")
    data = ctx.require_data("evaluate")
    from .data import to_tensors
    from .eval.plots import robust_vs_eps

    x, y = to_tensors(data.test, max_samples=n_samples)
    radii = [None] if not eps else [parse_number(e, "evaluate.eps") for e in eps]
    rows: list[dict[str, Any]] = []
    plot_rows: list[dict[str, Any]] = []
    run = dict(batch_size=batch_size, progress=ctx.progress and ctx.is_main, seed=ctx.seed, shard=ctx.shard)
    for label, pre_specs in _defense_list(defenses, "evaluate.defenses"):
        pre = [p.to(ctx.device) for p in _preprocessor_stack(pre_specs, f"evaluate.defenses[{label}]")]
        defended: Defended = wrap(model, *pre)
        bpda = not defended.differentiable
        if bpda:  # same forward; straight-through gradients for the non-differentiable parts
            from .attacks.bpda import with_bpda

            defended = with_bpda(defended)
        clean = robust_accuracy(defended, None, x, y, desc=f"{label} / clean", **run).clean_accuracy
        ctx.log(f"  {label}: clean accuracy {clean:.3f} on {x.shape[0]} test images")
        rows.append({"defense": label, "attack": "clean", "norm": "-", "eps": "-", "accuracy": clean,
                     "adaptive": "-", "gradient": "-", "seconds": 0.0})
        plot_rows.append({"defense": label, "attack": "clean", "accuracy": clean})
        ctx.report.metrics[f"{label}/clean_accuracy"] = clean
        for i, spec in enumerate(attacks or []):
            spec, custom = _split_label(spec)
            for radius in radii:
                full = spec if radius is None else {**ATTACKS.split_spec(spec)[1], "name": ATTACKS.split_spec(spec)[0], "eps": radius}
                attack = ATTACKS.build(full, f"evaluate.attacks[{i}]")
                name = custom or attack_label(attack, full)
                if custom and radius is not None:
                    name = f"{custom} eps={_eps_label(attack.eps, attack.norm)}"
                if not defended.randomized and vars(attack).get("eot_samples", 1) > 1:
                    # a deterministic model gives the same gradient on every EOT pass: one is enough
                    attack = copy.copy(attack)
                    attack.eot_samples = 1
                res = robust_accuracy(defended, attack, x, y, desc=f"{label} / {name}", **run)
                adaptive = (not defended.randomized) or getattr(attack, "eot_samples", 1) > 1
                rows.append({"defense": label, "attack": name, "norm": attack.norm, "eps": attack.eps,
                             "accuracy": res.robust_accuracy, "adaptive": adaptive,
                             "gradient": "BPDA" if bpda else "exact", "seconds": res.seconds})
                plot_rows.append({"defense": label, "attack": name, "accuracy": res.robust_accuracy,
                                  "family": custom or attack_label(attack, {}).split(" eps=")[0], "eps": attack.eps})
                ctx.report.metrics[f"{label}/{name}/robust_accuracy"] = res.robust_accuracy
                ctx.log(f"  {label} / {name}: robust accuracy {res.robust_accuracy:.3f} ({res.seconds:.1f} s)")
                if not adaptive:
                    ctx.report.notes.append(
                        f"'{label}' is randomized but '{name}' averages no gradients over its randomness (no EOT): "
                        "its robust accuracy is an upper bound, not evidence of robustness."
                    )
    ctx.report.add_table(
        "Clean and robust accuracy", rows,
        note=f"{x.shape[0]} test images. Robust = correct on the clean and on the attacked image. "
             "adaptive = the attack differentiates through the defense and, for randomized defenses, uses EOT; "
             "gradient = exact, or BPDA (identity backward) through non-differentiable preprocessors.",
    )
    if ctx.is_main:
        for label, _ in _defense_list(defenses, "evaluate.defenses"):
            path = ctx.out_dir / f"robustbench_{_slug(label)}.json"
            atomic_write_json(path, robustbench_entry(label, rows, ctx.config, x.shape[0]))
            ctx.report.metrics[f"{label}/robustbench_json"] = path.name
        if eps and len(radii) > 1:
            ctx.report.figures.append(robust_vs_eps(plot_rows, ctx.out_dir / "robust_vs_eps.png").name)
        else:
            ctx.report.figures.append(accuracy_bars(plot_rows, ctx.out_dir / "accuracy.png").name)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def robustbench_entry(label: str, rows: list[dict[str, Any]], config: dict[str, Any], n: int) -> dict[str, Any]:
    """One defense's results in RobustBench's model-info format (accuracies as percent strings).

    ``autoattack_acc`` is the lowest robust accuracy among AutoAttack rows at the largest
    evaluated radius (empty when AutoAttack was not run); ``robustkit`` keeps every row.
    """
    mine = [r for r in rows if r["defense"] == label]
    clean = next(r["accuracy"] for r in mine if r["attack"] == "clean")
    attacked = [r for r in mine if r["attack"] != "clean"]
    aa = [r for r in attacked if "AutoAttack" in r["attack"] or r["attack"].lower().startswith("autoattack")]
    eps = max((r["eps"] for r in attacked), default=None)
    norm = next((r["norm"] for r in attacked), "linf")
    aa_at_eps = [r["accuracy"] for r in aa if r["eps"] == eps]
    worst = min((r["accuracy"] for r in attacked if r["eps"] == eps and r["adaptive"] is not False), default=None)
    return {
        "link": "", "name": label, "authors": "", "additional_data": False,
        "number_forward_passes": 1, "dataset": config.get("data", {}).get("name", ""),
        "venue": "", "architecture": config.get("model", {}).get("name", ""),
        "eps": None if eps is None else _eps_label(eps, norm), "threat_model": {"linf": "Linf", "l2": "L2"}.get(norm, norm),
        "clean_acc": f"{100 * clean:.2f}", "reported": "",
        "autoattack_acc": f"{100 * min(aa_at_eps):.2f}" if aa_at_eps else "",
        "worst_adaptive_acc": "" if worst is None else f"{100 * worst:.2f}",
        "footnote": f"Evaluated with robustkit on {n} test images.",
        "robustkit": {"rows": mine},
    }


def _validate_evaluate(params: dict[str, Any], path: str) -> None:
    for label, pre in _defense_list(params.get("defenses"), f"{path}.defenses"):
        _preprocessor_stack(pre, f"{path}.defenses[{label}].preprocessors")
    attacks = params.get("attacks") or []
    if not isinstance(attacks, list):
        raise ConfigError("must be a list of attack specs", f"{path}.attacks")
    for i, spec in enumerate(attacks):
        spec, _ = _split_label(spec)
        ATTACKS.build(spec, f"{path}.attacks[{i}]")


evaluate.validate = _validate_evaluate  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- backdoors
@STEPS.register("poison")
def poison(ctx: Context, /, attack: Any = "badnets", rate: float = 0.1, seed: int | None = None,
           save: str | None = None) -> None:
    """Implant a backdoor in the training split (``attack``: a backdoor spec, e.g. ``{name: badnets}``).

    The poisoned indices are recorded; ``save`` writes the poisoned set (``.npz`` or a folder)
    with its manifest, relative to the output folder.
    """
    from .data.arrays import DataBundle

    data = ctx.require_data("poison")
    atk = BACKDOORS.build(attack, "poison.attack")
    poisoned = atk.poison(data.train, rate=rate, seed=ctx.seed if seed is None else seed, num_classes=data.num_classes)
    ctx.data = DataBundle(poisoned, data.test, data.num_classes, data.channels, data.image_size, data.classes, data.name)
    ctx.artifacts.update(backdoor=atk, poisoned=poisoned, clean_train=data.train)
    name = BACKDOORS.split_spec(attack)[0]
    row = {"attack": name, "rate": rate, "poisoned": len(poisoned.poisoned_indices),
           "noise_samples": len(poisoned.noise_indices), "train_size": len(poisoned), "target": atk.target}
    if save:
        target = Path(save) if Path(save).is_absolute() else ctx.out_dir / save
        if ctx.is_main:
            poisoned.save(target)
        row["saved_to"] = str(target)
    ctx.report.add_table("Poisoning", [row])
    ctx.log(f"  poisoned {row['poisoned']} of {row['train_size']} training images with {name} (target {atk.target})")


def _validate_poison(params: dict[str, Any], path: str) -> None:
    BACKDOORS.build(params.get("attack", "badnets"), f"{path}.attack")


poison.validate = _validate_poison  # type: ignore[attr-defined]


@STEPS.register("backdoor_eval")
def backdoor_eval(ctx: Context, /, attack: Any = None) -> None:
    """ACC, ASR and RA of the model on the test split (trigger from the ``poison`` step, or ``attack``)."""
    from .eval.backdoor import backdoor_metrics

    model = ctx.require_model("backdoor_eval")
    data = ctx.require_data("backdoor_eval")
    atk = BACKDOORS.build(attack, "backdoor_eval.attack") if attack is not None else ctx.artifacts.get("backdoor")
    if atk is None:
        raise ConfigError("needs a trigger: run a 'poison' step first or give 'attack'", "backdoor_eval")
    m = backdoor_metrics(model, atk, data.test, data.num_classes)
    ctx.report.add_table("Backdoor", [{"attack": type(atk).__name__, **m.to_dict()}],
                         note="ACC on clean test images; ASR and RA on triggered test images whose label is not the target.")
    ctx.report.metrics.update(acc=m.acc, asr=m.asr, ra=m.ra)
    ctx.log(f"  ACC {m.acc:.3f}  ASR {m.asr:.3f}  RA {m.ra:.3f}")


# --------------------------------------------------------------------------- repair
@STEPS.register("repair")
def repair(ctx: Context, /, defense: Any = "ft_sam", attack: Any = None) -> None:
    """Repair the run's (backdoored) model with a ``defense`` (``finetune``, ``ft_sam``, ``skip_suppression``).

    The defense gets the clean training split (before any ``poison`` step) and uses its own
    ``clean_ratio`` of it. When a trigger is known (a ``poison`` step, or ``attack``; used only
    to *measure*, never given to the defense) the report holds ACC / ASR / RA before and after,
    the DER, and ``repair.png`` with ACC and ASR over the repair epochs. The repaired model
    replaces the run's model (add a ``save_model`` step to keep it).
    """
    from .eval.backdoor import backdoor_metrics, defense_effectiveness_rating
    from .eval.plots import repair_curves, skip_sweep

    model = ctx.require_model("repair")
    data = ctx.require_data("repair")
    clean = ctx.artifacts.get("clean_train", data.train)
    if clean is data.train and hasattr(data.train, "poisoned_indices"):
        raise ConfigError("the training split is poisoned and no clean copy is known; run 'poison' in this config", "repair")
    atk = BACKDOORS.build(attack, "repair.attack") if attack is not None else ctx.artifacts.get("backdoor")
    name = REPAIRS.split_spec(defense)[0]
    rep = REPAIRS.build(defense, "repair.defense")
    ctx.log(f"  repairing with {rep!r}")
    before = backdoor_metrics(model, atk, data.test, data.num_classes) if atk is not None else None
    result = rep.repair(model, clean, test_data=data.test, backdoor=atk, num_classes=data.num_classes,
                        progress=ctx.progress and ctx.is_main)
    ctx.model = result.model
    ctx.artifacts.setdefault("repairs", {})[name] = result
    ctx.report.add_table(f"Repair history ({name})", [dict(h) for h in result.history])
    details = {k: v for k, v in result.details.items() if not isinstance(v, dict)}
    if before is not None:
        after = backdoor_metrics(result.model, atk, data.test, data.num_classes)
        der = defense_effectiveness_rating(before, after)
        table = [{"model": "before", "acc": before.acc, "asr": before.asr, "ra": before.ra},
                 {"model": f"after {name}", "acc": after.acc, "asr": after.asr, "ra": after.ra, "der": der}]
        ctx.report.add_table("Repair", table, note="DER = [max(0, dASR) - max(0, dACC) + 1] / 2 (BackdoorBench).")
        ctx.report.metrics.update(acc_before=before.acc, asr_before=before.asr, ra_before=before.ra,
                                  acc=after.acc, asr=after.asr, ra=after.ra, der=der)
        ctx.log(f"  ACC {before.acc:.3f} -> {after.acc:.3f}  ASR {before.asr:.3f} -> {after.asr:.3f}  DER {der:.3f}")
    else:
        ctx.report.notes.append("repair: no trigger known, so ASR / RA / DER were not measured")
    if details:
        ctx.report.add_table(f"Repair details ({name})", [details])
    if ctx.is_main:
        if any("acc" in h for h in result.history):
            ctx.report.figures.append(repair_curves({name: result.history}, ctx.out_dir / "repair.png").name)
        if "sweep" in result.details:
            d = result.details
            ctx.report.figures.append(skip_sweep(d["sweep"], d["gammas"], ctx.out_dir / "skip_sweep.png", d["layer"]).name)


def _validate_repair(params: dict[str, Any], path: str) -> None:
    REPAIRS.build(params.get("defense", "ft_sam"), f"{path}.defense")
    if params.get("attack") is not None:
        BACKDOORS.build(params["attack"], f"{path}.attack")


repair.validate = _validate_repair  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- filtering
@STEPS.register("filter")
def filter_data(ctx: Context, /, filter: Any = "attention_entropy", out: str = "filtered") -> None:  # noqa: A002
    """Flag suspected poisoned training samples with a ``FILTERS`` defense and keep the rest.

    The run's model (trained on the suspect data) scores the training split. ``out`` (inside
    the output folder) receives ``kept.npz``, ``flagged.json``, ``scores.png`` and a report; the
    training split is replaced by the kept samples, so a following ``reset_model`` + ``train``
    retrains on them. With ground truth (after ``poison``) TPR / FPR / precision / F1 / AUROC go
    to the run's report.
    """
    from .data.arrays import DataBundle
    from .eval.filtering import run_filter

    model = ctx.require_model("filter")
    data = ctx.require_data("filter")
    name = FILTERS.split_spec(filter)[0]
    target = Path(out) if Path(out).is_absolute() else ctx.out_dir / out
    result, metrics = run_filter(model, data.train, FILTERS.build(filter, "filter.filter"), target, name=name)
    kept = result.clean_subset(data.train)
    row = {"filter": name, "samples": len(data.train), "flagged": int(result.flagged.sum()), "kept": len(kept)}
    row.update({k: metrics[k] for k in ("poisoned", "tpr", "fpr", "precision", "f1", "auroc") if k in metrics})
    ctx.report.add_table("Filtering", [row], note="TPR/FPR: share of poisoned / clean training samples flagged.")
    ctx.report.metrics.update({f"filter_{k}": metrics[k] for k in ("tpr", "fpr", "f1", "auroc") if k in metrics})
    ctx.report.figures.append(f"{target.name}/scores.png")
    ctx.data = DataBundle(kept, data.test, data.num_classes, data.channels, data.image_size, data.classes, data.name)
    ctx.artifacts["filter_result"] = result
    msg = f"  {name}: flagged {row['flagged']} of {row['samples']} training samples"
    if metrics:
        msg += f" (TPR {metrics['tpr']:.3f}, FPR {metrics['fpr']:.3f}, AUROC {metrics['auroc']:.3f})"
    ctx.log(msg)


def _validate_filter(params: dict[str, Any], path: str) -> None:
    FILTERS.build(params.get("filter", "attention_entropy"), f"{path}.filter")


filter_data.validate = _validate_filter  # type: ignore[attr-defined]


@STEPS.register("reset_model")
def reset_model(ctx: Context, /, seed: int | None = None) -> None:
    """Replace the run's model by a freshly initialized one from the config's ``model`` spec (e.g. to retrain)."""
    from .pipeline import build_model

    if "model" not in ctx.config:
        raise ConfigError("needs a top-level 'model' to rebuild", "reset_model")
    torch.manual_seed(ctx.seed if seed is None else seed)
    ctx.model = build_model(ctx.config["model"], ctx.data).to(ctx.device)
    ctx.log("  model re-initialized")


# --------------------------------------------------------------------------- checkpoints
@STEPS.register("save_model")
def save_model(ctx: Context, /, path: str = "model.pt") -> None:
    """Save the run's model (relative paths are inside the output folder), atomically."""
    from .models.loaders import save_checkpoint

    model = ctx.require_model("save_model")
    target = Path(path) if Path(path).is_absolute() else ctx.out_dir / path
    spec = dict(ctx.config.get("model", {}))
    name = spec.pop("name", None)
    if ctx.is_main:
        save_checkpoint(model, target, name=name, kwargs=getattr(model, "config", None) or spec)
    ctx.artifacts["model_path"] = str(target)
    ctx.log(f"  saved model to {target}")


@STEPS.register("load_model")
def load_model(ctx: Context, /, path: str) -> None:
    """Replace the run's model by a robustkit checkpoint."""
    from .models.loaders import load_checkpoint

    ctx.model = load_checkpoint(path, map_location=ctx.device).to(ctx.device)
    ctx.log(f"  loaded model from {path}")
