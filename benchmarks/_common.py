"""Shared plumbing of the benchmark scripts: arguments, threads, machine facts, tables, JSON.

Every benchmark prints a table and writes JSON (atomically) with :func:`machine_info` beside
the numbers, so a figure always says which CPU (model, instruction set) or GPU it came from.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

CIFAR_SUBSET_HELP = ("genuine CIFAR-10 images as .npz (x_train/y_train/x_test/y_test, e.g. "
                     "../shared/data/cifar10_subset.npz); results on it are 'CIFAR-10 subset' figures")


def parser(doc: str | None, default_out: str, quick_help: str = "a smaller, faster run") -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: ``--quick``, ``--out``, ``--threads``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=default_out, help=f"JSON result file (default {default_out})")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")),
                   help="torch CPU threads (default $BENCH_THREADS or 2)")
    return p


def add_data_option(p: argparse.ArgumentParser) -> None:
    """``--data PATH.npz``: run on real images (the CIFAR-10 subset) instead of the built-in digits."""
    p.add_argument("--data", default=None, help=CIFAR_SUBSET_HELP)


def setup(args: argparse.Namespace) -> None:
    """Apply ``--threads``."""
    torch.set_num_threads(max(1, int(args.threads)))


def pyautoattack_checkpoint() -> str | None:
    """Path of the CIFAR-10 ResNet-18 state dict that ships with pyautoattack (``examples/model_test.pt``,
    loads into robustkit's ``resnet18_cifar``), or None when the package or the file is missing."""
    try:
        import pyautoattack
    except ImportError:
        return None
    path = Path(pyautoattack.__file__).resolve().parent / "examples" / "model_test.pt"
    return str(path) if path.is_file() else None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def instruction_sets() -> list[str]:
    """Vector instruction sets the CPU reports (``avx512f``, ``avx2``, ``fma``, ``neon`` ...)."""
    wanted = ("avx512f", "avx512_bf16", "avx512_vnni", "avx2", "fma", "avx", "sse4_2", "neon", "asimd")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """Versions, CPU model, instruction sets, thread count and GPU: what a reader needs next to a number."""
    from robustkit.eval.report import environment_info

    return {**environment_info(), "cpu_model": cpu_model(), "instruction_sets": instruction_sets(),
            "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """A plain-text table (floats to 3 decimals)."""
    if not rows:
        print("(no rows)")
        return
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus ``machine`` and ``argv`` atomically; return the path."""
    from robustkit.io import atomic_write_json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {**payload, "machine": machine_info(), "argv": sys.argv[1:]})
    print(f"wrote {out}")
    return out
