"""The typed state shared by the steps of one pipeline run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..base import BackdoorAttack
from ..data.arrays import DataBundle
from ..errors import ConfigError, InputError
from ..inference import output_classes
from ..validation import check_num_classes
from ..eval.report import Report
from ..utils import resolve_out_path


@dataclass
class Context:
    """State shared by the steps of one run.

    ``data`` and ``model`` are what the steps read and replace; ``backdoor`` is the trigger
    implanted by a ``poison`` step (used to *measure* ASR, never given to a defense) and
    ``clean_train`` the training split as it was before poisoning (what a repair may use).
    """

    config: dict[str, Any]
    device: torch.device
    seed: int
    out_dir: Path
    report: Report
    progress: bool = True
    data: DataBundle | None = None
    model: nn.Module | None = None
    backdoor: BackdoorAttack | None = None
    clean_train: Dataset | None = None
    rank: int = 0
    world_size: int = 1
    _classes_checked: nn.Module | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints (all ranks compute)."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world_size) if self.world_size > 1 else None

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def require_model(self, step: str) -> nn.Module:
        """The run's model; the first time a step asks for a (new) model, its output count is checked
        against the data's class count, so a 3-class checkpoint on 10-class data fails before any number."""
        if self.model is None:
            raise ConfigError(f"step {step!r} needs a model: add a 'model' section or a load_model step before it", "steps")
        if self.data is not None and self._classes_checked is not self.model:
            x, _ = self.data.test[0] if len(self.data.test) else self.data.train[0]  # type: ignore[arg-type]
            try:
                check_num_classes(output_classes(self.model, x.unsqueeze(0)), self.data.num_classes,
                                  model=f"the model of step {step!r}", data=f"data {self.data.name!r}")
            except InputError as exc:
                raise ConfigError(str(exc), "model") from None
            self._classes_checked = self.model
        return self.model

    def out_path(self, path: str | Path) -> Path:
        """``path`` if absolute, else inside the output folder."""
        return resolve_out_path(path, self.out_dir)

    @property
    def show_progress(self) -> bool:
        return self.progress and self.is_main

    def require_data(self, step: str) -> DataBundle:
        if self.data is None:
            raise ConfigError(f"step {step!r} needs data: add a 'data' section", "data")
        return self.data
