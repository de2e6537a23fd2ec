"""Bilateral filter benchmark: robustkit vs kornia vs an OpenCV per-image loop (CPU), and
robustkit's Triton kernel vs kornia on the GPU when one is present.

Each method is compared with its own window: ``robustkit-circle`` (OpenCV's circular window)
against the OpenCV loop, ``robustkit-square`` (all K^2 taps) against kornia. L1 colour
distance, reflect-101 borders, sigma_color 0.1, sigma_space 1.5 throughout.

Each CPU (method, shape, mode) runs in a fresh subprocess so that peak memory is its own
(growth of peak RSS over the RSS before the first call; tracemalloc does not see torch). On
CUDA, ``torch.cuda.max_memory_allocated`` minus the input, and for our forward also the
kernel-only time (``triton.testing.do_bench``). Prints a table and writes JSON.

    python benchmarks/bilateral.py            # full run
    python benchmarks/bilateral.py --quick    # < 1 minute on 2 cores
    python benchmarks/bilateral.py --device cuda --out benchmarks/results/bilateral_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CPU_CASES = [  # name, shape, kernel size
    ("cifar", (256, 3, 32, 32), 5),
    ("imagenet", (16, 3, 224, 224), 9),
]
GPU_CASES = CPU_CASES + [
    ("cifar-1024", (1024, 3, 32, 32), 5),
    ("imagenet-64", (64, 3, 224, 224), 5),
]
SIGMA_COLOR, SIGMA_SPACE = 0.1, 1.5
# which of our variants each peer is compared with (the same window)
OURS_FOR = {
    ("cpu", "opencv"): "robustkit-circle", ("cpu", "robustkit-circle"): "robustkit-circle",
    ("cpu", "kornia"): "robustkit-square", ("cpu", "robustkit-square"): "robustkit-square",
    ("cuda", "kornia"): "robustkit", ("cuda", "robustkit-torch"): "robustkit", ("cuda", "robustkit"): "robustkit",
}
H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3


def bandwidth_bound_us(shape, bytes_per_el=4, bandwidth=H100_BANDWIDTH) -> float:
    """Read x once, write out once: the least traffic any forward can do."""
    n = 1
    for s in shape:
        n *= s
    return 2 * n * bytes_per_el / bandwidth * 1e6


# ---------------------------------------------------------------------------- worker
def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(method: str, shape, k: int, mode: str, device: str, repeats: int, budget_s: float) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    x = torch.rand(*shape, device=device)
    backward = mode == "fwd+bwd"
    if method == "opencv" and backward:
        return {"skipped": "OpenCV has no backward"}
    if method.startswith("robustkit"):
        from robustkit.kernels import bilateral_filter

        backend = "torch" if method == "robustkit-torch" or device == "cpu" else "triton"
        window = "circle" if method.endswith("circle") else "square"
        run = lambda t: bilateral_filter(t, k, SIGMA_COLOR, SIGMA_SPACE, "l1", window, backend=backend)
    elif method == "kornia":
        import kornia

        run = lambda t: kornia.filters.bilateral_blur(t, (k, k), SIGMA_COLOR, (SIGMA_SPACE, SIGMA_SPACE), border_type="reflect", color_distance_type="l1")
    elif method == "opencv":
        import cv2

        cv2.setNumThreads(int(os.environ.get("BENCH_THREADS", "2")))
        xn = x.permute(0, 2, 3, 1).contiguous().numpy()
        out = np.empty_like(xn)

        def run(_t):
            for i in range(xn.shape[0]):
                out[i] = cv2.bilateralFilter(xn[i], k, SIGMA_COLOR, SIGMA_SPACE)
            return out
    else:
        raise ValueError(method)

    def step():
        if backward:
            xi = x.detach().requires_grad_(True)
            run(xi).sum().backward()
        else:
            with torch.no_grad():
                run(x)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        step()  # compile / autotune outside the measurement
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
        kernel_ms = None
        if method.startswith("robustkit") and not backward:
            from triton.testing import do_bench

            with torch.no_grad():
                kernel_ms = do_bench(lambda: run(x))
    else:
        base = _rss_bytes()
        step()
        peak = max(0, _peak_rss_bytes() - base)
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats and (len(times) < 1 or time.perf_counter() - t_start < budget_s):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    res = {"median_ms": med * 1e3, "images_per_s": shape[0] / med, "peak_mem_mib": peak / 2**20, "runs": len(times)}
    if device == "cuda" and kernel_ms is not None:
        res["kernel_ms"] = kernel_ms
    return res


# ---------------------------------------------------------------------------- driver
def run_case(method, shape, k, mode, device, repeats, budget_s) -> dict:
    if device == "cuda":  # CUDA peak memory is per-allocation: measure in-process
        try:
            return worker(method, tuple(shape), k, mode, device, repeats, budget_s)
        except Exception as exc:  # report, keep going
            return {"error": [f"{type(exc).__name__}: {exc}"[:300]]}
    cmd = [sys.executable, __file__, "--worker", json.dumps([method, list(shape), k, mode, device, repeats, budget_s])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats (< 1 minute on 2 cores)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="cpu, cuda, or all available (default)")
    p.add_argument("--out", default="benchmarks/results/bilateral.json", help="JSON output path")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")), help="CPU threads (default 2)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        method, shape, k, mode, device, repeats, budget = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(method, tuple(shape), k, mode, device, repeats, budget)))
        return 0

    os.environ["BENCH_THREADS"] = str(args.threads)  # read by the workers
    import torch

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            print("no CUDA device", file=sys.stderr)
            return 2
        devices.remove("cuda")
    repeats, budget = (3, 1.0) if args.quick else (9, 8.0)
    rows = []
    for device in devices:
        cases = CPU_CASES if device == "cpu" else GPU_CASES
        methods = ["robustkit-circle", "robustkit-square", "kornia", "opencv"] if device == "cpu" else ["robustkit", "robustkit-torch", "kornia"]
        for name, shape, k in cases:
            for mode in ("fwd", "fwd+bwd"):
                results = {}
                for m in methods:
                    if device == "cpu" and args.quick and m == "kornia" and name == "imagenet" and mode == "fwd+bwd":
                        results[m] = {"skipped": "--quick (about 7 s and 3 GiB)"}
                        continue
                    if m == "opencv" and mode == "fwd+bwd":
                        results[m] = {"skipped": "OpenCV has no backward"}
                        continue
                    reps = repeats * 5 if device == "cuda" else repeats
                    results[m] = run_case(m, shape, k, mode, device, reps, budget)
                for m, r in results.items():
                    row = {"device": device, "case": name, "shape": "x".join(map(str, shape)), "k": k, "mode": mode, "method": m, **r}
                    ours_name = OURS_FOR.get((device, m))
                    ours = results.get(ours_name, {}) if ours_name else {}
                    if "median_ms" in r and "median_ms" in ours:
                        row["vs"] = ours_name
                        row["ours_speedup"] = r["median_ms"] / ours["median_ms"]
                        row["ours_mem_ratio"] = (r["peak_mem_mib"] / ours["peak_mem_mib"]) if ours["peak_mem_mib"] > 0 else None
                    if device == "cuda" and m == "robustkit" and mode == "fwd" and "median_ms" in r:
                        bound = bandwidth_bound_us(shape)
                        row["bandwidth_bound_us"] = bound
                        row["x_over_bound"] = r["median_ms"] * 1e3 / bound
                        if r.get("kernel_ms"):
                            row["kernel_x_over_bound"] = r["kernel_ms"] * 1e3 / bound
                    rows.append(row)
                    print(_fmt_row(row), flush=True)
    meta = {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "threads": args.threads, "quick": args.quick,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "sigma_color": SIGMA_COLOR, "sigma_space": SIGMA_SPACE,
        "note": "ours_speedup = peer time / time of our method named in 'vs' (same window); ours_mem_ratio likewise for peak memory",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


HEADER = (f"{'device':6} {'case':9} {'mode':8} {'method':17} {'median ms':>10} {'img/s':>10} {'peak MiB':>9} "
          f"{'x ours':>7} {'mem x':>6}  (x ours / mem x: peer time / memory over ours, same window)")


def _fmt_row(r: dict) -> str:
    if "median_ms" not in r:
        return f"{r['device']:6} {r['case']:9} {r['mode']:8} {r['method']:17} {r.get('skipped') or r.get('error')}"
    sp = f"{r['ours_speedup']:.2f}" if r.get("ours_speedup") is not None else "-"
    mr = f"{r['ours_mem_ratio']:.1f}" if r.get("ours_mem_ratio") is not None else "-"
    extra = ""
    if "x_over_bound" in r:
        extra = f"  ({r['x_over_bound']:.1f}x the {r['bandwidth_bound_us']:.1f} us bandwidth bound"
        if "kernel_x_over_bound" in r:
            extra += f"; kernel alone {r['kernel_ms'] * 1e3:.1f} us = {r['kernel_x_over_bound']:.1f}x"
        extra += ")"
    return (f"{r['device']:6} {r['case']:9} {r['mode']:8} {r['method']:17} {r['median_ms']:10.2f} "
            f"{r['images_per_s']:10.0f} {r['peak_mem_mib']:9.1f} {sp:>7} {mr:>6}{extra}")


if __name__ == "__main__":
    if "--worker" not in sys.argv:
        print(HEADER)
    sys.exit(main())
