"""Bilateral filter benchmark: robustkit's fused CPU kernel (Numba) and its PyTorch path vs
kornia and an OpenCV per-image loop (CPU), and robustkit's Triton kernel vs kornia on the GPU
when one is present.

Each method is compared with its own window: ``robustkit-circle`` (OpenCV's circular window)
against the OpenCV loop, ``robustkit-square`` (all K^2 taps) against kornia. L1 colour
distance, reflect-101 borders, sigma_color 0.1, sigma_space 1.5 throughout. On CPU
``robustkit-*`` is the fused Numba kernel (``backend="numba"``, the default on CPU) and
``robustkit-torch-*`` the PyTorch tap loop (``backend="torch"``, the fallback).

Each CPU (method, shape, mode) runs in a fresh subprocess so that peak memory is its own
(growth of peak RSS over the RSS after a warm-up call on one image; tracemalloc does not see
torch), and reports the median of its repeated calls. The whole set runs ``--rounds`` times,
interleaved, because the machine may be shared: the reported time is the median over rounds,
and the speed-up is the median over rounds of (peer time / our time) measured in the same
round. On CUDA, ``torch.cuda.max_memory_allocated`` minus the input, and for our forward also
the kernel-only time (``triton.testing.do_bench``). On CPU it then alternates our circle
forward and the OpenCV loop call by call in one process (``--paired-rounds``, with
``--threads`` threads and with 1): wall and process CPU time of both, the median over rounds of
the per-round ratio, and the load average. Prints a table and writes JSON with the CPU model and
instruction sets (``benchmarks/_common.machine_info``).

    python benchmarks/bilateral.py                       # full run (about 5 minutes on 2 cores)
    python benchmarks/bilateral.py --quick               # about a minute
    python benchmarks/bilateral.py --numba-cpu haswell   # the fused kernel compiled for AVX2 only
    python benchmarks/bilateral.py --torch-path          # also the PyTorch fallback path
    python benchmarks/bilateral.py --omp-passive         # on a shared machine (see --help)
    python benchmarks/bilateral.py --paired-only         # only ours vs OpenCV, alternated in one process
    python benchmarks/bilateral.py --device cuda --out benchmarks/results/bilateral_gpu.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CPU_CASES = [  # name, shape, kernel size
    ("cifar", (256, 3, 32, 32), 5),
    ("imagenet", (16, 3, 224, 224), 9),
]
GPU_CASES = CPU_CASES + [
    ("cifar-1024", (1024, 3, 32, 32), 5),
    ("imagenet-64", (64, 3, 224, 224), 5),
]
SIGMA_COLOR, SIGMA_SPACE = 0.1, 1.5
# (device, mode) -> methods; fwd+bwd has no OpenCV (no backward)
CPU_METHODS = {
    "fwd": ["robustkit-circle", "robustkit-square", "kornia", "opencv"],
    "fwd+bwd": ["robustkit-circle", "robustkit-square", "kornia"],
}
TORCH_PATH_METHODS = {"fwd": ["robustkit-torch-circle", "robustkit-torch-square"], "fwd+bwd": ["robustkit-torch-square"]}
GPU_METHODS = {"fwd": ["robustkit", "robustkit-torch", "kornia"], "fwd+bwd": ["robustkit", "robustkit-torch", "kornia"]}
# which of our variants each method is compared with (the same window)
OURS_FOR = {
    ("cpu", "opencv"): "robustkit-circle", ("cpu", "robustkit-torch-circle"): "robustkit-circle",
    ("cpu", "kornia"): "robustkit-square", ("cpu", "robustkit-torch-square"): "robustkit-square",
    ("cuda", "kornia"): "robustkit", ("cuda", "robustkit-torch"): "robustkit",
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
        from robustkit.preprocessing.kernels import bilateral_filter

        if device == "cpu":
            backend = "torch" if method.startswith("robustkit-torch") else "numba"
        else:
            backend = "torch" if method == "robustkit-torch" else "triton"
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

        def run(t):
            for i in range(t.shape[0]):
                out[i] = cv2.bilateralFilter(xn[i], k, SIGMA_COLOR, SIGMA_SPACE)
            return out
    else:
        raise ValueError(method)

    def step(inp=x):
        if backward:
            xi = inp.detach().requires_grad_(True)
            run(xi).sum().backward()
        else:
            with torch.no_grad():
                run(inp)

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
        step(x[:1])  # imports, JIT cache load, thread pool: not the call's memory
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
    res = {"median_ms": med * 1e3, "min_ms": min(times) * 1e3, "images_per_s": shape[0] / med, "peak_mem_mib": peak / 2**20, "runs": len(times)}
    if device == "cuda" and kernel_ms is not None:
        res["kernel_ms"] = kernel_ms
    return res


# ---------------------------------------------------------------------------- paired
def paired_worker(shape, k: int, threads: int, rounds: int) -> dict:
    """Our circle forward and the OpenCV loop alternated call by call in one process.

    Both sides get the same input (float32 in [0, 1]; OpenCV as HWC images, converted outside
    the timing, sigma_color in data units) and the same thread count (``torch`` and
    ``cv2.setNumThreads``). Per call: wall time and process CPU time (all threads). A shared
    machine's load hits both sides of a round alike, so the per-round ratio is the figure.
    """
    import numpy as np
    import torch

    import cv2
    from robustkit.preprocessing.kernels import bilateral_filter

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    torch.manual_seed(0)
    x = torch.rand(*shape)
    xn = x.permute(0, 2, 3, 1).contiguous().numpy()
    out = np.empty_like(xn)

    def ours():
        with torch.no_grad():
            return bilateral_filter(x, k, SIGMA_COLOR, SIGMA_SPACE, "l1", "circle", backend="numba")

    def opencv():
        for i in range(xn.shape[0]):
            out[i] = cv2.bilateralFilter(xn[i], k, SIGMA_COLOR, SIGMA_SPACE)
        return out

    diff = float((ours() - torch.from_numpy(opencv()).permute(0, 3, 1, 2)).abs().max())  # also the warm-up
    times = {"ours": ([], []), "opencv": ([], [])}
    load_start = _loadavg()
    for rnd in range(rounds):
        for name, fn in (("ours", ours), ("opencv", opencv)) if rnd % 2 == 0 else (("opencv", opencv), ("ours", ours)):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name][0].append(time.perf_counter() - t0)
            times[name][1].append(time.process_time() - c0)
    (ow, oc), (cw, cc) = times["ours"], times["opencv"]
    ratios = [b / a for a, b in zip(ow, cw)]
    cpu_ratios = [b / a for a, b in zip(oc, cc) if a > 0]
    ms = lambda v: round(statistics.median(v) * 1e3, 3)
    return {
        "shape": "x".join(map(str, shape)), "k": k, "threads": threads, "rounds": rounds, "max_abs_diff_vs_opencv": diff,
        "ours_wall_ms": ms(ow), "opencv_wall_ms": ms(cw), "ours_wall_min_ms": round(min(ow) * 1e3, 3),
        "opencv_wall_min_ms": round(min(cw) * 1e3, 3),
        "speedup_wall": statistics.median(ratios), "speedup_wall_quartiles": [round(q, 3) for q in _quartiles(ratios)],
        "ours_cpu_ms": ms(oc), "opencv_cpu_ms": ms(cc), "ours_cpu_min_ms": round(min(oc) * 1e3, 3),
        "opencv_cpu_min_ms": round(min(cc) * 1e3, 3),
        "speedup_cpu": statistics.median(cpu_ratios) if cpu_ratios else None,
        "speedup_cpu_of_mins": min(cc) / min(oc) if min(oc) > 0 else None,
        "load_average_start": load_start, "load_average_end": _loadavg(),
    }


def _quartiles(v):
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return [q[0], q[2]]


def run_paired(shape, k, threads, rounds) -> dict:
    cmd = [sys.executable, __file__, "--paired-worker", json.dumps([list(shape), k, threads, rounds])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1][len("RESULT "):])


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


def _combine(rounds: list[dict[str, dict]], device: str) -> dict[str, dict]:
    """Median over rounds of each method's time, and of its per-round ratio to our method."""
    out = {}
    for m in rounds[0]:
        rs = [r[m] for r in rounds if "median_ms" in r.get(m, {})]
        if not rs:
            out[m] = rounds[0][m]
            continue
        row = {
            "median_ms": statistics.median(r["median_ms"] for r in rs),
            "round_ms": [round(r["median_ms"], 3) for r in rs],
            "peak_mem_mib": statistics.median(r["peak_mem_mib"] for r in rs),
            "runs": sum(r["runs"] for r in rs),
        }
        if any("kernel_ms" in r for r in rs):
            row["kernel_ms"] = statistics.median(r["kernel_ms"] for r in rs if "kernel_ms" in r)
        ours_name = OURS_FOR.get((device, m))
        ratios = [r[m]["median_ms"] / r[ours_name]["median_ms"] for r in rounds
                  if ours_name and "median_ms" in r.get(m, {}) and "median_ms" in r.get(ours_name, {})]
        if ratios:
            row["vs"] = ours_name
            row["ours_speedup"] = statistics.median(ratios)
            row["ours_speedup_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        out[m] = row
    for m, row in out.items():  # memory ratio from the combined peaks
        ours = out.get(OURS_FOR.get((device, m), ""), {})
        if "vs" in row and ours.get("peak_mem_mib"):
            row["ours_mem_ratio"] = row["peak_mem_mib"] / ours["peak_mem_mib"]
    return out


def main(argv=None) -> int:
    from _common import parser

    p = parser(__doc__, "benchmarks/results/bilateral.json", "one round, fewer repeats (about a minute on 2 cores)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="cpu, cuda, or all available (default)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of every method (default 3, --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method and round (default 9, --quick 3)")
    p.add_argument("--case", choices=["cifar", "imagenet"], default=None, help="only this CPU/GPU case")
    p.add_argument("--mode", choices=["fwd", "fwd+bwd"], default=None, help="only this mode")
    p.add_argument("--torch-path", action="store_true", help="also time the PyTorch fallback path (robustkit-torch-*)")
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE for every worker: on a shared, oversubscribed machine PyTorch's "
                        "(and kornia's) OpenMP threads otherwise spin while their partner is descheduled")
    p.add_argument("--numba-cpu", default=None,
                   help="compile the fused kernel for this CPU (NUMBA_CPU_NAME), e.g. 'haswell' for AVX2 without AVX-512")
    p.add_argument("--paired-rounds", type=int, default=None,
                   help="CPU forward vs the OpenCV loop alternated in one process, this many rounds, with "
                        "--threads threads and with 1 (default 40, --quick 10; 0: skip)")
    p.add_argument("--paired-only", action="store_true", help="only the paired OpenCV comparison (no per-process table)")
    p.add_argument("--worker", help=argparse_suppress())
    p.add_argument("--paired-worker", help=argparse_suppress())
    args = p.parse_args(argv)
    if args.worker:
        method, shape, k, mode, device, repeats, budget = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(method, tuple(shape), k, mode, device, repeats, budget)))
        return 0
    if args.paired_worker:
        shape, k, threads, rounds = json.loads(args.paired_worker)
        print("RESULT " + json.dumps(paired_worker(tuple(shape), k, threads, rounds)))
        return 0

    os.environ["BENCH_THREADS"] = str(args.threads)  # read by the workers
    if args.numba_cpu:
        os.environ["NUMBA_CPU_NAME"] = args.numba_cpu
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    from _common import machine_info, print_table, write_json

    print(HEADER)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            print("no CUDA device", file=sys.stderr)
            return 2
        devices.remove("cuda")
    rounds = args.rounds or (1 if args.quick else 3)
    repeats = args.repeats or (3 if args.quick else 9)
    budget = 1.0 if args.quick else 8.0
    rows = []
    load_start = _loadavg()
    for device in devices if not args.paired_only else []:
        cases = CPU_CASES if device == "cpu" else GPU_CASES
        methods_for = CPU_METHODS if device == "cpu" else GPU_METHODS
        if device == "cpu" and args.torch_path:
            methods_for = {mode: ms[:2] + TORCH_PATH_METHODS[mode] + ms[2:] for mode, ms in CPU_METHODS.items()}
        for name, shape, k in cases:
            if args.case and name != args.case:
                continue
            for mode in ("fwd", "fwd+bwd"):
                if args.mode and mode != args.mode:
                    continue
                per_round = []
                for rnd in range(rounds):
                    results = {}
                    for m in methods_for[mode]:
                        if device == "cpu" and m == "kornia" and name == "imagenet" and mode == "fwd+bwd" and args.quick:
                            results[m] = {"skipped": "--quick (about 7 s and 3 GiB)"}
                            continue
                        reps = repeats * 5 if device == "cuda" else repeats
                        results[m] = run_case(m, shape, k, mode, device, reps, budget)
                        r = results[m]
                        if "median_ms" in r:
                            print(f"  round {rnd + 1}/{rounds} {name} {mode} {m}: {r['median_ms']:.2f} ms", flush=True)
                    per_round.append(results)
                combined = _combine(per_round, device)
                for m, r in combined.items():
                    row = {"device": device, "case": name, "shape": "x".join(map(str, shape)), "k": k, "mode": mode, "method": m, **r}
                    if device == "cuda" and m == "robustkit" and mode == "fwd" and "median_ms" in r:
                        bound = bandwidth_bound_us(shape)
                        row["bandwidth_bound_us"] = bound
                        row["x_over_bound"] = r["median_ms"] * 1e3 / bound
                        if r.get("kernel_ms"):
                            row["kernel_x_over_bound"] = r["kernel_ms"] * 1e3 / bound
                    rows.append(row)
                    print(_fmt_row(row), flush=True)
    paired = []
    paired_rounds = args.paired_rounds if args.paired_rounds is not None else (10 if args.quick else 40)
    if "cpu" in devices and paired_rounds > 0 and args.mode in (None, "fwd"):
        print(f"\nCPU forward, circle, alternated with the OpenCV loop in one process ({paired_rounds} rounds):")
        for name, shape, k in CPU_CASES:
            if args.case and name != args.case:
                continue
            for threads in sorted({args.threads, 1}, reverse=True):
                r = {"case": name, **run_paired(shape, k, threads, paired_rounds)}
                paired.append(r)
                print(_fmt_paired(r), flush=True)
    meta = {
        "threads": args.threads, "quick": args.quick, "rounds": rounds, "repeats": repeats, "paired_rounds": paired_rounds,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_start": load_start, "load_average_end": _loadavg(),
        "sigma_color": SIGMA_COLOR, "sigma_space": SIGMA_SPACE, **_numba_info(),
        "note": ("median_ms: median over rounds of each round's median call; ours_speedup: median over rounds of "
                 "(peer time / time of our method named in 'vs', same round, same window); ours_mem_ratio likewise "
                 "for peak memory. robustkit-* on CPU = fused Numba kernel, robustkit-torch-* = PyTorch tap loop. "
                 "paired: our circle forward and the OpenCV loop alternated call by call in one process; "
                 "speedup_wall / speedup_cpu: median over rounds of (OpenCV time / ours) in wall time / process "
                 "CPU time (all threads); speedup_cpu_of_mins: fastest OpenCV call / our fastest."),
    }
    print()
    print_table([{"case": r["case"], "mode": r["mode"], "method": r["method"], "median_ms": r.get("median_ms"),
                  "vs": r.get("vs", ""), "x_ours": r.get("ours_speedup"), "x_range": r.get("ours_speedup_range", ""),
                  "peak_MiB": r.get("peak_mem_mib")} for r in rows if "median_ms" in r])
    info = machine_info()
    print(f"\nCPU: {info['cpu_model']} ({', '.join(info['instruction_sets'])}), {args.threads} threads; "
          f"fused kernel compiled for {meta.get('numba_cpu_name')}")
    write_json(args.out, {"meta": meta, "machine": info, "rows": rows, "paired_vs_opencv": paired})
    return 0


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the (possibly shared) machine was."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _numba_info() -> dict:
    """Numba version and the CPU its kernels are compiled for (the host unless NUMBA_CPU_NAME)."""
    try:
        import llvmlite.binding as llvm
        import numba
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        return {"numba": None, "numba_error": f"{type(exc).__name__}: {exc}"}
    return {"numba": numba.__version__, "numba_cpu_name": os.environ.get("NUMBA_CPU_NAME") or llvm.get_host_cpu_name()}


