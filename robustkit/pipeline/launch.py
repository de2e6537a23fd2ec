"""The ``torchrun`` entry points' shared body: parse ``CONFIG [--out] [--set] [--backend]``, join the
process group that torchrun describes in the environment, pin each process to its device, run the
config, and leave the group. ``python -m robustkit.eval`` and ``python -m robustkit.training`` are
this with their own program name and help text."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def torchrun_main(prog: str, description: str | None, argv: Sequence[str] | None = None) -> int:
    """Run a pipeline config in this process, as one rank of a ``torchrun`` job when ``WORLD_SIZE`` > 1.

    Backend ``auto``: nccl when CUDA is available (one GPU per process, ``LOCAL_RANK``), else gloo;
    each rank then runs on ``cuda:LOCAL_RANK`` (nccl) or the CPU (gloo). Returns the exit status
    (2 with a one-line message for a robustkit error)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
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
    from .runner import run

    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1 and not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        started = True
    overrides = list(args.overrides)
    if started:  # gloo ranks run on the CPU even where a GPU is visible; nccl ranks on their own GPU
        overrides.append(f"device=cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if backend == "nccl" else "device=cpu")
    try:
        run(args.config, out_dir=args.out, overrides=overrides, progress=not args.no_progress)
    except RobustkitError as exc:
        print(f"robustkit: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            dist.destroy_process_group()
    return 0
