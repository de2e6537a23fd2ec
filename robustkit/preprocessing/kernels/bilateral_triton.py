"""Fused Triton bilateral filter (CUDA; also runs under ``TRITON_INTERPRET=1`` on CPU).

Forward: one program per block of output pixels; the centre's channels are held in registers
as a ``BLOCK x C`` tile, the window taps are unrolled at compile time, and numerator,
denominator and the colour distance are accumulated in float32 (float64 for float64 input).
It writes ``out`` and ``1/D`` - the only state the backward needs besides ``x``.

Backward (exact gradient, gathers only, no atomics), with ``G = g / D`` and ``b = sum_c G out``:

- centre kernel, on the image grid: ``grad_p += sum_q w_pq S_pq coef_pq`` where
  ``S_pq = sum_c G_p x_q - b_p`` and ``coef = (x_q - x_p) / s_c^2`` (L2) or
  ``dist_pq sign(x_q - x_p) / s_c^2`` (L1);
- neighbour kernel, on the reflect-padded grid: padded position ``P`` receives, from every
  pixel ``p = P - o`` whose window reaches it at offset ``o``, ``w_pP (G_p - S_pP coef_pP)``;
  the padded gradient is then folded back onto the image (reflect-101).

Both are registered as ``torch.library`` custom ops with fake (meta) implementations and an
autograd formula, so autograd and ``torch.compile`` see one op each.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .bilateral_torch import _unpad_grad, refuse_double_backward

# Measured on an H100 (benchmarks/bilateral.py, docs/bilateral.md): 512 pixels and 8 warps per
# program is the fastest of BLOCK in {64..512} x warps in {2, 4, 8} for every benchmark shape;
# configurations with one pixel per thread (e.g. 128 x 4 warps) ran up to 12x slower.
BLOCK = 512
NUM_WARPS = 8
# Triton's CPU interpreter (TRITON_INTERPRET=1, tests) simulates a whole block with numpy:
# small blocks keep it fast and give tiny test images several programs each.
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    BLOCK = 64


@triton.jit
def _reflect(i, n):
    i = tl.where(i < 0, -i, i)
    return tl.where(i > n - 1, 2 * (n - 1) - i, i)


@triton.jit
def _image_block(NPIX, H, W, C: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of image pixels: flat index, mask, sample, row, column, the
    ``BLOCK x CP`` pixel-and-channel mask and offsets of each pixel's channel planes."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pmask = offs < NPIX
    hw = H * W
    n = offs // hw
    rem = offs % hw
    h = rem // W
    w = rem % W
    ch = tl.arange(0, CP)
    m2 = pmask[:, None] & (ch < C)[None, :]
    cptr = (n * (C * hw))[:, None] + ch[None, :] * hw
    return offs, pmask, n, h, w, m2, cptr


@triton.jit
def _tap_weight(diff, d2, i2ss2, isc2, L1: tl.constexpr):
    """Weight of a tap at squared spatial distance ``d2`` from the channel differences ``diff``
    (``BLOCK x CP``, zero in padding channels), and the weight derivative's factor ``coef``:
    ``dist * sign(diff)`` (L1, sign(0) = 0) or ``diff`` (L2)."""
    if L1:
        d = tl.sum(tl.abs(diff), axis=1)
        e = 0.5 * d * d
        coef = tl.where(diff > 0, d[:, None], tl.where(diff < 0, -d[:, None], 0.0))
    else:
        e = 0.5 * tl.sum(diff * diff, axis=1)
        coef = diff
    wgt = tl.exp(-d2 * i2ss2 - e * isc2)
    return wgt, coef


@triton.jit
def _bilateral_fwd_kernel(
    x_ptr, out_ptr, invden_ptr, isc2_ptr, i2ss2_ptr,
    NPIX, H, W,
    C: tl.constexpr, CP: tl.constexpr, R: tl.constexpr, CIRCLE: tl.constexpr, L1: tl.constexpr,
    F64: tl.constexpr, BLOCK: tl.constexpr, STORE_INV: tl.constexpr,
):
    acc_t = tl.float64 if F64 else tl.float32
    offs, pmask, n, h, w, m2, cptr = _image_block(NPIX, H, W, C, CP, BLOCK)
    xc = tl.load(x_ptr + cptr + (h * W + w)[:, None], mask=m2, other=0.0).to(acc_t)
    isc2 = tl.load(isc2_ptr + n, mask=pmask, other=1.0).to(acc_t)
    i2ss2 = tl.load(i2ss2_ptr + n, mask=pmask, other=1.0).to(acc_t)
    num = tl.zeros((BLOCK, CP), dtype=acc_t)
    den = tl.zeros((BLOCK,), dtype=acc_t)
    for iy in tl.static_range(2 * R + 1):
        for ix in tl.static_range(2 * R + 1):
            dy = iy - R
            dx = ix - R
            if (not CIRCLE) or (dy * dy + dx * dx <= R * R):
                yy = _reflect(h + dy, H)
                xx = _reflect(w + dx, W)
                nb = tl.load(x_ptr + cptr + (yy * W + xx)[:, None], mask=m2, other=0.0).to(acc_t)
                wgt, _ = _tap_weight(nb - xc, dy * dy + dx * dx, i2ss2, isc2, L1)
                num += wgt[:, None] * nb
                den += wgt
    inv = 1.0 / den
    tl.store(out_ptr + cptr + (h * W + w)[:, None], (num * inv[:, None]).to(out_ptr.dtype.element_ty), mask=m2)
    if STORE_INV:  # only the autograd op needs 1/D
        tl.store(invden_ptr + offs, inv.to(invden_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _bilateral_bwd_centre_kernel(
    x_ptr, G_ptr, b_ptr, grad_ptr, isc2_ptr, i2ss2_ptr,
    NPIX, H, W,
    C: tl.constexpr, CP: tl.constexpr, R: tl.constexpr, CIRCLE: tl.constexpr, L1: tl.constexpr,
    F64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_t = tl.float64 if F64 else tl.float32
    offs, pmask, n, h, w, m2, cptr = _image_block(NPIX, H, W, C, CP, BLOCK)
    here = (h * W + w)[:, None]
    xc = tl.load(x_ptr + cptr + here, mask=m2, other=0.0).to(acc_t)
    G = tl.load(G_ptr + cptr + here, mask=m2, other=0.0).to(acc_t)
    b = tl.load(b_ptr + offs, mask=pmask, other=0.0).to(acc_t)
    isc2 = tl.load(isc2_ptr + n, mask=pmask, other=1.0).to(acc_t)
    i2ss2 = tl.load(i2ss2_ptr + n, mask=pmask, other=1.0).to(acc_t)
    acc = tl.zeros((BLOCK, CP), dtype=acc_t)
    for iy in tl.static_range(2 * R + 1):
        for ix in tl.static_range(2 * R + 1):
            dy = iy - R
            dx = ix - R
            if (not CIRCLE) or (dy * dy + dx * dx <= R * R):
                yy = _reflect(h + dy, H)
                xx = _reflect(w + dx, W)
                nb = tl.load(x_ptr + cptr + (yy * W + xx)[:, None], mask=m2, other=0.0).to(acc_t)
                wgt, coef = _tap_weight(nb - xc, dy * dy + dx * dx, i2ss2, isc2, L1)
                S = tl.sum(G * nb, axis=1) - b
                acc += coef * (S * wgt * isc2)[:, None]
    tl.store(grad_ptr + cptr + here, acc.to(grad_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _bilateral_bwd_neighbour_kernel(
    x_ptr, G_ptr, b_ptr, gpad_ptr, isc2_ptr, i2ss2_ptr,
    NPAD, H, W,
    C: tl.constexpr, CP: tl.constexpr, R: tl.constexpr, CIRCLE: tl.constexpr, L1: tl.constexpr,
    F64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_t = tl.float64 if F64 else tl.float32
    Hp = H + 2 * R
    Wp = W + 2 * R
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pmask = offs < NPAD
    hwp = Hp * Wp
    hw = H * W
    n = offs // hwp
    rem = offs % hwp
    py = rem // Wp - R  # padded position in image coordinates (may be outside)
    px = rem % Wp - R
    ch = tl.arange(0, CP)
    cm = (ch < C)[None, :]
    m2 = pmask[:, None] & cm
    cptr = (n * (C * hw))[:, None] + ch[None, :] * hw
    # the value seen at padded position P (reflect-101)
    xP = tl.load(x_ptr + cptr + (_reflect(py, H) * W + _reflect(px, W))[:, None], mask=m2, other=0.0).to(acc_t)
    isc2 = tl.load(isc2_ptr + n, mask=pmask, other=1.0).to(acc_t)
    i2ss2 = tl.load(i2ss2_ptr + n, mask=pmask, other=1.0).to(acc_t)
    acc = tl.zeros((BLOCK, CP), dtype=acc_t)
    for iy in tl.static_range(2 * R + 1):
        for ix in tl.static_range(2 * R + 1):
            dy = iy - R
            dx = ix - R
            if (not CIRCLE) or (dy * dy + dx * dx <= R * R):
                cy = py - dy  # the centre p whose tap (dy, dx) lands on P
                cx = px - dx
                valid = pmask & (cy >= 0) & (cy < H) & (cx >= 0) & (cx < W)
                vm = valid[:, None] & cm
                cidx = (tl.where(valid, cy, 0) * W + tl.where(valid, cx, 0))[:, None]
                xp = tl.load(x_ptr + cptr + cidx, mask=vm, other=0.0).to(acc_t)
                Gp = tl.load(G_ptr + cptr + cidx, mask=vm, other=0.0).to(acc_t)
                bp = tl.load(b_ptr + n * hw + tl.where(valid, cy, 0) * W + tl.where(valid, cx, 0), mask=valid, other=0.0).to(acc_t)
                wgt, coef = _tap_weight(xP - xp, dy * dy + dx * dx, i2ss2, isc2, L1)
                wgt = tl.where(valid, wgt, 0.0)
                S = tl.sum(Gp * xP, axis=1) - bp
                acc += wgt[:, None] * (Gp - coef * (S * isc2)[:, None])
    tl.store(gpad_ptr + (n * (C * hwp))[:, None] + ch[None, :] * hwp + rem[:, None], acc.to(gpad_ptr.dtype.element_ty), mask=m2)


def _launch_cfg(x: torch.Tensor) -> dict:
    c = x.shape[1]
    return {"C": c, "CP": triton.next_power_of_2(c), "F64": x.dtype == torch.float64, "BLOCK": BLOCK, "num_warps": NUM_WARPS}


def _forward(x, radius, inv_sc2, inv_2ss2, l1, circle, store_inv: bool):
    x = x.contiguous()
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_den = torch.empty((n, 1, h, w), dtype=acc_dtype, device=x.device) if store_inv else out
    npix = n * h * w
    grid = (triton.cdiv(npix, BLOCK),)
    _bilateral_fwd_kernel[grid](x, out, inv_den, inv_sc2, inv_2ss2, npix, h, w, R=radius, CIRCLE=circle, L1=l1,
                                STORE_INV=store_inv, **_launch_cfg(x))
    return out, inv_den


@torch.library.custom_op("robustkit::bilateral_fwd", mutates_args=())
def bilateral_fwd(x: torch.Tensor, radius: int, inv_sc2: torch.Tensor, inv_2ss2: torch.Tensor, l1: bool, circle: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One bilateral pass: returns ``(out, 1/D)``."""
    return _forward(x, radius, inv_sc2, inv_2ss2, l1, circle, True)


