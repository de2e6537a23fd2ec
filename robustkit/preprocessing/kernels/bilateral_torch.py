"""Bilateral filter in pure PyTorch: a loop over window taps on shifted slices of the padded
input, with a hand-written exact backward.

Extra memory is O(N*C*H*W) (padded copies of the input, the accumulators and a few per-tap
temporaries), never O(N*C*H*W*K^2) as with ``unfold``. This path runs on any device; on
CUDA the fused Triton kernel in :mod:`robustkit.preprocessing.kernels.bilateral_triton` is faster.

Forward, for pixel p and window offsets q (reflect-101 borders)::

    w_pq  = exp(-|q - p|^2 / (2 s_s^2)) * exp(-dist(x_p, x_q)^2 / (2 s_c^2))
    D_p   = sum_q w_pq,   out_p = sum_q w_pq x_q / D_p

with ``dist`` the L1 (sum over channels of |.|) or L2 colour distance, shared by all channels.

Two tricks keep the number of passes over memory low:

- the weight is symmetric (``w_pq = w_qp``), also across reflected borders when it is
  computed on the padded grid: for each pair of opposite offsets ``+o`` / ``-o`` one weight map
  over the padded positions ``u`` (pairs ``(u, u + o)``) serves both taps;
- an all-ones channel appended to the padded input makes one ``addcmul_`` per tap accumulate
  the numerator and the denominator together.

Backward: see ``docs/bilateral.md``; it uses the same pairing on the padded grid.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import torch

from ...errors import InputError

LOG2E = 1.4426950408889634
# exp(-d^2 / (2 s^2)) = 2^(-(k d)^2) with k = sqrt(log2(e) / 2) / s: distances are computed on
# the input scaled by k (per sample), and exp2 is several times faster than exp on CPU.
_HALF_LOG2E_SQRT = math.sqrt(0.5 * LOG2E)


def window_offsets(kernel_size: int, window: str) -> list[tuple[int, int]]:
    """(dy, dx) taps of a ``kernel_size`` window; ``circle`` keeps dy^2 + dx^2 <= r^2 (as OpenCV)."""
    r = kernel_size // 2
    taps = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    if window == "circle":
        taps = [(dy, dx) for dy, dx in taps if dy * dy + dx * dx <= r * r]
    return taps


def half_offsets(kernel_size: int, window: str) -> list[tuple[int, int]]:
    """One offset of each pair ``{o, -o}`` of the window (the centre excluded)."""
    return [(dy, dx) for dy, dx in window_offsets(kernel_size, window) if dy > 0 or (dy == 0 and dx > 0)]


# ------------------------------------------------------------------ reflect-101 padding
def _reflect_index(n: int, r: int, device: torch.device) -> torch.Tensor:
    """Indices of reflect-101 padding by r (periodic for r >= n), as OpenCV's BORDER_REFLECT_101."""
    idx = torch.arange(-r, n + r, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def _pad_into(x: torch.Tensor, r: int, out: torch.Tensor) -> torch.Tensor:
    """Write reflect-101 padding of ``x`` by ``r`` into ``out`` (N x C x H+2r x W+2r).

    Slice copies rather than ``F.pad``: the same speed on large tensors, and no thread-pool
    round trip on small ones (which costs milliseconds on a busy machine).
    """
    h, w = x.shape[-2:]
    if r >= h or r >= w:  # reflection wider than the image: OpenCV reflects periodically
        iy = _reflect_index(h, r, x.device)
        ix = _reflect_index(w, r, x.device)
        return out.copy_(x.index_select(2, iy).index_select(3, ix))
    out[:, :, r : r + h, r : r + w].copy_(x)
    for i in range(1, r + 1):
        out[:, :, r - i, r : r + w].copy_(x[:, :, i])
        out[:, :, r + h - 1 + i, r : r + w].copy_(x[:, :, h - 1 - i])
    for j in range(1, r + 1):
        out[:, :, :, r - j].copy_(out[:, :, :, r + j])
        out[:, :, :, r + w - 1 + j].copy_(out[:, :, :, r + w - 1 - j])
    return out


def _fold(gpad: torch.Tensor, x_shape: Sequence[int], r: int) -> torch.Tensor:
    """Adjoint of the padding: add the padded-grid gradient back onto the image (in place on gpad)."""
    if r == 0:
        return gpad
    h, w = x_shape[-2], x_shape[-1]
    if r >= h or r >= w:
        return _unpad_grad(gpad, x_shape, r)
    for j in range(1, r + 1):
        gpad[:, :, :, r + j].add_(gpad[:, :, :, r - j])
        gpad[:, :, :, r + w - 1 - j].add_(gpad[:, :, :, r + w - 1 + j])
    for i in range(1, r + 1):
        gpad[:, :, r + i, r : r + w].add_(gpad[:, :, r - i, r : r + w])
        gpad[:, :, r + h - 1 - i, r : r + w].add_(gpad[:, :, r + h - 1 + i, r : r + w])
    return gpad[:, :, r : r + h, r : r + w]


def _unpad_grad(grad_pad: torch.Tensor, x_shape: Sequence[int], r: int) -> torch.Tensor:
    """Fold the gradient w.r.t. the padded input back onto the unpadded input (any r)."""
    if r == 0:
        return grad_pad
    h, w = x_shape[-2], x_shape[-1]
    iy = _reflect_index(h, r, grad_pad.device)
    ix = _reflect_index(w, r, grad_pad.device)
    g = torch.zeros(*grad_pad.shape[:2], grad_pad.shape[2], w, dtype=grad_pad.dtype, device=grad_pad.device)
    g.index_add_(3, ix, grad_pad)
    out = torch.zeros(*grad_pad.shape[:2], h, w, dtype=grad_pad.dtype, device=grad_pad.device)
    out.index_add_(2, iy, g)
    return out


# ------------------------------------------------------------------ scratch buffers and chunks
_WORKSPACE = threading.local()


def _buffer(name: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor reused across calls (per thread), so the tap loop allocates nothing.

    Large CPU allocations are returned to the OS on free and page-faulted back on the next
    call; reusing them made the forward up to 1.5x faster in fresh processes. Buffers are
    flat and viewed to ``shape``, so one buffer serves every tap's (differently sized) region.
    """
    cache = getattr(_WORKSPACE, "buffers", None)
    if cache is None:
        cache = _WORKSPACE.buffers = {}
    numel = math.prod(shape)
    key = (name, like.dtype, like.device)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        if len(cache) > 32:
            cache.clear()
        buf = cache[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(tuple(shape))


def release_buffers() -> None:
    """Free the scratch buffers kept by this thread (they are rebuilt on the next call)."""
    _WORKSPACE.buffers = {}


# Samples are processed in chunks of about this many input elements (at least one sample) so
# that the per-tap passes stay in cache. Measured on 2 cores: 256x3x32x32 k=5 and 16x3x224x224
# k=9 both run fastest with 2^18 (1.2x and 1.7x faster than 2^20, 1.1x / 1.7x than no chunking).
CHUNK_ELEMENTS = 1 << 18


def _chunks(x: torch.Tensor):
    if x.shape[0] == 1 or x.numel() <= CHUNK_ELEMENTS or x.device.type != "cpu":
        yield slice(0, x.shape[0])
        return
    step = max(1, CHUNK_ELEMENTS // max(1, x[0].numel()))
    for start in range(0, x.shape[0], step):
        yield slice(start, min(start + step, x.shape[0]))


def _slice_sigma(sigma, s: slice):
    return sigma[s] if isinstance(sigma, torch.Tensor) and sigma.numel() > 1 else sigma


def _scales(x: torch.Tensor, sigma_color, sigma_space):
    """``k = sqrt(log2(e)/2) / s_c`` and ``log2(e) / (2 s_s^2)``: floats or N x 1 x 1 x 1 tensors."""
    if isinstance(sigma_color, torch.Tensor):
        k = sigma_color.to(x).reshape(-1, 1, 1, 1).reciprocal().mul(_HALF_LOG2E_SQRT)
    else:
        k = _HALF_LOG2E_SQRT / float(sigma_color)
    if isinstance(sigma_space, torch.Tensor):
        s = sigma_space.to(x).reshape(-1, 1, 1, 1).pow(-2).mul(0.5 * LOG2E)
    else:
        s = 0.5 * LOG2E / float(sigma_space) ** 2
    return k, s


def _neg_spatial(s, d2: int, like: torch.Tensor) -> torch.Tensor:
    """``-s * |o|^2`` as a tensor that broadcasts against N x 1 x h x w."""
    if isinstance(s, torch.Tensor):
        return s * (-float(d2))
    return torch.full((), -s * d2, dtype=like.dtype, device=like.device)


def _channel_sum(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Sum over dim 1 (keepdim) without the zero-fill of ``torch.sum(out=)``; returns a view if C == 1."""
    c = t.shape[1]
    if c == 1:
        return t
    if c > 4:
        return torch.sum(t, 1, keepdim=True, out=out)
    torch.add(t[:, 0:1], t[:, 1:2], out=out)
    for i in range(2, c):
        out.add_(t[:, i : i + 1])
    return out


def _pair_weight(xs, r, dy, dx, h, w, l1, neg_s, like, keep_abs: bool):
    """Weight map of the pairs ``(u, u + o)`` over the padded positions both taps ``+o``/``-o`` need.

    ``xs`` is the padded input scaled by ``k``. Returns ``(wgt, diff, dist)`` on the region of
    ``(h + |dy|) x (w + |dx|)`` starting positions; ``diff = xs[u + o] - xs[u]`` and ``dist`` is
    the scaled L1 distance (L1) or the squared scaled L2 distance (L2).
    """
    n, c = xs.shape[:2]
    he, we = h + abs(dy), w + abs(dx)
    r0, c0 = r - max(0, dy), r - max(0, dx)
    base = xs[:, :, r0 : r0 + he, c0 : c0 + we]
    shifted = xs[:, :, r0 + dy : r0 + dy + he, c0 + dx : c0 + dx + we]
    diff = _buffer("diff", (n, c, he, we), like)
    torch.sub(shifted, base, out=diff)
    dist_buf = _buffer("dist", (n, 1, he, we), like)
    wgt = _buffer("wgt", (n, 1, he, we), like)
    if l1:
        if keep_abs:
            absd = torch.abs(diff, out=_buffer("absd", diff.shape, like))
        else:
            absd = diff.abs_()
        dist = _channel_sum(absd, dist_buf)
        torch.addcmul(neg_s, dist, dist, value=-1.0, out=wgt)
    else:
        sq = torch.mul(diff, diff, out=_buffer("absd", diff.shape, like)) if keep_abs else diff.mul_(diff)
        dist = _channel_sum(sq, dist_buf)
        torch.sub(neg_s, dist, out=wgt)
    wgt.exp2_()
    return wgt, diff, dist


# ------------------------------------------------------------------ forward
def bilateral_forward_torch(x, kernel_size, sigma_color, sigma_space, distance, window, save=True):
    """Returns ``(out, inv_den)`` (``1/D``, N x 1 x H x W; None unless ``save``); builds no autograd graph."""
    x = x.contiguous()
    out = torch.empty_like(x)
    inv_den = torch.empty(x.shape[0], 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    for s in _chunks(x):
        _forward(x[s], kernel_size, _slice_sigma(sigma_color, s), _slice_sigma(sigma_space, s), distance, window, out[s], inv_den[s])
    return out, inv_den if save else None


def _forward(x, kernel_size, sigma_color, sigma_space, distance, window, out, inv_den):
    n, c, h, w = x.shape
    r = kernel_size // 2
    k, s = _scales(x, sigma_color, sigma_space)
    # padded input plus an all-ones channel: w * [x_q, 1] accumulates numerator and denominator
    xp = _buffer("xp", (n, c + 1, h + 2 * r, w + 2 * r), x)
    _pad_into(x, r, xp[:, :c])
    xp[:, c].fill_(1.0)
    xs = torch.mul(xp[:, :c], k, out=_buffer("xs", (n, c, h + 2 * r, w + 2 * r), x))
    acc = _buffer("acc", (n, c + 1, h, w), x)
    acc.copy_(xp[:, :, r : r + h, r : r + w])  # the centre tap has weight 1
    l1 = distance == "l1"
    for dy, dx in half_offsets(kernel_size, window):
        wgt, _, _ = _pair_weight(xs, r, dy, dx, h, w, l1, _neg_spatial(s, dy * dy + dx * dx, x), x, keep_abs=False)
        ay, ax, by, bx = max(0, dy), max(0, dx), max(0, -dy), max(0, -dx)
        acc.addcmul_(wgt[:, :, ay : ay + h, ax : ax + w], xp[:, :, r + dy : r + dy + h, r + dx : r + dx + w])
        acc.addcmul_(wgt[:, :, by : by + h, bx : bx + w], xp[:, :, r - dy : r - dy + h, r - dx : r - dx + w])
    torch.reciprocal(acc[:, c:], out=inv_den)
    torch.mul(acc[:, :c], inv_den, out=out)


# ------------------------------------------------------------------ backward
def bilateral_backward_torch(grad_out, x, out, inv_den, kernel_size, sigma_color, sigma_space, distance, window):
    """Exact gradient w.r.t. ``x`` (weights depend on both the centre and the neighbour)."""
    grad_out, x = grad_out.contiguous(), x.contiguous()
    grad = torch.empty_like(x)
    for s in _chunks(x):
        grad[s] = _backward(grad_out[s], x[s], out[s], inv_den[s], kernel_size,
                            _slice_sigma(sigma_color, s), _slice_sigma(sigma_space, s), distance, window)
    return grad


def _backward(grad_out, x, out, inv_den, kernel_size, sigma_color, sigma_space, distance, window):
    """Pairs ``(u, v = u + o)`` on the padded grid, with G and b zero outside the image.

    With ``S_uv = sum_c G_u x_v - b_u`` (zero unless u is an image pixel), ``c_uv`` the weight's
    log-derivative factor (``(x_v - x_u)/s_c^2`` for L2, ``dist sign(x_v - x_u)/s_c^2`` for L1;
    ``c_vu = -c_uv``) and ``T = w (S_uv + S_vu)``, the pair adds

        gpad[u] += w G_v + c_uv T,     gpad[v] += w G_u - c_uv T,

    which covers u as centre / v as neighbour and the reverse. The centre tap adds G.
    """
    n, c, h, w = x.shape
    r = kernel_size // 2
    hp, wp = h + 2 * r, w + 2 * r
    k, s = _scales(x, sigma_color, sigma_space)
    xp = _buffer("xp", (n, c + 1, hp, wp), x)  # [x, 1] padded (the forward's buffers are free now)
    _pad_into(x, r, xp[:, :c])
    xp[:, c].fill_(1.0)
    xs = torch.mul(xp[:, :c], k, out=_buffer("xs", (n, c, hp, wp), x))
    gb = _buffer("gb", (n, c + 1, hp, wp), x).zero_()  # [G, -b], zero outside the image
    G = gb[:, :c, r : r + h, r : r + w]
    torch.mul(grad_out, inv_den, out=G)
    bneg = gb[:, c:, r : r + h, r : r + w]
    b = _channel_sum(torch.mul(G, out, out=_buffer("gout", G.shape, x)), bneg)
    torch.neg(b, out=bneg)
    gpad = _buffer("gpad", (n, c, hp, wp), x).zero_()
    gpad[:, :, r : r + h, r : r + w].copy_(G)  # centre tap: w = 1, no weight derivative
    # c_uv = coef_s / (k s_c^2) with coef_s computed on the scaled input: fold the factor into T
    factor = k * (2.0 / LOG2E)  # 1 / (k s_c^2) = 2 k / log2(e)
    l1 = distance == "l1"
    for dy, dx in half_offsets(kernel_size, window):
        wgt, diff, dist = _pair_weight(xs, r, dy, dx, h, w, l1, _neg_spatial(s, dy * dy + dx * dx, x), x, keep_abs=True)
        he, we = wgt.shape[-2:]
        r0, c0 = r - max(0, dy), r - max(0, dx)
        U = (slice(None), slice(None), slice(r0, r0 + he), slice(c0, c0 + we))
        V = (slice(None), slice(None), slice(r0 + dy, r0 + dy + he), slice(c0 + dx, c0 + dx + we))
        prod = _buffer("prod", (n, c + 1, he, we), x)
        s_uv = _buffer("s_uv", (n, 1, he, we), x)
        s_vu = _buffer("s_vu", (n, 1, he, we), x)
        _channel_sum(torch.mul(gb[U], xp[V], out=prod), s_uv)
        _channel_sum(torch.mul(gb[V], xp[U], out=prod), s_vu)
        t = s_uv.add_(s_vu).mul_(wgt).mul_(factor)
        coef = torch.sign(diff, out=diff).mul_(dist) if l1 else diff
        coef.mul_(t)
        gu, gv = gpad[U], gpad[V]
        gu.addcmul_(wgt, gb[V][:, :c]).add_(coef)
        gv.addcmul_(wgt, gb[U][:, :c]).sub_(coef)
    return _fold(gpad, x.shape, r)


def refuse_double_backward() -> None:
    """The hand-written backward is exact but not itself differentiable: refuse second-order use clearly
    (``create_graph=True`` turns grad mode on inside ``backward``) instead of returning a wrong Hessian."""
    if torch.is_grad_enabled():
        raise InputError(
            "double backward through the bilateral filter is not supported: its exact gradient is computed by a "
            "hand-written kernel that is not itself differentiable (gradient penalties, Hessian-vector products "
            "and create_graph=True need a second derivative); use the filter's first-order gradient only, or a "
            "differentiable approximation such as BPDA (robustkit.attacks.BPDA) for the filter")


class BilateralFunction(torch.autograd.Function):
    """One bilateral pass with an exact hand-written backward, for a pair of kernels (the
    PyTorch path here, the fused CPU kernel in :mod:`.bilateral_numba`):
    ``forward(x, kernel_size, sigma_color, sigma_space, distance, window, save)`` returns
    ``(out, inv_den)`` and ``backward(grad_out, x, out, inv_den, kernel_size, sigma_color,
    sigma_space, distance, window)`` the gradient w.r.t. ``x``. Saved state: ``x``, ``out`` and
    ``1/D``. Sigmas are constants (no gradient); the backward is not itself differentiable."""

    @staticmethod
    def forward(ctx, x, kernels, kernel_size, sigma_color, sigma_space, distance, window):
        forward, ctx.backward_kernel = kernels
        out, inv_den = forward(x, kernel_size, sigma_color, sigma_space, distance, window, True)
        ctx.save_for_backward(x, out, inv_den)
        ctx.cfg = (kernel_size, sigma_color, sigma_space, distance, window)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward()
        x, out, inv_den = ctx.saved_tensors
        grad = ctx.backward_kernel(grad_out, x, out, inv_den, *ctx.cfg)
        return (grad,) + (None,) * 6


def apply_bilateral(kernels, x, kernel_size, sigma_color, sigma_space, distance, window):
    """One pass with ``kernels = (forward, backward)``: through :class:`BilateralFunction` when
    autograd needs the gradient, else the forward alone, keeping no state for a backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return BilateralFunction.apply(x, kernels, kernel_size, sigma_color, sigma_space, distance, window)
    return kernels[0](x, kernel_size, sigma_color, sigma_space, distance, window, False)[0]


TORCH_KERNELS = (bilateral_forward_torch, bilateral_backward_torch)


def bilateral_filter_torch(x, kernel_size, sigma_color, sigma_space, distance="l1", window="circle"):
    """One bilateral pass on the PyTorch path (differentiable w.r.t. ``x``; sigmas are constants)."""
    return apply_bilateral(TORCH_KERNELS, x, kernel_size, sigma_color, sigma_space, distance, window)


def spatial_weight_sum(kernel_size: int, sigma_space: float, window: str) -> float:
    """Sum of spatial weights over the window (handy for tests)."""
    return sum(math.exp(-(dy * dy + dx * dx) / (2 * sigma_space**2)) for dy, dx in window_offsets(kernel_size, window))
