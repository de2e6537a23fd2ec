import json

import pytest
import yaml

import robustkit
from robustkit.cli import demo_config_path, main
from robustkit.errors import ConfigError, DataNotFoundError, UnknownNameError
from robustkit.pipeline import apply_overrides, load_config, validate_config


def tiny_config(tmp_path, **extra):
    cfg = {
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "output_dir": str(tmp_path / "out"),
        "data": {"name": "digits", "size": 16},
        "model": {"name": "small_cnn", "width": 8},
        "steps": [
            {"train": {"epochs": 2, "lr": 0.05}},
            {"evaluate": {
                "n_samples": 64,
                "defenses": [{"label": "undefended"}, {"label": "noise", "preprocessors": [{"name": "gaussian_noise", "sigma": 0.05}]}],
                "attacks": [{"name": "pgd", "eps": "32/255", "steps": 3}, {"name": "pgd", "eps": "32/255", "steps": 3, "eot_samples": 2}],
            }},
            {"save_model": {"path": "m.pt"}},
        ],
    }
    cfg.update(extra)
    return cfg


def test_demo_config_is_valid():
    cfg = load_config(demo_config_path())
    assert cfg["data"]["name"] == "digits"
    assert [next(iter(s)) for s in cfg["steps"]][:2] == ["train", "evaluate"]


@pytest.mark.parametrize(
    "mutate,path,reason",
    [
        (lambda c: c.update(bogus=1), "bogus", "unknown top-level key"),
        (lambda c: c.update(stpes=[]), "stpes", "Did you mean 'steps'"),
        (lambda c: c.update(seed="x"), "seed", "expected an integer"),
        (lambda c: c["data"].update(name="mnist"), "data", "unknown dataset 'mnist'"),
        (lambda c: c["data"].update(size="big"), "data.size", "expected int"),
        (lambda c: c["model"].update(widht=3), "model.widht", "unknown parameter.*Did you mean 'width'"),
        (lambda c: c["steps"][0]["train"].update(epochs="ten"), "steps[0].train.epochs", "expected int"),
        (lambda c: c["steps"].append({"trian": {}}), "steps[3]", "unknown pipeline step 'trian'.*Did you mean 'train'"),
        (lambda c: c["steps"].append(["x"]), "steps[3]", "one-key mapping"),
        (lambda c: c["steps"][1]["evaluate"]["attacks"][0].update(eps="lots"), "steps[1].evaluate.attacks[0].eps", "expected float"),
        (lambda c: c["steps"][1]["evaluate"]["attacks"][0].update(name="fgsmm"), "steps[1].evaluate.attacks[0]", "unknown attack"),
        (lambda c: c["steps"][1]["evaluate"]["attacks"][0].update(norm="l7"), "steps[1].evaluate.attacks[0]", "norm must be"),
        (lambda c: c["steps"][1]["evaluate"]["defenses"][1]["preprocessors"][0].update(sigma=-1), "steps[1].evaluate.defenses", "sigma"),
        (lambda c: c["steps"][1]["evaluate"]["defenses"][0].update(extra=1), "steps[1].evaluate.defenses[0]", "unknown key"),
    ],
)
def test_validation_names_bad_key(tmp_path, mutate, path, reason):
    cfg = tiny_config(tmp_path)
    mutate(cfg)
    with pytest.raises(ConfigError, match=reason) as info:
        validate_config(cfg)
    assert str(info.value).startswith(path), str(info.value)