@bilateral_fwd.register_fake
def _(x, radius, inv_sc2, inv_2ss2, l1, circle):
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty_like(x), x.new_empty((x.shape[0], 1, x.shape[2], x.shape[3]), dtype=acc_dtype)


@torch.library.custom_op("robustkit::bilateral_bwd", mutates_args=())
def bilateral_bwd(grad_out: torch.Tensor, x: torch.Tensor, out: torch.Tensor, inv_den: torch.Tensor, radius: int,
                  inv_sc2: torch.Tensor, inv_2ss2: torch.Tensor, l1: bool, circle: bool) -> torch.Tensor:
    """Exact gradient of one bilateral pass w.r.t. ``x``."""
    x = x.contiguous()
    acc_dtype = inv_den.dtype
    G = (grad_out.to(acc_dtype) * inv_den).contiguous()
    b = (G * out.to(acc_dtype)).sum(1, keepdim=True).contiguous()
    n, c, h, w = x.shape
    cfg = _launch_cfg(x)
    grad_centre = torch.empty_like(x, dtype=acc_dtype)
    npix = n * h * w
    _bilateral_bwd_centre_kernel[(triton.cdiv(npix, BLOCK),)](
        x, G, b, grad_centre, inv_sc2, inv_2ss2, npix, h, w, R=radius, CIRCLE=circle, L1=l1, **cfg)
    gpad = torch.empty((n, c, h + 2 * radius, w + 2 * radius), dtype=acc_dtype, device=x.device)
    npad = n * (h + 2 * radius) * (w + 2 * radius)
    _bilateral_bwd_neighbour_kernel[(triton.cdiv(npad, BLOCK),)](
        x, G, b, gpad, inv_sc2, inv_2ss2, npad, h, w, R=radius, CIRCLE=circle, L1=l1, **cfg)
    return (grad_centre + _unpad_grad(gpad, x.shape, radius)).to(x.dtype)


