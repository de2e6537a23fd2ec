"""RobustBench model-zoo models, loaded offline from ``model_dir`` (never downloaded here).

RobustBench models take [0, 1] images with their normalization inside, like robustkit's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from ..errors import ConfigError, DataNotFoundError
from ..registry import MODELS


@MODELS.register("robustbench")
def robustbench_model(model_name: str, model_dir: str = "models", dataset: str = "cifar10", threat_model: str = "Linf") -> nn.Module:
    """A RobustBench zoo model (e.g. ``Standard``, ``Carmon2019Unlabeled``) from
    ``model_dir/<dataset>/<threat_model>/<model_name>.pt``; a clear error when the file is absent."""
    from ..attacks.autoattack import install_upstream_shim

    install_upstream_shim()  # robustbench modules import `autoattack`
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        from robustbench.utils import load_model

    try:
        ds, tm = BenchmarkDataset(dataset), ThreatModel(threat_model)
    except ValueError as exc:
        raise ConfigError(f"{exc}; datasets: {[d.value for d in BenchmarkDataset]}, threat models: {[t.value for t in ThreatModel]}") from None
    zoo = model_dicts[ds][tm]
    if model_name not in zoo:
        raise ConfigError(f"unknown RobustBench model {model_name!r} for {dataset}/{threat_model}; e.g. {', '.join(list(zoo)[:8])}, ...",
                          "model_name")
    path = Path(model_dir) / ds.value / tm.value / f"{model_name}.pt"
    if not path.is_file():
        raise DataNotFoundError(
            f"RobustBench checkpoint not found: {path}. robustkit never downloads at run time; on a machine "
            f"with network run robustbench.utils.load_model({model_name!r}, model_dir={str(model_dir)!r}, "
            f"dataset={dataset!r}, threat_model={threat_model!r}) once and copy {path} here."
        )
    return load_model(model_name=model_name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model,
                      custom_checkpoint=str(path)).eval()
