"""``python -m robustkit.eval CONFIG [--out DIR] [--set k=v ...]``: run an evaluation config,
sharded across processes when launched with torchrun::

    torchrun --nproc-per-node 4 -m robustkit.eval configs/eval_demo.yaml --out runs/eval

Each rank builds the same data and model (same seed), attacks its share of the batches
(batch b with seed ``seed + b``), and all ranks gather the per-example results; rank 0 writes
the report, which equals the single-process one. Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m robustkit.eval", description=__doc__,
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
    if world > 1 and not dist.is_initialized():
        backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        started = True
    overrides = list(args.overrides)
    if started and torch.cuda.is_available():
        overrides.append(f"device=cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
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
