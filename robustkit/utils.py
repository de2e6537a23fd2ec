"""Small helpers: seeding, device selection, batching."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import ConfigError


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present; an unavailable CUDA request is a clear error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}", "device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine; use 'cpu' or 'auto'", "device")
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a parameter-free module)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in chunks of ``batch_size``."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be > 0, got {batch_size}", "batch_size")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm bar that hides itself when ``enabled`` is False or the output is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=None if enabled else True, unit=unit, leave=False)


def resolve_out_path(path: str | Path, base: str | Path) -> Path:
    """``path`` if absolute, else ``base / path`` (output files named in configs)."""
    p = Path(path)
    return p if p.is_absolute() else Path(base) / p
