"""``python -m robustkit.training CONFIG [--out DIR] [--set k=v ...]``: run a training config,
data parallel when launched with torchrun::

    torchrun --nproc-per-node 2 -m robustkit.training configs/adv_train_trades.yaml --out runs/ddp

Every process builds the same data and model (same seed); :func:`robustkit.training.fit` wraps
the model in ``DistributedDataParallel`` and trains each process on its slice of every global
batch (``batch_size`` stays the global batch), so one epoch matches a single-process run with
the same batch. Backend: nccl on CUDA (one GPU per process, ``LOCAL_RANK``), gloo on CPU. Only
rank 0 prints and writes the report, plots and checkpoints.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from ..pipeline.launch import torchrun_main

    return torchrun_main("python -m robustkit.training", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
