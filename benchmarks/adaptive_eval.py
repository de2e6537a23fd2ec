"""Adaptive evaluation vs. AutoAttack ``rand`` alone (issue #17, item 2).

On the pyautoattack ResNet-18 (``pyautoattack/examples/model_test.pt``, robustkit's
``resnet18_cifar``) behind the noise + bilateral defense, per radius:

- **peer**: pyautoattack's ``rand`` version alone (APGD-CE and APGD-DLR, 100 iterations, EOT over
  20 draws), through ``robust_accuracy`` (its verdict caps the per-draw count);
- **robustkit**: the full worst-case evaluation ``evaluate_defenses(..., cascade=True)`` with PGD
  (non-adaptive, reported as an upper bound), EOT-PGD and AutoAttack ``rand``: early stop inside
  EOT-PGD (``early_stop_randomized``, opt-in in PGD; ``--no-early-stop-randomized`` drops it), stacked EOT draws, and the cascade (AutoAttack runs only on the images EOT-PGD left
  robust in at least one draw), plus the gradient-masking checks unless ``--no-checks``.

Both are scored over the same number of draws of the defense's randomness (the protocol of
docs/evaluation.md). Cost: process CPU time (single-threaded by default, so it approximates wall
time on a quiet core), wall time (run back to back in one process; the load average is recorded),
and image-passes through the classifier with gradient (forward+backward), which do not move with
the machine's load. ``target_met``: robustkit's CPU time at most half the peer's and its worst-case
robust accuracy not above the peer's.

    python benchmarks/adaptive_eval.py --data ../shared/data/cifar10_subset.npz --n 8 --eps 2/255,8/255
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DATA_NAME = "CIFAR-10 subset (5,085 train / 512 test)"


class PassCounter(torch.nn.Module):
    """The classifier, counting the images it sees: with gradient (an attack's forward+backward) or without
    (a prediction). Image-passes do not move with the machine's load, unlike seconds."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.grad_images = 0
        self.eval_images = 0

    def forward(self, x):
        if torch.is_grad_enabled():
            self.grad_images += int(x.shape[0])
        else:
            self.eval_images += int(x.shape[0])
        return self.inner(x)

    def take(self) -> dict:
        out = {"grad_images": self.grad_images, "eval_images": self.eval_images}
        self.grad_images = self.eval_images = 0
        return out


def _timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def main(argv=None) -> int:
    p = _common.parser(__doc__, "benchmarks/results/adaptive_eval.json", "4 images, reduced budgets (a smoke run)")
    _common.add_data_option(p)
    p.set_defaults(threads=int(os.environ.get("BENCH_THREADS", "1")))
    p.add_argument("--checkpoint", default=None, help="state dict for resnet18_cifar (default: pyautoattack's model_test.pt)")
    p.add_argument("--n", type=int, default=8, help="test images (the first n of the subset)")
    p.add_argument("--offset", type=int, default=0, help="skip this many test images first")
    p.add_argument("--eps", default="2/255,8/255", help="comma-separated Linf radii")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--eot", type=int, default=8, help="EOT draws of EOT-PGD")
    p.add_argument("--draws", type=int, default=10, help="draws of the defense's randomness per scored image")
    p.add_argument("--sigma", type=float, default=0.05, help="noise sigma of noise_bilateral")
    p.add_argument("--no-early-stop-randomized", action="store_true",
                   help="EOT-PGD without early stop on the randomized defense (default: with it, opt-in in PGD)")
    p.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks in robustkit's run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _common.setup(args)
    if not args.data:
        p.error("--data is required (a CIFAR-10 .npz, e.g. ../shared/data/cifar10_subset.npz)")
    checkpoint = args.checkpoint or _common.pyautoattack_checkpoint()
    if checkpoint is None:
        p.error("no --checkpoint and pyautoattack's examples/model_test.pt was not found")

    import robustkit
    from robustkit.attacks import AutoAttack
    from robustkit.data import to_tensors
    from robustkit.data.npz import load_npz
    from robustkit.eval import robust_accuracy
    from robustkit.eval.robust import evaluate_defenses
    from robustkit.models import resnet18_cifar
    from robustkit.models.checkpoints import load_weights
    from robustkit.registry import parse_number

    n_iter = 5 if args.quick else None
    if args.quick:
        args.n, args.pgd_steps, args.eot, args.draws = 4, 3, 2, 2
    x, y = to_tensors(load_npz(args.data).test, max_samples=args.offset + args.n)
    x, y = x[args.offset:], y[args.offset:]
    net = resnet18_cifar()
    load_weights(net, checkpoint)
    model = PassCounter(net).eval()
    defense = {"name": "noise_bilateral", "sigma": args.sigma}
    radii = [e.strip() for e in args.eps.split(",") if e.strip()]
    rows, details = [], []
    for eps_text in radii:
        eps = parse_number(eps_text, "eps")
        defended = robustkit.wrap(model, defense)
        peer_attack = AutoAttack(eps=eps, version="rand", seed=args.seed, n_iter=n_iter)
        peer, peer_cpu, peer_wall = _timed(lambda: robust_accuracy(
            defended, peer_attack, x, y, progress=False, seed=args.seed, draws=args.draws))
        load_peer = os.getloadavg()
        peer_passes = model.take()
        attacks = [{"name": "pgd", "steps": args.pgd_steps, "label": "PGD"},
                   {"name": "pgd", "steps": args.pgd_steps, "eot_samples": args.eot, "label": "EOT-PGD",
                    "early_stop_randomized": not args.no_early_stop_randomized},
                   {"name": "autoattack", "version": "rand", "label": "AutoAttack-rand",
                    **({"n_iter": n_iter} if n_iter else {})}]
        ev, ours_cpu, ours_wall = _timed(lambda: evaluate_defenses(
            model, x, y, defenses=[{"label": "noise+bilateral", "preprocessors": [defense]}], attacks=attacks,
            eps=[eps], draws=args.draws, seed=args.seed, progress=False, checks=not args.no_checks, cascade=True))
        load_ours = os.getloadavg()
        ours_passes = model.take()
        worst = next(r for r in ev.rows if r["kind"] == "worst_case")
        row = {"eps": eps_text, "n": int(x.shape[0]), "peer_acc": peer.robust_accuracy,
               "peer_all_draws": peer.robust_all_draws, "ours_worst_acc": worst["accuracy"],
               "ours_all_draws": worst["all_draws"], "peer_cpu_s": peer_cpu, "ours_cpu_s": ours_cpu,
               "cpu_ratio": ours_cpu / peer_cpu, "peer_wall_s": peer_wall, "ours_wall_s": ours_wall,
               "wall_ratio": ours_wall / peer_wall, "peer_grad_images": peer_passes["grad_images"],
               "ours_grad_images": ours_passes["grad_images"],
               "passes_ratio": ours_passes["grad_images"] / max(1, peer_passes["grad_images"]), "target_met": ours_cpu <= 0.5 * peer_cpu
               and worst["accuracy"] <= peer.robust_accuracy + 1e-9}
        rows.append(row)
        details.append({"eps": eps_text, "rows": [{k: v for k, v in r.items() if k != "settings"} for r in ev.rows],
                        "notes": ev.notes, "checks": [c.to_row() for c in ev.checks],
                        "peer": {**peer.to_dict(), "verdict_robust": peer.verdict_robust,
                                 "settings": peer_attack.describe()},
                        "passes_peer": peer_passes, "passes_ours": ours_passes,
                        "loadavg_after_peer": load_peer, "loadavg_after_ours": load_ours})
        _common.print_table([row])
        print(f"  rows: " + "; ".join(f"{r['attack']}: {r['accuracy']:.3f} ({r['seconds']:.0f} s"
                                      + (f", {r['attacked']} attacked" if "attacked" in r else "") + ")"
                                      for r in ev.rows), flush=True)
    print(f"\n{DATA_NAME}: first {args.n} test images after offset {args.offset}; ResNet-18 (model_test.pt) behind "
          f"noise(sigma={args.sigma}) + bilateral; {args.draws} draws; threads {args.threads}"
          + ("; QUICK (reduced budgets: not a result)" if args.quick else ""))
    _common.print_table(rows)
    _common.write_json(args.out, {"benchmark": "adaptive_eval", "data": DATA_NAME, "n_images": args.n,
                                  "offset": args.offset, "quick": bool(args.quick), "draws": args.draws,
                                  "pgd_steps": args.pgd_steps, "eot": args.eot, "sigma": args.sigma,
                                  "checks": not args.no_checks,
                                  "early_stop_randomized": not args.no_early_stop_randomized, "rows": rows, "details": details,
                                  "loadavg": os.getloadavg()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
