"""Clean and robust accuracy, batched, seeded per batch, shardable, with progress bars."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..base import EvasionAttack
from ..inference import accuracy, eval_mode, is_randomized, predict  # noqa: F401  (accuracy, predict: re-exported)
from ..utils import batches, model_device, progress_bar
from ..validation import check_images, check_int, check_labels


def reseed_randomized(model: nn.Module, seed: int) -> None:
    """Reseed every outermost randomized module (a :class:`Compose` seeds its own parts)."""
    def walk(m: nn.Module) -> None:
        if hasattr(m, "reseed") and getattr(m, "randomized", False):
            m.reseed(seed)
            return
        for child in m.children():
            walk(child)

    walk(model)


@dataclass
class AttackResult:
    """Outcome of one attack on one model over a set of examples.

    For a randomized model every image is scored over ``draws`` independent draws of the
    model's randomness: in each draw the clean and the attacked image are classified, and the
    image counts as robust in that draw iff both are correct (and the attack's own verdict, when
    it gives one, did not find it broken). ``robust_accuracy`` is the mean over images and draws
    (the expected accuracy of the randomized classifier on the final adversarial images);
    ``robust_all_draws`` counts an image only if it was robust in every draw. Deterministic
    models use one draw and the two agree.
    """

    clean_accuracy: float
    robust_accuracy: float
    n: int
    seconds: float
    clean_correct: torch.Tensor = field(repr=False)
    robust_correct: torch.Tensor = field(repr=False)
    x_adv: torch.Tensor | None = field(default=None, repr=False)
    draws: int = 1
    robust_frac: torch.Tensor | None = field(default=None, repr=False)
    robust_all_draws: float | None = None
    clean_all_draws: float | None = None
    verdict_robust: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "robust_all_draws": self.robust_all_draws,
            "draws": self.draws,
            "n": self.n,
            "seconds": self.seconds,
        }


def _gather(parts: list[tuple]) -> list:
    """All ranks' per-batch parts, on every rank (gloo or nccl)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return parts
    everything: list = [None] * dist.get_world_size()
    dist.all_gather_object(everything, parts)
    return [p for rank_parts in everything for p in rank_parts]


@torch.no_grad()
def _correct_over_draws(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """``draws x n`` booleans: is each image classified correctly in each draw."""
    return torch.stack([model(x).argmax(1) == y for _ in range(draws)])


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
    draws: int = 10,
) -> AttackResult:
    """Attack every example and count it robust if it is classified correctly both
    clean and under attack (the AutoAttack / RobustBench convention).

    ``attack=None`` measures clean accuracy only. A randomized ``model`` is scored over
    ``draws`` draws (see :class:`AttackResult`); a deterministic one over one. When the attack
    reports its own verdict (AutoAttack), an image it found broken is never counted robust.
    With ``seed``, batch ``b`` runs with the defense's random streams and the attack's seed set
    to ``seed + b``, so results do not depend on which process ran the batch.
    ``shard=(rank, world_size)`` runs batches ``rank, rank + world_size, ...`` only and, under
    ``torch.distributed``, gathers every rank's flags so each rank returns the full result.
    """
    check_images(x, "x")
    check_labels(y, x.shape[0])
    check_int(draws, "draws", minimum=1)
    device = model_device(model)
    n_draws = draws if is_randomized(model) else 1
    parts: list[tuple] = []
    n_done = 0
    robust_sum = 0.0
    t0 = time.perf_counter()
    all_batches = list(batches(x.shape[0], batch_size))
    mine = list(range(len(all_batches)))
    if shard is not None:
        rank, world = shard
        mine = mine[rank::world]
    with eval_mode(model):
        bar = progress_bar(sum(all_batches[b].stop - all_batches[b].start for b in mine), desc, progress, unit="img")
        for b in mine:
            s = all_batches[b]
            xb, yb = x[s].to(device), y[s].to(device)
            atk = attack
            if seed is not None:
                reseed_randomized(model, seed + b)
                if atk is not None:
                    atk = atk.with_options(seed=seed + b)
            verdict = None
            if atk is None:
                x_adv = xb
            else:
                x_adv, verdict = atk.run(model, xb, yb)
            clean = _correct_over_draws(model, xb, yb, n_draws)
            adv = clean if atk is None else _correct_over_draws(model, x_adv, yb, n_draws) & clean
            if verdict is not None:
                adv = adv & verdict.to(adv.device).view(1, -1)
            parts.append((b, clean.cpu(), adv.cpu(), None if verdict is None else verdict.cpu(),
                          x_adv.cpu() if keep_adversarials else None))
            n_done += int(yb.numel())
            robust_sum += float(adv.float().mean(0).sum())
            bar.update(xb.shape[0])
            bar.set_postfix(robust=f"{robust_sum / n_done:.3f}")
        bar.close()
    parts = sorted(_gather(parts) if shard is not None else parts, key=lambda p: p[0])
    if [p[0] for p in parts] != list(range(len(all_batches))):
        raise RuntimeError(f"sharded evaluation is missing batches: got {[p[0] for p in parts]}")
    clean = torch.cat([p[1] for p in parts], dim=1)
    adv = torch.cat([p[2] for p in parts], dim=1)
    verdicts = [p[3] for p in parts]
    robust_frac = adv.float().mean(0)
    return AttackResult(
        clean_accuracy=float(clean.float().mean()),
        robust_accuracy=float(robust_frac.mean()),
        n=int(x.shape[0]),
        seconds=time.perf_counter() - t0,
        clean_correct=clean[0],
        robust_correct=adv.all(0),
        x_adv=torch.cat([p[4] for p in parts]) if keep_adversarials else None,
        draws=n_draws,
        robust_frac=robust_frac,
        robust_all_draws=float(adv.all(0).float().mean()),
        clean_all_draws=float(clean.all(0).float().mean()),
        verdict_robust=None if any(v is None for v in verdicts) else float(torch.cat(verdicts).float().mean()),
    )