def test_unknown_names_are_unknown_name_errors(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["model"]["name"] = "resnet9000"
    with pytest.raises(UnknownNameError, match="Known models:.*small_cnn"):
        validate_config(cfg)


def test_overrides():
    cfg = {"steps": [{"train": {"epochs": 5}}], "data": {"name": "digits"}}
    out = apply_overrides(cfg, ["steps.0.train.epochs=2", "data.size=16", "seed=3"])
    assert out["steps"][0]["train"]["epochs"] == 2 and out["data"]["size"] == 16 and out["seed"] == 3
    assert cfg["steps"][0]["train"]["epochs"] == 5  # copy, not mutated
    with pytest.raises(ConfigError, match="no list index"):
        apply_overrides(cfg, ["steps.4.train.epochs=2"])
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(cfg, ["seed"])


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(DataNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [train\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(scalar)


@pytest.mark.slow
def test_run_end_to_end_writes_report(tmp_path):
    report = robustkit.run(tiny_config(tmp_path), progress=False, log=None)
    out = tmp_path / "out"
    for name in ("report.json", "report.md", "accuracy.png", "training.png", "m.pt"):
        assert (out / name).is_file(), name
    data = json.loads((out / "report.json").read_text())
    rows = next(t for t in data["tables"] if t["title"] == "Clean and robust accuracy")["rows"]
    by = {(r["defense"], r["attack"]): r for r in rows}
    clean = by[("undefended", "clean")]["accuracy"]
    pgd = by[("undefended", "PGD-Linf eps=32/255")]["accuracy"]
    assert clean > 0.5 and pgd < clean
    # the randomized defense attacked without EOT is flagged, with EOT it is adaptive
    assert by[("noise", "PGD-Linf eps=32/255")]["adaptive"] is False
    assert by[("noise", "EOT-PGD-Linf eps=32/255 EOT=2")]["adaptive"] is True
    assert any("no EOT" in n for n in report.notes)
    assert "| defense |" in (out / "report.md").read_text()
    # the checkpoint reloads into the same model: it reproduces the reported clean accuracy
    from robustkit.data import digits, to_tensors
    from robustkit.eval import accuracy
    from robustkit.models.checkpoints import load_checkpoint

    x, y = to_tensors(digits(size=16).test, max_samples=64)
    assert accuracy(load_checkpoint(out / "m.pt"), (x, y)) == pytest.approx(clean)


def test_cli_help_and_list(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "run" in out and "list" in out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "digits" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--set" in capsys.readouterr().out
    assert main(["list", "attacks"]) == 0
    assert "pgd(eps=" in capsys.readouterr().out
    assert main(["list", "nonsense"]) == 2


def test_cli_run_reports_bad_config(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg["steps"][0]["train"]["epochz"] = 3
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "steps[0].train.epochz: unknown parameter" in err and "Did you mean 'epochs'" in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_cli_dry_run(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    assert main(["run", str(path), "--dry-run", "--set", "steps.0.train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "epochs: 1" in out
    assert not (tmp_path / "out").exists()


def test_cli_train_backdoor_pipeline(tmp_path, capsys):
    """poison -> train (checkpoints, per-epoch ASR) -> backdoor_eval -> save, through `robustkit train`."""
    from robustkit.data import load_poisoned

    cfg = {
        "name": "victim", "seed": 0, "device": "cpu", "output_dir": str(tmp_path / "v"),
        "data": {"name": "digits", "size": 16},
        "model": {"name": "small_cnn", "width": 8},
        "steps": [
            {"poison": {"attack": {"name": "badnets", "size": 3}, "rate": 0.1, "save": "poisoned.npz"}},
            {"train": {"epochs": 4, "checkpoint_every": 2}},
            {"backdoor_eval": {}},
        ],
    }
    path = tmp_path / "victim.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-progress"]) == 0
    out = tmp_path / "v"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_002.pt", "epoch_004.pt", "last.pt"]
    report = json.loads((out / "report.json").read_text())
    training = next(t for t in report["tables"] if t["title"] == "Training")["rows"]
    assert all("asr" in r for r in training)
    assert report["metrics"]["asr"] > 0.5 and report["metrics"]["acc"] > 0.5
    assert len(load_poisoned(out / "poisoned.npz").poisoned_indices) == 135
    # a config without a train step is refused by `robustkit train`
    cfg["steps"] = [{"backdoor_eval": {"attack": "badnets"}}]
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    assert "has no 'train' step" in capsys.readouterr().err


def test_evaluate_writes_robustbench_json_and_eps_sweep(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["steps"][1]["evaluate"].update(
        eps=["8/255", "16/255"],
        attacks=[{"name": "pgd", "steps": 2}, {"name": "autoattack", "version": "custom", "attacks": ["apgd-ce"], "n_iter": 3}],
        n_samples=32,
    )
    cfg["steps"] = cfg["steps"][:2]
    robustkit.run(cfg, progress=False, log=None)
    out = tmp_path / "out"
    entry = json.loads((out / "robustbench_undefended.json").read_text())
    assert entry["eps"] == "16/255" and entry["threat_model"] == "Linf"
    # a reduced AutoAttack (n_iter=3) never fills autoattack_acc; the worst case over both attacks does fill
    # worst_adaptive_acc, and is at most every single attack's number at that radius
    assert entry["autoattack_acc"] == ""
    rows = entry["robustkit"]["rows"]
    assert len(rows) == 1 + 2 * 2 + 2  # clean, 2 attacks x 2 radii, a worst-case row per radius
    at_16 = [r for r in rows if r["eps"] == 16 / 255 and r["kind"] != "worst_case"]
    assert float(entry["worst_adaptive_acc"]) <= 100 * min(r["accuracy"] for r in at_16) + 1e-9
    assert all(r["settings"]["reduced"] for r in rows if r["kind"] == "autoattack")
    assert (out / "robust_vs_eps.png").is_file() and json.loads((out / "robustbench_noise.json").read_text())["name"] == "noise"


def test_cli_eval_robustbench_model_missing(tmp_path, capsys):
    cfg = {"name": "rb", "device": "cpu", "data": {"name": "digits", "size": 32, "channels": 3},
           "steps": [{"evaluate": {"n_samples": 8}}]}
    path = tmp_path / "rb.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(path), "--robustbench-model", "Standard", "--model-dir", str(tmp_path / "zoo"), "--out", str(tmp_path / "o")]) == 2
    assert "RobustBench checkpoint not found" in capsys.readouterr().err
