"""Fused CPU bilateral filter: Numba kernels for the forward and the exact backward.

Why Numba (see ``docs/bilateral.md``): it ships as a wheel with its own LLVM, so the fused
kernel needs no C/C++ compiler on the user's machine (a C++ extension or ``torch.compile`` on
CPU do), it compiles for the host's vector unit (AVX2, AVX-512, NEON) and caches the machine
code on disk (``cache=True``), and its ``nogil`` functions run on plain Python threads, so no
second OpenMP/TBB runtime competes with PyTorch's. Where Numba is missing the dispatcher falls
back to the PyTorch tap loop (:mod:`.bilateral_torch`), which computes the same function.

Layout. Each work item (a sample and a block of output rows) copies the reflect-101 padded
rows it needs into a small local buffer, flat per channel (``C x rows*Wp``). A window tap
``(dy, dx)`` is then one flat offset ``o = dy*Wp + dx`` and the block of output rows is one
contiguous segment (the padding columns inside it are computed and discarded), so every inner
loop runs over a long unit-stride segment that LLVM vectorizes (AVX2/AVX-512/NEON: whatever
the host has). Taps come in pairs ``{+o, -o}`` with the same weight (``w_pq = w_qp``): one
loop computes the pair weights ``w(p, p + o)`` over the segment (colour distance over the
channels, spatial term, ``2^t``), and accumulation loops add both taps to the numerator and
denominator rows (for 3 channels three pairs per pass, the first pass starting from the centre
tap). Everything a tap touches is a row buffer that stays in L1/L2: one pass over the window
per output pixel, no per-tap tensors in memory, half the exponentials of a tap-by-tap loop.
Items are claimed one at a time from a shared atomic counter by ``torch.get_num_threads()``
threads (the caller and a small pool), each item written by exactly one thread.

The weight ``exp(-dist^2/(2 s_c^2) - |o|^2/(2 s_s^2))`` is computed as ``2^t`` with
``t = -kk dist^2 - sp_o`` (``kk = log2(e)/(2 s_c^2)``, ``sp_o = log2(e)|o|^2/(2 s_s^2)``). In
float32, ``2^t`` is a degree-5 polynomial on the fractional part times an exponent built from
bits (relative error 2.4e-7, vectorizes); weights with ``t < -64`` (below 2^-64 = 5.4e-20 of the centre's
weight 1) are exactly 0, so no arithmetic ever touches a denormal weight (several times slower
on x86, and common: most colour distances of a noisy image are that large). A NaN or infinite
neighbour gets weight 0 and ``0 * inf = NaN``, as on the PyTorch path. float64 uses
``math.exp`` (exact to libm, for gradcheck-grade results). fastmath flags: FMA contraction,
``nsz``, ``arcp``; no ``nnan``/``ninf`` (NaN and inf propagate) and no ``reassoc``.

Backward (the formula of ``docs/bilateral.md``, as a gather): with ``G = g/D`` and
``b = sum_c G out`` (both zero outside the image), every position ``u`` of the r-padded grid
gets ``gpad[u] = G_u + sum_{o != 0} w_{u,u+o} (G_{u+o} + coef_{u,u+o} (S_{u,u+o} + S_{u+o,u}))``,
``S_uv = sum_c G_u x_v - b_u``; ``coef = (x_v - x_u)/s_c^2`` (L2) or
``dist sign(x_v - x_u)/s_c^2`` (L1). The weight and ``S_{u,v} + S_{v,u}`` are symmetric, so
again one loop per pair of taps computes them and a second applies both taps. Inputs come from
2r-padded local rows (x reflected, G and b zero outside the image); ``gpad`` is folded back
onto the image (reflect-101). Each output position is written by one thread: no atomics, no
races. Saved state is ``x``, ``out`` and ``1/D``, as on the PyTorch path (the autograd function
is shared: :class:`.bilateral_torch.BilateralFunction`); without autograd the forward writes no
``1/D``.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .bilateral_torch import apply_bilateral

try:  # optional: without Numba the dispatcher uses the PyTorch path
    import numba
    from numba import njit
    from numba.extending import overload

    NUMBA_ERROR: str | None = None
except Exception as exc:  # ImportError, or an llvmlite that fails to load
    numba = None
    NUMBA_ERROR = f"{type(exc).__name__}: {exc}"

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# 2^f on [-1/2, 1/2]: degree-5 Chebyshev interpolant in the power basis (relative error 1.0e-7
# in exact arithmetic, 2.4e-7 evaluated in float32: two float32 ulps).
EXP2_POLY = (1.0000000754548972, 0.6931471880262324, 0.24022107485308009, 0.05550357114213535,
             0.00967603191832621, 0.0013390863366433998)
# float32 weights 2^t with t below this are flushed to zero (see the module docstring): the
# kernels never make denormal weights, whose arithmetic is several times slower on x86.
EXP2_FLUSH32 = -64.0
# Rows per work item: about this many padded positions per flat segment keeps the row buffers
# (C + 4 of them) and the input rows the segment reads in L2 on both test machines' cores.
SEGMENT = 8192
# Below this many (pixels x taps) a call runs on the calling thread only (thread hand-off costs
# tens of microseconds).
SERIAL_WORK = 1 << 16

# fastmath: contraction into FMA and no signed-zero / reciprocal strictness; no 'nnan'/'ninf'
# (NaN inputs propagate) and no 'reassoc' (results do not depend on the vector width).
_FASTMATH = {"contract", "nsz", "arcp"}


def available() -> bool:
    """Whether the Numba kernels can be used (Numba importable, JIT not disabled)."""
    return numba is not None and not numba.config.DISABLE_JIT


if numba is not None:
    import llvmlite.binding as _llvm
    from llvmlite import ir as _ir
    from numba.core import types as _t
    from numba.extending import intrinsic

    # The fused loops read 6-12 rows and update 3-4 accumulator rows: LLVM proves them disjoint
    # with runtime checks, and gives up vectorizing above 8 such checks (its default). Raising
    # the limit (process-wide; it only lets more loops vectorize) makes these loops SIMD.
    _llvm.set_option("", "-runtime-memory-check-threshold=4096")
    _llvm.set_option("", "-vectorize-memory-check-threshold=4096")

    @intrinsic
    def _f32_from_bits(typingctx, v):
        """Reinterpret int32 bits as a float32 (a no-op in vector registers)."""
        if v != _t.int32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _ir.FloatType())

        return _t.float32(_t.int32), codegen

    @intrinsic
    def _fetch_add(typingctx, arr, idx):
        """Atomically ``arr[idx] += 1``, returning the old value (int64 array)."""
        if not (isinstance(arr, _t.Array) and arr.dtype == _t.int64):
            return None

        def codegen(context, builder, signature, args):
            from numba.core import cgutils

            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
            return builder.atomic_rmw("add", ptr, context.get_constant(_t.int64, 1), "seq_cst")

        return _t.int64(arr, _t.intp), codegen

    def _exp2(t, lo):  # pragma: no cover - replaced by the overload below
        raise NotImplementedError

    @overload(_exp2, jit_options={"fastmath": _FASTMATH})
    def _exp2_impl(t, lo):
        """``2^t``, flushed to 0 below ``t = lo``: float32 as polynomial x exponent bits
        (vectorizes), float64 via libm. A NaN ``t`` gives NaN."""
        if t == _t.float32:
            c0, c1, c2, c3, c4, c5 = (np.float32(v) for v in EXP2_POLY)
            mant = np.float32(8388608.0)  # 2^23
            bias = np.float32(1065353216.0)  # 127 * 2^23, the bits of 1.0
            zero = np.float32(0.0)

            def impl32(t, lo):
                # lo >= -126 (kernels: EXP2_FLUSH32): 2^k is a normal number; below lo the value
                # is discarded for 0. f from the unclamped t, so a NaN t gives NaN.
                k = np.rint(max(lo, t))  # max(lo, NaN) is lo: the conversion is always defined
                f = t - k  # in [-1/2, 1/2] where t >= lo
                p = c5 * f + c4
                p = p * f + c3
                p = p * f + c2
                p = p * f + c1
                p = p * f + c0
                w = p * _f32_from_bits(np.int32(k * mant + bias))  # p * 2^k, exact
                return zero if t < lo else w

            return impl32
        if isinstance(t, _t.Float):
            return lambda t, lo: 0.0 if t < lo else math.exp(t * LN2)
        return None

    # Indexing note: numba wraps negative indices around, and an index ``offset + j`` with a
    # signed runtime offset keeps that check in the loop and blocks vectorization (6x slower
    # copies here). Offsets are therefore unsigned (np.uintp) wherever a loop adds them.
    @njit(nogil=True)
    def _load_rows(x, n, i0, i1, iy, ix, xl):
        """Reflect-101 padded rows ``i0 <= i < i1`` of sample n into the local buffer
        ``xl[c, (i - i0) * Wp + j] = x[n, c, iy[i], ix[j]]``."""
        C, W = x.shape[1], x.shape[3]
        Wp = ix.shape[0]
        r = (Wp - W) // 2
        uW, ur, uWp = np.uintp(W), np.uintp(r), np.uintp(Wp)
        for c in range(C):
            xc = x[n, c]
            lc = xl[c]
            for i in range(i0, i1):
                src = xc[iy[i]]
                o = np.uintp(i - i0) * uWp
                for j in range(uW):  # inside columns: ix[r + j] = j
                    lc[o + ur + j] = src[j]
                for j in range(ur):
                    lc[o + j] = src[ix[j]]
                    lc[o + ur + uW + j] = src[ix[ur + uW + j]]

    @njit(nogil=True)
    def _load_rows3(x, n, i0, i1, iy, ix, xl):
        """:func:`_load_rows` for 3 channels, one loop per row (rows of 32 values are short: the
        loop overhead, not the copy, is most of the cost)."""
        W = x.shape[3]
        Wp = ix.shape[0]
        r = (Wp - W) // 2
        uW, ur, uWp = np.uintp(W), np.uintp(r), np.uintp(Wp)
        l0, l1, l2 = xl[0], xl[1], xl[2]
        for i in range(i0, i1):
            y = iy[i]
            s0, s1, s2 = x[n, 0, y], x[n, 1, y], x[n, 2, y]
            o = np.uintp(i - i0) * uWp
            d0, d1, d2 = l0[o + ur : o + ur + uW], l1[o + ur : o + ur + uW], l2[o + ur : o + ur + uW]
            for j in range(uW):  # inside columns: ix[r + j] = j
                d0[j] = s0[j]
                d1[j] = s1[j]
                d2[j] = s2[j]
            for j in range(ur):
                a, b = ix[j], ix[ur + uW + j]
                l0[o + j], l0[o + ur + uW + j] = s0[a], s0[b]
                l1[o + j], l1[o + ur + uW + j] = s1[a], s1[b]
                l2[o + j], l2[o + ur + uW + j] = s2[a], s2[b]

    @njit(nogil=True, fastmath=_FASTMATH)
    def _load_grad_rows(g, inv_den, out, n, i0, i1, r2, Gl, bl):
        """Rows ``i0 <= i < i1`` of the 2r-padded grids ``G = g/D`` and ``b = sum_c G out``
        (zero outside the image) into the local buffers ``Gl`` (C x rows*Wq) and ``bl``."""
        C, H, W = g.shape[1], g.shape[2], g.shape[3]
        Wq = W + 2 * r2
        uW, ur, uWq = np.uintp(W), np.uintp(r2), np.uintp(Wq)
        for i in range(i0, i1):
            y = i - r2
            lb = np.uintp(i - i0) * uWq
            for j in range(uWq):
                bl[lb + j] = 0
            if y < 0 or y >= H:
                for c in range(C):
                    Gc = Gl[c]
                    for j in range(uWq):
                        Gc[lb + j] = 0
                continue
            idr = inv_den[n, 0, y]
            for c in range(C):
                grow = g[n, c, y]
                orow = out[n, c, y]
                Gc = Gl[c]
                for j in range(ur):
                    Gc[lb + j] = 0
                    Gc[lb + ur + uW + j] = 0
                for j in range(uW):
                    v = grow[j] * idr[j]
                    Gc[lb + ur + j] = v
                    bl[lb + ur + j] += v * orow[j]

    # ---------------------------------------------------------- forward, one pair of taps
    # A half offset o > 0 (flat) stands for the taps +o and -o: the pair weights
    # wb[i] = w(p, p + o) over the pair starts p = pstart + i, i < M = L + o (pstart = base - o),
    # serve the centre u = base + i twice: tap +o uses wb[i + o], tap -o uses wb[i].
    # acc rows: numerators of the C channels, then the denominator.
    @njit(nogil=True, fastmath=_FASTMATH)
    def _pair_weights3(xn, pstart, o, M, k2, s, low, l1, wb):
        """``wb[i] = w(p, p + o)`` for the pair starts ``p = pstart + i``, ``i < M`` (3 channels)."""
        u0, u1, u2 = xn[0, pstart : pstart + M], xn[1, pstart : pstart + M], xn[2, pstart : pstart + M]
        q = pstart + o
        v0, v1, v2 = xn[0, q : q + M], xn[1, q : q + M], xn[2, q : q + M]
        if l1:
            for i in range(M):
                d = abs(v0[i] - u0[i]) + abs(v1[i] - u1[i]) + abs(v2[i] - u2[i])
                wb[i] = _exp2(-(k2 * d * d) - s, low)
        else:
            for i in range(M):
                e0, e1, e2 = v0[i] - u0[i], v1[i] - u1[i], v2[i] - u2[i]
                wb[i] = _exp2(-(k2 * (e0 * e0 + e1 * e1 + e2 * e2)) - s, low)

    @njit(nogil=True, fastmath=_FASTMATH)
    def _fwd_pair3(xn, pstart, o, M, L, k2, s, low, l1, acc, wb):
        _pair_weights3(xn, pstart, o, M, k2, s, low, l1, wb)
        base = pstart + o
        f0, f1, f2 = xn[0, base + o : base + o + L], xn[1, base + o : base + o + L], xn[2, base + o : base + o + L]
        b0, b1, b2 = xn[0, pstart : pstart + L], xn[1, pstart : pstart + L], xn[2, pstart : pstart + L]  # x[u - o]
        wf = wb[o : o + L]
        a0, a1, a2, den = acc[0], acc[1], acc[2], acc[3]
        for i in range(L):
            x = wf[i]
            y = wb[i]
            den[i] += x + y
            a0[i] += x * f0[i] + y * b0[i]
            a1[i] += x * f1[i] + y * b1[i]
            a2[i] += x * f2[i] + y * b2[i]

    # Several pairs per pass over the accumulators: the pass is bound by loads and stores, and
    # each extra pair adds 8 loads to the 4 loads + 4 stores of the accumulator rows. Three
    # pairs per pass (generated by hand; 28 streams) measured 25% less time per pair than one.
    @njit(nogil=True, fastmath=_FASTMATH)
    def _acc3_g1(xn, base, L, o1, wb, acc, first, one):
        """Both taps of 1 pair of offsets (o1) (weights in ``wb[:1]``) into ``acc``, 3 channels;
        ``first``: start from the centre tap (weight 1) instead of adding to ``acc``."""
        p1, q1 = base - o1, base + o1
        w1f, w1b = wb[0, o1 : o1 + L], wb[0, :L]
        f10, f11, f12 = xn[0, q1 : q1 + L], xn[1, q1 : q1 + L], xn[2, q1 : q1 + L]
        b10, b11, b12 = xn[0, p1 : p1 + L], xn[1, p1 : p1 + L], xn[2, p1 : p1 + L]
        a0, a1, a2, den = acc[0], acc[1], acc[2], acc[3]
        if first:
            c0, c1, c2 = xn[0, base : base + L], xn[1, base : base + L], xn[2, base : base + L]
            for i in range(L):
                x1, y1 = w1f[i], w1b[i]
                den[i] = one + ((x1 + y1))
                a0[i] = c0[i] + ((x1 * f10[i] + y1 * b10[i]))
                a1[i] = c1[i] + ((x1 * f11[i] + y1 * b11[i]))
                a2[i] = c2[i] + ((x1 * f12[i] + y1 * b12[i]))
        else:
            for i in range(L):
                x1, y1 = w1f[i], w1b[i]
                den[i] += (x1 + y1)
                a0[i] += (x1 * f10[i] + y1 * b10[i])
                a1[i] += (x1 * f11[i] + y1 * b11[i])
                a2[i] += (x1 * f12[i] + y1 * b12[i])

    @njit(nogil=True, fastmath=_FASTMATH)
    def _acc3_g2(xn, base, L, o1, o2, wb, acc, first, one):
        """Both taps of 2 pairs of offsets (o1, o2) (weights in ``wb[:2]``) into ``acc``, 3 channels;
        ``first``: start from the centre tap (weight 1) instead of adding to ``acc``."""
        p1, q1 = base - o1, base + o1
        w1f, w1b = wb[0, o1 : o1 + L], wb[0, :L]
        f10, f11, f12 = xn[0, q1 : q1 + L], xn[1, q1 : q1 + L], xn[2, q1 : q1 + L]
        b10, b11, b12 = xn[0, p1 : p1 + L], xn[1, p1 : p1 + L], xn[2, p1 : p1 + L]
        p2, q2 = base - o2, base + o2
        w2f, w2b = wb[1, o2 : o2 + L], wb[1, :L]
        f20, f21, f22 = xn[0, q2 : q2 + L], xn[1, q2 : q2 + L], xn[2, q2 : q2 + L]
        b20, b21, b22 = xn[0, p2 : p2 + L], xn[1, p2 : p2 + L], xn[2, p2 : p2 + L]
        a0, a1, a2, den = acc[0], acc[1], acc[2], acc[3]
        if first:
            c0, c1, c2 = xn[0, base : base + L], xn[1, base : base + L], xn[2, base : base + L]
            for i in range(L):
                x1, y1, x2, y2 = w1f[i], w1b[i], w2f[i], w2b[i]
                den[i] = one + ((x1 + y1) + (x2 + y2))
                a0[i] = c0[i] + ((x1 * f10[i] + y1 * b10[i]) + (x2 * f20[i] + y2 * b20[i]))
                a1[i] = c1[i] + ((x1 * f11[i] + y1 * b11[i]) + (x2 * f21[i] + y2 * b21[i]))
                a2[i] = c2[i] + ((x1 * f12[i] + y1 * b12[i]) + (x2 * f22[i] + y2 * b22[i]))
        else:
            for i in range(L):
                x1, y1, x2, y2 = w1f[i], w1b[i], w2f[i], w2b[i]
                den[i] += (x1 + y1) + (x2 + y2)
                a0[i] += (x1 * f10[i] + y1 * b10[i]) + (x2 * f20[i] + y2 * b20[i])
                a1[i] += (x1 * f11[i] + y1 * b11[i]) + (x2 * f21[i] + y2 * b21[i])
                a2[i] += (x1 * f12[i] + y1 * b12[i]) + (x2 * f22[i] + y2 * b22[i])

    @njit(nogil=True, fastmath=_FASTMATH)
    def _acc3_g3(xn, base, L, o1, o2, o3, wb, acc, first, one):
        """Both taps of 3 pairs of offsets (o1, o2, o3) (weights in ``wb[:3]``) into ``acc``, 3 channels;
        ``first``: start from the centre tap (weight 1) instead of adding to ``acc``."""
        p1, q1 = base - o1, base + o1
        w1f, w1b = wb[0, o1 : o1 + L], wb[0, :L]
        f10, f11, f12 = xn[0, q1 : q1 + L], xn[1, q1 : q1 + L], xn[2, q1 : q1 + L]
        b10, b11, b12 = xn[0, p1 : p1 + L], xn[1, p1 : p1 + L], xn[2, p1 : p1 + L]
        p2, q2 = base - o2, base + o2
        w2f, w2b = wb[1, o2 : o2 + L], wb[1, :L]
        f20, f21, f22 = xn[0, q2 : q2 + L], xn[1, q2 : q2 + L], xn[2, q2 : q2 + L]
        b20, b21, b22 = xn[0, p2 : p2 + L], xn[1, p2 : p2 + L], xn[2, p2 : p2 + L]
        p3, q3 = base - o3, base + o3
        w3f, w3b = wb[2, o3 : o3 + L], wb[2, :L]
        f30, f31, f32 = xn[0, q3 : q3 + L], xn[1, q3 : q3 + L], xn[2, q3 : q3 + L]
        b30, b31, b32 = xn[0, p3 : p3 + L], xn[1, p3 : p3 + L], xn[2, p3 : p3 + L]
        a0, a1, a2, den = acc[0], acc[1], acc[2], acc[3]
        if first:
            c0, c1, c2 = xn[0, base : base + L], xn[1, base : base + L], xn[2, base : base + L]
            for i in range(L):
                x1, y1, x2, y2, x3, y3 = w1f[i], w1b[i], w2f[i], w2b[i], w3f[i], w3b[i]
                den[i] = one + ((x1 + y1) + (x2 + y2) + (x3 + y3))
                a0[i] = c0[i] + ((x1 * f10[i] + y1 * b10[i]) + (x2 * f20[i] + y2 * b20[i]) + (x3 * f30[i] + y3 * b30[i]))
                a1[i] = c1[i] + ((x1 * f11[i] + y1 * b11[i]) + (x2 * f21[i] + y2 * b21[i]) + (x3 * f31[i] + y3 * b31[i]))
                a2[i] = c2[i] + ((x1 * f12[i] + y1 * b12[i]) + (x2 * f22[i] + y2 * b22[i]) + (x3 * f32[i] + y3 * b32[i]))
        else:
            for i in range(L):
                x1, y1, x2, y2, x3, y3 = w1f[i], w1b[i], w2f[i], w2b[i], w3f[i], w3b[i]
                den[i] += (x1 + y1) + (x2 + y2) + (x3 + y3)
                a0[i] += (x1 * f10[i] + y1 * b10[i]) + (x2 * f20[i] + y2 * b20[i]) + (x3 * f30[i] + y3 * b30[i])
                a1[i] += (x1 * f11[i] + y1 * b11[i]) + (x2 * f21[i] + y2 * b21[i]) + (x3 * f31[i] + y3 * b31[i])
                a2[i] += (x1 * f12[i] + y1 * b12[i]) + (x2 * f22[i] + y2 * b22[i]) + (x3 * f32[i] + y3 * b32[i])

    @njit(nogil=True, fastmath=_FASTMATH)
    def _fwd_pair1(xn, pstart, o, M, L, k2, s, low, l1, acc, wb):
        u0 = xn[0, pstart : pstart + M]
        v0 = xn[0, pstart + o : pstart + o + M]
        for i in range(M):  # one channel: the L1 and L2 distances agree
            d = v0[i] - u0[i]
            wb[i] = _exp2(-(k2 * d * d) - s, low)
        base = pstart + o
        f0 = xn[0, base + o : base + o + L]
        wf = wb[o : o + L]
        a0, den = acc[0], acc[1]
        for i in range(L):
            x = wf[i]
            y = wb[i]
            den[i] += x + y
            a0[i] += x * f0[i] + y * u0[i]

    @njit(nogil=True, fastmath=_FASTMATH)
    def _fwd_pair_any(xn, pstart, o, M, L, k2, s, low, l1, acc, wb):
        C = xn.shape[0]
        for i in range(M):
            wb[i] = 0
        for c in range(C):
            u = xn[c, pstart : pstart + M]
            v = xn[c, pstart + o : pstart + o + M]
            if l1:
                for i in range(M):
                    wb[i] += abs(v[i] - u[i])
            else:
                for i in range(M):
                    e = v[i] - u[i]
                    wb[i] += e * e
        if l1:
            for i in range(M):
                d = wb[i]
                wb[i] = _exp2(-(k2 * d * d) - s, low)
        else:
            for i in range(M):
                wb[i] = _exp2(-(k2 * wb[i]) - s, low)
        base = pstart + o
        wf = wb[o : o + L]
        den = acc[C]
        for i in range(L):
            den[i] += wf[i] + wb[i]
        for c in range(C):
            f = xn[c, base + o : base + o + L]
            b = xn[c, pstart : pstart + L]
            a = acc[c]
            for i in range(L):
                a[i] += wf[i] * f[i] + wb[i] * b[i]

    def _fwd_pair(xn, pstart, o, M, L, k2, s, low, l1, acc, wb):  # pragma: no cover - overloaded
        raise NotImplementedError

    @overload(_fwd_pair)
    def _fwd_pair_impl(xn, pstart, o, M, L, k2, s, low, l1, acc, wb):
        """float32: loops fused for 1 and 3 channels; float64 (tests, gradcheck): generic loops."""
        if xn.dtype == _t.float32:
            def impl(xn, pstart, o, M, L, k2, s, low, l1, acc, wb):
                C = xn.shape[0]
                if C == 3:
                    _fwd_pair3(xn, pstart, o, M, L, k2, s, low, l1, acc, wb)
                elif C == 1:
                    _fwd_pair1(xn, pstart, o, M, L, k2, s, low, l1, acc, wb)
                else:
                    _fwd_pair_any(xn, pstart, o, M, L, k2, s, low, l1, acc, wb)

            return impl
        return lambda xn, pstart, o, M, L, k2, s, low, l1, acc, wb: _fwd_pair_any(xn, pstart, o, M, L, k2, s, low, l1, acc, wb)

    @njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
    def _forward_items(x, r, iy, ix, offs, sp, kk, l1, out, inv_den, save, rows, consts, counter, total):
        """Forward on work items (claimed from ``counter``, ``total`` of them): item = (sample, block of ``rows`` output rows).

        ``x``: N x C x H x W; ``iy``/``ix``: reflect-101 source rows/columns of the padded
        grid; ``offs``: flat half offsets on the padded grid (one per pair of opposite taps,
        > 0); ``sp``: N x T spatial exponents; ``kk``: N colour scales; ``out``: N x C x H x W;
        ``inv_den``: N x 1 x H x W, written only if ``save`` (the backward's state).
        """
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        Wp = W + 2 * r
        T = offs.shape[0]
        blocks = (H + rows - 1) // rows
        Lmax = (rows - 1) * Wp + W
        omax = r * Wp + r
        xl = np.empty((C, (rows + 2 * r) * Wp), x.dtype)
        acc = np.empty((C + 1, Lmax), x.dtype)
        wb = np.empty((3, Lmax + omax), x.dtype)
        low = consts[0]
        one = consts[1]
        base = r * Wp + r  # output row y0, column 0 in the local padded rows
        uW, uWp = np.uintp(W), np.uintp(Wp)
        while True:  # claim items one at a time (shared counter; see _run)
            it = _fetch_add(counter, 0)
            if it >= total:
                break
            n = it // blocks
            y0 = (it % blocks) * rows
            y1 = min(H, y0 + rows)
            L = (y1 - y0 - 1) * Wp + W
            if C == 3:
                _load_rows3(x, n, y0, y1 + 2 * r, iy, ix, xl)
            else:
                _load_rows(x, n, y0, y1 + 2 * r, iy, ix, xl)
            k2 = kk[n]
            den = acc[C]
            if C == 3 and T > 0:  # groups of up to 3 pairs per pass, the first from the centre tap
                t = 0
                while t < T:
                    g = min(3, T - t)
                    for j in range(g):
                        o = offs[t + j]
                        _pair_weights3(xl, base - o, o, L + o, k2, sp[n, t + j], low, l1, wb[j])
                    if g == 3:
                        _acc3_g3(xl, base, L, offs[t], offs[t + 1], offs[t + 2], wb, acc, t == 0, one)
                    elif g == 2:
                        _acc3_g2(xl, base, L, offs[t], offs[t + 1], wb, acc, t == 0, one)
                    else:
                        _acc3_g1(xl, base, L, offs[t], wb, acc, t == 0, one)
                    t += g
            else:
                for c in range(C):  # the centre tap has weight 1
                    src = xl[c, base : base + L]
                    a = acc[c]
                    for i in range(L):
                        a[i] = src[i]
                for i in range(L):
                    den[i] = one
                for t in range(T):
                    o = offs[t]
                    _fwd_pair(xl, base - o, o, L + o, L, k2, sp[n, t], low, l1, acc, wb[0])
            if C == 3 and not save:  # one loop per row: 1/D and the three channels
                for y in range(y0, y1):
                    rb = np.uintp(y - y0) * uWp
                    drow = den[rb : rb + uW]
                    a0, a1, a2 = acc[0, rb : rb + uW], acc[1, rb : rb + uW], acc[2, rb : rb + uW]
                    o0, o1, o2 = out[n, 0, y], out[n, 1, y], out[n, 2, y]
                    for j in range(uW):
                        idn = one / drow[j]
                        o0[j] = a0[j] * idn
                        o1[j] = a1[j] * idn
                        o2[j] = a2[j] * idn
            else:
                for i in range(L):
                    den[i] = one / den[i]
                for y in range(y0, y1):
                    rb = np.uintp(y - y0) * uWp
                    drow = den[rb : rb + uW]
                    if save:
                        idr = inv_den[n, 0, y]
                        for j in range(uW):
                            idr[j] = drow[j]
                    for c in range(C):
                        arow = acc[c, rb : rb + uW]
                        orow = out[n, c, y]
                        for j in range(uW):
                            orow[j] = arow[j] * drow[j]
            _fetch_add(counter, 1)  # done

    # ---------------------------------------------------------- backward
    # One pair of taps of the gather. Pass 1, over the pair starts p = pstart + i (i < M):
    # wb[i] = w(p, p + o) and tb[i] = w (S_pq + S_qp) / s_c^2 (times dist for L1), q = p + o.
    # Pass 2, over the centres u = base + i (i < L), for both taps:
    # acc_c[u] += w G_c[v] + coef_c(u, v) t, v = u + o (index i + o) and v = u - o (index i),
    # coef_c(u, v) = sign(x_c[v] - x_c[u]) (L1) or x_c[v] - x_c[u] (L2).
    @njit(nogil=True, fastmath=_FASTMATH)
    def _bwd_pair3(xn, Gn, bn_, pstart, o, M, L, k2, s, c2, low, zero, l1, acc, wb, tb):
        q = pstart + o
        u0, u1, u2 = xn[0, pstart : pstart + M], xn[1, pstart : pstart + M], xn[2, pstart : pstart + M]
        v0, v1, v2 = xn[0, q : q + M], xn[1, q : q + M], xn[2, q : q + M]
        g0, g1, g2 = Gn[0, pstart : pstart + M], Gn[1, pstart : pstart + M], Gn[2, pstart : pstart + M]
        h0, h1, h2 = Gn[0, q : q + M], Gn[1, q : q + M], Gn[2, q : q + M]
        bu = bn_[pstart : pstart + M]
        bv = bn_[q : q + M]
        if l1:
            for i in range(M):
                p0, p1, p2 = u0[i], u1[i], u2[i]
                r0, r1, r2 = v0[i], v1[i], v2[i]
                d = abs(r0 - p0) + abs(r1 - p1) + abs(r2 - p2)
                ss = g0[i] * r0 + g1[i] * r1 + g2[i] * r2 + h0[i] * p0 + h1[i] * p1 + h2[i] * p2 - bu[i] - bv[i]
                w = _exp2(-(k2 * d * d) - s, low)
                wb[i] = w
                tb[i] = w * ss * c2 * d
        else:
            for i in range(M):
                p0, p1, p2 = u0[i], u1[i], u2[i]
                r0, r1, r2 = v0[i], v1[i], v2[i]
                e0, e1, e2 = r0 - p0, r1 - p1, r2 - p2
                ss = g0[i] * r0 + g1[i] * r1 + g2[i] * r2 + h0[i] * p0 + h1[i] * p1 + h2[i] * p2 - bu[i] - bv[i]
                w = _exp2(-(k2 * (e0 * e0 + e1 * e1 + e2 * e2)) - s, low)
                wb[i] = w
                tb[i] = w * ss * c2
        # centres u = q + i: x[u] = v*, x[u - o] = u*, G[u - o] = g*; x[u + o], G[u + o] below
        base2 = q + o
        f0, f1, f2 = xn[0, base2 : base2 + L], xn[1, base2 : base2 + L], xn[2, base2 : base2 + L]
        k0, k1, k2_ = Gn[0, base2 : base2 + L], Gn[1, base2 : base2 + L], Gn[2, base2 : base2 + L]
        wf = wb[o : o + L]
        tf = tb[o : o + L]
        a0, a1, a2 = acc[0], acc[1], acc[2]
        if l1:
            for i in range(L):
                x, y, tx, ty = wf[i], wb[i], tf[i], tb[i]
                c0, c1, c2x = v0[i], v1[i], v2[i]
                e0, e1, e2 = f0[i] - c0, f1[i] - c1, f2[i] - c2x
                d0, d1, d2 = u0[i] - c0, u1[i] - c1, u2[i] - c2x
                a0[i] += (x * k0[i] + y * g0[i] + (tx if e0 > zero else (-tx if e0 < zero else zero))
                          + (ty if d0 > zero else (-ty if d0 < zero else zero)))
                a1[i] += (x * k1[i] + y * g1[i] + (tx if e1 > zero else (-tx if e1 < zero else zero))
                          + (ty if d1 > zero else (-ty if d1 < zero else zero)))
                a2[i] += (x * k2_[i] + y * g2[i] + (tx if e2 > zero else (-tx if e2 < zero else zero))
                          + (ty if d2 > zero else (-ty if d2 < zero else zero)))
        else:
            for i in range(L):
                x, y, tx, ty = wf[i], wb[i], tf[i], tb[i]
                c0, c1, c2x = v0[i], v1[i], v2[i]
                a0[i] += x * k0[i] + y * g0[i] + tx * (f0[i] - c0) + ty * (u0[i] - c0)
                a1[i] += x * k1[i] + y * g1[i] + tx * (f1[i] - c1) + ty * (u1[i] - c1)
                a2[i] += x * k2_[i] + y * g2[i] + tx * (f2[i] - c2x) + ty * (u2[i] - c2x)

    @njit(nogil=True, fastmath=_FASTMATH)
    def _bwd_pair_any(xn, Gn, bn_, pstart, o, M, L, k2, s, c2, low, zero, l1, acc, wb, tb):
        C = xn.shape[0]
        q = pstart + o
        bu = bn_[pstart : pstart + M]
        bv = bn_[q : q + M]
        for i in range(M):
            wb[i] = zero  # the distance, then the weight
            tb[i] = -(bu[i] + bv[i])  # S_pq + S_qp, then t
        for c in range(C):
            xu = xn[c, pstart : pstart + M]
            xv = xn[c, q : q + M]
            gu = Gn[c, pstart : pstart + M]
            gv = Gn[c, q : q + M]
            for i in range(M):
                e = xv[i] - xu[i]
                wb[i] += abs(e) if l1 else e * e
                tb[i] += gu[i] * xv[i] + gv[i] * xu[i]
        if l1:
            for i in range(M):
                d = wb[i]
                w = _exp2(-(k2 * d * d) - s, low)
                wb[i] = w
                tb[i] = w * tb[i] * c2 * d
        else:
            for i in range(M):
                w = _exp2(-(k2 * wb[i]) - s, low)
                wb[i] = w
                tb[i] = w * tb[i] * c2
        base = q
        wf = wb[o : o + L]
        tf = tb[o : o + L]
        for c in range(C):
            xc = xn[c, base : base + L]
            xf = xn[c, base + o : base + o + L]
            xb = xn[c, pstart : pstart + L]
            gf = Gn[c, base + o : base + o + L]
            gb = Gn[c, pstart : pstart + L]
            a = acc[c]
            if l1:
                for i in range(L):
                    e = xf[i] - xc[i]
                    d = xb[i] - xc[i]
                    tx, ty = tf[i], tb[i]
                    a[i] += (wf[i] * gf[i] + wb[i] * gb[i] + (tx if e > zero else (-tx if e < zero else zero))
                             + (ty if d > zero else (-ty if d < zero else zero)))
            else:
                for i in range(L):
                    a[i] += wf[i] * gf[i] + wb[i] * gb[i] + tf[i] * (xf[i] - xc[i]) + tb[i] * (xb[i] - xc[i])

    def _bwd_pair(xn, Gn, bn_, pstart, o, M, L, k2, s, c2, low, zero, l1, acc, wb, tb):  # pragma: no cover
        raise NotImplementedError

    @overload(_bwd_pair)
    def _bwd_pair_impl(xn, Gn, bn_, pstart, o, M, L, k2, s, c2, low, zero, l1, acc, wb, tb):
        """float32: loops fused for 3 channels; otherwise (and float64) generic loops."""
        if xn.dtype == _t.float32:
            def impl(xn, Gn, bn_, pstart, o, M, L, k2, s, c2, low, zero, l1, acc, wb, tb):
                if xn.shape[0] == 3:
                    _bwd_pair3(xn, Gn, bn_, pstart, o, M, L, k2, s, c2, low, zero, l1, acc, wb, tb)
                else:
                    _bwd_pair_any(xn, Gn, bn_, pstart, o, M, L, k2, s, c2, low, zero, l1, acc, wb, tb)

            return impl
        return (lambda xn, Gn, bn_, pstart, o, M, L, k2, s, c2, low, zero, l1, acc, wb, tb:
                _bwd_pair_any(xn, Gn, bn_, pstart, o, M, L, k2, s, c2, low, zero, l1, acc, wb, tb))

    @njit(nogil=True, cache=True, fastmath=_FASTMATH)
    def _backward_items(x, g, inv_den, out, r, iy2, ix2, offs, sp, kk, cf, l1, gpad, rows, consts, counter, total):
        """Padded gradient on work items (claimed from ``counter``): item = (sample, block of ``rows`` rows of the
        r-padded grid). ``x``, ``g``, ``out``: N x C x H x W, ``inv_den``: N x 1 x H x W;
        ``iy2``/``ix2``: reflect-101 source rows/columns of the 2r-padded grid, on which ``offs``
        are flat; ``gpad``: N x C x (H+2r) x (W+2r); ``cf``: N values of ``1/s_c^2``."""
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        Wq = W + 4 * r
        Hr, Wr = H + 2 * r, W + 2 * r
        T = offs.shape[0]
        blocks = (Hr + rows - 1) // rows
        Lmax = (rows - 1) * Wq + Wr
        omax = r * Wq + r
        nloc = (rows + 2 * r) * Wq
        xl = np.empty((C, nloc), x.dtype)
        Gl = np.empty((C, nloc), x.dtype)
        bl = np.empty(nloc, x.dtype)
        acc = np.empty((C, Lmax), x.dtype)
        wb = np.empty(Lmax + omax, x.dtype)
        tb = np.empty(Lmax + omax, x.dtype)
        low = consts[0]
        zero = consts[2]
        base = r * Wq + r  # r-padded row z0, column 0 in the local 2r-padded rows
        uWq, uWr = np.uintp(Wq), np.uintp(Wr)
        while True:  # claim items one at a time (shared counter; see _run)
            it = _fetch_add(counter, 0)
            if it >= total:
                break
            n = it // blocks
            z0 = (it % blocks) * rows
            z1 = min(Hr, z0 + rows)
            L = (z1 - z0 - 1) * Wq + Wr
            _load_rows(x, n, z0, z1 + 2 * r, iy2, ix2, xl)
            _load_grad_rows(g, inv_den, out, n, z0, z1 + 2 * r, 2 * r, Gl, bl)
            k2 = kk[n]
            c2 = cf[n]
            for c in range(C):  # the centre tap: weight 1, no weight derivative
                src = Gl[c, base : base + L]
                a = acc[c]
                for i in range(L):
                    a[i] = src[i]
            for t in range(T):
                o = offs[t]
                _bwd_pair(xl, Gl, bl, base - o, o, L + o, L, k2, sp[n, t], c2, low, zero, l1, acc, wb, tb)
            for z in range(z0, z1):
                rb = np.uintp(z - z0) * uWq
                for c in range(C):
                    a = acc[c]
                    orow = gpad[n, c, z]
                    for j in range(uWr):
                        orow[j] = a[rb + j]
            _fetch_add(counter, 1)  # done

    @njit(nogil=True, cache=True)
    def _fold_items(gpad, grad, iy, ix, r, counter, total):
        """Adjoint of the reflect-101 padding by r: ``grad[n, c] = fold(gpad[n, c])``, items = (n, c)."""
        N, C, H, W = grad.shape
        Hr, Wr = H + 2 * r, W + 2 * r
        while True:  # claim items one at a time (shared counter; see _run)
            it = _fetch_add(counter, 0)
            if it >= total:
                break
            n = it // C
            c = it % C
            gp = gpad[n, c]
            gi = grad[n, c]
            ur = np.uintp(r)
            for y in range(H):
                src = gp[y + r]
                dst = gi[y]
                for j in range(np.uintp(W)):
                    dst[j] = src[j + ur]
            for z in range(Hr):
                src = gp[z]
                dst = gi[iy[z]]
                if r <= z < r + H:  # an image row: only its border columns fold
                    for j in range(ur):
                        dst[ix[j]] += src[j]
                        dst[ix[ur + W + j]] += src[ur + W + j]
                else:
                    for j in range(Wr):
                        dst[ix[j]] += src[j]
            _fetch_add(counter, 1)  # done


# ------------------------------------------------------------------ threads
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < n:  # noqa: SLF001
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="robustkit-bilateral")
        return _POOL


def _forget_pool_after_fork() -> None:
    """A forked child (e.g. a DataLoader worker) has none of the parent's threads: start anew."""
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _run(fn, total: int, work: int, *args) -> None:
    """Run the item kernel ``fn(*args, counter, total)`` on ``torch.get_num_threads()`` threads
    (the calling thread is one of them).

    Every thread makes one GIL-free call that claims items one at a time from a shared atomic
    counter (``counter[0]``) and counts finished ones (``counter[1]``). When the caller's call
    returns, every item is claimed; it then waits only for items still running on a helper. On a
    busy machine a helper that starts late claims nothing instead of holding the call up, and
    there is no per-chunk return to Python (no GIL hand-offs while the work runs).
    """
    counter = np.zeros(2, dtype=np.int64)
    threads = max(1, min(torch.get_num_threads(), total))
    if threads == 1 or work < SERIAL_WORK:
        fn(*args, counter, total)
        return
    errors: list[BaseException] = []

    def helper():
        try:
            fn(*args, counter, total)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    pool = _pool(threads - 1)
    for _ in range(threads - 1):
        pool.submit(helper)
    fn(*args, counter, total)
    while counter[1] < total and not errors:
        time.sleep(0)  # yield: on a 2-core machine the helper may need this core to finish
    if errors:
        raise errors[0]


# ------------------------------------------------------------------ helpers
# The per-call set-up below (tap offsets, reflect indices, per-sample constants) is cached:
# at 32 x 32 a whole forward is a few milliseconds and numpy's small-array calls add up.
# Cached arrays are passed to the kernels, which never write to them.
@functools.lru_cache(maxsize=256)
def _reflect_index(n: int, r: int) -> np.ndarray:
    """Reflect-101 source index of each padded position (periodic when r >= n), as OpenCV."""
    idx = np.arange(-r, n + r)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx).astype(np.int64)


