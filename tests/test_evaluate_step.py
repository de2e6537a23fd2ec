"""The ``evaluate`` step's ``cascade`` option: same worst case as separate runs, rows say so."""

from __future__ import annotations

import pytest

import robustkit
from robustkit.errors import ConfigError


def config(tmp_path, **evaluate_params):
    params = {
        # batch_size 1: an image's forward/backward is the same computation whether the cascade attacks it
        # among 24 or among fewer (batched convolutions may sum in another order for another batch size)
        "n_samples": 24, "batch_size": 1, "checks": False, "eps": ["4/255", "16/255"],
        "defenses": [{"label": "undefended"}],
        # no random start: with one, a subset of a batch draws other starts than the whole batch, so the
        # cascade equals separate runs in distribution only (docs/evaluation.md)
        "attacks": [{"name": "pgd", "steps": 6, "random_start": False, "label": "PGD-6"},
                    {"name": "pgd", "steps": 2, "random_start": False, "label": "PGD-2"}],
    }
    params.update(evaluate_params)
    return {"name": "cascade tiny", "seed": 0, "device": "cpu", "output_dir": str(tmp_path / "out"),
            "data": {"name": "digits", "size": 8}, "model": {"name": "small_cnn", "width": 4},
            "steps": [{"train": {"epochs": 2}}, {"evaluate": params}]}


@pytest.mark.slow  # trains a tiny CNN twice and attacks 24 images: ~10 s
def test_evaluate_step_cascade_keeps_the_worst_case(tmp_path):
    plain = robustkit.run(config(tmp_path / "a"), progress=False, log=None)
    cas = robustkit.run(config(tmp_path / "b", cascade=True), progress=False, log=None)
    rows = {r["attack"]: r["accuracy"] for r in plain.table("Clean and robust accuracy").rows}
    rows_c = {r["attack"]: r["accuracy"] for r in cas.table("Clean and robust accuracy").rows}
    assert rows.keys() == rows_c.keys()
    worst = [k for k in rows if k.startswith("worst case")]
    assert len(worst) == 2
    for k in worst:  # a deterministic model and attack: the per-example worst case is identical
        assert rows_c[k] == rows[k]
    for k in rows:  # a cascaded row counts cheaper attacks' breaks too: never above its separate run
        assert rows_c[k] <= rows[k]
    assert "Cascade" in cas.table("Clean and robust accuracy").note
    assert any("cascade" in n for n in cas.notes)


def test_evaluate_step_cascade_must_be_a_bool(tmp_path):
    from robustkit.pipeline import validate_config

    with pytest.raises(ConfigError, match="cascade"):
        validate_config(config(tmp_path, cascade="yes"))