@bilateral_bwd.register_fake
def _(grad_out, x, out, inv_den, radius, inv_sc2, inv_2ss2, l1, circle):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, radius, inv_sc2, inv_2ss2, l1, circle = inputs
    out, inv_den = output
    ctx.save_for_backward(x, out, inv_den, inv_sc2, inv_2ss2)
    ctx.cfg = (radius, l1, circle)


def _backward(ctx, grad_out, grad_inv_den):
    refuse_double_backward()
    x, out, inv_den, inv_sc2, inv_2ss2 = ctx.saved_tensors
    radius, l1, circle = ctx.cfg
    grad = bilateral_bwd(grad_out.contiguous(), x, out, inv_den, radius, inv_sc2, inv_2ss2, l1, circle)
    return grad, None, None, None, None, None


bilateral_fwd.register_autograd(_backward, setup_context=_setup_context)


_SCALAR_CACHE: dict[tuple, torch.Tensor] = {}


def _per_sample(v, n: int, x: torch.Tensor, power: float, scale: float) -> torch.Tensor:
    """``scale * v ** power`` as a length-n tensor on x's device (cached for scalar v: no launches)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(v, torch.Tensor):
        t = v.to(device=x.device, dtype=dt).reshape(-1)
        t = t.expand(n) if t.numel() == 1 else t
        return (t.pow(power) * scale).contiguous()
    key = (x.device, dt, n, float(v), power, scale)
    t = _SCALAR_CACHE.get(key)
    if t is None:
        if len(_SCALAR_CACHE) > 256:
            _SCALAR_CACHE.clear()
        t = _SCALAR_CACHE[key] = torch.full((n,), scale * float(v) ** power, device=x.device, dtype=dt)
    return t


def bilateral_filter_triton(x, kernel_size, sigma_color, sigma_space, distance="l1", window="circle"):
    """One bilateral pass on the Triton path (falls back to PyTorch when the radius exceeds the image)."""
    r = kernel_size // 2
    if r >= x.shape[-1] or r >= x.shape[-2]:
        from .bilateral_torch import bilateral_filter_torch

        return bilateral_filter_torch(x, kernel_size, sigma_color, sigma_space, distance, window)
    n = x.shape[0]
    isc2 = _per_sample(sigma_color, n, x, -2.0, 1.0)
    i2ss2 = _per_sample(sigma_space, n, x, -2.0, 0.5)
    if not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling():
        # eager inference: the same kernel without the custom-op dispatch (~0.1 ms a call on an
        # H100, more than the kernel itself at CIFAR sizes) and without writing 1/D
        return _forward(x, r, isc2, i2ss2, distance == "l1", window == "circle", False)[0]
    out, _ = bilateral_fwd(x, r, isc2, i2ss2, distance == "l1", window == "circle")
    return out