HEADER = (f"{'device':6} {'case':9} {'mode':8} {'method':22} {'median ms':>10} {'img/s':>10} {'peak MiB':>9} "
          f"{'x ours':>7} {'mem x':>6}  (x ours / mem x: peer time / memory over ours, same window)")


def _fmt_paired(r: dict) -> str:
    if "error" in r:
        return f"  {r['case']}: {r['error']}"
    return (f"  {r['case']:9} {r['shape']:>13} k={r['k']} threads={r['threads']}: ours {r['ours_wall_ms']:.2f} ms, "
            f"OpenCV {r['opencv_wall_ms']:.2f} ms wall, x{r['speedup_wall']:.2f} "
            f"(quartiles {r['speedup_wall_quartiles'][0]:.2f}-{r['speedup_wall_quartiles'][1]:.2f}); CPU time ours "
            f"{r['ours_cpu_ms']:.2f} ms, OpenCV {r['opencv_cpu_ms']:.2f} ms, x{r['speedup_cpu']:.2f} "
            f"(fastest calls x{r['speedup_cpu_of_mins']:.2f}); load {r['load_average_start'][0]:.1f}-{r['load_average_end'][0]:.1f}")


def _fmt_row(r: dict) -> str:
    if "median_ms" not in r:
        return f"{r['device']:6} {r['case']:9} {r['mode']:8} {r['method']:22} {r.get('skipped') or r.get('error')}"
    sp = f"{r['ours_speedup']:.2f}" if r.get("ours_speedup") is not None else "-"
    mr = f"{r['ours_mem_ratio']:.1f}" if r.get("ours_mem_ratio") is not None else "-"
    ips = int(r["shape"].split("x")[0]) / (r["median_ms"] / 1e3)
    extra = ""
    if "x_over_bound" in r:
        extra = f"  ({r['x_over_bound']:.1f}x the {r['bandwidth_bound_us']:.1f} us bandwidth bound"
        if "kernel_x_over_bound" in r:
            extra += f"; kernel alone {r['kernel_ms'] * 1e3:.1f} us = {r['kernel_x_over_bound']:.1f}x"
        extra += ")"
    return (f"{r['device']:6} {r['case']:9} {r['mode']:8} {r['method']:22} {r['median_ms']:10.2f} "
            f"{ips:10.0f} {r['peak_mem_mib']:9.1f} {sp:>7} {mr:>6}{extra}")


if __name__ == "__main__":
    sys.exit(main())
