"""The fused gates as ``torch.library`` custom ops (``attnsurgeon::*``), so that autograd and
``torch.compile`` see each as one op: Triton kernels inside, a fake (meta) implementation
for shapes, and a backward that calls the backward ops.

Imported by :mod:`attnsurgeon.kernels` only when a fused path may run (it imports Triton).
What each op computes is written out in :mod:`attnsurgeon.kernels._triton`; the plain
PyTorch form of each is in :mod:`attnsurgeon.kernels`. Backward passes recompute from
what the forward already keeps (its inputs and, for a fused ReLU, its output) instead of
saving intermediates.
"""

from typing import Any

import torch
import triton
from torch import Tensor

from . import _triton as K

__all__ = [
    "context_pool", "coord_pool", "gate_apply", "mean_max_hw", "norm_act_apply", "norm_act_coord_pool",
    "norm_act_mean_max", "norm_act_spatial_pool", "spatial_pool",
]

# Tile sizes (elements per program and the cap on a block's channels / columns) and how
# many programs a split reduction aims at; module globals so tests can shrink them.
TILE = 2048
BLOCK_MAX = 64
PROGRAMS = 1024
CONTEXT_TILE = 8192  # GC's pooling holds all channels of a block of positions in one tile

_Strides = tuple[int, int, int]
_Pre = tuple[Tensor, Tensor, int] | None  # (scale (C,), shift (C,), PRE code): see _triton._prologue
_ROUND = {torch.bfloat16: 1, torch.float16: 2}  # the spatial max is taken over x * s in its dtype


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _flat(t: Tensor) -> tuple[Tensor, _Strides]:
    """``t`` (N, C, H, W) and its strides as an (N, C, H*W) view; a contiguous copy where
    H and W do not merge into one axis."""
    _, _, h, w = t.shape
    if w == 1:
        return t, (t.stride(0), t.stride(1), t.stride(2))
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t, (t.stride(0), t.stride(1), t.stride(3))
    t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(3))


def _tile(strides: _Strides, c: int, p: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): the contiguous axis gets the longer side of the tile."""
    if strides[1] == 1 and strides[2] != 1:  # channels_last: channels are contiguous
        bc = min(_np2(c), BLOCK_MAX)
        return min(_np2(p), max(1, TILE // bc)), bc
    bp = min(_np2(p), max(1, TILE // min(_np2(c), BLOCK_MAX)))
    return bp, min(_np2(c), max(1, TILE // bp))


def _splits(programs: int, p: int, bp: int) -> tuple[int, int]:
    """(splits, positions per split) so that about PROGRAMS programs share a reduction."""
    blocks = triton.cdiv(p, bp)
    per = triton.cdiv(blocks, max(1, min(blocks, triton.cdiv(PROGRAMS, programs)))) * bp
    return triton.cdiv(p, per), per


def _promote(*ts: Tensor | None) -> torch.dtype:
    dtype = None
    for t in ts:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    assert dtype is not None
    return dtype


def _none(like: Tensor) -> Tensor:
    """A fresh empty tensor for an output that was not asked for (outputs may not alias)."""
    return like.new_empty(0)


def _small(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _pre_args(x: Tensor, pre: _Pre) -> tuple[Tensor, Tensor, int]:
    """The prologue's (scale, shift) pointers and PRE code (0, and x as a dummy pointer: none)."""
    return (x, x, 0) if pre is None else (pre[0].contiguous(), pre[1].contiguous(), pre[2])


# --- act(x * s * sp * ah * aw + t + identity) -------------------------------------------

@torch.library.custom_op("attnsurgeon::gate_apply", mutates_args=())
def gate_apply(x: Tensor, s: Tensor | None, t: Tensor | None, sp: Tensor | None, ah: Tensor | None,
               aw: Tensor | None, identity: Tensor | None, relu: bool) -> Tensor:
    """``act(x * s[n,c] * sp[n,p] * ah[n,c,h] * aw[n,c,w] + t[n,c] + identity)`` in one pass;
    every operand but x optional; s, t (N, C), sp (N, H*W), ah (N, C, H), aw (N, C, W)."""
    return _apply(x, s, t, sp, ah, aw, identity, relu, None)


