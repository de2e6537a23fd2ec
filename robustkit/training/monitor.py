"""Per-epoch clean and PGD accuracy during training: :class:`RobustAccuracy` (a :class:`Monitor`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import InputError
from ..inference import is_randomized
from .loop import Monitor


def _shard() -> tuple[int, int] | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


class RobustAccuracy(Monitor):
    """Clean and PGD accuracy of ``wrap(model, preprocess)`` on a fixed test subset, before training
    (an ``epoch 0`` row) and every ``every`` epochs: history keys ``clean_acc`` and ``pgd_acc``.

    The subset is the first ``n_samples`` images of ``data``; the attack is
    :class:`~robustkit.attacks.PGD` (``eps``, ``steps``, ``norm``, random start, a fixed seed so
    epochs are comparable) and is an EOT attack (``eot_samples``, default 8) when the
    preprocessor is randomized. The preprocessor runs in eval mode, i.e. with the test-time
    schedule (a :class:`~robustkit.preprocessing.BilateralFilter`'s ``iterations``); it is a copy
    of the one passed, so the measurement never touches the training preprocessor's random
    stream. A randomized model is scored over ``draws`` draws. Under ``torch.distributed`` the
    batches are sharded across the processes and gathered (every process gets the result).
    This is a training monitor, not a robustness evaluation: use the ``evaluate`` step
    (AutoAttack, EOT, several radii) for reported numbers.
    """

    def __init__(self, data: Dataset | tuple[torch.Tensor, torch.Tensor], n_samples: int = 256, eps: float = 8 / 255,
                 steps: int = 10, alpha: float | None = None, norm: str = "linf", eot_samples: int | None = None,
                 preprocess: nn.Module | None = None, draws: int = 4, every: int = 1, epochs: int | None = None,
                 batch_size: int = 256, seed: int = 0):
        from ..attacks.pgd import PGD
        from ..data.arrays import to_tensors

        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise InputError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        if isinstance(data, (tuple, list)):
            self.x, self.y = data[0][:n_samples], data[1][:n_samples]
        else:
            self.x, self.y = to_tensors(data, n_samples)
        self.preprocess = copy.deepcopy(preprocess) if preprocess is not None else None
        randomized = self.preprocess is not None and is_randomized(self.preprocess)
        eot = eot_samples if eot_samples is not None else (8 if randomized else 1)
        self.attack = PGD(eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=True, eot_samples=eot, seed=seed)
        self.draws, self.batch_size, self.seed = draws, batch_size, seed
        super().__init__(self.measure, every, epochs)

    def measure(self, model: nn.Module) -> dict[str, Any]:
        from ..eval.metrics import robust_accuracy
        from ..utils import model_device
        from ..wrap import wrap

        pre = [self.preprocess.to(model_device(model))] if self.preprocess is not None else []
        defended = wrap(model, *pre, check_input=False)
        res = robust_accuracy(defended, self.attack, self.x, self.y, batch_size=self.batch_size, progress=False,
                              seed=self.seed, shard=_shard(), draws=self.draws)
        return {"clean_acc": res.clean_accuracy, "pgd_acc": res.robust_accuracy}

    def describe(self) -> dict[str, Any]:
        return {"n_samples": int(self.x.shape[0]), "attack": self.attack.label(), "draws": self.draws}
