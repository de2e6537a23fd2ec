"""Skip-connection suppression: Yang, Li, Jiang, Xia, "Backdoor Defense via Suppressing Model
Shortcuts", ICASSP 2023.

A residual block computes ``out = F(x) + shortcut(x)``; backdoors lean on the shortcuts, so
scaling a chosen shortcut by ``gamma < 1`` (``out = F(x) + gamma * shortcut(x)``) lowers the
attack success rate. Finding the skip connections of PreActResNet, torchvision ResNet and ViT
blocks and scaling them with forward hooks is :mod:`robustkit.models.introspect`
(:func:`~robustkit.models.introspect.find_skip_connections`, :func:`~robustkit.models.introspect.scale_skips`);
this module chooses the block (the gamma sweep on a defender-implanted surrogate trigger, with the
collapse guard) and fine-tunes its stage.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..base import ModelRepair, RepairResult, ResultDetails
from ..data.arrays import ArrayDataset, to_tensors
from ..errors import InputError
from ..registry import BACKDOORS, REPAIRS
from ..utils import progress_bar
from ..backdoor.metrics import backdoor_monitor
from ..models.introspect import find_skip_connections, scale_skips
from .finetune import finetune_loop
from .guard import (HOLDOUT_RATIO, MAX_ACC_DROP, SuppressionError, check_bound, check_collapse, check_ratio,
                    clean_accuracy, split_clean)

GAMMAS = tuple(round(0.1 * i, 1) for i in range(11))
#: Default bound of the sweep: a skip whose suppression costs more held-out clean accuracy is excluded.
SWEEP_MAX_ACC_DROP = 0.2


# --------------------------------------------------------------------------- layer selection
def jump_score(asr: list[float]) -> float:
    """The paper's selection score for one block: ``max_i (ASR_i - ASR_{i-1}) / exp(ASR_{i-1})``.

    ``asr`` holds the ASR at gamma = 0, 0.1, ..., 1 (increasing gamma): a block whose
    suppression makes the ASR jump from low to high is where the backdoor's shortcut runs.
    """
    if len(asr) < 2:
        raise InputError("jump_score needs the ASR at two gammas at least")
    return max((asr[i] - asr[i - 1]) / math.exp(asr[i - 1]) for i in range(1, len(asr)))


def _excess_asr(model: nn.Module, x_clean: torch.Tensor, x_trig: torch.Tensor, target: torch.Tensor,
                batch_size: int = 256) -> float:
    """Target rate on triggered images minus the target rate on the same images without the trigger.

    Plain ASR would also be high when a suppressed block breaks the model into predicting
    one class that happens to be the target; the excess counts only what the trigger adds.
    """
    from ..eval.metrics import predict

    trig = float((predict(model, x_trig, batch_size) == target).float().mean())
    clean = float((predict(model, x_clean, batch_size) == target).float().mean())
    return max(0.0, trig - clean)


@dataclass
class SkipSuppressionDetails(ResultDetails):
    """The chosen skip connection, its stage and gamma; (when swept) the gamma sweep of the
    surrogate's ASR and held-out clean accuracy, the scores and the skips excluded for collapse;
    and the collapse guard (held-out clean accuracy before and after, bound, verdict)."""

    clean_samples: int
    layer: str
    stage: str
    gamma: float
    surrogate_asr: float | None = None
    gammas: list[float] | None = None
    sweep: dict[str, list[float]] | None = None
    scores: dict[str, float] | None = None
    sweep_acc: dict[str, list[float]] | None = None
    surrogate_acc: float | None = None
    sweep_max_acc_drop: float | None = None
    excluded: dict[str, float] | None = None
    helpful: bool | None = None
    holdout_samples: int = 0
    holdout_acc_before: float | None = None
    holdout_acc_after: float | None = None
    max_acc_drop: float | None = None
    collapsed: bool = False

    def tables(self) -> list[tuple[str, list[dict[str, Any]]]]:
        if not self.sweep:
            return []
        rows = []
        for name, asr in self.sweep.items():
            row: dict[str, Any] = {"skip": name, "jump_score": (self.scores or {}).get(name),
                                   "excluded": name in (self.excluded or {})}
            row.update({f"asr@{g:g}": a for g, a in zip(self.gammas or [], asr)})
            row.update({f"acc@{g:g}": a for g, a in zip(self.gammas or [], (self.sweep_acc or {}).get(name, []))})
            rows.append(row)
        return [("Skip-connection sweep (surrogate excess ASR and held-out clean accuracy per gamma)", rows)]

    def figures(self, out_dir: Any) -> list[str]:
        if not self.sweep:
            return []
        from ..eval.plots import skip_sweep

        return [skip_sweep(self.sweep, self.gammas or [], Path(out_dir) / "skip_sweep.png", self.layer).name]


@REPAIRS.register("skip_suppression")
class SkipSuppression(ModelRepair):
    """Skip-connection suppression (Yang et al., ICASSP 2023) with the paper's layer selection.

    1. The defender never sees the attacker's trigger. It stamps its *own* surrogate trigger
       (``probe_attack``, default a 3x3 checkerboard BadNets patch at the top-left corner,
       target ``probe_target``) on ``probe_rate`` of its clean subset and fine-tunes a copy of
       the suspect model on it (``probe_epochs``, ``probe_lr``, ``probe_batch_size``). This is
       our reading of "a BadNets-style probe set": the surrogate backdoor is implanted in the
       suspect's own weights so the sweep measures this architecture and these features.
    2. For every skip connection, gamma is swept over 0, 0.1, ..., 1 on the surrogate and the
       surrogate trigger's ASR is measured on the clean subset's non-target images; the block
       with the largest :func:`jump_score` is chosen (``layer=`` skips the sweep). Deviation:
       the ASR used is the *excess* target rate (triggered minus untriggered images under the
       same gamma), because zeroing a skip can collapse a model to predicting one class, which
       plain ASR would read as a backdoor path when that class is the target.
       **Collapse exclusion:** at every gamma the surrogate's clean accuracy on the held-out
       clean split is measured too; a skip connection whose suppression to ``gamma`` drops it
       by more than ``sweep_max_acc_drop`` (default 0.2, i.e. 20 points) below the unsuppressed
       surrogate's is excluded from the choice, however high its score (a collapsed network
       also "removes" a backdoor). If every skip connection is excluded, a
       :class:`SuppressionError` is raised. When no admissible block's score is positive
       (no suppression lowered the surrogate ASR) ``details.helpful`` is False and a
       ``RuntimeWarning`` says so.
    3. On a copy of the suspect model that skip connection gets ``gamma`` (0 by default),
       every parameter outside the enclosing stage (a ResNet stage such as ``layer3``, or the
       ViT block) is frozen - frozen BatchNorm layers also keep their running statistics -
       and the stage is fine-tuned for ``epochs`` (10) with SGD lr 0.01, momentum 0.9,
       weight decay 5e-4, batch 128 on the clean subset.

    4. **Collapse guard** (:mod:`robustkit.repair.guard`, shared with FineTune / FT-SAM): the
       held-out clean split (``holdout_ratio`` of ``clean_data``, class-balanced, disjoint from
       the training share, never trained on) measures the input model's and the repaired
       model's clean accuracy; a drop of more than ``max_acc_drop`` (default 0.10) sets
       ``RepairResult.collapsed`` and warns (``RuntimeWarning``) with both numbers.

    The history's epoch-0 row is measured right after the suppression, before fine-tuning.
    The returned model carries the suppression as forward hooks (``model.skip_scaling``);
    :func:`~robustkit.models.loaders.save_checkpoint` stores it and ``load_checkpoint``
    re-applies it.
    """

    def __init__(self, gamma: float = 0.0, layer: str | None = None, epochs: int = 10, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128, clean_ratio: float = 0.05,
                 probe_attack: Any = None, probe_target: int = 0, probe_rate: float = 0.5, probe_epochs: int = 30,
                 probe_lr: float = 0.05, probe_batch_size: int = 32, eval_every: int = 1, seed: int = 0, *,
                 max_acc_drop: float = MAX_ACC_DROP, sweep_max_acc_drop: float = SWEEP_MAX_ACC_DROP,
                 holdout_ratio: float = HOLDOUT_RATIO):
        if not 0.0 <= float(gamma) <= 1.0:
            raise InputError(f"gamma must be in [0, 1], got {gamma!r}")
        if not 0 < clean_ratio <= 1:
            raise InputError(f"clean_ratio must be in (0, 1], got {clean_ratio!r}")
        if not 0 < probe_rate <= 1:
            raise InputError(f"probe_rate must be in (0, 1], got {probe_rate!r}")
        self.gamma, self.layer, self.epochs, self.lr = float(gamma), layer, epochs, float(lr)
        self.momentum, self.weight_decay, self.batch_size = float(momentum), float(weight_decay), batch_size
        self.clean_ratio, self.probe_target, self.probe_rate = float(clean_ratio), int(probe_target), float(probe_rate)
        self.probe_epochs, self.probe_lr, self.eval_every, self.seed = probe_epochs, float(probe_lr), eval_every, seed
        self.probe_batch_size = probe_batch_size
        self.max_acc_drop = check_bound(max_acc_drop, "max_acc_drop")
        self.sweep_max_acc_drop = check_bound(sweep_max_acc_drop, "sweep_max_acc_drop")
        self.holdout_ratio = check_ratio(holdout_ratio, "holdout_ratio")
        spec = probe_attack or {"name": "badnets", "size": 3, "position": "top-left", "pattern": "checkerboard"}
        if isinstance(spec, dict) and "target" not in spec:
            spec = {**spec, "target": self.probe_target}
        self.probe_attack = BACKDOORS.build(spec, "probe_attack") if not hasattr(spec, "apply") else spec

    # -- step 1 + 2
    def select_layer(self, model: nn.Module, clean: Dataset, progress: bool = True,
                     holdout: Dataset | None = None) -> dict[str, Any]:
        """Implant the surrogate trigger in a copy and run the gamma sweep; return the sweep and the choice.

        ``holdout`` (clean images never trained on; default: a held-out split of ``clean``)
        gives the clean accuracy per gamma that excludes collapsing skip connections.
        """
        skips = find_skip_connections(model)
        if holdout is None:
            split = split_clean(clean, 1.0, self.holdout_ratio, self.seed)
            clean, holdout = split.train, split.holdout
        hx, hy = to_tensors(holdout)
        x, y = to_tensors(clean)
        k = int(max(int(y.max()), int(hy.max()))) + 1
        atk = self.probe_attack
        probe = atk.poison(ArrayDataset(x, y), rate=min(self.probe_rate, float((y != atk.target).float().mean())),
                           seed=self.seed, num_classes=k)
        if getattr(model, "skip_scaling", None):
            raise InputError(f"model already has scaled skip connections ({model.skip_scaling}); sweep an unscaled model")
        surrogate = copy.deepcopy(model)
        finetune_loop(surrogate, probe, epochs=self.probe_epochs, lr=self.probe_lr, momentum=self.momentum,
                      weight_decay=self.weight_decay, batch_size=self.probe_batch_size, seed=self.seed,
                      progress=progress, desc="implant surrogate trigger")
        keep = y != atk.target
        if not bool(keep.any()):
            raise InputError("the clean subset has no image outside the probe target class")
        xc = x[keep]
        xp = atk.apply(xc)
        tp = atk.target_labels(y[keep], k)
        base_asr = _excess_asr(surrogate, xc, xp, tp)
        hold = ArrayDataset(hx, hy)
        base_acc = clean_accuracy(surrogate, hold)
        gammas = list(GAMMAS)
        sweep: dict[str, list[float]] = {}
        sweep_acc: dict[str, list[float]] = {}
        applied: dict[str, float] = {}
        bar = progress_bar(len(skips) * len(GAMMAS), "gamma sweep", progress)
        for s in skips:
            row, accs = [], []
            for g in gammas:
                with scale_skips(surrogate, {s.name: g}):
                    row.append(_excess_asr(surrogate, xc, xp, tp))
                    accs.append(clean_accuracy(surrogate, hold))
                bar.update(1)
            sweep[s.name], sweep_acc[s.name] = row, accs
            if self.gamma in gammas:
                applied[s.name] = accs[gammas.index(self.gamma)]
            else:
                with scale_skips(surrogate, {s.name: self.gamma}):
                    applied[s.name] = clean_accuracy(surrogate, hold)
        bar.close()
        scores = {name: jump_score(row) for name, row in sweep.items()}
        excluded = {name: acc for name, acc in applied.items() if base_acc - acc > self.sweep_max_acc_drop + 1e-12}
        admissible = [name for name in scores if name not in excluded]
        if not admissible:
            worst = ", ".join(f"{n} {a:.1%}" for n, a in excluded.items())
            raise SuppressionError(
                f"every skip connection collapses the model when suppressed to gamma={self.gamma:g}: held-out clean "
                f"accuracy falls from {base_acc:.1%} by more than sweep_max_acc_drop={self.sweep_max_acc_drop:g} "
                f"({worst}); skip suppression cannot repair this model (raise the bound, use a larger gamma or "
                f"another defense)")
        chosen = max(admissible, key=lambda n: scores[n])
        helpful = scores[chosen] > 0
        if not helpful:
            warnings.warn(
                f"SkipSuppression: no admissible skip connection lowered the surrogate trigger's ASR when suppressed "
                f"(best jump score {scores[chosen]:.3g} at {chosen}); the chosen suppression is unlikely to help",
                RuntimeWarning, stacklevel=3)
        return {"surrogate_asr": base_asr, "gammas": gammas, "sweep": sweep, "scores": scores, "layer": chosen,
                "sweep_acc": sweep_acc, "surrogate_acc": base_acc, "excluded": excluded, "helpful": helpful}

    # -- step 3
    def repair(self, model: nn.Module, clean_data: Dataset, *, test_data: Dataset | None = None,
               backdoor: Any = None, num_classes: int | None = None, inplace: bool = False,
               progress: bool = True) -> RepairResult:
        """Select a skip connection (unless ``layer`` was given), suppress it and fine-tune its stage."""
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        skips = {s.name: s for s in find_skip_connections(model)}
        split = split_clean(clean_data, self.clean_ratio, self.holdout_ratio, self.seed)
        clean = split.train
        acc_before = clean_accuracy(model, split.holdout)
        sweep: dict[str, Any] = {}
        if self.layer is None:
            sweep = self.select_layer(model, clean, progress, holdout=split.holdout)
            layer = sweep["layer"]
        else:
            if self.layer not in skips:
                raise InputError(f"layer {self.layer!r} is not a skip connection of this model; known: {', '.join(skips)}")
            layer = self.layer
        details = SkipSuppressionDetails(clean_samples=len(clean), layer=layer, stage=skips[layer].stage, gamma=self.gamma,
                                         surrogate_asr=sweep.get("surrogate_asr"), gammas=sweep.get("gammas"),
                                         sweep=sweep.get("sweep"), scores=sweep.get("scores"),
                                         sweep_acc=sweep.get("sweep_acc"), surrogate_acc=sweep.get("surrogate_acc"),
                                         sweep_max_acc_drop=self.sweep_max_acc_drop if sweep else None,
                                         excluded=sweep.get("excluded"), helpful=sweep.get("helpful"))
        net = model if inplace else copy.deepcopy(model)
        scale_skips(net, {layer: self.gamma})
        stage = skips[layer].stage
        prefix = stage + "." if stage else ""

        def trainable(name: str, p: nn.Parameter) -> bool:
            return not stage or name.startswith(prefix)

        stage_module = net.get_submodule(stage) if stage else net

        def train_mode(m: nn.Module) -> None:
            m.eval()  # frozen layers keep BatchNorm / dropout in eval mode
            stage_module.train()

        monitor = backdoor_monitor(test_data, backdoor, num_classes)
        history = finetune_loop(net, clean, epochs=self.epochs, lr=self.lr, momentum=self.momentum,
                                weight_decay=self.weight_decay, batch_size=self.batch_size, trainable=trainable,
                                train_mode=train_mode, monitor=monitor, eval_every=self.eval_every, seed=self.seed,
                                progress=progress, desc=f"fine-tune {stage or 'model'}")
        check = check_collapse("SkipSuppression", acc_before, net, split.holdout, self.max_acc_drop)
        details.holdout_samples, details.holdout_acc_before = check.samples, check.acc_before
        details.holdout_acc_after, details.max_acc_drop, details.collapsed = check.acc_after, self.max_acc_drop, check.collapsed
        return RepairResult(net, history, details, collapsed=check.collapsed)

    def __repr__(self) -> str:
        return (f"SkipSuppression(gamma={self.gamma}, layer={self.layer!r}, epochs={self.epochs}, lr={self.lr}, "
                f"clean_ratio={self.clean_ratio}, max_acc_drop={self.max_acc_drop}, "
                f"sweep_max_acc_drop={self.sweep_max_acc_drop})")
