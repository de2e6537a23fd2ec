"""Sharded evaluation (torch.distributed, gloo, 2 CPU processes) equals the single-process result."""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

import robustkit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_evaluation_equals_single_process(tmp_path):
    # a trained model to evaluate (evaluation configs load one, as users do)
    robustkit.run({"name": "train", "seed": 0, "device": "cpu", "data": {"name": "digits", "size": 16},
                   "model": {"name": "small_cnn", "width": 8},
                   "steps": [{"train": {"epochs": 2}}, {"save_model": {"path": str(tmp_path / "m.pt")}}]},
                  out_dir=tmp_path / "train", progress=False, log=None)
    base = {
        "name": "shard", "seed": 0, "device": "cpu",
        "data": {"name": "digits", "size": 16},
        "steps": [
            {"load_model": {"path": str(tmp_path / "m.pt")}},
            {"evaluate": {
                "n_samples": 96, "batch_size": 16,  # 6 batches: 3 per rank
                "defenses": [{"label": "undefended"}, {"label": "noise", "preprocessors": [{"name": "gaussian_noise", "sigma": 0.1}]}],
                "attacks": [{"name": "pgd", "eps": "16/255", "steps": 3, "eot_samples": 2}],
                "eps": ["8/255", "16/255"],
            }},
        ],
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(base))

    def launch(world: int, out: str) -> list[str]:
        # same thread count in both runs: float reductions then agree bit for bit
        env_base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                        WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, "-m", "robustkit.eval", str(cfg_path), "--out", str(tmp_path / out),
                                   "--no-progress"], env=dict(env_base, RANK=str(r), LOCAL_RANK=str(r)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        return [o for o, _ in outs]

    launch(1, "single")
    outs = launch(2, "sharded")
    assert "2 processes" in outs[0] and outs[1] == ""  # only rank 0 prints
    single = json.loads((tmp_path / "single" / "report.json").read_text())
    sharded = json.loads((tmp_path / "sharded" / "report.json").read_text())
    rows_single = next(t for t in single["tables"] if t["title"] == "Clean and robust accuracy")["rows"]
    rows_sharded = next(t for t in sharded["tables"] if t["title"] == "Clean and robust accuracy")["rows"]
    key = lambda r: (r["defense"], r["attack"], r["accuracy"])
    assert [key(r) for r in rows_sharded] == [key(r) for r in rows_single]
    assert (tmp_path / "sharded" / "robust_vs_eps.png").is_file()
