"""``python -m robustkit.eval CONFIG [--out DIR] [--set k=v ...]``: run an evaluation config,
sharded across processes when launched with torchrun::

    torchrun --nproc-per-node 4 -m robustkit.eval configs/eval_demo.yaml --out runs/eval

Each rank builds the same data and model (same seed), attacks its share of the batches
(batch b with seed ``seed + b``), and all ranks gather the per-example results; rank 0 writes
the report, which equals the single-process one. Backend: nccl on CUDA (one GPU per process,
``LOCAL_RANK``), gloo on CPU (every rank on the CPU).
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from ..pipeline.launch import torchrun_main

    return torchrun_main("python -m robustkit.eval", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
