"""Plug-ins: a user's own model / trigger / preprocessor, registered in their module, named from YAML
(``imports:``) and from the CLI (``--import``)."""

from __future__ import annotations

import textwrap

import pytest
import yaml

import robustkit
from robustkit.cli import main
from robustkit.errors import ConfigError

PLUGIN = textwrap.dedent('''
    import torch
    from torch import nn
    from robustkit.base import BackdoorAttack, Preprocessor
    from robustkit.registry import BACKDOORS, MODELS, PREPROCESSORS

    @MODELS.register("plugin_linear_{tag}")
    class PluginLinear(nn.Module):
        def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8):
            super().__init__()
            self.fc = nn.Linear(in_channels * image_size * image_size, num_classes)
        def forward(self, x):
            return self.fc(x.flatten(1))

    @PREPROCESSORS.register("plugin_invert_{tag}")
    class Invert(Preprocessor):
        def forward(self, x):
            return 1 - x

    @BACKDOORS.register("plugin_corner_{tag}")
    class Corner(BackdoorAttack):
        def apply(self, x):
            x = x.clone(); x[..., :2, :2] = 1.0; return x
''')


def _plugin(tmp_path, tag):
    path = tmp_path / f"my_plugin_{tag}.py"
    path.write_text(PLUGIN.format(tag=tag))
    return path


def _config(tmp_path, tag):
    return {"name": "plugin", "device": "cpu", "output_dir": str(tmp_path / "out"),
            "data": {"name": "digits", "size": 8},
            "model": {"name": f"plugin_linear_{tag}"},
            "steps": [{"poison": {"attack": {"name": f"plugin_corner_{tag}"}, "rate": 0.1}},
                      {"train": {"epochs": 1}},
                      {"evaluate": {"defenses": [{"label": "inv", "preprocessors": [f"plugin_invert_{tag}"]}],
                                    "n_samples": 16}}]}


def test_yaml_imports_make_plugin_names_usable(tmp_path):
    cfg = _config(tmp_path, "a")
    with pytest.raises(ConfigError, match="plugin_linear_a"):
        robustkit.validate_config(cfg)  # unknown until imported
    cfg["imports"] = [str(_plugin(tmp_path, "a"))]
    report = robustkit.run(cfg, progress=False, log=None)
    assert "inv/clean_accuracy" in report.metrics
    assert any(t.title == "Poisoning" for t in report.tables)


def test_cli_import_option_and_clear_error_for_a_missing_module(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, "b")))
    assert main(["run", str(path), "--import", str(_plugin(tmp_path, "b")), "--no-progress", "--dry-run"]) == 0
    assert main(["--import", "no_such_module_xyz", "list", "models"]) == 2
    assert "cannot import plug-in module 'no_such_module_xyz'" in capsys.readouterr().err


def test_plugin_error_is_reported_with_its_module(tmp_path):
    bad = tmp_path / "broken_plugin.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="broken_plugin.py.*RuntimeError: boom"):
        robustkit.validate_config({"imports": [str(bad)], "steps": []})


def test_set_value_that_is_not_yaml_is_a_config_error(tmp_path):
    from robustkit.pipeline import apply_overrides

    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides({"steps": []}, ["data={name: [digits"])
