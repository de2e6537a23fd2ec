"""Clear one-line errors instead of tracebacks, and a --dry-run that checks everything knowable (issue #12)."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from robustkit.cli import main
from robustkit.models import SmallCNN
from robustkit.models.checkpoints import save_checkpoint


def _cfg(tmp_path, steps, model=None):
    cfg = {"name": "t", "device": "cpu", "data": {"name": "digits", "size": 8},
           "model": model or {"name": "small_cnn", "width": 4}, "steps": steps}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_set_value_that_is_not_yaml(tmp_path, capsys):
    assert main(["run", _cfg(tmp_path, []), "--set", "data={name: [digits", "--dry-run"]) == 2
    assert "is not valid YAML" in _error(capsys)


def test_out_pointing_at_an_existing_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(["run", _cfg(tmp_path, []), "--out", str(afile)]) == 2
    assert "is an existing file, not a folder" in _error(capsys)
    assert afile.read_text() == "keep me"


def test_filter_on_a_corrupt_npz(tmp_path, capsys):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"not a zip at all")
    ck = tmp_path / "m.pt"
    save_checkpoint(SmallCNN(in_channels=1, num_classes=10, width=4), ck, name="small_cnn")
    assert main(["filter", "--model", str(ck), "--data", str(bad), "--out", str(tmp_path / "o"),
                 "--filter", "spectral_signatures"]) == 2
    assert "not an .npz archive" in _error(capsys)


def test_checkpoint_class_count_must_match_the_data(tmp_path, capsys):
    ck = tmp_path / "three.pt"
    save_checkpoint(SmallCNN(in_channels=1, num_classes=3, width=4), ck, name="small_cnn")
    path = _cfg(tmp_path, [{"load_model": {"path": str(ck)}}, {"evaluate": {"n_samples": 8}}])
    assert main(["run", path, "--dry-run"]) == 2  # caught before running
    assert "outputs 3 classes but data 'digits' has 10" in _error(capsys)
    assert main(["run", path, "--no-progress", "--out", str(tmp_path / "o")]) == 2  # and when running: no number first
    err = _error(capsys)
    assert "outputs 3 classes" in err


@pytest.mark.parametrize("override, message", [
    ("device=cuda:7", "CUDA is not available"),
    ("steps.0.evaluate.eps=[8/255, -1]", "a radius must be >= 0"),
    ("steps.0.evaluate.draws=0", "must be an integer >= 1"),
])
def test_dry_run_catches_bad_values(tmp_path, capsys, override, message):
    if override.startswith("device") and torch.cuda.is_available():
        pytest.skip("CUDA present")
    path = _cfg(tmp_path, [{"evaluate": {"n_samples": 8}}])
    assert main(["run", path, "--set", override, "--dry-run"]) == 2
    assert message in _error(capsys)


def test_dry_run_catches_poison_target_and_rate(tmp_path, capsys):
    path = _cfg(tmp_path, [{"poison": {"attack": {"name": "badnets", "target": 42}}}])
    assert main(["run", path, "--dry-run"]) == 2
    assert "42" in _error(capsys)
    path = _cfg(tmp_path, [{"poison": {"attack": "badnets", "rate": 1.5}}])
    assert main(["run", path, "--dry-run"]) == 2
    assert "poisoned fraction) must be a number in [0.0, 1.0]" in _error(capsys)


def test_dry_run_loads_checkpoints(tmp_path, capsys):
    garbage = tmp_path / "bad.pt"
    garbage.write_text("x")
    assert main(["run", _cfg(tmp_path, [{"load_model": {"path": str(garbage)}}]), "--dry-run"]) == 2
    assert "bad.pt" in _error(capsys)
    missing = _cfg(tmp_path, [{"load_model": {"path": str(tmp_path / "nope.pt")}}])
    assert main(["run", missing, "--dry-run"]) == 2
    assert "nope.pt" in _error(capsys)
    ok = tmp_path / "ok.pt"
    save_checkpoint(SmallCNN(in_channels=1, num_classes=10, width=4), ok, name="small_cnn")
    assert main(["run", _cfg(tmp_path, [{"load_model": {"path": str(ok)}}]), "--dry-run"]) == 0
    assert "checkpoint" in capsys.readouterr().out


def test_list_several_kinds(capsys):
    assert main(["list", "models", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "models:" in out and "datasets:" in out and "attacks:" not in out
    assert main(["list", "modles"]) == 2


def test_certify_command_needs_a_certify_step(tmp_path, capsys):
    assert main(["certify", _cfg(tmp_path, [{"evaluate": {"n_samples": 8}}]), "--dry-run"]) == 2
    assert "has no 'certify' step" in _error(capsys)
    assert main(["certify", "configs/certify_digits.yaml", "--dry-run"]) == 0


def test_unreadable_checkpoints_never_advise_weights_only_false(tmp_path):
    from robustkit.errors import InputError
    from robustkit.models.checkpoints import load_checkpoint

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    pickled = tmp_path / "objects.pt"
    torch.save({"layer": torch.nn.Linear(2, 2)}, pickled)  # a module object, not a state dict
    for path, message in ((garbage, "corrupt, truncated or of another format"),
                          (pickled, re.escape("torch.save(model.state_dict(), path)"))):
        with pytest.raises(InputError, match=message) as info:
            load_checkpoint(path)
        assert "weights_only` set to `False`" not in str(info.value) and "will likely succeed" not in str(info.value)
