"""torch.distributed (gloo, 2 CPU processes): sharded evaluation and data-parallel adversarial training equal the single-process results."""

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


# --------------------------------------------------------------------------- data-parallel adversarial training
_WORKER = r'''
import os, sys, torch
from torch import nn
import torch.distributed as dist

torch.set_num_threads(1)
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
from robustkit.data import digits
from robustkit.data.augment import CropFlip
from robustkit.training import PGDATStep, PlainStep, RobustAccuracy, TRADESStep, fit


class Net(nn.Module):  # no BatchNorm: per-process batch statistics would differ from one process's
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x))


out, method = sys.argv[1], sys.argv[2]
d = digits(size=8, channels=1, test_fraction=0.25, seed=0)
train = torch.utils.data.Subset(d.train, range(245))  # 7 global batches of 32, then 21: shards of 11 and 10
torch.manual_seed(0)
model = Net()
init = {k: v.clone() for k, v in model.state_dict().items()}
steps = {"trades": lambda: TRADESStep(eps=16 / 255, steps=3), "pgd": lambda: PGDATStep(eps=16 / 255, steps=3),
         "crop": lambda: PlainStep()}
step = steps[method]()
augment = CropFlip(1, flip=True) if method == "crop" else None  # draws for the global batch, sliced per rank
monitor = RobustAccuracy(d.test, n_samples=40, steps=2, batch_size=16)  # sharded across the ranks, gathered
import gc
from torch.nn.parallel import DistributedDataParallel
gc.disable()  # fit itself must free its DDP wrapper: one left in a reference cycle aborted a rank at exit
hist = fit(model, train, step, epochs=1, lr=0.1, batch_size=32, schedule="constant", progress=False, seed=3,
           callbacks=[monitor], augment=augment)
assert not any(isinstance(o, DistributedDataParallel) for o in gc.get_objects()), "fit left its DDP wrapper alive"
gc.enable()
if int(os.environ.get("RANK", "0")) == 0:
    torch.save({"init": init, "state": model.state_dict(), "history": hist}, out)
if world > 1:
    dist.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.parametrize("method", ["trades", "pgd", "crop"])
def test_data_parallel_adversarial_training_equals_one_process(tmp_path, method):
    """2 gloo processes with global batch 32 (16 + 16; the last 21 as 11 + 10) give the first-epoch
    weights of one process with batch 32: same shuffling, same attack noise per example, the same
    random crops and flips per example ("crop": plain steps on augmented batches),
    gradients weighted by each process's share of the batch."""
    import torch

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)

    def launch(world: int, out: str) -> None:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
                   OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / out), method],
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(world)]
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]

    launch(1, "single.pt")
    launch(2, "ddp.pt")
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    moved = max(float((single["state"][k] - single["init"][k]).abs().max()) for k in single["init"])
    diff = max(float((single["state"][k] - ddp["state"][k]).abs().max()) for k in single["init"])
    assert moved > 1e-2  # training changed the weights...
    assert diff < 1e-5, (diff, moved)  # ...identically, up to float reduction order (measured ~1e-8)
    h1, h2 = single["history"][-1], ddp["history"][-1]
    assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-5) and h1["train_acc"] == h2["train_acc"]
    assert h1["pgd_acc"] == h2["pgd_acc"] and h1["clean_acc"] == h2["clean_acc"]


@pytest.mark.slow
def test_training_config_runs_under_torchrun_style_launch(tmp_path):
    """``python -m robustkit.training CONFIG`` with 2 gloo processes: TRADES with the defense in the loop,
    a BatchNorm model (per-process statistics, rank 0's buffers broadcast), one report from rank 0."""
    cfg = {
        "name": "ddp train", "seed": 0, "device": "cpu",
        "data": {"name": "digits", "size": 8, "test_fraction": 0.8},
        "model": {"name": "small_cnn", "width": 4},
        "steps": [{"train": {"epochs": 1, "batch_size": 64,
                             "preprocessors": [{"name": "noise_bilateral", "sigma": 0.02, "kernel_size": 3}],
                             "adversarial": {"method": "trades", "eps": "8/255", "steps": 1, "eot_samples": 1},
                             "monitor": {"n_samples": 32, "steps": 1, "draws": 1, "eot_samples": 1}}},
                  {"save_model": {"path": "model.pt"}}],
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "robustkit.training", str(cfg_path), "--out", str(tmp_path / "run"),
                               "--no-progress"], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 processes" in outs[0][0] and outs[1][0] == ""
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = next(t for t in report["tables"] if t["title"] == "Training")["rows"]
    assert [r["epoch"] for r in rows] == [0, 1] and "pgd_acc" in rows[1]
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / "training.png").is_file()
