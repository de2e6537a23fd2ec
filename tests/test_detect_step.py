"""The ``detect`` pipeline step and the ``DETECTORS`` registry (issue #16): STRIP and Neural Cleanse's
detection named from YAML and the CLI, with TPR / FPR on triggered test inputs in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from robustkit.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_detectors_registered_and_listed(capsys):
    from robustkit.cli import main
    from robustkit.filtering import DETECTORS, STRIP, InputDetector, ModelScanner
    from robustkit.registry import REGISTRIES, STEPS
    from robustkit.repair.neural_cleanse import NeuralCleanseScan

    assert "detect" in STEPS and REGISTRIES["detectors"] is DETECTORS
    assert isinstance(DETECTORS.build({"name": "strip", "n_overlay": 8}), STRIP)
    assert isinstance(DETECTORS.build("strip"), InputDetector)
    scan = DETECTORS.build({"name": "neural_cleanse", "epochs_per_label": 2})
    assert isinstance(scan, NeuralCleanseScan) and isinstance(scan, ModelScanner) and scan.nc.epochs_per_label == 2
    with pytest.raises(ConfigError, match="n_overlay"):
        DETECTORS.build({"name": "strip", "n_overlays": 8})
    assert main(["list", "detectors"]) == 0
    out = capsys.readouterr().out
    assert "strip(n_overlay=100" in out and "neural_cleanse(" in out


def test_bundled_detect_configs_validate():
    from robustkit.pipeline import load_config, validate_config

    for name in ("detect_strip.yaml", "detect_neural_cleanse.yaml"):
        cfg = load_config(CONFIGS / name)
        validate_config(cfg)
        assert any("detect" in s for s in cfg["steps"])
    for name in ("fine_pruning", "nad", "neural_cleanse", "anp", "ibau"):  # the baselines' repair configs
        cfg = load_config(CONFIGS / f"repair_{name}.yaml")
        validate_config(cfg)
        assert any("repair" in s for s in cfg["steps"])


def test_detect_step_refuses_bad_specs(tmp_path):
    from robustkit.pipeline import validate_config

    base = {"name": "x", "data": {"name": "digits", "size": 16}, "model": {"name": "small_cnn", "width": 4},
            "output_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="strp"):
        validate_config({**base, "steps": [{"detect": {"detector": "strp"}}]})
    with pytest.raises(ConfigError, match="clean_ratio"):
        validate_config({**base, "steps": [{"detect": {"detector": "strip", "clean_ratio": 0}}]})


@pytest.mark.slow
def test_detect_step_strip_through_a_config_and_the_cli(cnn_victim_ckpt, tmp_path):
    """The backdoored victim of tests/test_baselines.py behind a load_model step; STRIP from YAML through the
    CLI; the report holds the TPR on the triggered test images and the FPR on the clean ones."""
    from robustkit.cli import main

    ckpt, atk = cnn_victim_ckpt
    cfg = {"name": "strip", "seed": 0, "device": "cpu", "output_dir": str(tmp_path / "out"),
           "data": {"name": "digits", "size": 16},
           "steps": [{"load_model": {"path": str(ckpt)}},
                     {"detect": {"detector": {"name": "strip", "n_overlay": 32, "frr": 0.01},
                                 "clean_ratio": 0.1, "attack": {"name": "badnets", "size": 3, "target": atk.target}}},
                     # the model-scanner branch (its detection quality is tested in test_baselines.py)
                     {"detect": {"detector": {"name": "neural_cleanse", "epochs_per_label": 1},
                                 "attack": {"name": "badnets", "size": 3, "target": atk.target}}}]}
    path = tmp_path / "detect.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = next(t for t in report["tables"] if t["title"] == "Input detection")["rows"]
    assert rows[0]["detector"] == "strip" and rows[0]["n_triggered"] == 406 and rows[0]["n_clean"] == 450
    assert report["metrics"]["detect_tpr"] > 0.8 and report["metrics"]["detect_fpr"] < 0.05, rows
    assert (tmp_path / "out" / "strip_entropy.png").is_file()
    scan = next(t for t in report["tables"] if t["title"] == "Model scan")["rows"][0]
    assert scan["detector"] == "neural_cleanse" and scan["true_target"] == atk.target
    assert scan["target_correct"] == (scan["target"] == atk.target)
    assert (tmp_path / "out" / "neural_cleanse_anomaly.png").is_file()


@pytest.fixture(scope="module")
def cnn_victim_ckpt(digits16, victim, tmp_path_factory):
    """The SmallCNN (width 16) BadNets victim of tests/test_baselines.py, saved as a robustkit checkpoint."""
    from robustkit.backdoor import BadNets
    from robustkit.models import SmallCNN
    from robustkit.models.checkpoints import save_checkpoint

    atk = BadNets(size=3)
    torch.manual_seed(0)
    model, _, _ = victim(SmallCNN(in_channels=1, width=16), atk, digits16.train, digits16.test,
                         epochs=6, lr=0.05, batch_size=64)
    path = tmp_path_factory.mktemp("victim") / "victim.pt"
    save_checkpoint(model, path, name="small_cnn", kwargs={"in_channels": 1, "width": 16})
    return path, atk
