"""Fine-tune a real pretrained CIFAR-10 network with the noise + bilateral defense in front:
pyautoattack's ResNet-18 (``pyautoattack/examples/model_test.pt``, loaded into robustkit's
``resnet18_cifar``), warm-started and trained with the preprocessor in the loop - once with
standard training (``PlainStep``), once with TRADES (``TRADESStep``: the attack and the loss
see ``model(preprocess(x))``, gradients through the filter, EOT when the noise is on) - and
evaluated before and after with :func:`robustkit.eval.evaluate_defenses`: clean accuracy and
adaptive EOT-PGD (Linf) at each radius of ``--eps``.

Rows: the bare pretrained network (no defense), the pretrained network behind the defense
without fine-tuning ("before"), and the two fine-tuned networks behind it ("after"). Every
accuracy carries its binomial standard error.

On a CPU the full recipe (many epochs of 10-step TRADES on 50,000 images) is out of reach; the
options size it: ``--std-n-train`` / ``--trades-n-train`` images (a seeded random subset of the
training set), ``--*-epochs``, ``--trades-steps``, ``--trades-eot``, and the evaluation's
``--n-clean`` / ``--n-attack`` images, ``--steps`` and ``--eot``. The script first times one
batch of each training step and prints the projected training cost. The same script with
``--device cuda`` and the full sizes is the real recipe.

    python benchmarks/finetune_pretrained.py --data ../shared/data/cifar10_subset.npz --threads 1
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def main(argv=None) -> int:
    p = _common.parser(__doc__, "benchmarks/results/finetune_pretrained.json", "tiny sizes (a smoke run)")
    _common.add_data_option(p)
    p.add_argument("--checkpoint", default=None, help="state dict for resnet18_cifar (default: pyautoattack's model_test.pt)")
    p.add_argument("--sigma", type=float, default=0.05, help="noise sigma (0: bilateral only)")
    p.add_argument("--kernel-size", type=int, default=5)
    p.add_argument("--sigma-color", type=float, default=0.1)
    p.add_argument("--sigma-space", type=float, default=1.5)
    p.add_argument("--train-iterations", type=int, default=1, help="filter iterations in training (the paper's a)")
    p.add_argument("--iterations", type=int, default=1, help="filter iterations at test time (the paper's b)")
    p.add_argument("--std-epochs", type=int, default=1)
    p.add_argument("--std-n-train", type=int, default=1024)
    p.add_argument("--trades-epochs", type=int, default=1)
    p.add_argument("--trades-n-train", type=int, default=512)
    p.add_argument("--trades-steps", type=int, default=3)
    p.add_argument("--trades-eot", type=int, default=1, help="EOT passes of the TRADES attack (randomized defense)")
    p.add_argument("--trades-eps", default="8/255")
    p.add_argument("--trades-alpha", type=float, default=None,
                   help="TRADES attack step (default: TRADESStep's 0.007 at 8/255; with few steps raise it, e.g. "
                        "2.5 * eps / steps, or the attack never reaches the ball's edge)")
    p.add_argument("--beta", type=float, default=6.0)
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of the fine-tuning, cosine (default 0.01)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-clean", type=int, default=512)
    p.add_argument("--n-attack", type=int, default=64)
    p.add_argument("--eps", default="2/255,8/255", help="comma-separated Linf radii of the EOT-PGD rows")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eot", type=int, default=2)
    p.add_argument("--autoattack", action="store_true", help="also AutoAttack version='rand' at the largest radius")
    p.add_argument("--aa-n-iter", type=int, default=None, help="AutoAttack APGD iterations (default: published 100)")
    p.add_argument("--aa-eot-iter", type=int, default=None, help="AutoAttack rand EOT draws (default: published 20)")
    p.add_argument("--skip", default="", help="comma-separated rows to skip: pretrained, standard, trades")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _common.setup(args)
    if not args.data:
        p.error("--data is required (a CIFAR-10 .npz, e.g. ../shared/data/cifar10_subset.npz): the checkpoint is a CIFAR-10 model")
    checkpoint = args.checkpoint or _common.pyautoattack_checkpoint()
    if checkpoint is None:
        p.error("no --checkpoint and pyautoattack's examples/model_test.pt was not found")
    if args.quick:
        args.std_n_train, args.trades_n_train, args.n_clean, args.n_attack, args.steps = 64, 32, 64, 8, 2

    import robustkit
    from robustkit.data import to_tensors
    from robustkit.data.npz import load_npz
    from robustkit.eval.report import save_figure
    from robustkit.eval.robust import evaluate_defenses
    from robustkit.models.checkpoints import load_weights
    from robustkit.registry import parse_number
    from robustkit.training import TRADESStep, fit
    from robustkit.training.steps import PlainStep
    from robustkit.wrap import build_preprocessor

    device = torch.device(args.device)
    data = load_npz(args.data)
    data_name = "CIFAR-10 subset (5,085 train / 512 test)"
    specs = ([{"name": "gaussian_noise", "sigma": args.sigma}] if args.sigma > 0 else []) + [
        {"name": "bilateral", "kernel_size": args.kernel_size, "sigma_color": args.sigma_color,
         "sigma_space": args.sigma_space, "iterations": args.iterations, "train_iterations": args.train_iterations}]
    radii = [e.strip() for e in args.eps.split(",") if e.strip()]
    n_clean = min(args.n_clean, len(data.test))
    n_attack = min(args.n_attack, n_clean)
    xc, yc = to_tensors(data.test, max_samples=n_clean)
    xa, ya = xc[:n_attack], yc[:n_attack]
    attacks = [{"name": "pgd", "norm": "linf", "eps": parse_number(e), "steps": args.steps, "eot_samples": args.eot,
                "label": f"EOT-PGD {e}"} for e in radii]
    aa_budget = {k: v for k, v in (("n_iter", args.aa_n_iter), ("eot_iter", args.aa_eot_iter)) if v is not None}
    if args.autoattack:
        attacks.append({"name": "autoattack", "norm": "linf", "eps": parse_number(radii[-1]), "version": "rand",
                        **aa_budget, "label": f"AutoAttack-rand {radii[-1]}"})
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed)).tolist()

    def pretrained() -> torch.nn.Module:
        m = robustkit.MODELS.build({"name": "resnet18_cifar", "in_channels": data.channels, "num_classes": data.num_classes})
        load_weights(m, checkpoint)
        return m.to(device).eval()

    def pre() -> torch.nn.Module:
        return torch.nn.Sequential(*[build_preprocessor(s) for s in specs]).to(device)

    def trades_step() -> TRADESStep:
        return TRADESStep(eps=parse_number(args.trades_eps), steps=args.trades_steps, alpha=args.trades_alpha,
                          beta=args.beta, preprocess=pre(),
                          eot_samples=args.trades_eot)

    # time one batch of each training step (the cost of the run is projected from it)
    xb = torch.stack([data.train[i][0] for i in perm[:args.batch_size]]).to(device)
    yb = torch.tensor([int(data.train[i][1]) for i in perm[:args.batch_size]]).to(device)
    timing = {}
    for name, step in (("standard", PlainStep(preprocess=pre())), ("trades", trades_step())):
        m = pretrained().train()
        t0 = time.perf_counter()
        step(m, xb, yb)
        timing[name] = (time.perf_counter() - t0) / args.batch_size
    print(f"one batch of {args.batch_size}: standard {1e3 * timing['standard']:.0f} ms/image, TRADES "
          f"{1e3 * timing['trades']:.0f} ms/image -> projected training {timing['standard'] * args.std_n_train * args.std_epochs:.0f} s"
          f" + {timing['trades'] * args.trades_n_train * args.trades_epochs:.0f} s", flush=True)

    def evaluate(model, label: str, defense: list[dict]) -> dict:
        t0 = time.perf_counter()
        clean = evaluate_defenses(model, xc, yc, defenses=[{"label": label, "preprocessors": defense}], attacks=[],
                                  draws=1, checks=False, progress=False, seed=args.seed)
        rob = evaluate_defenses(model, xa, ya, defenses=[{"label": label, "preprocessors": defense}], attacks=attacks,
                                draws=1, checks=False, progress=False, seed=args.seed)
        acc = {r["attack"]: r["accuracy"] for r in rob.rows}
        worst = {f"{r['norm']} {r['eps']:.4f}": r["accuracy"] for r in rob.rows if r.get("kind") == "worst_case"}
        row = {"row": label, "clean": clean.rows[0]["accuracy"], "clean_se": _se(clean.rows[0]["accuracy"], n_clean),
               "clean_on_attacked": acc["clean"], "robust": {e: acc[f"EOT-PGD {e}"] for e in radii},
               "robust_se": {e: _se(acc[f"EOT-PGD {e}"], n_attack) for e in radii},
               "autoattack_rand": acc.get(f"AutoAttack-rand {radii[-1]}"), "worst_case": worst,
               "notes": list(rob.notes), "eval_s": time.perf_counter() - t0}
        print(f"{label:34} clean {100 * row['clean']:5.1f}  " + "  ".join(
            f"EOT-PGD {e} {100 * row['robust'][e]:5.1f}" for e in radii)
            + (f"  AA-rand {100 * row['autoattack_rand']:5.1f}" if row["autoattack_rand"] is not None else "")
            + "".join(f"  worst {k} {100 * v:5.1f}" for k, v in worst.items())
            + f"  ({row['eval_s']:.0f} s eval)", flush=True)
        return row

    rows = []
    if "pretrained" not in skip:
        base = pretrained()
        rows.append({**evaluate(base, "pretrained, no defense", []), "train_s": 0.0})
        rows.append({**evaluate(base, "pretrained + defense (before)", specs), "train_s": 0.0})
    out = Path(args.out)
    _common.write_json(out.with_suffix(".partial.json"), {"rows": rows})
    for kind in ("standard", "trades"):
        if kind in skip:
            continue
        model = pretrained()
        n = args.std_n_train if kind == "standard" else args.trades_n_train
        epochs = args.std_epochs if kind == "standard" else args.trades_epochs
        subset = torch.utils.data.Subset(data.train, perm[:n])
        step = PlainStep(preprocess=pre()) if kind == "standard" else trades_step()
        torch.manual_seed(args.seed)  # the noise layer draws from the global generator
        t0 = time.perf_counter()
        hist = fit(model, subset, step, epochs=epochs, lr=args.lr, batch_size=args.batch_size, progress=False,
                   seed=args.seed)
        t_train = time.perf_counter() - t0
        print(f"fine-tuned ({kind}) on {n} images x {epochs} epoch(s) in {t_train:.0f} s; train loss "
              f"{hist[-1]['loss']:.3f}", flush=True)
        label = f"fine-tuned {kind} + defense (after)"
        rows.append({**evaluate(model, label, specs), "train_s": t_train, "n_train": n, "epochs": epochs,
                     "history": hist})
        _common.write_json(out.with_suffix(".partial.json"), {"rows": rows})

    _common.print_table([{"row": r["row"], "clean": r["clean"], **{f"eot_pgd_{e}": r["robust"][e] for e in radii},
                          "train_s": r["train_s"]} for r in rows])
    _common.write_json(out, {
        "load_average": os.getloadavg(), "data": data_name, "checkpoint": str(checkpoint), "model": "resnet18_cifar", "preprocessing": specs,
        "n_clean": n_clean, "n_attack": n_attack, "radii": radii,
        "attack": {"name": "pgd", "norm": "linf", "steps": args.steps, "eot_samples": args.eot, "draws": 1},
        "autoattack": ({"version": "rand", "eps": radii[-1], **aa_budget} if args.autoattack else None),
        "standard": {"n_train": args.std_n_train, "epochs": args.std_epochs, "lr": args.lr, "batch_size": args.batch_size},
        "trades": {"n_train": args.trades_n_train, "epochs": args.trades_epochs, "steps": args.trades_steps,
                   "eot_samples": args.trades_eot, "eps": args.trades_eps, "alpha": args.trades_alpha, "beta": args.beta, "lr": args.lr},
        "seconds_per_image": timing, "rows": rows, "quick": args.quick})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("clean", None)] + [("robust", e) for e in radii]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    w = 0.8 / len(keys)
    for j, (k, e) in enumerate(keys):
        vals = [100 * (r[k] if e is None else r[k][e]) for r in rows]
        errs = [100 * (r["clean_se"] if e is None else r["robust_se"][e]) for r in rows]
        ax.bar([i + (j - (len(keys) - 1) / 2) * w for i in range(len(rows))], vals, w, yerr=errs, capsize=2,
               label=f"clean (n={n_clean})" if e is None else f"EOT-PGD Linf {e} (n={n_attack})")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["row"].replace(" + ", "\n+ ") for r in rows], fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"ResNet-18 (pyautoattack checkpoint) fine-tuned with noise + bilateral, {data_name}", fontsize=8)
    ax.legend(fontsize=7)
    save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
