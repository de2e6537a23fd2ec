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

import argparse
import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m robustkit.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--out", "-o")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from ..errors import RobustkitError
    from ..pipeline import run

    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1 and not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        started = True
    overrides = list(args.overrides)
    if started and backend == "nccl":
        overrides.append(f"device=cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    elif started:
        overrides.append("device=cpu")
    try:
        run(args.config, out_dir=args.out, overrides=overrides, progress=not args.no_progress)
    except RobustkitError as exc:
        print(f"robustkit: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
