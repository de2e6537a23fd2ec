"""The one training loop: :func:`fit` with a pluggable per-batch step and callbacks.

Plain training (:func:`robustkit.training.train_classifier`), the backdoor repairs (FineTune,
FT-SAM, skip suppression's stage fine-tuning) and adversarial training all run here; what
differs is the :class:`~robustkit.training.steps.TrainStep` and the callbacks.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.augment import AUGMENT_SEED_OFFSET
from ..errors import ConfigError, InputError
from ..utils import model_device, progress_bar
from .optim import make_optimizer, make_scheduler
from .steps import PlainStep, TrainStep


class Callback:
    """Hooks of :func:`fit`; override what you need."""

    def on_fit_start(self, model: nn.Module, history: list[dict[str, Any]]) -> None:
        """Before the first epoch (may append an ``epoch 0`` row to ``history``)."""

    def on_epoch_end(self, model: nn.Module, epoch: int, row: dict[str, Any]) -> None:
        """After each epoch, with the model in eval mode; may add keys to ``row``."""


class Monitor(Callback):
    """Adds ``measure(model)`` (e.g. ``{acc, asr, ra}``) to an ``epoch 0`` row and every ``every`` epochs (and the last)."""

    def __init__(self, measure: Callable[[nn.Module], dict[str, float]], every: int = 1, epochs: int | None = None):
        self.measure, self.every, self.epochs = measure, max(1, int(every)), epochs

    def on_fit_start(self, model: nn.Module, history: list[dict[str, Any]]) -> None:
        history.append({"epoch": 0, **self.measure(model)})

    def on_epoch_end(self, model: nn.Module, epoch: int, row: dict[str, Any]) -> None:
        if epoch % self.every == 0 or epoch == self.epochs:
            row.update(self.measure(model))


class EpochEnd(Callback):
    """Adapts a plain ``fn(epoch, row)`` (the older ``on_epoch_end`` argument)."""

    def __init__(self, fn: Callable[[int, dict[str, Any]], None]):
        self.fn = fn

    def on_epoch_end(self, model: nn.Module, epoch: int, row: dict[str, Any]) -> None:
        self.fn(epoch, row)


def check_epochs_lr(epochs: Any, lr: Any) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}", "epochs")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"lr must be > 0, got {lr!r}", "lr")


def fit(
    model: nn.Module,
    data: Dataset,
    step: TrainStep | None = None,
    *,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 64,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    trainable: Callable[[str, nn.Parameter], bool] | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    callbacks: Sequence[Callback] | Iterable[Callback] = (),
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    distributed: bool | None = None,
    augment: Callable[..., torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place; return one history row per epoch (plus rows callbacks add).

    Every epoch shuffles ``data`` with a generator seeded by ``seed``, calls ``step`` on each
    batch (default: :class:`PlainStep`, cross-entropy), then the optimizer and the per-step LR
    schedule. ``trainable(name, param)`` restricts the updated parameters (the others are
    frozen for the call and their ``requires_grad`` restored after); ``train_mode(model)``
    replaces ``model.train()`` (e.g. to keep frozen BatchNorm layers in eval mode). The model
    is in eval mode when callbacks run and when ``fit`` returns. A non-finite loss raises
    ``RuntimeError`` naming the epoch and the learning rate.

    Data parallel: when ``torch.distributed`` is initialized with several processes
    (``distributed=None``, the default; ``False`` never, ``True`` requires it), the model is wrapped
    in ``DistributedDataParallel`` and ``batch_size`` is the *global* batch: every process
    shuffles with the same generator, cuts the same global batches and trains on its contiguous
    slice of each; gradients are averaged with per-process weights (local size / global size),
    so one epoch equals one process with the same global batch up to float reduction order and
    per-process BatchNorm statistics (use a model without BatchNorm, or SyncBatchNorm on GPUs,
    where that matters). A final global batch smaller than the number of processes is skipped.
    The history (loss, train_acc) is reduced over the processes.

    ``augment`` (e.g. :class:`robustkit.data.augment.CropFlip`) is applied to every batch on its
    device before the step, as ``augment(x, generator, start, total)``: one generator seeded from
    ``seed`` for the whole run, draws made for the global batch of ``total`` and this process's
    slice from ``start`` applied, so the draws do not depend on the number of processes.
    """
    check_epochs_lr(epochs, lr)
    if len(data) == 0:  # type: ignore[arg-type]
        raise InputError("training set is empty")
    step = step or PlainStep()
    device = model_device(model)
    named = list(model.named_parameters())
    saved_flags = [(p, p.requires_grad) for _, p in named]
    if trainable is not None:
        for n, p in named:
            p.requires_grad_(p.requires_grad and trainable(n, p))
    try:
        params = [(n, p) for n, p in named if p.requires_grad]
        if not params:
            raise InputError("nothing to train: no parameter is trainable")
        rank, world = _world(distributed)
        if world > 1:
            sampler = GlobalBatchSampler(len(data), batch_size, rank, world, torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
            loader = DataLoader(data, batch_sampler=sampler, generator=sampler.generator)
        else:
            loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        opt = make_optimizer([p for _, p in params], optimizer, lr, momentum, weight_decay)
        steps_per_epoch = len(loader)
        sched = make_scheduler(opt, schedule, epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch))
        if hasattr(step, "set_seed"):  # steps written before set_seed existed need not have it
            step.set_seed(seed)
        step.setup(model, params)
        runner: nn.Module = model
        scale: dict[str, float] = {"local": 1.0}
        if world > 1:
            runner = _ddp(model, device, scale)
        callbacks = list(callbacks)
        history: list[dict[str, Any]] = []
        for cb in callbacks:
            cb.on_fit_start(model, history)
        aug_gen = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET) if augment is not None else None
        bar = progress_bar(epochs * steps_per_epoch, desc, progress, unit="batch")
        try:
            for epoch in range(1, epochs + 1):
                (train_mode or nn.Module.train)(model)
                t0 = time.perf_counter()
                loss_sum = correct = seen = 0.0
                for b, (x, y) in enumerate(loader):
                    x, y = x.to(device, non_blocking=True), _labels(y).to(device, non_blocking=True)
                    opt.zero_grad(set_to_none=True)
                    start, total = 0, len(x)
                    if world > 1:
                        step.shard = sampler.shards[b]
                        start, stop, total = step.shard
                        scale["local"] = (stop - start) / total
                    if augment is not None:
                        x = augment(x, aug_gen, start, total)
                    try:
                        loss, logits = step(runner, x, y)
                    except FloatingPointError as exc:
                        raise RuntimeError(f"{desc} diverged at epoch {epoch} ({exc}); lower lr (now {lr})") from None
                    opt.step()
                    sched.step()
                    n = y.numel()
                    loss_sum += float(loss) * n
                    correct += float((logits.argmax(1) == y).sum())
                    seen += n
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                if world > 1:
                    loss_sum, correct, seen = _all_sum(loss_sum, correct, seen, device=device)
                row: dict[str, Any] = {"epoch": epoch, "loss": loss_sum / seen, "train_acc": correct / seen,
                                       "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
                model.eval()
                for cb in callbacks:
                    cb.on_epoch_end(model, epoch, row)
                history.append(row)
        finally:
            bar.close()
            if runner is not model:
                # Release DistributedDataParallel now, while the interpreter is whole: its reducer holds the
                # process group and the gradient hook's Python futures, and when a reference cycle
                # left it to the collector at interpreter exit, a gloo worker thread's teardown aborted
                # the process ("terminate called without an active exception") about one run in 13.
                runner = model
                gc.collect()
    finally:
        step.shard = None
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.eval()
    return history


def _labels(y: Any) -> torch.Tensor:
    """Batch labels as int64 class indices (any integer dtype converts; floats are an error)."""
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise InputError(f"training labels must be integer class indices, got dtype {y.dtype}")
    return y if y.dtype == torch.int64 else y.long()


def _world(distributed: bool | None) -> tuple[int, int]:
    """(rank, world size) this call of :func:`fit` trains with."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and not on:
        raise InputError("distributed=True needs an initialized torch.distributed process group with >= 2 processes "
                         "(launch with torchrun)")
    if distributed is False or not on:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous slice ``[start, stop)`` of a global batch of ``total`` held by ``rank`` (sizes differ by <= 1)."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's slice of each global batch, the global batches being exactly those of
    ``DataLoader(data, batch_size, shuffle=True, generator=generator)`` in one process (same
    generator draws: pass ``generator`` to the DataLoader too). ``shards[b]`` is
    ``(start, stop, total)`` of batch ``b``; a last global batch smaller than ``world`` is skipped.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, generator: torch.Generator):
        from torch.utils.data import BatchSampler, RandomSampler

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < world:
            raise InputError(f"batch_size (the global batch) must be an integer >= the number of processes ({world}), "
                             f"got {batch_size!r}")
        self.generator = generator
        self.batches = BatchSampler(RandomSampler(range(n), generator=generator), batch_size, drop_last=False)
        self.rank, self.world = rank, world
        sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
        self.shards = [(*shard_bounds(t, rank, world), t) for t in sizes if t >= world]

    def __iter__(self):
        for batch in self.batches:
            if len(batch) >= self.world:
                start, stop = shard_bounds(len(batch), self.rank, self.world)
                yield batch[start:stop]

    def __len__(self) -> int:
        return len(self.shards)


def _ddp(model: nn.Module, device: torch.device, scale: dict[str, float]) -> nn.Module:
    """``DistributedDataParallel(model)`` whose gradient all-reduce weights each process by its share of the batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids)

    def weighted_allreduce(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
        buf = bucket.buffer()
        buf.mul_(state["local"])  # local mean -> this process's share of the global mean
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])

    ddp.register_comm_hook(scale, weighted_allreduce)
    return ddp


def _all_sum(*values: float, device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
