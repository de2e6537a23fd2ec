"""RobustBench zoo models load offline from model_dir, with a clear error when absent."""

import warnings

import pytest
import torch

import robustkit
from robustkit.errors import ConfigError, DataNotFoundError


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"cifar10/Linf/Standard.pt.*never downloads"):
        robustkit.MODELS.build({"name": "robustbench", "model_name": "Standard", "model_dir": str(tmp_path)})


def test_unknown_model_and_threat_model(tmp_path):
    with pytest.raises(ConfigError, match="unknown RobustBench model"):
        robustkit.MODELS.build({"name": "robustbench", "model_name": "NoSuchModel2099", "model_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="threat models"):
        robustkit.MODELS.build({"name": "robustbench", "model_name": "Standard", "threat_model": "L7", "model_dir": str(tmp_path)})


@pytest.mark.slow
def test_loads_standard_checkpoint_offline(tmp_path):
    """A checkpoint in RobustBench's layout (here: freshly initialized weights) loads without network."""
    robustkit.attacks.install_upstream_shim()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    arch = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Standard"]["model"]()
    target = tmp_path / "cifar10" / "Linf"
    target.mkdir(parents=True)
    torch.save({"state_dict": arch.state_dict()}, target / "Standard.pt")
    model = robustkit.MODELS.build({"name": "robustbench", "model_name": "Standard", "model_dir": str(tmp_path)})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), arch.eval()(x), atol=1e-5)
    defended = robustkit.wrap(model, "noise_bilateral")
    assert defended(x).shape == (2, 10)
