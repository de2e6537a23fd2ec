"""Bilateral filter: agreement with OpenCV and kornia, exact gradients, input checks."""

import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch

from robustkit.errors import InputError
from robustkit.preprocessing.kernels import bilateral_filter, numba_available, window_offsets

# The CPU paths: the fused Numba kernel (the default on CPU) and the PyTorch tap loop (the
# fallback). The agreement tests below run on both.
CPU_BACKENDS = [
    pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="numba not installed")),
    "torch",
]


def cv2_filter(x: torch.Tensor, d: int, sc: float, ss: float) -> torch.Tensor:
    """OpenCV per image (HWC float32), back to NCHW."""
    out = [cv2.bilateralFilter(np.ascontiguousarray(img.permute(1, 2, 0).numpy()), d, sc, ss) for img in x]
    out = [o[:, :, None] if o.ndim == 2 else o for o in out]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def photos():
    """scikit-learn's two real photos (china, flower), downscaled to 3 x 80 x 120, in [0, 1]."""
    from sklearn.datasets import load_sample_images

    imgs = [cv2.resize(im, (120, 80), interpolation=cv2.INTER_AREA) for im in load_sample_images().images]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d,sc,ss", [(3, 0.1, 1.0), (5, 0.1, 1.5), (7, 0.2, 2.0), (9, 0.05, 3.0)])
def test_matches_opencv_on_real_photos(photos, d, sc, ss, backend):
    ours = bilateral_filter(photos, d, sc, ss, distance="l1", window="circle", backend=backend)
    ref = cv2_filter(photos, d, sc, ss)
    assert torch.allclose(ours, ref, atol=1e-4), float((ours - ref).abs().max())
    # and the filter really did something (edge-preserving smoothing, not identity)
    assert float((ours - photos).abs().mean()) > 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_matches_opencv_on_random_batches(channels, backend):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, channels, 17, 23, generator=g)
    ours = bilateral_filter(x, 5, 0.3, 1.2, backend=backend)
    assert torch.allclose(ours, cv2_filter(x, 5, 0.3, 1.2), atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_matches_kornia_square_window(distance, photos, backend):
    kornia = pytest.importorskip("kornia")
    x = torch.cat([photos[:, :, :40, :40], torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))])
    for k, sc, ss in [(5, 0.1, 1.5), (9, 0.2, 2.5)]:
        ref = kornia.filters.bilateral_blur(x, (k, k), sc, (ss, ss), border_type="reflect", color_distance_type=distance)
        ours = bilateral_filter(x, k, sc, ss, distance=distance, window="square", backend=backend)
        assert torch.allclose(ours, ref, atol=1e-4), float((ours - ref).abs().max())


