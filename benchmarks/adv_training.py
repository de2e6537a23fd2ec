"""One TRADES epoch: robustkit (``fit`` + ``TRADESStep`` with the noise + bilateral defense in the
loop) against a plain hand-written PyTorch TRADES loop doing the same work, and the share of the
epoch spent in the preprocessor.

Both sides run the same model, data order, optimizer (SGD, momentum 0.9, weight decay 5e-4,
constant LR), attack (10 steps of 0.007 at 8/255 from x + 0.001 N(0, I), network in eval mode,
target softmax(f(x)) computed once, one pass per step) and loss (CE + 6 KL, train mode), with
the preprocessor in front and gradients through it. The hand loop is what a user would write
from the TRADES paper; after the epoch both models are compared (same weights up to float
noise), so the timing compares equal work. Each side runs ``--repeats`` times, alternating; the
best time counts (the machine is shared). The preprocessor's share is
``1 - t(no preprocessor) / t(with)`` for robustkit's epoch (forward and backward through it).

    python benchmarks/adv_training.py --quick                 # ~1-2 minutes on 2 cores
    python benchmarks/adv_training.py --data ../shared/data/cifar10_subset.npz --n-train 512
    python benchmarks/adv_training.py --device cuda --n-train 4096 --width 32 --out benchmarks/results/adv_training_gpu.json
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

EPS, ALPHA, STEPS, BETA, LR = 8 / 255, 0.007, 10, 6.0, 0.05


def load(args):
    from robustkit.data import digits, to_tensors
    from robustkit.data.npz import load_npz

    if args.data:
        bundle = load_npz(args.data)
        name = "CIFAR-10 subset"
    else:
        bundle = digits(size=args.size, channels=3 if args.size >= 32 else 1)
        name = f"digits {args.size}x{args.size}"
    x, y = to_tensors(bundle.train, args.n_train)
    return torch.utils.data.TensorDataset(x, y), name


def preprocessor(device):
    from robustkit.preprocessing import NoiseBilateral

    return NoiseBilateral(sigma=0.05, kernel_size=5, train_iterations=1, iterations=1).to(device)


def hand_trades_epoch(model, data, pre, batch_size, device, seed):
    """TRADES written out in plain PyTorch (same schedule of random draws as robustkit's step)."""
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(seed)
    f = (lambda z: model(pre(z))) if pre is not None else model
    if pre is not None:
        pre.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        model.eval()
        with torch.no_grad():
            target = F.softmax(f(x), dim=1)
        x_adv = x + 0.001 * torch.randn(x.shape, generator=gen, device=device)
        x_adv = (x + (x_adv - x).clamp(-EPS, EPS)).clamp(0, 1)
        for _ in range(STEPS):
            x_adv.requires_grad_(True)
            loss_kl = F.kl_div(F.log_softmax(f(x_adv), dim=1), target, reduction="sum")
            (g,) = torch.autograd.grad(loss_kl, x_adv)
            x_adv = x_adv.detach() + ALPHA * g.sign()
            x_adv = (x + (x_adv - x).clamp(-EPS, EPS)).clamp(0, 1)
        model.train()
        opt.zero_grad(set_to_none=True)
        logits = f(x)
        loss = F.cross_entropy(logits, y) + BETA * F.kl_div(F.log_softmax(f(x_adv), dim=1), F.softmax(logits, dim=1),
                                                            reduction="batchmean")
        loss.backward()
        opt.step()


def robustkit_epoch(model, data, pre, batch_size, device, seed):
    from robustkit.training import TRADESStep, fit

    step = TRADESStep(eps=EPS, steps=STEPS, alpha=ALPHA, beta=BETA, preprocess=pre, eot_samples=1)
    fit(model, data, step, epochs=1, lr=LR, batch_size=batch_size, schedule="constant", seed=seed, progress=False)


def timed(fn, model0, data, pre, args, device):
    model = copy.deepcopy(model0)
    torch.manual_seed(args.seed)  # the preprocessor's noise (global RNG) draws the same on both sides
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(model, data, pre, args.batch_size, device, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, model


def main() -> None:
    p = _common.parser(__doc__, "benchmarks/results/adv_training.json", "256 training images, 2 repeats")
    _common.add_data_option(p)
    p.add_argument("--n-train", type=int, default=1024, help="training images in the epoch (default 1024)")
    p.add_argument("--size", type=int, default=16, help="digits image size without --data (default 16)")
    p.add_argument("--width", type=int, default=16, help="SmallCNN width (default 16)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.quick:
        args.n_train, args.repeats = 256, 2
    _common.setup(args)
    from robustkit.models import SmallCNN

    device = torch.device(args.device)
    data, data_name = load(args)
    channels = data.tensors[0].shape[1]
    torch.manual_seed(args.seed)
    model0 = SmallCNN(in_channels=channels, num_classes=10, width=args.width).to(device)
    if device.type != "cpu":
        data = torch.utils.data.TensorDataset(*(t.to(device) for t in data.tensors))
    pre = preprocessor(device)

    times: dict[str, list[float]] = {"robustkit": [], "hand-written": [], "robustkit, no preprocessor": []}
    models = {}
    timed(robustkit_epoch, model0, torch.utils.data.Subset(data, range(args.batch_size)), pre, args, device)  # warm-up
    for _ in range(args.repeats):
        for name, fn, pp in (("robustkit", robustkit_epoch, pre), ("hand-written", hand_trades_epoch, pre),
                             ("robustkit, no preprocessor", robustkit_epoch, None)):
            t, models[name] = timed(fn, model0, data, pp, args, device)
            times[name].append(t)
    best = {k: min(v) for k, v in times.items()}
    diff = max(float((a - b).abs().max()) for a, b in zip(models["robustkit"].state_dict().values(),
                                                           models["hand-written"].state_dict().values())
               if a.is_floating_point())
    ratio = best["robustkit"] / best["hand-written"]
    share = 1 - best["robustkit, no preprocessor"] / best["robustkit"]
    rows = [{"loop": k, "best_s": best[k], "all_s": ", ".join(f"{t:.2f}" for t in v),
             "images_per_s": args.n_train / best[k]} for k, v in times.items()]
    _common.print_table(rows)
    print(f"\nrobustkit / hand-written = {ratio:.3f} (target <= 1.1); preprocessor share of robustkit's epoch = "
          f"{100 * share:.1f} %; max weight difference after the epoch = {diff:.2e}")
    _common.write_json(args.out, {
        "what": "one TRADES epoch (10 steps of 0.007 at 8/255, beta 6) with noise + bilateral in the loop",
        "data": data_name, "n_train": args.n_train, "batch_size": args.batch_size, "model": f"SmallCNN width {args.width}",
        "device": str(device), "threads": args.threads, "repeats": args.repeats,
        "seconds": times, "best_seconds": best, "ratio_robustkit_over_hand": ratio,
        "preprocessor_share": share, "max_weight_difference": diff,
    })


if __name__ == "__main__":
    main()
