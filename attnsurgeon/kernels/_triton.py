"""Triton kernels of the fused gates; launched by :mod:`attnsurgeon.kernels._ops` only.

Every feature map is read as ``(N, C, P)`` with ``P = H * W`` and strides ``(sn, sc, sp)``:
``(C*P, P, 1)`` for a contiguous tensor, ``(P*C, 1, C)`` for channels_last, so one kernel
takes both memory formats (Triton specialises a stride of 1, so the contiguous axis is
coalesced in either). Small per-sample tensors (gates, pools, their gradients) are
contiguous: ``(N, C)``, ``(N, P)``, ``(N, C, H)``, ``(N, C, W)``. Arithmetic is float32
whatever the storage dtype. Reductions whose programs split an axis write float32
partials that the caller sums, so results do not depend on the order atomics would
impose.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "apply_bwd", "apply_fwd", "context_bwd", "context_fwd", "coord_bwd", "coord_pool", "coord_pool_bwd",
    "mean_max_bwd", "mean_max_hw", "spatial_pool", "spatial_pool_bwd",
]


@triton.jit
def _prologue(x, a_ptr, b_ptr, c, cm, mask, PRE: tl.constexpr):
    """``act(x * a[c] + b[c])`` where masked, 0 elsewhere: an eval-mode BatchNorm (a per-channel
    affine) and the activation after it, applied as a map is read. PRE: 0 none (x as it is),
    1 the affine alone, then with 2 ReLU, 3 ReLU6, 4 SiLU, 5 Hardswish."""
    if PRE > 0:
        x = x * tl.load(a_ptr + c, mask=cm, other=0.0) + tl.load(b_ptr + c, mask=cm, other=0.0)
        if PRE == 2:
            x = tl.maximum(x, 0.0)
        elif PRE == 3:
            x = tl.minimum(tl.maximum(x, 0.0), 6.0)
        elif PRE == 4:
            x = x * tl.sigmoid(x)
        elif PRE == 5:
            x = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
        x = tl.where(mask, x, 0.0)
    return x


@triton.jit
def apply_fwd(
    x_ptr, id_ptr, out_ptr, s_ptr, t_ptr, sp_ptr, ah_ptr, aw_ptr, pa_ptr, pb_ptr,
    C, P, H, W,
    sxn, sxc, sxp, sin, sic, sip, son, soc, sop,
    HAS_S: tl.constexpr, HAS_T: tl.constexpr, HAS_SP: tl.constexpr, HAS_HW: tl.constexpr,
    HAS_ID: tl.constexpr, RELU: tl.constexpr, PRE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out = act(x * s[n,c] * sp[n,p] * ah[n,c,h] * aw[n,c,w] + t[n,c] + id)``, each factor
    optional; with PRE, x is first ``pre(x)`` (:func:`_prologue`, a norm and activation)."""
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    cm = c < C
    pm = p < P
    mask = pm & cm
    y = tl.load(x_ptr + n * sxn + c * sxc + p * sxp, mask=mask, other=0.0).to(tl.float32)
    y = _prologue(y, pa_ptr, pb_ptr, c, cm, mask, PRE)
    if HAS_S:
        y = y * tl.load(s_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_SP:
        y = y * tl.load(sp_ptr + n * P + p, mask=pm, other=0.0).to(tl.float32)
    if HAS_HW:
        h = p // W
        w = p - h * W
        y = y * tl.load(ah_ptr + (n * C + c) * H + h, mask=mask, other=0.0).to(tl.float32)
        y = y * tl.load(aw_ptr + (n * C + c) * W + w, mask=mask, other=0.0).to(tl.float32)
    if HAS_T:
        y = y + tl.load(t_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_ID:
        y = y + tl.load(id_ptr + n * sin + c * sic + p * sip, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(out_ptr + n * son + c * soc + p * sop, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def apply_bwd(
    g_ptr, out_ptr, x_ptr, s_ptr, sp_ptr, gpre_ptr, gx_ptr, ps_ptr, pt_ptr, psp_ptr,
    C, P, P_SPLIT,
    sgn, sgc, sgp, son, soc, sop, sxn, sxc, sxp, sqn, sqc, sqp, sdn, sdc, sdp,
    HAS_S: tl.constexpr, HAS_T: tl.constexpr, HAS_SP: tl.constexpr, RELU: tl.constexpr,
    WRITE_PRE: tl.constexpr, WRITE_GX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward of :func:`apply_fwd` without ``ah``/``aw``, one read of the incoming gradient,
    the output (ReLU's mask) and ``x``: ``gpre = g * [out > 0]`` (the identity's gradient),
    ``gx = gpre * s * sp``, and float32 partial sums ``ps[n, split, c]`` of ``gpre * x * sp``
    (ds), ``pt[n, split, c]`` of ``gpre`` (dt), ``psp[n, cblock, p]`` of ``gpre * x * s`` (dsp).

    Grid ``(N, C blocks, splits)``; a program covers ``P_SPLIT`` positions (a multiple of BLOCK_P).
    """
    n = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    split = tl.program_id(2)
    c1 = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[None, :]
    cm = c < C
    s = tl.full([1, BLOCK_C], 1.0, tl.float32)
    if HAS_S:
        s = tl.load(s_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32)
    acc_s = tl.zeros([BLOCK_C], tl.float32)
    acc_t = tl.zeros([BLOCK_C], tl.float32)
    start = split * P_SPLIT
    end = tl.minimum(start + P_SPLIT, P)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        pm = p < end
        mask = pm & cm
        g = tl.load(g_ptr + n * sgn + c * sgc + p * sgp, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            o = tl.load(out_ptr + n * son + c * soc + p * sop, mask=mask, other=0.0).to(tl.float32)
            g = tl.where(o > 0.0, g, 0.0)
        if WRITE_PRE:
            tl.store(gpre_ptr + n * sqn + c * sqc + p * sqp, g.to(gpre_ptr.dtype.element_ty), mask=mask)
        sp = tl.full([BLOCK_P, 1], 1.0, tl.float32)
        if HAS_SP:
            sp = tl.load(sp_ptr + n * P + p, mask=pm, other=0.0).to(tl.float32)
        if WRITE_GX:
            tl.store(gx_ptr + n * sdn + c * sdc + p * sdp, (g * s * sp).to(gx_ptr.dtype.element_ty), mask=mask)
        if HAS_S or HAS_SP:
            gxa = g * tl.load(x_ptr + n * sxn + c * sxc + p * sxp, mask=mask, other=0.0).to(tl.float32)
            if HAS_S:
                acc_s += tl.sum(gxa * sp, axis=0)
            if HAS_SP:
                psp = tl.sum(gxa * s, axis=1)
                p1 = p0 + tl.arange(0, BLOCK_P)
                tl.store(psp_ptr + (n * tl.num_programs(1) + cb) * P + p1, psp, mask=p1 < end)
        if HAS_T:
            acc_t += tl.sum(g, axis=0)
    row = (n * tl.num_programs(2) + split) * C + c1
    if HAS_S:
        tl.store(ps_ptr + row, acc_s, mask=c1 < C)
    if HAS_T:
        tl.store(pt_ptr + row, acc_t, mask=c1 < C)


@triton.jit
def coord_bwd(
    g_ptr, out_ptr, x_ptr, ah_ptr, aw_ptr, gpre_ptr, gx_ptr, pah_ptr, gaw_ptr,
    C, H, W,
    sgn, sgc, sgp, son, soc, sop, sxn, sxc, sxp, sqn, sqc, sqp, sdn, sdc, sdp,
    RELU: tl.constexpr, WRITE_PRE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward of ``act(x * ah[n,c,h] * aw[n,c,w] + id)``: ``gpre``, ``gx = gpre * ah * aw``,
    ``gaw[n,c,w] = sum_h gpre * x * ah`` and partials ``pah[n, wblock, c, h]`` of
    ``sum_w gpre * x * aw``. Grid ``(N, C blocks, W blocks)``; a program walks the rows h."""
    n = tl.program_id(0).to(tl.int64)
    wb = tl.program_id(2)
    c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[None, :]
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)[:, None]
    mask = (w < W) & (c < C)
    aw = tl.load(aw_ptr + (n * C + c) * W + w, mask=mask, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    for h in range(0, H):
        p = h * W + w
        g = tl.load(g_ptr + n * sgn + c * sgc + p * sgp, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            o = tl.load(out_ptr + n * son + c * soc + p * sop, mask=mask, other=0.0).to(tl.float32)
            g = tl.where(o > 0.0, g, 0.0)
        if WRITE_PRE:
            tl.store(gpre_ptr + n * sqn + c * sqc + p * sqp, g.to(gpre_ptr.dtype.element_ty), mask=mask)
        ah = tl.load(ah_ptr + (n * C + c) * H + h, mask=c < C, other=0.0).to(tl.float32)
        tl.store(gx_ptr + n * sdn + c * sdc + p * sdp, (g * ah * aw).to(gx_ptr.dtype.element_ty), mask=mask)
        gxa = g * tl.load(x_ptr + n * sxn + c * sxc + p * sxp, mask=mask, other=0.0).to(tl.float32)
        acc_w += gxa * ah
        row = tl.sum(gxa * aw, axis=0)
        tl.store(pah_ptr + ((n * tl.num_programs(2) + wb) * C + c1) * H + h, row, mask=c1 < C)
    tl.store(gaw_ptr + (n * C + c) * W + w, acc_w, mask=mask)


@triton.jit
def coord_pool(
    x_ptr, pa_ptr, pb_ptr, pzh_ptr, zw_ptr, C, H, W, sxn, sxc, sxp,
    PRE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Both directional sums in one read: ``zw[n,c,w] = mean_h x`` and partials
    ``pzh[n, wblock, c, h]`` of ``sum_w x`` (float32), of ``pre(x)`` with PRE
    (:func:`_prologue`). Grid ``(N, C blocks, W blocks)``."""
    n = tl.program_id(0).to(tl.int64)
    wb = tl.program_id(2)
    c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[None, :]
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)[:, None]
    mask = (w < W) & (c < C)
    acc_w = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    for h in range(0, H):
        x = tl.load(x_ptr + n * sxn + c * sxc + (h * W + w) * sxp, mask=mask, other=0.0).to(tl.float32)
        x = _prologue(x, pa_ptr, pb_ptr, c, c < C, mask, PRE)
        acc_w += x
        tl.store(pzh_ptr + ((n * tl.num_programs(2) + wb) * C + c1) * H + h, tl.sum(x, axis=0), mask=c1 < C)
    tl.store(zw_ptr + (n * C + c) * W + w, acc_w / H, mask=mask)


@triton.jit
def coord_pool_bwd(
    gh_ptr, gw_ptr, gx_ptr, C, P, H, W, sdn, sdc, sdp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``gx[n,c,h,w] = gh[n,c,h] / W + gw[n,c,w] / H``: the gradient of the two means."""
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (p < P) & (c < C)
    h = p // W
    w = p - h * W
    g = tl.load(gh_ptr + (n * C + c) * H + h, mask=mask, other=0.0).to(tl.float32) / W
    g += tl.load(gw_ptr + (n * C + c) * W + w, mask=mask, other=0.0).to(tl.float32) / H
    tl.store(gx_ptr + n * sdn + c * sdc + p * sdp, g.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mean_max_hw(
    x_ptr, pa_ptr, pb_ptr, mean_ptr, max_ptr, cnt_ptr, C, P, sxn, sxc, sxp,
    PRE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Mean and max over the positions per (n, c) in one read, and how many positions
    reach the max (the backward splits the gradient among ties, as ``amax``'s does); of
    ``pre(x)`` with PRE (:func:`_prologue`). Grid ``(N, C blocks)``."""
    n = tl.program_id(0).to(tl.int64)
    c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[None, :]
    acc = tl.zeros([BLOCK_C], tl.float32)
    best = tl.full([BLOCK_C], float("-inf"), tl.float32)
    cnt = tl.zeros([BLOCK_C], tl.int32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        mask = (p < P) & (c < C)
        x = tl.load(x_ptr + n * sxn + c * sxc + p * sxp, mask=mask, other=0.0).to(tl.float32)
        x = _prologue(x, pa_ptr, pb_ptr, c, c < C, mask, PRE)
        acc += tl.sum(x, axis=0)
        xm = tl.where(mask, x, float("-inf"))
        top = tl.max(xm, axis=0)
        ties = tl.sum(tl.where(mask & (xm == top[None, :]), 1, 0), axis=0)
        cnt = tl.where(top > best, ties, tl.where(top == best, cnt + ties, cnt))
        best = tl.maximum(best, top)
    row = n * C + c1
    cm = c1 < C
    tl.store(mean_ptr + row, (acc / P).to(mean_ptr.dtype.element_ty), mask=cm)
    tl.store(max_ptr + row, best.to(max_ptr.dtype.element_ty), mask=cm)
    tl.store(cnt_ptr + row, cnt, mask=cm)


@triton.jit
def mean_max_bwd(
    x_ptr, max_ptr, cnt_ptr, gmean_ptr, gmax_ptr, gx_ptr, C, P, sxn, sxc, sxp, sdn, sdc, sdp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``gx = gmean / P + [x == max] * gmax / ties`` per (n, c). Grid ``(N, P blocks, C blocks)``."""
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    cm = c < C
    mask = (p < P) & cm
    x = tl.load(x_ptr + n * sxn + c * sxc + p * sxp, mask=mask, other=0.0).to(tl.float32)
    top = tl.load(max_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32)
    ties = tl.load(cnt_ptr + n * C + c, mask=cm, other=1).to(tl.float32)
    g = tl.load(gmean_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32) / P
    g += tl.where(x == top, tl.load(gmax_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32) / ties, 0.0)
    tl.store(gx_ptr + n * sdn + c * sdc + p * sdp, g.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rounded(v, ROUND: tl.constexpr):
    """float32 ``v`` rounded to bfloat16 (ROUND 1) or float16 (ROUND 2), to nearest even, as
    float32; bfloat16 by bits, because Triton's interpreter truncates that cast."""
    if ROUND == 1:
        b = v.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        v = b.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def spatial_pool(
    x_ptr, s_ptr, pa_ptr, pb_ptr, mean_ptr, max_ptr, cnt_ptr, C, P, sxn, sxc, sxp,
    PRE: tl.constexpr, ROUND: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Mean and max over the channels of ``x * s[n, c]`` per (n, p), without writing
    ``x * s``, and the count of channels reaching the max. The max is taken over ``x * s``
    rounded to the output dtype, as the plain form (which stores ``x * s``) does, so ties
    match. With PRE, of ``pre(x) * s`` (:func:`_prologue`). Grid ``(N, P blocks)``."""
    n = tl.program_id(0).to(tl.int64)
    p1 = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p = p1[:, None]
    acc = tl.zeros([BLOCK_P], tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    cnt = tl.zeros([BLOCK_P], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)[None, :]
        cm = c < C
        mask = (p < P) & cm
        s = tl.load(s_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32)
        xs = tl.load(x_ptr + n * sxn + c * sxc + p * sxp, mask=mask, other=0.0).to(tl.float32)
        xs = _prologue(xs, pa_ptr, pb_ptr, c, cm, mask, PRE) * s
        acc += tl.sum(xs, axis=1)
        xm = tl.where(mask, _rounded(xs, ROUND), float("-inf"))
        top = tl.max(xm, axis=1)
        ties = tl.sum(tl.where(mask & (xm == top[:, None]), 1, 0), axis=1)
        cnt = tl.where(top > best, ties, tl.where(top == best, cnt + ties, cnt))
        best = tl.maximum(best, top)
    row = n * P + p1
    pm = p1 < P
    tl.store(mean_ptr + row, (acc / C).to(mean_ptr.dtype.element_ty), mask=pm)
    tl.store(max_ptr + row, best.to(max_ptr.dtype.element_ty), mask=pm)
    tl.store(cnt_ptr + row, cnt, mask=pm)


@triton.jit
def spatial_pool_bwd(
    x_ptr, s_ptr, max_ptr, cnt_ptr, gmean_ptr, gmax_ptr, gx_ptr, ps_ptr,
    C, P, P_SPLIT, sxn, sxc, sxp, sdn, sdc, sdp,
    ROUND: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward of :func:`spatial_pool`: with ``gxs = gmean / C + [x*s == max] * gmax / ties``,
    ``gx = gxs * s`` and partials ``ps[n, split, c]`` of ``sum_p gxs * x``.
    Grid ``(N, C blocks, splits)``."""
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[None, :]
    cm = c < C
    s = tl.load(s_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C], tl.float32)
    start = split * P_SPLIT
    end = tl.minimum(start + P_SPLIT, P)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        pm = p < end
        mask = pm & cm
        x = tl.load(x_ptr + n * sxn + c * sxc + p * sxp, mask=mask, other=0.0).to(tl.float32)
        top = tl.load(max_ptr + n * P + p, mask=pm, other=0.0).to(tl.float32)
        ties = tl.load(cnt_ptr + n * P + p, mask=pm, other=1).to(tl.float32)
        g = tl.load(gmean_ptr + n * P + p, mask=pm, other=0.0).to(tl.float32) / C
        xs = _rounded(x * s, ROUND)
        g += tl.where(xs == top, tl.load(gmax_ptr + n * P + p, mask=pm, other=0.0).to(tl.float32) / ties, 0.0)
        g = tl.where(mask, g, 0.0)
        tl.store(gx_ptr + n * sdn + c * sdc + p * sdp, (g * s).to(gx_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(g * x, axis=0)
    tl.store(ps_ptr + (n * tl.num_programs(2) + split) * C + c1, acc, mask=c1 < C)


@triton.jit
def _context_start(w_ptr, b_ptr, C, P, P_SPLIT, BLOCK_C: tl.constexpr):
    """What a context program needs first: (n, split, channels, w, b, its positions' range)."""
    c1 = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + c1[None, :], mask=c1[None, :] < C, other=0.0).to(tl.float32)
    start = tl.program_id(1) * P_SPLIT
    return (tl.program_id(0).to(tl.int64), tl.program_id(1), c1, w, tl.load(b_ptr).to(tl.float32),
            start, tl.minimum(start + P_SPLIT, P))


@triton.jit
def _context_block(x_ptr, w, b, n, p0, end, C, sxn, sxc, sxp, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One block of positions from ``p0``: its mask, all channels of x (float32) and the
    logits ``w . x[:, p] + b`` (-inf past ``end``)."""
    p1 = p0 + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)[None, :]
    mask = (p1[:, None] < end) & (c < C)
    x = tl.load(x_ptr + n * sxn + c * sxc + p1[:, None] * sxp, mask=mask, other=0.0).to(tl.float32)
    return mask, x, tl.where(p1 < end, tl.sum(x * w, axis=1) + b, float("-inf"))


@triton.jit
def context_fwd(
    x_ptr, w_ptr, b_ptr, m_ptr, z_ptr, acc_ptr, C, P, P_SPLIT, sxn, sxc, sxp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """GC's attention pooling, streaming softmax over the positions of one split:
    ``l[p] = w . x[:, p] + b``, and with ``m`` the split's max logit, ``z = sum_p exp(l - m)``
    and ``acc[c] = sum_p exp(l - m) x[c, p]`` (float32 partials per (n, split), which the
    caller rescales to a common max and sums). All C channels of a block of positions are
    one tile (BLOCK_C >= C), so x is read once. Grid ``(N, splits)``."""
    n, split, c1, w, b, start, end = _context_start(w_ptr, b_ptr, C, P, P_SPLIT, BLOCK_C)
    m = tl.full([], float("-inf"), tl.float32)
    z = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        _, x, logit = _context_block(x_ptr, w, b, n, p0, end, C, sxn, sxc, sxp, BLOCK_P, BLOCK_C)
        m_new = tl.maximum(m, tl.max(logit, axis=0))  # finite: position p0 is in the split
        alpha = tl.exp(m - m_new)
        e = tl.exp(logit - m_new)
        z = z * alpha + tl.sum(e, axis=0)
        acc = acc * alpha + tl.sum(x * e[:, None], axis=0)
        m = m_new
    row = n * tl.num_programs(1) + split
    tl.store(m_ptr + row, m)
    tl.store(z_ptr + row, z)
    tl.store(acc_ptr + row * C + c1, acc, mask=c1 < C)


@triton.jit
def context_bwd(
    x_ptr, w_ptr, b_ptr, lse_ptr, g_ptr, gd_ptr, gx_ptr, pw_ptr, pb_ptr,
    C, P, P_SPLIT, sxn, sxc, sxp, sdn, sdc, sdp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward of :func:`context_fwd` (``out[c] = sum_p a[p] x[c, p]``, ``a = softmax(l)``),
    recomputing ``a`` from x and the per-sample log-sum-exp ``lse``: with ``g`` the
    gradient of out and ``gd = g . out``, ``dl[p] = a[p] (g . x[:, p] - gd)``,
    ``gx[c, p] = a[p] g[c] + dl[p] w[c]``, and float32 partials of
    ``dw[c] = sum_p dl[p] x[c, p]`` (``pw[n, split, c]``) and ``db = sum_p dl[p]``
    (``pb[n, split]``). One read of x, one write of gx. Grid ``(N, splits)``."""
    n, split, c1, w, b, start, end = _context_start(w_ptr, b_ptr, C, P, P_SPLIT, BLOCK_C)
    lse = tl.load(lse_ptr + n)
    g = tl.load(g_ptr + n * C + c1[None, :], mask=c1[None, :] < C, other=0.0).to(tl.float32)
    gd = tl.load(gd_ptr + n)
    acc_w = tl.zeros([BLOCK_C], tl.float32)
    acc_b = tl.zeros([], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        mask, x, logit = _context_block(x_ptr, w, b, n, p0, end, C, sxn, sxc, sxp, BLOCK_P, BLOCK_C)
        a = tl.exp(logit - lse)  # 0 past the end
        dl = a * (tl.sum(x * g, axis=1) - gd)
        gx = a[:, None] * g + dl[:, None] * w
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        tl.store(gx_ptr + n * sdn + c1[None, :] * sdc + p * sdp, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        acc_w += tl.sum(x * dl[:, None], axis=0)
        acc_b += tl.sum(dl, axis=0)
    row = n * tl.num_programs(1) + split
    tl.store(pw_ptr + row * C + c1, acc_w, mask=c1 < C)
    tl.store(pb_ptr + row, acc_b)