@functools.lru_cache(maxsize=256)
def _taps(kernel_size: int, window: str, wp: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat offsets (> 0) and squared lengths of one tap of each pair ``{o, -o}`` (centre excluded)."""
    from .bilateral_torch import half_offsets

    taps = half_offsets(kernel_size, window)
    offs = np.array([dy * wp + dx for dy, dx in taps], dtype=np.int64)
    d2 = np.array([dy * dy + dx * dx for dy, dx in taps], dtype=np.float64)
    return offs, d2


def _per_sample(sigma) -> np.ndarray:
    if isinstance(sigma, torch.Tensor):
        return sigma.detach().to("cpu", torch.float64).reshape(-1).numpy()
    return np.array([float(sigma)], dtype=np.float64)


def _params(x: torch.Tensor, kernel_size: int, sigma_color, sigma_space, window: str, wp: int):
    """Flat tap offsets, and per sample (N rows): spatial exponents, colour scale, 1/s_c^2."""
    n = x.shape[0]
    dt = np.float32 if x.dtype == torch.float32 else np.float64
    if not isinstance(sigma_color, torch.Tensor) and not isinstance(sigma_space, torch.Tensor):
        return _params_cached(kernel_size, window, wp, float(sigma_color), float(sigma_space), n, dt)
    return _params_uncached(kernel_size, window, wp, sigma_color, sigma_space, n, dt)


@functools.lru_cache(maxsize=64)
def _params_cached(kernel_size, window, wp, sigma_color, sigma_space, n, dt):
    return _params_uncached(kernel_size, window, wp, sigma_color, sigma_space, n, dt)


def _params_uncached(kernel_size, window, wp, sigma_color, sigma_space, n, dt):
    offs, d2 = _taps(kernel_size, window, wp)
    sc = np.broadcast_to(_per_sample(sigma_color), (n,))
    ss = np.broadcast_to(_per_sample(sigma_space), (n,))
    kk = np.ascontiguousarray(LOG2E / (2.0 * sc * sc), dtype=dt)
    sp = np.ascontiguousarray((LOG2E / (2.0 * ss * ss))[:, None] * d2[None, :], dtype=dt)
    if sp.shape[1] == 0:
        sp = np.zeros((n, 1), dt)
    cf = np.ascontiguousarray(1.0 / (sc * sc), dtype=dt)
    low = EXP2_FLUSH32 if dt == np.float32 else -1022.0
    consts = np.array([low, 1.0, 0.0], dtype=dt)
    return offs, sp, kk, cf, consts


def _rows_per_item(h: int, wp: int, n: int) -> int:
    rows = max(1, min(h, SEGMENT // wp))
    # enough items for the threads even with few samples
    threads = max(1, torch.get_num_threads())
    while rows > 1 and n * ((h + rows - 1) // rows) < 4 * threads:
        rows = (rows + 1) // 2
    return rows


# ------------------------------------------------------------------ scratch buffers
_WORKSPACE = threading.local()


def _scratch(name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """A scratch tensor reused across calls (per calling thread): large CPU allocations are
    returned to the OS on free and page-faulted back on the next call, which costs more than
    the padding itself. Every element is rewritten before it is read."""
    cache = getattr(_WORKSPACE, "buffers", None)
    if cache is None:
        cache = _WORKSPACE.buffers = {}
    numel = math.prod(shape)
    key = (name, dtype)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(tuple(shape))


def release_buffers() -> None:
    """Free the scratch buffers kept by this thread (they are rebuilt on the next call)."""
    _WORKSPACE.buffers = {}


# ------------------------------------------------------------------ forward / backward
def bilateral_forward_numba(x, kernel_size, sigma_color, sigma_space, distance, window, save=True):
    """Returns ``(out, inv_den)`` (``1/D``, N x 1 x H x W) for a CPU float32/float64 tensor;
    ``inv_den`` is None unless ``save`` (it is only needed by the backward)."""
    x = x.detach().contiguous()
    n, c, h, w = x.shape
    r = kernel_size // 2
    wp = w + 2 * r
    offs, sp, kk, _, consts = _params(x, kernel_size, sigma_color, sigma_space, window, wp)
    out = torch.empty_like(x)
    inv_den = torch.empty(n, 1, h, w, dtype=x.dtype) if save else None
    rows = _rows_per_item(h, wp, n)
    total = n * ((h + rows - 1) // rows)
    _run(_forward_items, total, x.numel() * (2 * len(offs) + 1),
         x.numpy(), r, _reflect_index(h, r), _reflect_index(w, r), offs, sp, kk, distance == "l1",
         out.numpy(), inv_den.numpy() if save else np.empty((1, 1, 1, 1), out.numpy().dtype), save, rows, consts)
    return out, inv_den


def bilateral_backward_numba(grad_out, x, out, inv_den, kernel_size, sigma_color, sigma_space, distance, window):
    """Exact gradient w.r.t. ``x`` (CPU float32/float64)."""
    n, c, h, w = x.shape
    r = kernel_size // 2
    if r == 0:
        return grad_out.detach().clone()  # 1x1 window: the filter is the identity
    wq = w + 4 * r
    offs, sp, kk, cf, consts = _params(x, kernel_size, sigma_color, sigma_space, window, wq)
    hr, wr = h + 2 * r, w + 2 * r
    gpad = _scratch("gpad", (n, c, hr, wr), x.dtype)
    rows = _rows_per_item(hr, wq, n)
    _run(_backward_items, n * ((hr + rows - 1) // rows), gpad.numel() * (2 * len(offs) + 1) * 2,
         x.detach().contiguous().numpy(), grad_out.detach().contiguous().numpy(),
         inv_den.detach().contiguous().numpy(), out.detach().contiguous().numpy(), r,
         _reflect_index(h, 2 * r), _reflect_index(w, 2 * r), offs, sp, kk, cf, distance == "l1", gpad.numpy(), rows, consts)
    grad = torch.empty_like(x)
    _run(_fold_items, n * c, gpad.numel(), gpad.numpy(), grad.numpy(), _reflect_index(h, r), _reflect_index(w, r), r)
    return grad


NUMBA_KERNELS = (bilateral_forward_numba, bilateral_backward_numba)


def warm_up(background: bool = True) -> threading.Thread | None:
    """Compile the float32 forward and backward kernels now (or load them from Numba's on-disk
    cache), so that the first real call does not wait for it.

    The first use after an install compiles for ~20 s on a 2-vCPU machine (later processes load
    the cache in ~0.5 s). With ``background=True`` this runs on a daemon thread and returns it: a
    caller that has other work first (loading data, training) overlaps the compile with it; a
    real call made meanwhile waits on Numba's compiler lock and then uses the compiled kernel.
    Does nothing (returns None) where Numba is unavailable.
    """
    if not available():
        return None

    def compile_kernels():
        x = torch.rand(1, 1, 8, 8, requires_grad=True)
        bilateral_filter_numba(x, 5, 0.1, 1.5).sum().backward()

    if not background:
        compile_kernels()
        return None
    thread = threading.Thread(target=compile_kernels, name="robustkit-numba-warm-up", daemon=True)
    thread.start()
    return thread


def bilateral_filter_numba(x, kernel_size, sigma_color, sigma_space, distance="l1", window="circle"):
    """One bilateral pass on the fused CPU path (differentiable w.r.t. ``x``; sigmas are constants)."""
    return apply_bilateral(NUMBA_KERNELS, x, kernel_size, sigma_color, sigma_space, distance, window)
