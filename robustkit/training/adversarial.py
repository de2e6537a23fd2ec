"""Adversarial training steps for :func:`robustkit.training.fit`: PGD-AT and TRADES, with the
training-time preprocessor (e.g. noise + bilateral) in the loop.

- :class:`PGDATStep` - Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models
  Resistant to Adversarial Attacks", ICLR 2018: cross-entropy on PGD examples only.
- :class:`TRADESStep` - Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled
  Trade-off between Robustness and Accuracy", ICML 2019:
  ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``x'`` maximizing the KL term inside the ball,
  started at ``x + 0.001 N(0, I)``, 10 steps of 0.007 at eps 8/255, model in eval mode while
  generating, ``beta = 6``.

The classifier trained is ``f = model(preprocess(.))`` (what :func:`robustkit.wrap` builds): the
attack and the loss both see the preprocessor, with gradients through it, so the network learns
to be robust *with* its defense in front (Stalder et al. 2025 train their noise + bilateral
defense this way, with TRADES). The preprocessor runs in train mode throughout the step, so a
:class:`~robustkit.preprocessing.BilateralFilter` uses its ``train_iterations`` (the paper's
"a" of the a/b schedule); at test time (eval mode) it uses ``iterations`` ("b"). When the
preprocessor is randomized, every attack gradient averages ``eot_samples`` passes
(Expectation over Transformation, Athalye et al. 2018).

Random numbers (the PGD random start, TRADES' initial noise) come from the step's own
generator, seeded by :func:`fit`'s ``seed``; under ``torch.distributed`` every process draws the
noise of the whole global batch and keeps its own slice, so a data-parallel run draws exactly
what one process with the same global batch draws.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..inference import is_randomized
from .sam import frozen_bn_stats
from .steps import TrainStep, _check_finite

ATTACK_MODES = ("eval", "train")
NORMS = ("linf", "l2")
#: TRADES' published step size at eps = 8/255 (CIFAR-10): 0.007 per step, 10 steps.
TRADES_ALPHA_AT_8_255 = 0.007
#: Expectation-over-transformation passes per attack gradient when the preprocessor is randomized
#: and ``eot_samples`` is left at ``None``.
DEFAULT_TRAIN_EOT = 4


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper, else ``model``."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_float(value: Any, name: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


@contextlib.contextmanager
def attack_modes(net: nn.Module, mode: str) -> Iterator[None]:
    """Modes of the network while the training-time attack runs, every module's flag restored after.

    ``"eval"`` (TRADES' setting, our default for both methods): BatchNorm uses its running
    statistics and nothing is updated. ``"train"``: the modes the loop set (BatchNorm on batch
    statistics, as many PGD-AT implementations generate), with running statistics frozen so the
    attack's iterations do not leak into them.
    """
    saved = [(m, m.training) for m in net.modules()]
    counters = [(m.num_batches_tracked, m.num_batches_tracked.clone()) for m in net.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None]
    try:
        if mode == "eval":
            net.eval()
            yield
        else:
            with frozen_bn_stats(net):
                yield
    finally:
        for m, flag in saved:
            m.training = flag
        with torch.no_grad():
            for buf, value in counters:
                buf.copy_(value)


def _name(pre: nn.Module | None) -> str | None:
    """``NoiseBilateral``, ``GaussianNoise+BilateralFilter`` (for a Sequential), or None."""
    if pre is None:
        return None
    if isinstance(pre, nn.Sequential):
        return "+".join(type(m).__name__ for m in pre) or None
    return type(pre).__name__


class AdversarialStep(TrainStep):
    """Shared machinery of :class:`PGDATStep` and :class:`TRADESStep` (ball, modes, EOT, RNG, preprocessor).

    Args:
        eps: radius of the training threat model ([0, 1] pixel units; 8/255 Linf on CIFAR-10).
        steps: attack iterations per batch.
        alpha: attack step size (defaults: see the subclasses).
        norm: ``"linf"`` (sign steps) or ``"l2"`` (normalized-gradient steps).
        preprocess: the training-time defense in front of the network (a module, e.g.
            ``NoiseBilateral(train_iterations=20, iterations=80)``); ``None``: the bare network.
        eot_samples: gradient passes averaged per attack step; ``None``: 1 for a deterministic
            preprocessor, :data:`DEFAULT_TRAIN_EOT` for a randomized one.
        attack_mode: ``"eval"`` or ``"train"`` (see :func:`attack_modes`).
        seed: seed of the step's generator; ``None``: :func:`fit`'s ``seed``.
    """

    def __init__(self, eps: float = 8 / 255, steps: int = 10, alpha: float | None = None, norm: str = "linf",
                 preprocess: nn.Module | None = None, eot_samples: int | None = None, attack_mode: str = "eval",
                 label_smoothing: float = 0.0, seed: int | None = None):
        super().__init__(label_smoothing)
        self.eps = _check_float(eps, "eps", allow_zero=True)
        self.steps = _check_int(steps, "steps", 1)
        if alpha is not None:
            alpha = _check_float(alpha, "alpha")
        self.alpha = alpha
        if norm not in NORMS:
            raise InputError(f"norm must be 'linf' or 'l2', got {norm!r}")
        self.norm = norm
        if preprocess is not None and not isinstance(preprocess, nn.Module):
            raise InputError(f"preprocess must be an nn.Module (e.g. NoiseBilateral(...)), got {type(preprocess).__name__}")
        if preprocess is not None and not all(getattr(m, "differentiable", True) for m in preprocess.modules()):
            raise InputError("the training-time preprocessor is not differentiable, so the training attack has no "
                             "gradient through it; use a differentiable defense (noise, bilateral) or train with PlainStep")
        self.preprocess = preprocess
        if eot_samples is not None:
            _check_int(eot_samples, "eot_samples", 1)
        self.eot_samples = eot_samples
        if attack_mode not in ATTACK_MODES:
            raise InputError(f"attack_mode must be 'eval' or 'train', got {attack_mode!r}")
        self.attack_mode = attack_mode
        if seed is not None:
            _check_int(seed, "seed", 0)
        self.seed = seed
        self._fit_seed = 0
        self._generators: dict[str, torch.Generator] = {}
        #: ``(start, stop, total)``: this process's slice of the global batch (set by :func:`fit`
        #: under torch.distributed; ``None``: the whole batch is here).
        self.shard: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ settings
    @property
    def step_size(self) -> float:
        raise NotImplementedError

    @property
    def randomized(self) -> bool:
        """Whether the training-time defense is randomized (then the attack uses EOT)."""
        return self.preprocess is not None and is_randomized(self.preprocess)

    @property
    def eot(self) -> int:
        """Gradient passes per attack step actually used."""
        if self.eot_samples is not None:
            return self.eot_samples
        return DEFAULT_TRAIN_EOT if self.randomized else 1

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "eps": self.eps, "steps": self.steps, "alpha": self.step_size, "norm": self.norm,
                "eot_samples": self.eot, "attack_mode": self.attack_mode,
                "preprocess": _name(self.preprocess)}

    # ------------------------------------------------------------------ loop hooks
    def set_seed(self, seed: int) -> None:
        self._fit_seed = int(seed)
        self._generators.clear()

    def setup(self, model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
        self._generators.clear()

    # ------------------------------------------------------------------ pieces
    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            seed = self.seed if self.seed is not None else self._fit_seed
            self._generators[key] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[key]

    def _draw(self, kind: str, like: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        """``rand`` / ``randn`` of ``like``'s shape (or one per sample), drawn for the whole global batch."""
        n = like.shape[0]
        start, stop, total = self.shard or (0, n, n)
        if stop - start != n:
            raise RuntimeError(f"shard {self.shard} does not match a batch of {n}")
        shape = (total,) if per_sample else (total, *like.shape[1:])
        fn = torch.rand if kind == "rand" else torch.randn
        return fn(shape, generator=self._generator(like.device), device=like.device, dtype=like.dtype)[start:stop]

    def classifier(self, net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> net(preprocess(x))`` (gradients flow through the preprocessor)."""
        if self.preprocess is None:
            return net
        pre = self.preprocess
        return lambda x: net(pre(x))

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Onto the eps-ball around ``x`` intersected with [0, 1]."""
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (self.eps / norms).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
        return (x + delta).clamp(0.0, 1.0)

    def ascend(self, x_adv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One step of size ``alpha`` up the gradient (sign for Linf, normalized for L2)."""
        if self.norm == "linf":
            return x_adv + self.step_size * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return x_adv + self.step_size * grad / norms.view(-1, *([1] * (grad.dim() - 1)))

    def maximize(self, f: Callable[[torch.Tensor], torch.Tensor], x_start: torch.Tensor, x: torch.Tensor,
                 objective: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``steps`` ascent steps on ``objective(f(x'))`` (summed over the batch), projected; EOT-averaged."""
        x_adv = self.project(x_start, x)
        eot = self.eot
        for _ in range(self.steps):
            grad = torch.zeros_like(x_adv)
            for _ in range(eot):
                x_in = x_adv.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(objective(f(x_in)), x_in)
                grad += g
            x_adv = self.project(self.ascend(x_adv, grad).detach(), x)
        return x_adv.detach()

    def _prepare(self, model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        """(the bare network for the attack, ``x -> model(preprocess(x))`` for the loss)."""
        if self.preprocess is not None:
            self.preprocess.train(True)  # the training schedule ("a" filter iterations)
        return unwrap(model), self.classifier(model)


class PGDATStep(AdversarialStep):
    """PGD adversarial training (Madry et al. 2018): cross-entropy on PGD examples of ``f = model(preprocess(.))``.

    The attack maximizes cross-entropy in the ``norm`` ball of radius ``eps`` with ``steps``
    steps of ``alpha`` (default ``2.5 * eps / steps``: 2/255 for 10 steps at 8/255) from a
    uniform random start (``random_start``), with the network in ``attack_mode``; the step then
    trains on the adversarial examples only (the returned logits, hence ``train_acc``, are
    those of the adversarial examples).
    """

    def __init__(self, eps: float = 8 / 255, steps: int = 10, alpha: float | None = None, norm: str = "linf",
                 random_start: bool = True, preprocess: nn.Module | None = None, eot_samples: int | None = None,
                 attack_mode: str = "eval", label_smoothing: float = 0.0, seed: int | None = None):
        super().__init__(eps, steps, alpha, norm, preprocess, eot_samples, attack_mode, label_smoothing, seed)
        self.random_start = bool(random_start)

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "random_start": self.random_start}

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform in the Linf ball, or uniform in the L2 ball; ``x`` itself without ``random_start``."""
        if not self.random_start or self.eps == 0:
            return x.clone()
        if self.norm == "linf":
            return x + (self._draw("rand", x) * 2 - 1) * self.eps
        direction = self._draw("randn", x)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        radius = self._draw("rand", x, per_sample=True) ** (1.0 / x[0].numel()) * self.eps
        return x + direction * radius.view(-1, *([1] * (x.dim() - 1)))

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The PGD examples the step trains on (network in ``attack_mode``, preprocessor in train mode)."""
        net, _ = self._prepare(model)
        f = self.classifier(net)
        with attack_modes(net, self.attack_mode):
            return self.maximize(f, self.start(x), x, lambda logits: F.cross_entropy(logits, y, reduction="sum"))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = self.perturb(model, x, y)
        _, f = self._prepare(model)
        logits = f(x_adv)
        loss = self.loss(logits, y)
        _check_finite(loss)
        loss.backward()
        self.last_adversarial = x_adv
        return loss.detach(), logits.detach()


class TRADESStep(AdversarialStep):
    """TRADES (Zhang et al. 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``f = model(preprocess(.))``.

    ``x'`` maximizes ``KL(f(x) || f(x'))`` (summed over the batch) inside the ball: start at
    ``x + 0.001 N(0, I)`` (clipped to [0, 1]), ``steps`` steps of ``alpha`` (default 0.007 at
    8/255, scaled with ``eps``: ``0.007 * eps / (8/255)``), network in ``attack_mode`` (eval, as
    the paper), target ``softmax(f(x))`` computed once in that mode (averaged over the EOT
    passes for a randomized defense). The loss is computed in train mode with the KL term
    averaged over the batch (``batchmean``) and no gradient stopped, as the reference code. The
    returned logits (and ``train_acc``) are the clean ones of the CE term.
    """

    def __init__(self, eps: float = 8 / 255, steps: int = 10, alpha: float | None = None, beta: float = 6.0,
                 norm: str = "linf", preprocess: nn.Module | None = None, eot_samples: int | None = None,
                 attack_mode: str = "eval", label_smoothing: float = 0.0, seed: int | None = None,
                 init_std: float = 0.001):
        super().__init__(eps, steps, alpha, norm, preprocess, eot_samples, attack_mode, label_smoothing, seed)
        self.beta = _check_float(beta, "beta", allow_zero=True)
        self.init_std = _check_float(init_std, "init_std", allow_zero=True)

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else TRADES_ALPHA_AT_8_255 * self.eps / (8 / 255)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beta": self.beta}

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The KL-maximizing ``x'`` (network in ``attack_mode``, preprocessor in train mode)."""
        net, _ = self._prepare(model)
        f = self.classifier(net)
        with attack_modes(net, self.attack_mode):
            with torch.no_grad():
                target = torch.stack([F.softmax(f(x), dim=1) for _ in range(self.eot)]).mean(0)
            start = x + self.init_std * self._draw("randn", x)
            objective = lambda logits: F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum")  # noqa: E731
            return self.maximize(f, start, x, objective)

    def trades_loss(self, logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``CE(logits, y) + beta * KL(softmax(logits) || softmax(logits_adv))`` (KL averaged over the batch)."""
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return self.loss(logits, y) + self.beta * kl

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = self.perturb(model, x, y)
        _, f = self._prepare(model)
        logits = f(x)
        logits_adv = f(x_adv)
        loss = self.trades_loss(logits, logits_adv, y)
        _check_finite(loss)
        loss.backward()
        self.last_adversarial = x_adv
        return loss.detach(), logits.detach()