def _apply(x: Tensor, s: Tensor | None, t: Tensor | None, sp: Tensor | None, ah: Tensor | None,
           aw: Tensor | None, identity: Tensor | None, relu: bool, pre: _Pre) -> Tensor:
    n, c, h, w = x.shape
    p = h * w
    out = torch.empty_like(x, dtype=_promote(x, s, t, sp, ah, aw, identity))
    x, xs = _flat(x)
    out, os_ = _flat(out)
    ident, is_ = _flat(identity) if identity is not None else (x, xs)
    s, t, sp, ah, aw = (_small(v) for v in (s, t, sp, ah, aw))
    pa, pb, code = _pre_args(x, pre)
    bp, bc = _tile(xs, c, p)
    K.apply_fwd[(n, triton.cdiv(p, bp), triton.cdiv(c, bc))](
        x, ident, out, x if s is None else s, x if t is None else t, x if sp is None else sp,
        x if ah is None else ah, x if aw is None else aw, pa, pb, c, p, h, w, *xs, *is_, *os_,
        HAS_S=s is not None, HAS_T=t is not None, HAS_SP=sp is not None, HAS_HW=ah is not None,
        HAS_ID=identity is not None, RELU=relu, PRE=code, BLOCK_P=bp, BLOCK_C=bc)
    return out


@gate_apply.register_fake
def _(x: Tensor, s: Tensor | None, t: Tensor | None, sp: Tensor | None, ah: Tensor | None,
      aw: Tensor | None, identity: Tensor | None, relu: bool) -> Tensor:
    return torch.empty_like(x, dtype=_promote(x, s, t, sp, ah, aw, identity))