def test_window_taps():
    assert len(window_offsets(5, "square")) == 25
    # r = 2: only taps with dy^2 + dx^2 <= 4 (OpenCV agreement above confirms the rule)
    assert len(window_offsets(5, "circle")) == 13
    assert len(window_offsets(7, "circle")) == 29
    assert window_offsets(1, "circle") == [(0, 0)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_sample_sigmas_equal_separate_calls(backend):
    x = torch.rand(3, 2, 12, 12, generator=torch.Generator().manual_seed(2))
    sc = torch.tensor([0.05, 0.2, 0.5])
    ss = torch.tensor([0.8, 1.5, 3.0])
    batched = bilateral_filter(x, 5, sc, ss, backend=backend)
    for i in range(3):
        single = bilateral_filter(x[i : i + 1], 5, float(sc[i]), float(ss[i]), backend=backend)
        assert torch.allclose(batched[i : i + 1], single, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_iterations_compose_and_zero_is_identity(backend):
    x = torch.rand(2, 3, 10, 10)
    twice = bilateral_filter(bilateral_filter(x, 5, 0.1, 1.5, backend=backend), 5, 0.1, 1.5, backend=backend)
    assert torch.allclose(bilateral_filter(x, 5, 0.1, 1.5, iterations=2, backend=backend), twice)
    assert torch.equal(bilateral_filter(x, 5, 0.1, 1.5, iterations=0, backend=backend), x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_properties_constant_image_and_range(backend):
    c = torch.full((1, 3, 8, 8), 0.37)
    assert torch.allclose(bilateral_filter(c, 7, 0.1, 2.0, backend=backend), c)
    x = torch.rand(2, 3, 16, 16)
    y = bilateral_filter(x, 5, 0.5, 2.0, backend=backend)
    assert float(y.min()) >= float(x.min()) - 1e-6 and float(y.max()) <= float(x.max()) + 1e-6  # convex combination


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_small_images_larger_than_radius(backend):
    """Reflect-101 padding wider than the image (OpenCV wraps the reflection)."""
    x = torch.rand(1, 1, 3, 4, generator=torch.Generator().manual_seed(3))
    ours = bilateral_filter(x, 9, 0.3, 2.0, backend=backend)
    assert torch.allclose(ours, cv2_filter(x, 9, 0.3, 2.0), atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("window", ["circle", "square"])
def test_gradcheck_float64(distance, window, backend):
    x = torch.rand(2, 2, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    sc = torch.tensor([0.3, 0.6], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: bilateral_filter(t, 5, 0.3, 1.2, distance, window, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda t: bilateral_filter(t, 3, sc, 1.0, distance, window, iterations=2, backend=backend), (x,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_is_not_the_refiltered_gradient(backend):
    """MONAI-style backward (filter grad_output with the forward weights) differs from the truth."""
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    g = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    (ours,) = torch.autograd.grad(bilateral_filter(x, 5, 0.2, 1.5, backend=backend), x, g)
    refiltered = bilateral_filter(g, 5, 0.2, 1.5, backend=backend)
    assert float((ours - refiltered).abs().max()) > 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_memory_is_linear_in_pixels(backend):
    """Saved state is x, out and 1/D: no K^2 blow-up."""
    x = torch.rand(8, 3, 32, 32, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bilateral_filter(x, 9, 0.1, 2.0, backend=backend)
    assert sum(saved) <= 2 * x.numel() + x.numel() // 3 + 1


def test_cpu_workspace_does_not_grow_with_window_area():
    """The tap loop keeps O(N*C*H*W) scratch (padded copies, accumulators): no K^2 factor as with unfold."""
    from robustkit.preprocessing.kernels import bilateral_torch as bilateral_cpu

    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    sizes = {}
    for k in (3, 9):
        bilateral_cpu.release_buffers()
        bilateral_filter(x, k, 0.1, 2.0, window="square", backend="torch").sum().backward()
        sizes[k] = sum(b.numel() for b in bilateral_cpu._WORKSPACE.buffers.values())
    assert sizes[9] < 1.5 * sizes[3], sizes  # 81 taps vs 9: only the padding grows
    assert sizes[9] < 16 * x.numel(), sizes


def naive_bilateral(x, k, sc, ss, distance="l1", window="circle"):
    """Textbook reference (unfold, K^2 memory, autograd): tiny inputs only."""
    r = k // 2
    n, c, h, w = x.shape
    taps = torch.nn.functional.unfold(torch.nn.functional.pad(x, (r, r, r, r), mode="reflect"), k)
    taps = taps.view(n, c, k * k, h, w)
    diff = taps - x.unsqueeze(2)
    dist2 = diff.abs().sum(1).square() if distance == "l1" else diff.square().sum(1)
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    d2 = (dy.square() + dx.square()).reshape(-1, 1, 1).to(x)
    wgt = torch.exp(-d2 / (2 * ss**2) - dist2 / (2 * sc**2))
    if window == "circle":
        wgt = wgt * (d2 <= r * r)
    return (wgt.unsqueeze(1) * taps).sum(2) / wgt.sum(1, keepdim=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_gradient_matches_autograd_reference_also_at_ties(distance, backend):
    """Against autograd through a textbook implementation, on images full of ties
    (constant regions, quantized values), where L1 uses sign(0) = 0 like torch's abs."""
    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.full((1, 3, 7, 8), 0.5, dtype=torch.float64),
                   torch.randint(0, 3, (1, 3, 7, 8), generator=g).double() / 2,
                   torch.rand(1, 3, 7, 8, generator=g, dtype=torch.float64)])
    up = torch.rand(x.shape, generator=g, dtype=torch.float64)
    for window in ("circle", "square"):
        a = x.clone().requires_grad_()
        out = bilateral_filter(a, 5, 0.4, 1.5, distance, window, backend=backend)
        (ga,) = torch.autograd.grad(out, a, up)
        b = x.clone().requires_grad_()
        ref = naive_bilateral(b, 5, 0.4, 1.5, distance, window)
        (gb,) = torch.autograd.grad(ref, b, up)
        assert torch.allclose(out, ref, atol=1e-12)
        assert torch.isfinite(ga).all() and torch.allclose(ga, gb, atol=1e-10), float((ga - gb).abs().max())


# ------------------------------------------------------------------ the fused CPU kernel (Numba)
needs_numba = pytest.mark.skipif(not numba_available(), reason="numba not installed")


def _vjp(x, g, **kw):
    a = x.clone().requires_grad_()
    out = bilateral_filter(a, **kw)
    (ga,) = torch.autograd.grad(out, a, g)
    return out, ga


def _close(a, b, rtol, atol_scale):
    """Tolerance relative to the reference's magnitude: float reduction order may differ by CPU."""
    return torch.allclose(a, b, rtol=rtol, atol=atol_scale * max(1.0, float(b.detach().abs().max())))


@needs_numba
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-4, 2e-5), (torch.float64, 1e-9, 1e-11)])
@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("window", ["circle", "square"])
def test_fused_path_equals_torch_path(dtype, rtol, atol, distance, window):
    """Forward and vector-Jacobian product of the fused kernel against the PyTorch tap loop, over
    channel counts (1 and 3 have fused float32 loops, 2 and 4 the generic ones), window sizes
    (k = 1, radius wider than the image: periodic reflect-101), per-sample sigmas and a batch
    large enough to run on several threads."""
    g = torch.Generator().manual_seed(11)
    cases = [((2, 3, 17, 23), 5), ((3, 1, 9, 12), 7), ((2, 2, 8, 6), 3), ((1, 4, 5, 5), 5),
             ((2, 3, 3, 4), 9), ((1, 3, 1, 1), 5), ((2, 3, 6, 7), 1), ((16, 3, 20, 20), 5), ((1, 3, 40, 64), 9),
             ((2, 3, 10, 9), 3)]  # k = 3: 2 (circle) or 4 (square) pairs of taps, the last pass of 1-2 pairs
    for shape, k in cases:
        x = torch.rand(shape, generator=g, dtype=dtype)
        up = torch.randn(shape, generator=g, dtype=dtype)
        sc = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.4 + 0.05
        for sigma_color in (0.15, sc):
            kw = dict(kernel_size=k, sigma_color=sigma_color, sigma_space=1.3, distance=distance, window=window)
            out_n, g_n = _vjp(x, up, backend="numba", **kw)
            out_t, g_t = _vjp(x, up, backend="torch", **kw)
            assert out_n.dtype == dtype and g_n.dtype == dtype
            assert _close(out_n, out_t, rtol, atol), (shape, k, float((out_n - out_t).abs().max()))
            assert _close(g_n, g_t, rtol, atol), (shape, k, float((g_n - g_t).abs().max()))


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_path_propagates_nan_and_inf_like_torch_path(dtype):
    """Non-finite pixels: a NaN or an infinite neighbour has weight 0 (exp(-inf)), and 0 * inf
    is NaN, as on the PyTorch path; an infinite centre stays infinite. Same pattern on both
    paths, same values elsewhere."""
    g = torch.Generator().manual_seed(14)
    x = torch.rand(2, 3, 9, 11, generator=g, dtype=dtype)
    x[0, 1, 4, 5] = float("inf")
    x[1, 0, 0, 0] = float("nan")
    x[1, 2, 8, 10] = -float("inf")
    for window, distance in (("circle", "l1"), ("square", "l2")):
        a = bilateral_filter(x, 5, 0.1, 1.5, distance, window, backend="numba")
        b = bilateral_filter(x, 5, 0.1, 1.5, distance, window, backend="torch")
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        assert a.isnan().any() and torch.equal(a[a.isinf()], b[b.isinf()])
        fin = a.isfinite()
        assert torch.allclose(a[fin], b[fin], atol=1e-6)


@needs_numba
def test_fused_forward_without_grad_keeps_no_backward_state():
    """Under no_grad (or for an input without grad) the forward writes no 1/D for the backward,
    and gives the same output as with it."""
    from robustkit.preprocessing.kernels import bilateral_numba

    x = torch.rand(3, 3, 12, 10, generator=torch.Generator().manual_seed(15))
    out_s, inv_den = bilateral_numba.bilateral_forward_numba(x, 5, 0.1, 1.5, "l1", "circle", save=True)
    out_n, none = bilateral_numba.bilateral_forward_numba(x, 5, 0.1, 1.5, "l1", "circle", save=False)
    assert none is None and inv_den.shape == (3, 1, 12, 10) and torch.equal(out_s, out_n)
    with torch.no_grad():
        assert torch.equal(bilateral_filter(x.requires_grad_(), 5, 0.1, 1.5, backend="numba"), out_s)


@needs_numba
def test_fused_path_iterations_and_layouts():
    """Iterated filtering, a channels-last (non-contiguous) input and a sliced view give the
    same values and gradients as the PyTorch path."""
    g = torch.Generator().manual_seed(12)
    x = torch.rand(4, 3, 24, 20, generator=g)
    up = torch.randn(4, 3, 24, 20, generator=g)
    for inp in (x, x.contiguous(memory_format=torch.channels_last), torch.rand(4, 3, 24, 40, generator=g)[..., ::2]):
        kw = dict(kernel_size=5, sigma_color=0.2, sigma_space=1.5, iterations=3)
        out_n, g_n = _vjp(inp, up, backend="numba", **kw)
        out_t, g_t = _vjp(inp, up, backend="torch", **kw)
        assert _close(out_n, out_t, 1e-4, 2e-5) and _close(g_n, g_t, 1e-4, 2e-5)


@needs_numba
def test_auto_backend_picks_fused_kernel_on_cpu(monkeypatch):
    from robustkit.preprocessing.kernels import bilateral_numba, dispatch

    calls = []
    real = bilateral_numba.bilateral_filter_numba
    monkeypatch.setattr(bilateral_numba, "bilateral_filter_numba", lambda *a, **k: calls.append("numba") or real(*a, **k))
    monkeypatch.setattr(dispatch, "bilateral_filter_torch", lambda *a, **k: pytest.fail("auto used the torch path on CPU"))
    x = torch.rand(1, 3, 8, 8)
    bilateral_filter(x, 5, 0.1, 1.5)
    bilateral_filter(x.double(), 5, 0.1, 1.5, iterations=2)
    assert calls == ["numba"] * 3


def test_falls_back_to_torch_path_without_numba(monkeypatch):
    """Where Numba is missing, 'auto' runs the PyTorch path and 'numba' says what to install."""
    from robustkit.preprocessing.kernels import bilateral_numba, dispatch

    monkeypatch.setattr(bilateral_numba, "available", lambda: False)
    monkeypatch.setattr(bilateral_numba, "NUMBA_ERROR", "ModuleNotFoundError: No module named 'numba'")
    calls = []
    real = dispatch.bilateral_filter_torch
    monkeypatch.setattr(dispatch, "bilateral_filter_torch", lambda *a, **k: calls.append("torch") or real(*a, **k))
    x = torch.rand(1, 3, 8, 8)
    ref = cv2_filter(x, 5, 0.1, 1.5)
    assert torch.allclose(bilateral_filter(x, 5, 0.1, 1.5), ref, atol=1e-4)
    assert calls == ["torch"]
    with pytest.raises(InputError, match="pip install numba"):
        bilateral_filter(x, 5, 0.1, 1.5, backend="numba")


def test_numba_backend_needs_a_cpu_tensor():
    with pytest.raises(InputError, match="CPU tensors"):
        bilateral_filter(torch.rand(1, 3, 8, 8, device="meta"), 5, 0.1, 1.5, backend="numba")


@needs_numba
def test_fused_kernel_thread_count_and_concurrent_callers():
    """The result does not depend on the number of threads, and calls from several Python
    threads at once (e.g. data-loading threads) are safe."""
    from concurrent.futures import ThreadPoolExecutor

    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bilateral_filter(x, 5, 0.1, 1.5)
        torch.set_num_threads(max(2, before))
        many = bilateral_filter(x, 5, 0.1, 1.5)
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(one, many, atol=1e-6)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: bilateral_filter(x[i * 8 : (i + 1) * 8], 5, 0.1, 1.5), range(4)))
    assert torch.allclose(torch.cat(outs), one, atol=1e-6)


@needs_numba
def test_fused_kernel_scratch_does_not_grow_with_window_area():
    """Per-thread scratch is the padded gradient (N*C*(H+2r)*(W+2r)); the kernels keep only
    row-block buffers besides: no K^2 factor."""
    from robustkit.preprocessing.kernels import bilateral_numba

    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    sizes = {}
    for k in (3, 9):
        bilateral_numba.release_buffers()
        bilateral_filter(x, k, 0.1, 2.0, window="square", backend="numba").sum().backward()
        sizes[k] = sum(b.numel() for b in bilateral_numba._WORKSPACE.buffers.values())
    assert 0 < sizes[9] < 1.5 * sizes[3], sizes
    assert sizes[9] < 2 * x.numel(), sizes


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kernel_size": 4}, "odd integer"),
        ({"kernel_size": 0}, "odd integer"),
        ({"kernel_size": 5.0}, "odd integer"),
        ({"sigma_space": torch.tensor([1.0, 2.0], device="meta")}, "one device"),
        ({"sigma_space": float("nan")}, "sigma_space"),
        ({"sigma_color": 0.0}, "sigma_color"),
        ({"sigma_space": -1.0}, "sigma_space"),
        ({"sigma_color": torch.tensor([0.1, 0.2, 0.3])}, "per-sample"),
        ({"sigma_color": torch.tensor([0.1, -0.2])}, "finite and > 0"),
        ({"distance": "l3"}, "distance"),
        ({"window": "hex"}, "window"),
        ({"iterations": -1}, "iterations"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    args = dict(kernel_size=5, sigma_color=0.1, sigma_space=1.5)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        bilateral_filter(torch.rand(2, 3, 8, 8), **args)


def test_rejects_bad_tensors():
    with pytest.raises(InputError, match="N x C x H x W"):
        bilateral_filter(torch.rand(3, 8, 8))
    with pytest.raises(InputError, match="torch.Tensor"):
        bilateral_filter(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(InputError, match="empty"):
        bilateral_filter(torch.rand(0, 3, 4, 4))
    with pytest.raises(InputError, match="floating-point"):
        bilateral_filter(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(InputError, match="CUDA only"):
        bilateral_filter(torch.rand(1, 1, 4, 4).half())
    with pytest.raises(InputError, match="needs a CUDA tensor"):
        if os.environ.get("TRITON_INTERPRET") != "1":
            bilateral_filter(torch.rand(1, 1, 4, 4), backend="triton")
        else:
            raise InputError("needs a CUDA tensor")


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from robustkit.preprocessing.kernels import bilateral_filter
    from robustkit.preprocessing.kernels import bilateral_triton as bt

    torch.manual_seed(0)
    # forward and vector-Jacobian product agree with the (gradchecked) PyTorch path
    for distance, window, k in (("l1", "circle", 5), ("l1", "square", 3), ("l2", "circle", 3), ("l2", "square", 3)):
        x = torch.rand(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
        sc = torch.tensor([0.2, 0.4], dtype=torch.float64)
        a = bilateral_filter(x, k, sc, 1.3, distance, window, backend="triton")
        b = bilateral_filter(x, k, sc, 1.3, distance, window, backend="torch")
        assert torch.allclose(a, b, atol=1e-10), (distance, window, float((a - b).abs().max()))
        g = torch.rand_like(a)
        (ga,) = torch.autograd.grad(a, x, g)
        (gb,) = torch.autograd.grad(b, x, g)
        assert torch.allclose(ga, gb, atol=1e-9), (distance, window, float((ga - gb).abs().max()))
    # float32 and half (computed in float32), eager inference path (no custom-op dispatch)
    x = torch.rand(2, 3, 5, 6)
    ref = bilateral_filter(x, 3, 0.2, 1.3, backend="torch")
    assert torch.allclose(bilateral_filter(x, 3, 0.2, 1.3, backend="triton"), ref, atol=1e-5)
    half = bilateral_filter(x.half(), 3, 0.2, 1.3, backend="triton")
    assert half.dtype == torch.float16 and torch.allclose(half.float(), ref, atol=2e-3)
    # a radius wider than the image falls back to the PyTorch path (periodic reflect-101)
    tiny = torch.rand(1, 1, 2, 3)
    assert torch.allclose(bilateral_filter(tiny, 5, 0.2, 1.3, backend="triton"), bilateral_filter(tiny, 5, 0.2, 1.3, backend="torch"))
    # exact gradient of the Triton op itself
    xd = torch.rand(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: bilateral_filter(t, 3, 0.3, 1.0, "l1", "circle", backend="triton"), (xd,))
    assert torch.autograd.gradcheck(
        lambda t: bilateral_filter(t, 3, 0.3, 1.0, "l2", "square", iterations=2, backend="triton"), (xd,), fast_mode=True)
    # registered ops: schema, fake (meta) implementation, autograd registration
    x = torch.rand(2, 3, 6, 6)
    isc2, i2ss2 = torch.full((2,), 25.0), torch.full((2,), 0.2)
    torch.library.opcheck(bt.bilateral_fwd, (x, 2, isc2, i2ss2, True, True))
    out, inv_den = bt.bilateral_fwd(x, 2, isc2, i2ss2, True, True)
    torch.library.opcheck(bt.bilateral_bwd, (torch.rand_like(x), x, out, inv_den, 2, isc2, i2ss2, True, True))
    # torch.compile traces one op (fullgraph: no graph break), forward and backward
    f = torch.compile(lambda t: bilateral_filter(t, 5, 0.1, 1.5, backend="triton").square().sum(), backend="aot_eager", fullgraph=True)
    xc = x.clone().requires_grad_()
    f(xc).backward()
    xr = x.clone().requires_grad_()
    bilateral_filter(xr, 5, 0.1, 1.5, backend="torch").square().sum().backward()
    assert torch.allclose(xc.grad, xr.grad, atol=1e-5), float((xc.grad - xr.grad).abs().max())
    print("TRITON-INTERPRET-OK")
    """
)


@pytest.mark.slow
def test_triton_kernel_under_interpreter():
    """The Triton kernels (forward and backward) agree with the PyTorch path, run on CPU by Triton's interpreter."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert "TRITON-INTERPRET-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_cuda_triton_matches_torch_path(dtype, atol):
    x = torch.rand(8, 3, 32, 32, device="cuda")
    ref = bilateral_filter(x, 5, 0.1, 1.5, backend="torch")
    out = bilateral_filter(x.to(dtype), 5, 0.1, 1.5, backend="triton")
    assert out.dtype == dtype
    assert torch.allclose(out.float(), ref, atol=atol)


@cuda
@pytest.mark.cuda
def test_cuda_gradcheck_and_compile():
    x = torch.rand(1, 2, 6, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: bilateral_filter(t, 5, 0.3, 1.2, backend="triton"), (x,))
    f = torch.compile(lambda t: bilateral_filter(t, 5, 0.1, 1.5, backend="triton").sum(), fullgraph=True)
    xc = torch.rand(4, 3, 16, 16, device="cuda", requires_grad=True)
    f(xc).backward()
    xr = xc.detach().clone().requires_grad_()
    bilateral_filter(xr, 5, 0.1, 1.5, backend="torch").sum().backward()
    assert torch.allclose(xc.grad, xr.grad, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_double_backward_is_refused_clearly(backend):
    """The exact backward is a hand-written kernel, not itself differentiable: create_graph must fail loudly
    (issue #12) rather than give a silently wrong second derivative."""
    from robustkit.errors import InputError
    from robustkit.preprocessing.kernels.bilateral_numba import NUMBA_ERROR

    if backend == "numba" and NUMBA_ERROR is not None:
        pytest.skip("numba not installed")
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(InputError, match="double backward"):
        torch.autograd.grad(bilateral_filter(x, 3, 0.1, 1.0, backend=backend).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(bilateral_filter(x, 3, 0.1, 1.0, backend=backend).sum(), x)  # first order still works
    assert torch.isfinite(g).all()


@needs_numba
def test_warm_up_compiles_what_real_calls_use():
    """warm_up compiles the very specializations a real float32 call dispatches to (else the
    first real call would compile again), on a thread when asked."""
    from robustkit.preprocessing.kernels import bilateral_numba

    thread = bilateral_numba.warm_up(background=True)
    assert thread is not None
    thread.join(timeout=300)
    assert not thread.is_alive()
    kernels = (bilateral_numba._forward_items, bilateral_numba._backward_items, bilateral_numba._fold_items)
    before = [list(k.signatures) for k in kernels]
    assert all(before), "warm_up compiled nothing"
    for shape, kw in (((6, 1, 32, 32), {}), ((2, 3, 17, 9), {"distance": "l2", "window": "square"})):
        x = torch.rand(*shape, requires_grad=True)
        bilateral_filter(x, 5, 0.1, 1.5, backend="numba", **kw).sum().backward()
    assert [list(k.signatures) for k in kernels] == before


def test_warm_up_is_a_no_op_without_numba(monkeypatch):
    from robustkit.preprocessing.kernels import bilateral_numba

    monkeypatch.setattr(bilateral_numba, "available", lambda: False)
    assert bilateral_numba.warm_up() is None


def test_cli_warms_the_kernel_only_for_cpu_pipelines_with_a_bilateral_filter(monkeypatch):
    from robustkit import cli
    from robustkit.pipeline import load_config
    from robustkit.preprocessing.kernels import bilateral_numba

    calls = []
    monkeypatch.setattr(bilateral_numba, "warm_up", lambda background=True: calls.append(background))
    demo = load_config(cli.demo_config_path())
    cli._warm_up_bilateral({**demo, "device": "cpu"})
    assert calls == [True]
    cli._warm_up_bilateral({**demo, "device": "cuda"})
    cli._warm_up_bilateral({"device": "cpu", "steps": [{"train": {"epochs": 1}}]})
    assert calls == [True]
