"""Clean and robust accuracy, batched, seeded per batch, shardable, with progress bars."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..base import EvasionAttack
from ..inference import accuracy, eval_mode, predict  # noqa: F401  (accuracy, predict: re-exported)
from ..utils import batches, model_device
from ..validation import check_images, check_labels


@dataclass
class AttackResult:
    """Outcome of one attack on one model over a set of examples."""

    clean_accuracy: float
    robust_accuracy: float
    n: int
    seconds: float
    clean_correct: torch.Tensor = field(repr=False)
    robust_correct: torch.Tensor = field(repr=False)
    x_adv: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "n": self.n,
            "seconds": self.seconds,
        }


def _reseed(model: nn.Module, attack: EvasionAttack | None, seed: int | None) -> EvasionAttack | None:
    """Per-batch determinism: restart the defense's random streams and the attack's seed."""
    if seed is None:
        return attack
    for m in model.modules():
        if hasattr(m, "reseed") and getattr(m, "randomized", False):
            m.reseed(seed)
    if attack is not None and hasattr(attack, "seed"):
        attack = copy.copy(attack)
        attack.seed = seed
    return attack


def _gather(parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> list:
    """All ranks' (batch index, clean, robust, x_adv) parts, on every rank (gloo or nccl)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return parts
    everything: list = [None] * dist.get_world_size()
    dist.all_gather_object(everything, parts)
    return [p for rank_parts in everything for p in rank_parts]


def robust_accuracy(
    model: nn.Module,
    attack: EvasionAttack | None,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
    keep_adversarials: bool = False,
    progress: bool = True,
    desc: str = "attack",
    seed: int | None = None,
    shard: tuple[int, int] | None = None,
) -> AttackResult:
    """Attack every example and count it robust if it is classified correctly both
    clean and under attack (the AutoAttack / RobustBench convention).

    ``attack=None`` measures clean accuracy only. With ``seed``, batch ``b`` runs with the
    defense's random streams and the attack's seed set to ``seed + b``, so results do not
    depend on which process ran the batch. ``shard=(rank, world_size)`` runs batches
    ``rank, rank + world_size, ...`` only and, under ``torch.distributed``, gathers every
    rank's flags so each rank returns the full result (equal to a single-process run).
    """
    check_images(x, "x")
    check_labels(y, x.shape[0])
    device = model_device(model)
    parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    n_done = n_robust = 0
    with eval_mode(model):
        t0 = time.perf_counter()
        all_batches = list(batches(x.shape[0], batch_size))
        mine = list(range(len(all_batches)))
        if shard is not None:
            rank, world = shard
            mine = mine[rank::world]
        bar = tqdm(total=sum(all_batches[b].stop - all_batches[b].start for b in mine), desc=desc,
                   disable=None if progress else True, unit="img", leave=False)
        for b in mine:
            s = all_batches[b]
            xb, yb = x[s].to(device), y[s].to(device)
            atk = _reseed(model, attack, None if seed is None else seed + b)
            with torch.no_grad():
                c = model(xb).argmax(1) == yb
            if atk is None:
                x_adv, r = xb, c
            else:
                x_adv = atk(model, xb, yb)
                with torch.no_grad():
                    r = (model(x_adv).argmax(1) == yb) & c
            parts.append((b, c.cpu(), r.cpu(), x_adv.cpu() if keep_adversarials else None))
            n_done += int(r.numel())
            n_robust += int(r.sum())
            bar.update(xb.shape[0])
            bar.set_postfix(robust=f"{n_robust / n_done:.3f}")
        bar.close()
    parts = sorted(_gather(parts), key=lambda p: p[0])
    if [p[0] for p in parts] != list(range(len(all_batches))):
        raise RuntimeError(f"sharded evaluation is missing batches: got {[p[0] for p in parts]}")
    clean_correct = torch.cat([p[1] for p in parts])
    robust_correct = torch.cat([p[2] for p in parts])
    return AttackResult(
        clean_accuracy=float(clean_correct.float().mean()),
        robust_accuracy=float(robust_correct.float().mean()),
        n=int(x.shape[0]),
        seconds=time.perf_counter() - t0,
        clean_correct=clean_correct,
        robust_correct=robust_correct,
        x_adv=torch.cat([p[3] for p in parts]) if keep_adversarials else None,
    )