@torch.library.custom_op("attnsurgeon::gate_apply_bwd", mutates_args=())
def gate_apply_bwd(g: Tensor, out: Tensor | None, x: Tensor | None, s: Tensor | None, sp: Tensor | None,
                   has_t: bool, write_pre: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(gpre, gx, ds, dt, dsp) of :func:`gate_apply` without ah/aw; ``out`` given where a
    ReLU was fused, ``x`` where s or sp was; an empty tensor for what was not asked."""
    n, c, h, w = g.shape
    p = h * w
    g, gs_ = _flat(g)
    out_, os_ = _flat(out) if out is not None else (g, gs_)
    factors = s is not None or sp is not None
    gpre = torch.empty_like(out if out is not None else g) if write_pre else _none(g)
    gx = torch.empty_like(x) if factors and x is not None else _none(g)
    gpre_, qs = _flat(gpre) if write_pre else (g, gs_)
    gx_, ds_ = _flat(gx) if gx.numel() else (g, gs_)
    x_, xs = _flat(x) if x is not None else (g, gs_)
    bp, bc = _tile(xs, c, p)
    ncb = triton.cdiv(c, bc)
    splits, per = _splits(n * ncb, p, bp)
    ps = torch.empty(n, splits, c, device=g.device, dtype=torch.float32) if s is not None else None
    pt = torch.empty(n, splits, c, device=g.device, dtype=torch.float32) if has_t else None
    psp = torch.empty(n, ncb, p, device=g.device, dtype=torch.float32) if sp is not None else None
    K.apply_bwd[(n, ncb, splits)](
        g, out_, x_, g if s is None else s.contiguous(), g if sp is None else sp.contiguous(), gpre_, gx_,
        ps if s is not None else g, pt if has_t else g, psp if sp is not None else g, c, p, per,
        *gs_, *os_, *xs, *qs, *ds_,
        HAS_S=s is not None, HAS_T=has_t, HAS_SP=sp is not None, RELU=out is not None,
        WRITE_PRE=write_pre, WRITE_GX=gx.numel() > 0, BLOCK_P=bp, BLOCK_C=bc)
    ds, dt, dsp = (_none(g) if v is None else v.sum(1) for v in (ps, pt, psp))
    return gpre, gx, ds, dt, dsp


@gate_apply_bwd.register_fake
def _(g: Tensor, out: Tensor | None, x: Tensor | None, s: Tensor | None, sp: Tensor | None,
      has_t: bool, write_pre: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    n, c, h, w = g.shape
    return (torch.empty_like(out if out is not None else g) if write_pre else _none(g),
            torch.empty_like(x) if (s is not None or sp is not None) and x is not None else _none(g),
            g.new_empty(n, c, dtype=torch.float32) if s is not None else _none(g),
            g.new_empty(n, c, dtype=torch.float32) if has_t else _none(g),
            g.new_empty(n, h * w, dtype=torch.float32) if sp is not None else _none(g))


def _coord_tiles(n: int, c: int, h: int, w: int, device: torch.device) -> tuple[int, int, int, Tensor, Tensor]:
    """Coordinate attention's launch: W and C tiles, W blocks, and its float32 partials
    ``(N, W blocks, C, H)`` (summed over the blocks after) and ``(N, C, W)``."""
    bw = min(_np2(w), BLOCK_MAX)
    bc = min(_np2(c), max(1, TILE // bw))
    nwb = triton.cdiv(w, bw)
    return (bw, bc, nwb, torch.empty(n, nwb, c, h, device=device, dtype=torch.float32),
            torch.empty(n, c, w, device=device, dtype=torch.float32))


@torch.library.custom_op("attnsurgeon::coord_apply_bwd", mutates_args=())
def coord_apply_bwd(g: Tensor, out: Tensor | None, x: Tensor, ah: Tensor, aw: Tensor,
                    write_pre: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(gpre, gx, dah, daw) of :func:`gate_apply` with ah and aw (coordinate attention)."""
    n, c, h, w = g.shape
    g, gs_ = _flat(g)
    out_, os_ = _flat(out) if out is not None else (g, gs_)
    gpre = torch.empty_like(out if out is not None else g) if write_pre else _none(g)
    gpre_, qs = _flat(gpre) if write_pre else (g, gs_)
    gx, ds_ = _flat(torch.empty_like(x))
    x, xs = _flat(x)
    bw, bc, nwb, pah, gaw = _coord_tiles(n, c, h, w, g.device)
    K.coord_bwd[(n, triton.cdiv(c, bc), nwb)](
        g, out_, x, ah.contiguous(), aw.contiguous(), gpre_, gx, pah, gaw, c, h, w,
        *gs_, *os_, *xs, *qs, *ds_, RELU=out is not None, WRITE_PRE=write_pre, BLOCK_W=bw, BLOCK_C=bc)
    return gpre, gx, pah.sum(1), gaw


@coord_apply_bwd.register_fake
def _(g: Tensor, out: Tensor | None, x: Tensor, ah: Tensor, aw: Tensor,
      write_pre: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, c, h, w = g.shape
    gpre = torch.empty_like(out if out is not None else g) if write_pre else _none(g)
    return (gpre, torch.empty_like(x), g.new_empty(n, c, h, dtype=torch.float32),
            g.new_empty(n, c, w, dtype=torch.float32))


def _apply_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, s, t, sp, ah, aw, identity, relu = inputs
    ctx.relu, ctx.has_t, ctx.has_id = relu, t is not None, identity is not None
    ctx.factors = s is not None or sp is not None or ah is not None
    ctx.dtypes = [None if v is None else v.dtype for v in (x, s, t, sp, ah, aw, identity)]
    ctx.save_for_backward(x if ctx.factors else None, s, sp, ah, aw, output if relu else None)


def _apply_backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
    x, s, sp, ah, aw, out = ctx.saved_tensors
    write_pre = ctx.relu and (ctx.has_id or not ctx.factors)
    ds = dt = dsp = dah = daw = None
    if ah is not None:
        gpre, gx, dah, daw = coord_apply_bwd(g, out, x, ah, aw, write_pre)
    else:
        gpre, gx, ds, dt, dsp = gate_apply_bwd(g, out, x, s, sp, ctx.has_t, write_pre)
    pre = gpre if write_pre else g  # without a ReLU the add passes g through
    grads = (gx if ctx.factors else pre, ds, dt, dsp, dah, daw, pre)
    return (*(None if d is None or v is None else v.to(d) for v, d in zip(grads, ctx.dtypes, strict=True)), None)


gate_apply.register_autograd(_apply_backward, setup_context=_apply_setup)


# --- mean and max over H, W (CBAM's channel pooling) -------------------------------------

@torch.library.custom_op("attnsurgeon::mean_max_hw", mutates_args=())
def mean_max_hw(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, max, ties) over H and W, each (N, C); ties (int32) is how many positions reach the max."""
    return _mean_max(x, None)


def _mean_max(x: Tensor, pre: _Pre) -> tuple[Tensor, Tensor, Tensor]:
    n, c, h, w = x.shape
    p = h * w
    mean, top = x.new_empty(n, c), x.new_empty(n, c)
    ties = torch.empty(n, c, device=x.device, dtype=torch.int32)
    x, xs = _flat(x)
    bp, bc = _tile(xs, c, p)
    pa, pb, code = _pre_args(x, pre)
    K.mean_max_hw[(n, triton.cdiv(c, bc))](x, pa, pb, mean, top, ties, c, p, *xs, PRE=code, BLOCK_P=bp, BLOCK_C=bc)
    return mean, top, ties


@mean_max_hw.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, c = x.shape[:2]
    return x.new_empty(n, c), x.new_empty(n, c), x.new_empty(n, c, dtype=torch.int32)


@torch.library.custom_op("attnsurgeon::mean_max_hw_bwd", mutates_args=())
def mean_max_hw_bwd(x: Tensor, top: Tensor, ties: Tensor, gmean: Tensor, gmax: Tensor) -> Tensor:
    n, c, h, w = x.shape
    p = h * w
    gx = torch.empty_like(x)
    x, xs = _flat(x)
    gx_, ds_ = _flat(gx)
    bp, bc = _tile(xs, c, p)
    K.mean_max_bwd[(n, triton.cdiv(p, bp), triton.cdiv(c, bc))](
        x, top, ties, gmean.contiguous(), gmax.contiguous(), gx_, c, p, *xs, *ds_, BLOCK_P=bp, BLOCK_C=bc)
    return gx


@mean_max_hw_bwd.register_fake
def _(x: Tensor, top: Tensor, ties: Tensor, gmean: Tensor, gmax: Tensor) -> Tensor:
    return torch.empty_like(x)


def _mean_max_setup(ctx: Any, inputs: tuple[Tensor], output: tuple[Tensor, Tensor, Tensor]) -> None:
    ctx.save_for_backward(inputs[0], output[1], output[2])


def _mean_max_backward(ctx: Any, gmean: Tensor | None, gmax: Tensor | None, _: Tensor | None) -> Tensor:
    x, top, ties = ctx.saved_tensors
    gmean = torch.zeros_like(top) if gmean is None else gmean
    gmax = torch.zeros_like(top) if gmax is None else gmax
    return mean_max_hw_bwd(x, top, ties, gmean, gmax)


mean_max_hw.register_autograd(_mean_max_backward, setup_context=_mean_max_setup)


# --- mean and max over C of x * s (CBAM's spatial pooling) -------------------------------

@torch.library.custom_op("attnsurgeon::spatial_pool", mutates_args=())
def spatial_pool(x: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, max, ties) over the channels of ``x * s`` (s: (N, C)), each (N, H*W)."""
    return _spatial_pool(x, s, None)


def _spatial_pool(x: Tensor, s: Tensor, pre: _Pre) -> tuple[Tensor, Tensor, Tensor]:
    n, c, h, w = x.shape
    p = h * w
    dtype = _promote(x, s)
    mean, top = x.new_empty(n, p, dtype=dtype), x.new_empty(n, p, dtype=dtype)
    ties = torch.empty(n, p, device=x.device, dtype=torch.int32)
    x, xs = _flat(x)
    bp, bc = _tile(xs, c, p)
    pa, pb, code = _pre_args(x, pre)
    K.spatial_pool[(n, triton.cdiv(p, bp))](x, s.contiguous(), pa, pb, mean, top, ties, c, p, *xs,
                                            PRE=code, ROUND=_ROUND.get(dtype, 0), BLOCK_P=bp, BLOCK_C=bc)
    return mean, top, ties


@spatial_pool.register_fake
def _(x: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, _, h, w = x.shape
    dtype = _promote(x, s)
    return x.new_empty(n, h * w, dtype=dtype), x.new_empty(n, h * w, dtype=dtype), \
        x.new_empty(n, h * w, dtype=torch.int32)


@torch.library.custom_op("attnsurgeon::spatial_pool_bwd", mutates_args=())
def spatial_pool_bwd(x: Tensor, s: Tensor, top: Tensor, ties: Tensor, gmean: Tensor,
                     gmax: Tensor) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    p = h * w
    gx = torch.empty_like(x)
    x, xs = _flat(x)
    gx_, ds_ = _flat(gx)
    bp, bc = _tile(xs, c, p)
    ncb = triton.cdiv(c, bc)
    splits, per = _splits(n * ncb, p, bp)
    ps = torch.empty(n, splits, c, device=x.device, dtype=torch.float32)
    K.spatial_pool_bwd[(n, ncb, splits)](
        x, s.contiguous(), top, ties, gmean.contiguous(), gmax.contiguous(), gx_, ps, c, p, per, *xs, *ds_,
        ROUND=_ROUND.get(top.dtype, 0), BLOCK_P=bp, BLOCK_C=bc)
    return gx, ps.sum(1)


@spatial_pool_bwd.register_fake
def _(x: Tensor, s: Tensor, top: Tensor, ties: Tensor, gmean: Tensor, gmax: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[:2], dtype=torch.float32)


def _spatial_setup(ctx: Any, inputs: tuple[Tensor, Tensor], output: tuple[Tensor, Tensor, Tensor]) -> None:
    ctx.save_for_backward(inputs[0], inputs[1], output[1], output[2])


def _spatial_backward(ctx: Any, gmean: Tensor | None, gmax: Tensor | None,
                      _: Tensor | None) -> tuple[Tensor, Tensor]:
    x, s, top, ties = ctx.saved_tensors
    gmean = torch.zeros_like(top) if gmean is None else gmean
    gmax = torch.zeros_like(top) if gmax is None else gmax
    gx, ds = spatial_pool_bwd(x, s, top, ties, gmean, gmax)
    return gx, ds.to(s.dtype)


spatial_pool.register_autograd(_spatial_backward, setup_context=_spatial_setup)


# --- mean over W and mean over H (coordinate attention's pooling) ------------------------

@torch.library.custom_op("attnsurgeon::coord_pool", mutates_args=())
def coord_pool(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean over W: (N, C, H), mean over H: (N, C, W)) in one read."""
    return _coord_pool(x, None)


def _coord_pool(x: Tensor, pre: _Pre) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    x, xs = _flat(x)
    bw, bc, nwb, pzh, zw = _coord_tiles(n, c, h, w, x.device)
    pa, pb, code = _pre_args(x, pre)
    K.coord_pool[(n, triton.cdiv(c, bc), nwb)](x, pa, pb, pzh, zw, c, h, w, *xs, PRE=code, BLOCK_W=bw, BLOCK_C=bc)
    return (pzh.sum(1) / w).to(x.dtype), zw.to(x.dtype)


@coord_pool.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    return x.new_empty(n, c, h), x.new_empty(n, c, w)


@torch.library.custom_op("attnsurgeon::coord_pool_bwd", mutates_args=())
def coord_pool_bwd(x: Tensor, gh: Tensor, gw: Tensor) -> Tensor:
    n, c, h, w = x.shape
    p = h * w
    gx = torch.empty_like(x)
    gx_, ds_ = _flat(gx)
    bp, bc = _tile(ds_, c, p)
    K.coord_pool_bwd[(n, triton.cdiv(p, bp), triton.cdiv(c, bc))](
        gh.contiguous(), gw.contiguous(), gx_, c, p, h, w, *ds_, BLOCK_P=bp, BLOCK_C=bc)
    return gx


@coord_pool_bwd.register_fake
def _(x: Tensor, gh: Tensor, gw: Tensor) -> Tensor:
    return torch.empty_like(x)


def _coord_pool_setup(ctx: Any, inputs: tuple[Tensor], output: tuple[Tensor, Tensor]) -> None:
    ctx.save_for_backward(inputs[0])


def _coord_pool_backward(ctx: Any, gh: Tensor | None, gw: Tensor | None) -> Tensor:
    (x,) = ctx.saved_tensors
    n, c, h, w = x.shape
    gh = x.new_zeros(n, c, h) if gh is None else gh
    gw = x.new_zeros(n, c, w) if gw is None else gw
    return coord_pool_bwd(x, gh, gw)


coord_pool.register_autograd(_coord_pool_backward, setup_context=_coord_pool_setup)


# --- GC's attention pooling: softmax over the positions of w . x + b, then the weighted sum

def _context_grid(x: Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, splits, positions per split) of the context kernels."""
    n, c, h, w = x.shape
    bc = _np2(c)
    bp = min(_np2(h * w), max(1, CONTEXT_TILE // bc))
    return (bp, bc, *_splits(n, h * w, bp))


@torch.library.custom_op("attnsurgeon::context_pool", mutates_args=())
def context_pool(x: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(context (N, C), lse (N,)), float32: ``context[n, c] = sum_p softmax_p(l) x[n, c, p]``
    with ``l[p] = w . x[n, :, p] + b`` (w: (C,), b: (1,)), and ``lse = logsumexp_p l``."""
    n, c, h, wd = x.shape
    bp, bc, splits, per = _context_grid(x)
    x, xs = _flat(x)
    m = torch.empty(n, splits, device=x.device, dtype=torch.float32)
    z = torch.empty_like(m)
    acc = torch.empty(n, splits, c, device=x.device, dtype=torch.float32)
    K.context_fwd[(n, splits)](x, w.contiguous(), b.contiguous(), m, z, acc, c, h * wd, per, *xs,
                               BLOCK_P=bp, BLOCK_C=bc)
    top = m.amax(1, keepdim=True)
    scale = torch.exp(m - top)  # each split's partials rescaled to the common max
    total = (z * scale).sum(1)
    return (acc * scale.unsqueeze(2)).sum(1) / total.unsqueeze(1), top.squeeze(1) + total.log()


@context_pool.register_fake
def _(x: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    n, c = x.shape[:2]
    return x.new_empty(n, c, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("attnsurgeon::context_pool_bwd", mutates_args=())
def context_pool_bwd(x: Tensor, w: Tensor, b: Tensor, lse: Tensor, g: Tensor,
                     gd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(gx, dw, db) of :func:`context_pool`; ``g`` (N, C) the gradient of the context and
    ``gd = (g * context).sum(1)``, float32."""
    n, c, h, wd = x.shape
    bp, bc, splits, per = _context_grid(x)
    gx = torch.empty_like(x)
    x, xs = _flat(x)
    gx_, ds_ = _flat(gx)
    pw = torch.empty(n, splits, c, device=x.device, dtype=torch.float32)
    pb = torch.empty(n, splits, device=x.device, dtype=torch.float32)
    K.context_bwd[(n, splits)](x, w.contiguous(), b.contiguous(), lse.contiguous(), g.contiguous(),
                               gd.contiguous(), gx_, pw, pb, c, h * wd, per, *xs, *ds_, BLOCK_P=bp, BLOCK_C=bc)
    return gx, pw.sum((0, 1)), pb.sum().reshape(1)


@context_pool_bwd.register_fake
def _(x: Tensor, w: Tensor, b: Tensor, lse: Tensor, g: Tensor, gd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[1], dtype=torch.float32), x.new_empty(1, dtype=torch.float32)


def _context_setup(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: tuple[Tensor, Tensor]) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs, *output)


def _context_backward(ctx: Any, g: Tensor | None, _: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    x, w, b, out, lse = ctx.saved_tensors
    g = torch.zeros_like(out) if g is None else g.float()
    gx, dw, db = context_pool_bwd(x, w, b, lse, g, (g * out).sum(1))
    return gx, dw.to(w.dtype), db.to(b.dtype)


context_pool.register_autograd(_context_backward, setup_context=_context_setup)


# --- the same with the block's eval-mode norm and activation applied as the map is read --
# Inference only (no autograd registration): ``pre(y) = act(y * a + b)``, a and b (C,)
# float32, ``code`` the PRE of _triton._prologue; the blocks call these without autograd.

@torch.library.custom_op("attnsurgeon::norm_act_mean_max", mutates_args=())
def norm_act_mean_max(y: Tensor, a: Tensor, b: Tensor, code: int) -> tuple[Tensor, Tensor]:
    """(mean, max) over H and W of ``pre(y)``, each (N, C), without writing ``pre(y)``."""
    mean, top, _ = _mean_max(y, (a, b, code))
    return mean, top


@norm_act_mean_max.register_fake
def _(y: Tensor, a: Tensor, b: Tensor, code: int) -> tuple[Tensor, Tensor]:
    return y.new_empty(y.shape[:2]), y.new_empty(y.shape[:2])


@torch.library.custom_op("attnsurgeon::norm_act_coord_pool", mutates_args=())
def norm_act_coord_pool(y: Tensor, a: Tensor, b: Tensor, code: int) -> tuple[Tensor, Tensor]:
    """:func:`coord_pool` of ``pre(y)``, without writing ``pre(y)``."""
    return _coord_pool(y, (a, b, code))


@norm_act_coord_pool.register_fake
def _(y: Tensor, a: Tensor, b: Tensor, code: int) -> tuple[Tensor, Tensor]:
    n, c, h, w = y.shape
    return y.new_empty(n, c, h), y.new_empty(n, c, w)


@torch.library.custom_op("attnsurgeon::norm_act_spatial_pool", mutates_args=())
def norm_act_spatial_pool(y: Tensor, a: Tensor, b: Tensor, code: int, s: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`spatial_pool` (mean, max) of ``pre(y)``, without writing ``pre(y)`` or ``pre(y) * s``."""
    mean, top, _ = _spatial_pool(y, s, (a, b, code))
    return mean, top


@norm_act_spatial_pool.register_fake
def _(y: Tensor, a: Tensor, b: Tensor, code: int, s: Tensor) -> tuple[Tensor, Tensor]:
    n, _, h, w = y.shape
    dtype = _promote(y, s)
    return y.new_empty(n, h * w, dtype=dtype), y.new_empty(n, h * w, dtype=dtype)


@torch.library.custom_op("attnsurgeon::norm_act_apply", mutates_args=())
def norm_act_apply(y: Tensor, a: Tensor, b: Tensor, code: int, s: Tensor | None, sp: Tensor | None,
                   ah: Tensor | None, aw: Tensor | None) -> Tensor:
    """``pre(y) * s[n,c] * sp[n,p] * ah[n,c,h] * aw[n,c,w]`` in one pass, each factor optional."""
    return _apply(y, s, None, sp, ah, aw, None, False, (a, b, code))


@norm_act_apply.register_fake
def _(y: Tensor, a: Tensor, b: Tensor, code: int, s: Tensor | None, sp: Tensor | None,
      ah: Tensor | None, aw: Tensor | None) -> Tensor:
    return torch.empty_like(y, dtype=_promote(y, s, sp, ah, aw))
