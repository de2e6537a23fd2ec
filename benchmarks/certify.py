"""Certified L2 accuracy (randomized smoothing, Cohen et al. 2019) of the noise defenses: does the
bilateral filter after the noise raise the certified accuracy at equal sigma?

For each sigma a small CNN is trained under Gaussian noise (the plain Gaussian-smoothing baseline)
and another under noise + bilateral (``noise_bilateral``, the filter in its train-time schedule);
each is certified with its own pipeline in front (the filter is part of the base classifier, so
the guarantee is the same). Also certified: the noise-trained model with the filter added only at
test time. Prints certified accuracy at several L2 radii, the abstention rate and the clean
accuracy of one noisy pass; writes JSON and a plot.

    python benchmarks/certify.py --quick                      # digits, a few minutes on 2 cores
    python benchmarks/certify.py                              # digits, more images and draws
    python benchmarks/certify.py --data ../shared/data/cifar10_subset.npz --quick   # CIFAR-10 subset

Draw counts (n0, n), images and epochs are stated in the table header and the JSON; the paper
uses n = 100,000 draws, which bounds the largest certifiable radius at sigma * 3.8 (n = 1000:
sigma * 2.4 at alpha = 0.001). The same script scales on a GPU (``--device cuda``, larger ``--n``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import add_data_option, parser, print_table, setup, write_json

RADII = [0.0, 0.25, 0.5, 0.75, 1.0]


def load(args):
    from robustkit.data import digits, load_npz

    if args.data:
        return load_npz(args.data), "CIFAR-10 subset"
    return digits(size=args.size), "digits"


def main() -> None:
    p = parser(__doc__, "benchmarks/results/certify.json", quick_help="fewer images, draws and epochs")
    add_data_option(p)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.12, 0.25])
    p.add_argument("--radii", type=float, nargs="+", default=RADII, help="L2 radii of the table")
    p.add_argument("--n0", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="estimation draws per image")
    p.add_argument("--images", type=int, default=None, help="test images certified")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=500, help="noisy copies per forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=16, help="digits image size (default 16: sized to a shared CPU)")
    p.add_argument("--width", type=int, default=16, help="small_cnn width")
    p.add_argument("--plot", default=None, help="PNG of certified accuracy vs radius (default: next to --out)")
    args = p.parse_args()
    setup(args)
    radii = sorted(set(args.radii))

    from robustkit import wrap
    from robustkit.data import to_tensors
    from robustkit.eval import accuracy
    from robustkit.eval.certify import (
        certified_accuracy_plot,
        certified_radius,
        certify,
        clopper_pearson_lower,
    )
    from robustkit.models.small_cnn import SmallCNN
    from robustkit.preprocessing import GaussianNoise, NoiseBilateral
    from robustkit.training import train_classifier

    data, data_name = load(args)
    quick = args.quick
    n0 = args.n0 or (50 if quick else 100)
    n = args.n or (500 if quick else 2000)
    images = args.images or (60 if quick else 200)
    epochs = args.epochs or ((6 if quick else 12) if data_name == "digits" else (8 if quick else 20))
    device = torch.device(args.device)
    x, y = to_tensors(data.test, max_samples=images)
    xe, ye = to_tensors(data.test, max_samples=min(len(data.test), 1000))
    channels = x.shape[1]
    rows, curves, models = [], {}, {}
    t_start = time.perf_counter()
    for sigma in args.sigmas:
        for train_name, make in (("noise", lambda s=sigma: GaussianNoise(s)),
                                 ("noise+bilateral", lambda s=sigma: NoiseBilateral(s))):
            torch.manual_seed(0)
            model = SmallCNN(in_channels=channels, num_classes=data.num_classes, width=args.width).to(device)
            t0 = time.perf_counter()
            train_classifier(model, data.train, epochs=epochs, lr=0.05, preprocess=make().to(device), seed=0,
                             progress=False, desc=f"train {train_name} sigma={sigma}")
            train_s = time.perf_counter() - t0
            models[(sigma, train_name)] = (model, train_s)
        tests = [("noise", "noise", GaussianNoise), ("noise+bilateral", "noise+bilateral", NoiseBilateral),
                 ("noise", "noise+bilateral", NoiseBilateral)]
        for train_name, test_name, cls in tests:
            model, train_s = models[(sigma, train_name)]
            defended = wrap(model, cls(sigma, seed=0).to(device))
            clean = accuracy(defended, (xe, ye))  # one noisy pass per image
            res = certify(defended, x, y, n0=n0, n=n, alpha=args.alpha, batch_size=args.batch_size, seed=0,
                          progress=not quick, desc=f"certify {test_name} sigma={sigma}")
            label = f"train {train_name} / test {test_name}, sigma={sigma:g}"
            curves[label] = res
            row = {"data": data_name, "sigma": sigma, "train": train_name, "test": test_name,
                   "noisy clean acc": clean, "abstain": res.abstention_rate,
                   "max r": certified_radius(clopper_pearson_lower(n, n, args.alpha), sigma)}
            row.update({f"cert@{r:g}": a for r, a in zip(radii, res.certified_accuracy(radii))})
            row.update({"train s": round(train_s, 1), "certify s": round(res.seconds, 1)})
            rows.append(row)
            print(f"{label}: " + ", ".join(f"{a:.3f}@{r:g}" for r, a in zip(radii, res.certified_accuracy(radii)))
                  + f" abstain {res.abstention_rate:.3f} ({res.seconds:.0f} s)", flush=True)
    print(f"\n{data_name}: {images} test images, n0={n0}, n={n}, alpha={args.alpha}, {epochs} epochs, "
          f"small_cnn width {args.width}, {tuple(x.shape[1:])} images, {torch.get_num_threads()} threads on {args.device}")
    print_table(rows)
    plot = Path(args.plot) if args.plot else Path(args.out).with_suffix(".png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    certified_accuracy_plot(curves, plot, title=f"Certified accuracy vs. L2 radius ({data_name}, n={n})")
    print(f"wrote {plot}")
    write_json(args.out, {"data": data_name, "images": images, "n0": n0, "n": n, "alpha": args.alpha,
                          "epochs": epochs, "model": f"small_cnn width {args.width}", "image_shape": list(x.shape[1:]), "radii": radii, "rows": rows,
                          "seconds": time.perf_counter() - t_start,
                          "certified_radii": {k: v.radii.tolist() for k, v in curves.items()},
                          "correct": {k: v.correct.tolist() for k, v in curves.items()}})


if __name__ == "__main__":
    main()
