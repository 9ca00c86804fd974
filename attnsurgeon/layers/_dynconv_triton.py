"""Dynamic convolution as one Triton implicit-GEMM conv that mixes the K kernels on the fly.

Paper: Dynamic Convolution: Attention over Convolution Kernels (Chen, Dai, Liu, Chen,
Yuan, Liu; CVPR 2020), https://arxiv.org/abs/1912.03458

``y[n] = conv(x[n], sum_k pi[n, k] W_k)``: each program reads sample n's K attention
weights and the kernel bank, sums the K tiles of the kernel it needs, and multiplies them
into its output tile, so the per-sample kernels are never written to memory (the
per-sample form stores N of them) and no K-times-larger output is made (the stacked form
does). Backward: ``dx`` is the transposed conv with the same on-the-fly kernel, and one
kernel computes each sample's kernel gradient tile ``G_n = dy[n] (x) x[n]`` in registers
and reduces it at once into ``dW_k = sum_n pi[n, k] G_n`` and ``dpi[n, k] = <G_n, W_k>``
(the batch is split so that the grid fills the device: up to 32 float32 partial dW, for
small banks). Depthwise convs (one channel per group) have their own kernels, a
multiply-add per tap, where a GEMM tile would be almost all padding.

:func:`dynamic_conv2d` is the ``torch.library`` op ``attnsurgeon::dynconv`` (with a fake
kernel and autograd), so ``torch.compile`` sees one op. It takes any strides (contiguous
and channels_last alike), groups (depthwise included), stride, padding, dilation; float32
(TF32 products where ``torch.backends.cudnn.allow_tf32`` allows them, as cuDNN's conv),
bfloat16, float16, accumulating in float32. The bias is left to the caller. It runs on CUDA,
or on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how the tests check it against the plain forms.

ODConv (:mod:`.odconv`) runs on the same kernels: its kernel of sample n is
``a_f[n, o] a_c[n, i] a_s[n, t] sum_k a_w[n, k] W_k[o, i, t]``. So ``pi`` may hold one mix
per tap, ``(N, kh * kw, K)``, and optional ``gates`` (input and output channel) scale each
kernel tile as it is summed (the forward scales the reduced rows by the input gate and the
output tile once by the output gate; ``dx`` the other way round), so the gated maps are
never written. The dW kernel, whose programs each hold one tap, leaves ``<G_n, W_k>`` per
tap, the gradient of that tap's mix, and with gates each gate's partial sums of
``G_n * M_n`` (``M_n`` the mixed kernel) over its tile; the host sums the partials.
ODConv's bank is ordered (kernel, group, out-channel) where dynamic convolution's is
(group, kernel, out-channel); the kernels take the row strides of either.

Premixed (``Blocks.premix``, timed as ``triton:premixed``): for a dense conv on a large
map, each sample's kernel is built by one batched product (N kernels, as the per-sample form
stores) and the forward kernel reads it with K = 1, instead of every position tile loading
and mixing the K kernels again; ``dx`` builds them again (nothing is kept for backward), and
dW is computed from the bank as always.

With a stride, ``dx`` (a transposed conv) is split by stride phase: each program holds
input positions of one phase ``(ih % SH, iw % SW)``, which a kernel tap reaches at every
position or at none, so it skips the taps that miss (stride 2: 3 of 4 phases for a 1x1
conv, 6.75 of 9 taps a phase on average for a 3x3 one) where masking them would multiply
zeros. The depthwise ``dx`` masks them: it has no product to skip, and masked loads read
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain forms run
    triton = None
    tl = None

__all__ = ["AVAILABLE", "TILES", "Blocks", "calls", "dynamic_conv2d", "interpreting", "supports", "tile_forms"]

AVAILABLE = triton is not None
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CALLS = {"forward": 0, "grad_input": 0, "grad_weight": 0}


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` was set
    when triton was imported)."""
    return _INTERPRETED


def calls() -> dict[str, int]:
    """How many times each kernel was launched in this process (tests check the path ran)."""
    return dict(_CALLS)


@dataclass(frozen=True)
class Blocks:
    """Tile sizes: output positions (m), output channels (n), reduced channels (k); warps
    per program; the number of programs the dW kernel aims at (it splits the batch for it);
    the dW kernel's out-channel tile at most (``dw_rows``), its warps (``dw_warps``: the K
    kernel tiles it holds get 1024 elements a warp) and its position tile (``dw_positions``,
    halved in float32). At 64 rows and 8 warps its ``tl.dot`` compiles to Hopper's
    warp-group MMA without spills (``benchmarks/kernel_resources.py``), at the default 32
    and 4 to the per-warp MMA."""

    m: int = 64
    n: int = 64
    k: int = 32
    warps: int = 4
    programs: int = 1024
    dw_rows: int = 32
    dw_warps: int = 4
    dw_positions: int = 64
    premix: int = 0

    def as_list(self) -> list[int]:
        """The fields in order, as the ops take them (``dataclasses.astuple`` deep-copies
        them, which ``torch.compile`` of torch 2.11 cannot trace: a graph break)."""
        return [getattr(self, f.name) for f in fields(self)]


_BLOCKS = Blocks()

# The tiles the automatic form times on CUDA, as forms of their own (``tile_forms``): the
# defaults; 128 positions a program (the K kernel tiles it mixes, on the CUDA cores, serve
# twice the positions of the tensor cores' product); 128 channels; dW on the warp-group MMA;
# and premixed: each sample's kernel built by one product (N of them, as the per-sample form
# stores; forward and dx each build them) and read with K = 1, where every position tile of
# a sample would otherwise load and mix all K kernels again (dW still reads the bank). Each
# compiles for sm_90 without spills in bf16 (``kernel_resources.py``; 128 positions at 4
# warps spilled 252 B a thread in dx, hence 8). Which is fastest where is not measured yet.
TILES = {
    "triton": _BLOCKS,
    "triton:m128": Blocks(m=128, warps=8),
    "triton:n128": Blocks(n=128, warps=8),
    "triton:wide-dw": Blocks(dw_rows=64, dw_warps=8),
    "triton:premixed": Blocks(m=128, warps=8, premix=1),
}


def tile_forms(x_shape: tuple[int, ...], out_shape: tuple[int, ...], groups: int, taps: int, *,
               train: bool) -> list[str]:
    """The ``TILES`` worth timing for a conv from ``x_shape`` to ``out_shape`` with ``taps``
    kernel taps: a larger tile only where the conv has more than the default tile covers
    (positions, channels; dW's rows only in training, for a dense conv); the premixed
    kernels for a dense conv with more positions than one tile (else no program reads a
    sample's kernel twice), where N of them are 32-bit indexable."""
    (n, c_in, h, w), (_, c_out, oh, ow) = x_shape, out_shape
    c_in_g, c_out_g = c_in // groups, c_out // groups
    depthwise = c_in_g == c_out_g == 1
    positions = max(h * w, oh * ow)
    forms = ["triton"]
    if positions > _BLOCKS.m:
        forms.append("triton:m128")
    if (c_in if depthwise else max(c_in_g, c_out_g)) > _BLOCKS.n:
        forms.append("triton:n128")
    if train and not depthwise and c_out_g > _BLOCKS.dw_rows:
        forms.append("triton:wide-dw")
    if not depthwise and positions > _BLOCKS.m and n * c_out * c_in_g * taps < 2**31:
        forms.append("triton:premixed")
    return forms


def supports(device: torch.device, dtype: torch.dtype, *numels: int, positions: int = 0) -> bool:
    """Whether the kernel takes tensors of ``dtype`` on ``device`` with these element
    counts and ``positions`` (H * W of the input): CUDA (or any device in the
    interpreter), a float dtype it handles, 32-bit indexable, a grid within CUDA's 65535
    blocks along y (position tiles of the smallest tile size, 16, with room for padding)."""
    on_device = device.type == "cuda" or interpreting()
    fits = all(n < 2**31 for n in numels) and positions <= 65535 * 16 // 2
    return AVAILABLE and on_device and dtype in _DTYPES and fits


def _geometry(x: Tensor, weight: Tensor, kernels: int, stride: list[int], padding: list[int],
              dilation: list[int], groups: int) -> tuple[int, int, int, int]:
    """C_out and the output size; raises on a shape that does not fit."""
    n, c_in, h, w = x.shape
    rows, c_in_g, kh, kw = weight.shape
    if rows % kernels or c_in != c_in_g * groups or (rows // kernels) % groups:
        raise ValueError(f"dynconv: bank {tuple(weight.shape)} does not fit input {tuple(x.shape)}, "
                         f"K={kernels}, groups={groups}")
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return rows // kernels, oh, ow, c_in


def _like(x: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An empty 4-D tensor in ``x``'s memory format."""
    last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)


if AVAILABLE:

    @triton.jit
    def _dot(a, b, acc, F32: tl.constexpr, PRECISION: tl.constexpr):
        # the interpreter's bf16/fp16 dot is wrong (numpy has no bfloat16): there the tiles
        # are widened first, which gives the same products (exact in float32)
        if F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _forward_kernel(
        x_ptr, w_ptr, pi_ptr, gi_ptr, go_ptr, y_ptr,
        C_IN_G, C_OUT_G, H, W, OH, OW, GROUPS, K, ROW_G, ROW_K, spn, spt,
        sxn, sxc, sxh, sxw, swn, swo, swi, swh, sww, syn, syc, syh, syw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        F32: tl.constexpr, PRECISION: tl.constexpr, GATED: tl.constexpr,
    ):
        pid_ng, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n, g = pid_ng // GROUPS, pid_ng % GROUPS
        w_ptr += n.to(tl.int64) * swn  # premixed: sample n's own kernel (else swn = 0: the bank)
        offs_m = pid_m * BM + tl.arange(0, BM)
        mask_m = offs_m < OH * OW
        oh, ow = offs_m // OW, offs_m % OW
        offs_c = pid_n * BN + tl.arange(0, BN)
        mask_c = offs_c < C_OUT_G
        x_base = x_ptr + n * sxn + (g * C_IN_G) * sxc
        offs_kk = tl.arange(0, KP)
        mask_kk = offs_kk < K
        w_rows = w_ptr + (g * ROW_G + offs_kk[:, None, None] * ROW_K + offs_c[None, None, :]) * swo
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for rs in range(KH * KW):
            r, s = rs // KW, rs % KW
            p = tl.load(pi_ptr + n * spn + rs * spt + offs_kk, mask=mask_kk, other=0.0)
            ih, iw = oh * SH - PH + r * DH, ow * SW - PW + s * DW
            valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            for c0 in range(0, C_IN_G, BK):
                offs_k = c0 + tl.arange(0, BK)
                mask_k = offs_k < C_IN_G
                xt = tl.load(x_base + offs_k[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
                             mask=valid[:, None] & mask_k[None, :], other=0.0)
                # this sample's kernel tile, sum_k pi[n, k] W_k, from the K tiles (KP, BK, BN)
                wk = tl.load(w_rows + offs_k[None, :, None] * swi + r * swh + s * sww,
                             mask=mask_kk[:, None, None] & mask_k[None, :, None] & mask_c[None, None, :], other=0.0)
                wt = tl.sum(p[:, None, None] * wk.to(tl.float32), axis=0)
                if GATED:  # the input-channel gate on the kernel's rows
                    ci = tl.load(gi_ptr + n * GROUPS * C_IN_G + g * C_IN_G + offs_k, mask=mask_k, other=0.0)
                    wt = wt * ci[:, None]
                acc = _dot(xt, wt.to(xt.dtype), acc, F32, PRECISION)
        if GATED:  # the output-channel gate, once per output tile
            acc = acc * tl.load(go_ptr + n * GROUPS * C_OUT_G + g * C_OUT_G + offs_c, mask=mask_c, other=0.0)[None, :]
        y = (y_ptr + n.to(tl.int64) * syn + (g * C_OUT_G + offs_c)[None, :] * syc
             + oh[:, None] * syh + ow[:, None] * syw)
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])

    @triton.jit
    def _grad_input_tap(
        acc, dy_base, w_ptr, pi_ptr, go_ptr, n, g, r, s, rs, ih, iw, mask_m, offs_c, mask_c, offs_kk, mask_kk,
        C_OUT_G, OH, OW, GROUPS, ROW_G, ROW_K, spn, spt, sdc, sdh, sdw, swo, swi, swh, sww,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
        DW: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr, PRECISION: tl.constexpr, GATED: tl.constexpr,
    ):
        # one kernel tap's share of dx, for positions that it reaches (exact divisions)
        p = tl.load(pi_ptr + n * spn + rs * spt + offs_kk, mask=mask_kk, other=0.0)
        oh, ow = (ih + PH - r * DH) // SH, (iw + PW - s * DW) // SW
        valid = mask_m & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        for c0 in range(0, C_OUT_G, BK):
            offs_k = c0 + tl.arange(0, BK)  # output channels of the group
            mask_k = offs_k < C_OUT_G
            dyt = tl.load(dy_base + offs_k[None, :] * sdc + oh[:, None] * sdh + ow[:, None] * sdw,
                          mask=valid[:, None] & mask_k[None, :], other=0.0)
            rows = g * ROW_G + offs_kk[:, None, None] * ROW_K + offs_k[None, :, None]
            wk = tl.load(w_ptr + rows * swo + offs_c[None, None, :] * swi + r * swh + s * sww,
                         mask=mask_kk[:, None, None] & mask_k[None, :, None] & mask_c[None, None, :], other=0.0)
            wt = tl.sum(p[:, None, None] * wk.to(tl.float32), axis=0)
            if GATED:  # the output-channel gate on the kernel's rows (here the reduced axis)
                co = tl.load(go_ptr + n * GROUPS * C_OUT_G + g * C_OUT_G + offs_k, mask=mask_k, other=0.0)
                wt = wt * co[:, None]
            acc = _dot(dyt, wt.to(dyt.dtype), acc, F32, PRECISION)
        return acc

    @triton.jit
    def _grad_input_kernel(
        dy_ptr, w_ptr, pi_ptr, gi_ptr, go_ptr, dx_ptr,
        C_IN_G, C_OUT_G, H, W, OH, OW, GROUPS, K, ROW_G, ROW_K, spn, spt,
        sdn, sdc, sdh, sdw, swn, swo, swi, swh, sww, sxn, sxc, sxh, sxw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        F32: tl.constexpr, PRECISION: tl.constexpr, GATED: tl.constexpr,
    ):
        pid_ng, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n, g = pid_ng // GROUPS, pid_ng % GROUPS
        w_ptr += n.to(tl.int64) * swn  # premixed: sample n's own kernel (else swn = 0: the bank)
        # input positions of one stride phase (ih % SH, iw % SW): a kernel tap reaches all of
        # them or none, so a strided conv's dx skips the taps that miss instead of masking them
        hp, wp = tl.cdiv(H, SH), tl.cdiv(W, SW)
        tiles = tl.cdiv(hp * wp, BM)
        phase_h, phase_w = (pid_m // tiles) // SW, (pid_m // tiles) % SW
        offs_m = (pid_m % tiles) * BM + tl.arange(0, BM)
        ih, iw = phase_h + (offs_m // wp) * SH, phase_w + (offs_m % wp) * SW
        mask_m = (offs_m < hp * wp) & (ih < H) & (iw < W)
        offs_c = pid_n * BN + tl.arange(0, BN)  # input channels of the group
        mask_c = offs_c < C_IN_G
        dy_base = dy_ptr + n * sdn + (g * C_OUT_G) * sdc
        offs_kk = tl.arange(0, KP)
        mask_kk = offs_kk < K
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for rs in range(KH * KW):
            r, s = rs // KW, rs % KW
            if ((phase_h + PH - r * DH) % SH == 0) & ((phase_w + PW - s * DW) % SW == 0):
                acc = _grad_input_tap(
                    acc, dy_base, w_ptr, pi_ptr, go_ptr, n, g, r, s, rs, ih, iw, mask_m, offs_c, mask_c, offs_kk,
                    mask_kk, C_OUT_G, OH, OW, GROUPS, ROW_G, ROW_K, spn, spt, sdc, sdh, sdw, swo, swi, swh, sww,
                    SH, SW, PH, PW, DH, DW, BK, F32, PRECISION, GATED)
        if GATED:
            acc = acc * tl.load(gi_ptr + n * GROUPS * C_IN_G + g * C_IN_G + offs_c, mask=mask_c, other=0.0)[None, :]
        dx = (dx_ptr + n.to(tl.int64) * sxn + (g * C_IN_G + offs_c)[None, :] * sxc
              + ih[:, None] * sxh + iw[:, None] * sxw)
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])

    @triton.jit
    def _grad_weight_kernel(
        dy_ptr, x_ptr, w_ptr, pi_ptr, gi_ptr, go_ptr, dw_ptr, dpi_ptr, dgi_ptr, dgo_ptr,
        N, C_IN_G, C_OUT_G, H, W, OH, OW, GROUPS, K, ROW_G, ROW_K, spn, spt, PER_SPLIT,
        sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, swo, swi, swh, sww,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        KP: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, BP: tl.constexpr,
        F32: tl.constexpr, PRECISION: tl.constexpr, GATED: tl.constexpr,
    ):
        # program: (group, out-channel tile) x (tap, in-channel tile) x a slice of the batch
        pid_o, pid_i, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        o_tiles = tl.cdiv(C_OUT_G, BO)
        g, offs_o = pid_o // o_tiles, (pid_o % o_tiles) * BO + tl.arange(0, BO)
        i_tiles = tl.cdiv(C_IN_G, BI)
        rs, offs_i = pid_i // i_tiles, (pid_i % i_tiles) * BI + tl.arange(0, BI)
        r, s = rs // KW, rs % KW
        mask_o, mask_i = offs_o < C_OUT_G, offs_i < C_IN_G
        offs_k = tl.arange(0, KP)
        mask_k = offs_k < K
        # the K kernel tiles, (KP, BO, BI), read once
        rows = g * ROW_G + offs_k[:, None, None] * ROW_K + offs_o[None, :, None]
        w_off = rows * swo + offs_i[None, None, :] * swi + r * swh + s * sww
        mask_w = mask_k[:, None, None] & mask_o[None, :, None] & mask_i[None, None, :]
        wk = tl.load(w_ptr + w_off, mask=mask_w, other=0.0).to(tl.float32)
        dw = tl.zeros((KP, BO, BI), dtype=tl.float32)
        tile = pid_o * tl.num_programs(1) + pid_i
        for n in range(pid_s * PER_SPLIT, tl.minimum(pid_s * PER_SPLIT + PER_SPLIT, N)):
            gn = tl.zeros((BO, BI), dtype=tl.float32)  # sample n's kernel gradient tile
            dy_base = dy_ptr + n * sdn + (g * C_OUT_G) * sdc
            x_base = x_ptr + n * sxn + (g * C_IN_G) * sxc
            for p0 in range(0, OH * OW, BP):
                offs_p = p0 + tl.arange(0, BP)
                mask_p = offs_p < OH * OW
                oh, ow = offs_p // OW, offs_p % OW
                ih, iw = oh * SH - PH + r * DH, ow * SW - PW + s * DW
                valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                dyt = tl.load(dy_base + offs_o[:, None] * sdc + oh[None, :] * sdh + ow[None, :] * sdw,
                              mask=mask_o[:, None] & mask_p[None, :], other=0.0)
                xt = tl.load(x_base + offs_i[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
                             mask=valid[:, None] & mask_i[None, :], other=0.0)
                gn = _dot(dyt, xt, gn, F32, PRECISION)
            p = tl.load(pi_ptr + n * spn + rs * spt + offs_k, mask=mask_k, other=0.0)
            if GATED:
                # gn is the gradient of the gated kernel co[o] ci[i] M[o, i]: each gate's
                # partial gradient sums gn * M over this tile's other axis, and M's is gated gn
                ci = tl.load(gi_ptr + n * GROUPS * C_IN_G + g * C_IN_G + offs_i, mask=mask_i, other=0.0)
                co = tl.load(go_ptr + n * GROUPS * C_OUT_G + g * C_OUT_G + offs_o, mask=mask_o, other=0.0)
                gm = gn * tl.sum(p[:, None, None] * wk, axis=0)
                at_i = ((pid_o % o_tiles) * KH * KW + rs) * N + n
                tl.store(dgi_ptr + at_i * GROUPS * C_IN_G + g * C_IN_G + offs_i, tl.sum(gm * co[:, None], axis=0),
                         mask=mask_i)
                at_o = ((pid_i % i_tiles) * KH * KW + rs) * N + n
                tl.store(dgo_ptr + at_o * GROUPS * C_OUT_G + g * C_OUT_G + offs_o, tl.sum(gm * ci[None, :], axis=1),
                         mask=mask_o)
                gn = gn * co[:, None] * ci[None, :]
            dw += p[:, None, None] * gn[None, :, :]
            part = tl.sum(tl.sum(wk * gn[None, :, :], axis=2), axis=1)  # <G_n, W_k> on this tile
            tl.store(dpi_ptr + (tile * N + n) * K + offs_k, part, mask=mask_k)
        out = pid_s.to(tl.int64) * (GROUPS * K * C_OUT_G * C_IN_G * KH * KW)
        d_off = ((rows * C_IN_G + offs_i[None, None, :]) * KH + r) * KW + s
        tl.store(dw_ptr + out + d_off, dw, mask=mask_w)


if AVAILABLE:

    @triton.jit
    def _depthwise_gate(gi_ptr, go_ptr, offs, mask):
        return (tl.load(gi_ptr + offs, mask=mask, other=0.0)
                * tl.load(go_ptr + offs, mask=mask, other=0.0))

    @triton.jit
    def _depthwise_forward_kernel(
        x_ptr, w_ptr, pi_ptr, gi_ptr, go_ptr, y_ptr, C, H, W, OH, OW, K, ROW_G, ROW_K, spn, spt,
        sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        KP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, GATED: tl.constexpr,
    ):
        # depthwise (one in and one out channel per group): a multiply-add per tap, no GEMM
        n, pid_m, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BM + tl.arange(0, BM)
        mask_m = offs_m < OH * OW
        oh, ow = offs_m // OW, offs_m % OW
        offs_c = pid_c * BC + tl.arange(0, BC)
        mask_c = offs_c < C
        offs_k = tl.arange(0, KP)
        mask_k = offs_k < K
        w_rows = w_ptr + (offs_c[None, :] * ROW_G + offs_k[:, None] * ROW_K) * swo  # (KP, BC)
        acc = tl.zeros((BM, BC), dtype=tl.float32)
        for rs in range(KH * KW):
            r, s = rs // KW, rs % KW
            p = tl.load(pi_ptr + n * spn + rs * spt + offs_k, mask=mask_k, other=0.0)
            wk = tl.load(w_rows + r * swh + s * sww, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            wt = tl.sum(p[:, None] * wk.to(tl.float32), axis=0)
            if GATED:  # one channel in and out: both gates scale its kernel
                wt = wt * _depthwise_gate(gi_ptr, go_ptr, n * C + offs_c, mask_c)
            ih, iw = oh * SH - PH + r * DH, ow * SW - PW + s * DW
            valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load(x_ptr + n * sxn + offs_c[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
                         mask=valid[:, None] & mask_c[None, :], other=0.0)
            acc += xt.to(tl.float32) * wt.to(xt.dtype).to(tl.float32)[None, :]
        y = y_ptr + n * syn + offs_c[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])

    @triton.jit
    def _depthwise_grad_input_kernel(
        dy_ptr, w_ptr, pi_ptr, gi_ptr, go_ptr, dx_ptr, C, H, W, OH, OW, K, ROW_G, ROW_K, spn, spt,
        sdn, sdc, sdh, sdw, swo, swh, sww, sxn, sxc, sxh, sxw,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        KP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, GATED: tl.constexpr,
    ):
        n, pid_m, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BM + tl.arange(0, BM)
        mask_m = offs_m < H * W
        ih, iw = offs_m // W, offs_m % W
        offs_c = pid_c * BC + tl.arange(0, BC)
        mask_c = offs_c < C
        offs_k = tl.arange(0, KP)
        mask_k = offs_k < K
        w_rows = w_ptr + (offs_c[None, :] * ROW_G + offs_k[:, None] * ROW_K) * swo
        acc = tl.zeros((BM, BC), dtype=tl.float32)
        for rs in range(KH * KW):
            r, s = rs // KW, rs % KW
            p = tl.load(pi_ptr + n * spn + rs * spt + offs_k, mask=mask_k, other=0.0)
            wk = tl.load(w_rows + r * swh + s * sww, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            wt = tl.sum(p[:, None] * wk.to(tl.float32), axis=0)
            if GATED:
                wt = wt * _depthwise_gate(gi_ptr, go_ptr, n * C + offs_c, mask_c)
            th, tw = ih + PH - r * DH, iw + PW - s * DW
            th0, tw0 = tl.where(th >= 0, th, 0), tl.where(tw >= 0, tw, 0)
            oh, ow = th0 // SH, tw0 // SW
            valid = (mask_m & (th >= 0) & (tw >= 0) & (th0 % SH == 0) & (tw0 % SW == 0)
                     & (oh < OH) & (ow < OW))
            dyt = tl.load(dy_ptr + n * sdn + offs_c[None, :] * sdc + oh[:, None] * sdh + ow[:, None] * sdw,
                          mask=valid[:, None] & mask_c[None, :], other=0.0)
            acc += dyt.to(tl.float32) * wt.to(dyt.dtype).to(tl.float32)[None, :]
        dx = dx_ptr + n * sxn + offs_c[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])

    @triton.jit
    def _depthwise_grad_weight_kernel(
        dy_ptr, x_ptr, w_ptr, pi_ptr, gi_ptr, go_ptr, dw_ptr, dpi_ptr, dg_ptr,
        N, C, H, W, OH, OW, K, ROW_G, ROW_K, spn, spt, PER_SPLIT,
        sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, swo, swh, sww,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        KP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, GATED: tl.constexpr,
    ):
        # program: (channel tile) x (tap) x a slice of the batch
        pid_c, rs, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r, s = rs // KW, rs % KW
        offs_c = pid_c * BC + tl.arange(0, BC)
        mask_c = offs_c < C
        offs_k = tl.arange(0, KP)
        mask_k = offs_k < K
        rows = offs_c[None, :] * ROW_G + offs_k[:, None] * ROW_K  # (KP, BC)
        mask_w = mask_k[:, None] & mask_c[None, :]
        wk = tl.load(w_ptr + rows * swo + r * swh + s * sww, mask=mask_w, other=0.0).to(tl.float32)
        dw = tl.zeros((KP, BC), dtype=tl.float32)
        tile = pid_c * tl.num_programs(1) + rs
        for n in range(pid_s * PER_SPLIT, tl.minimum(pid_s * PER_SPLIT + PER_SPLIT, N)):
            gn = tl.zeros((BC,), dtype=tl.float32)
            for p0 in range(0, OH * OW, BM):
                offs_p = p0 + tl.arange(0, BM)
                mask_p = offs_p < OH * OW
                oh, ow = offs_p // OW, offs_p % OW
                ih, iw = oh * SH - PH + r * DH, ow * SW - PW + s * DW
                valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                dyt = tl.load(dy_ptr + n * sdn + offs_c[None, :] * sdc + oh[:, None] * sdh + ow[:, None] * sdw,
                              mask=mask_p[:, None] & mask_c[None, :], other=0.0)
                xt = tl.load(x_ptr + n * sxn + offs_c[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
                             mask=valid[:, None] & mask_c[None, :], other=0.0)
                gn += tl.sum(dyt.to(tl.float32) * xt.to(tl.float32), axis=0)
            p = tl.load(pi_ptr + n * spn + rs * spt + offs_k, mask=mask_k, other=0.0)
            if GATED:  # the product of both gates' partial gradient at this tap: gn * M
                tl.store(dg_ptr + (rs * N + n) * C + offs_c, gn * tl.sum(p[:, None] * wk, axis=0), mask=mask_c)
                gn = gn * _depthwise_gate(gi_ptr, go_ptr, n * C + offs_c, mask_c)
            dw += p[:, None] * gn[None, :]
            tl.store(dpi_ptr + (tile * N + n) * K + offs_k, tl.sum(wk * gn[None, :], axis=1), mask=mask_k)
        out = pid_s.to(tl.int64) * (C * K * KH * KW)
        tl.store(dw_ptr + out + (rows * KH + r) * KW + s, dw, mask=mask_w)


_INTERPRETED = AVAILABLE and type(_forward_kernel).__name__ == "InterpretedFunction"


def _kernel_tiles(kernels: int, blocks: Blocks, dtype: torch.dtype) -> tuple[int, int]:
    """K rounded up to a power of two, and the reduction tile that keeps the K kernel
    tiles (KP x BK x BN) in registers within 16 KB: 8192 bf16/fp16 elements, 4096 float32.
    Compiled for sm_90 (``benchmarks/kernel_resources.py``), 8192 float32 elements spilled
    in dx (100 B a thread at 255 registers); 4096 spill nowhere."""
    kp = triton.next_power_of_2(kernels)
    budget = 16384 // dtype.itemsize
    return kp, max(16, min(blocks.k, triton.next_power_of_2(budget // (kp * blocks.n) or 1)))


def _precision(dtype: torch.dtype) -> str:
    """float32 products in TF32 where cuDNN's convs may use it, else in full precision;
    half types: Triton's default."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32"


def _rows(kernels: int, c_out_g: int, groups: int, kernel_major: bool) -> dict[str, int]:
    """Where kernel k's out-channel c of group g lies in the bank, in rows: ``g * ROW_G +
    k * ROW_K + c``. Dynamic convolution stores (group, kernel, channel), ODConv (kernel,
    group, channel)."""
    if kernel_major:
        return dict(ROW_G=c_out_g, ROW_K=groups * c_out_g)
    return dict(ROW_G=kernels * c_out_g, ROW_K=c_out_g)


def _pi_strides(pi: Tensor) -> tuple[int, int]:
    """pi's sample and tap strides; the tap stride is 0 where one mix serves every tap."""
    return pi.stride(0), (pi.stride(1) if pi.shape[1] > 1 else 0)


def _constexprs(weight: Tensor, stride: list[int], padding: list[int], dilation: list[int]) -> dict[str, int]:
    """The conv's geometry, which every kernel takes as constexprs."""
    kh, kw = weight.shape[2:]
    return dict(SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
                KH=kh, KW=kw)


def _gate_args(pi: Tensor, gates: tuple[Tensor | None, Tensor | None]) -> tuple[Tensor, Tensor, bool]:
    """The gate pointers a kernel takes (pi stands in for absent ones, never read) and GATED."""
    gate_in, gate_out = gates
    if gate_in is None or gate_out is None:
        return pi, pi, False
    return gate_in, gate_out, True


def _premix(x: Tensor, weight: Tensor, pi: Tensor, gate_in: Tensor | None, gate_out: Tensor | None, kernels: int,
            groups: int, kernel_major: bool) -> tuple[Tensor, tuple[int, ...]]:
    """Every sample's kernel of a dense conv, with its per-tap mix and gates, as N kernels
    in x's dtype by one product accumulated in float32 (what the per-sample form stores, made
    as it makes them), for the forward or dx kernel to read with K = 1. Returns them and
    their strides (sample, out-channel, in-channel, kernel row, kernel column)."""
    n = x.shape[0]
    rows, c_in_g, kh, kw = weight.shape
    c_out = rows // kernels
    # the bank as (K, C_out * C_in_g, taps), out-channels ordered (group, channel)
    bank = weight.reshape(*((kernels, groups) if kernel_major else (groups, kernels)), c_out // groups, -1)
    bank = (bank if kernel_major else bank.transpose(0, 1)).reshape(kernels, c_out * c_in_g, kh * kw).to(x.dtype)
    if pi.shape[1] > 1:  # a mix per tap: tap t is sum_k pi[n, t, k] W_k[..., t], laid out (tap, sample, o, i)
        mixed = torch.bmm(pi.to(x.dtype).transpose(0, 1), bank.permute(2, 0, 1))
        taps = mixed.view(kh * kw, n, c_out, c_in_g)
        strides: tuple[int, ...] = (c_out * c_in_g, c_in_g, 1, kw * n * c_out * c_in_g, n * c_out * c_in_g)
    else:  # one mix for every tap, laid out (sample, o, i, tap)
        mixed = pi[:, 0].to(x.dtype) @ bank.reshape(kernels, -1)
        taps = mixed.view(n, c_out, c_in_g, kh * kw).permute(3, 0, 1, 2)
        strides = (c_out * c_in_g * kh * kw, c_in_g * kh * kw, kh * kw, kw, 1)
    if gate_in is not None and gate_out is not None:
        g_in = gate_in.view(n, groups, 1, c_in_g).expand(n, groups, c_out // groups, c_in_g).reshape(n, c_out, c_in_g)
        taps.mul_((gate_out[:, :, None] * g_in).to(x.dtype))
    return mixed, strides


class _Operands(NamedTuple):
    """What the forward and dx kernels take besides the maps (:func:`_operands`)."""

    weight: Tensor
    w_strides: tuple[int, ...]
    pi: Tensor
    kernels: int
    rows: dict[str, int]
    gi: Tensor
    go: Tensor
    gated: bool


def _operands(x: Tensor, weight: Tensor, pi: Tensor, gate_in: Tensor | None, gate_out: Tensor | None, kernels: int,
              groups: int, kernel_major: bool, blocks: Blocks) -> _Operands:
    """The kernels' weight operands: the bank (sample stride 0) with pi and the gates, or,
    where ``blocks.premix`` asks and the conv is dense, the N premixed kernels
    (:func:`_premix`) with K = 1 and no gates; then K, the row strides and the gate pointers."""
    c_out_g = weight.shape[0] // kernels // groups
    w_strides = (0, *weight.stride())
    if blocks.premix and (weight.shape[1], c_out_g) != (1, 1):  # depthwise has nothing to premix
        weight, w_strides = _premix(x, weight, pi, gate_in, gate_out, kernels, groups, kernel_major)
        pi, gate_in, gate_out, kernels, kernel_major = pi.new_ones(x.shape[0], 1, 1), None, None, 1, False
    return _Operands(weight, w_strides, pi, kernels, _rows(kernels, c_out_g, groups, kernel_major),
                     *_gate_args(pi, (gate_in, gate_out)))


def _forward(x: Tensor, weight: Tensor, pi: Tensor, gate_in: Tensor | None, gate_out: Tensor | None, kernels: int,
             stride: list[int], padding: list[int], dilation: list[int], groups: int, kernel_major: bool,
             blocks: Blocks) -> Tensor:
    c_out, oh, ow, c_in = _geometry(x, weight, kernels, stride, padding, dilation, groups)
    n, _, h, w = x.shape
    c_in_g, c_out_g = c_in // groups, c_out // groups
    y = _like(x, (n, c_out, oh, ow), x.dtype)
    geometry = _constexprs(weight, stride, padding, dilation)
    op = _operands(x, weight, pi, gate_in, gate_out, kernels, groups, kernel_major, blocks)
    _CALLS["forward"] += 1
    if c_in_g == c_out_g == 1:
        grid = (n, triton.cdiv(oh * ow, blocks.m), triton.cdiv(c_in, blocks.n))
        _depthwise_forward_kernel[grid](
            x, op.weight, op.pi, op.gi, op.go, y, c_in, h, w, oh, ow, op.kernels, *op.rows.values(),
            *_pi_strides(op.pi), *x.stride(), op.weight.stride(0), *op.weight.stride()[2:], *y.stride(), **geometry,
            KP=triton.next_power_of_2(op.kernels), BM=blocks.m, BC=blocks.n, GATED=op.gated, num_warps=blocks.warps)
        return y
    grid = (n * groups, triton.cdiv(oh * ow, blocks.m), triton.cdiv(c_out_g, blocks.n))
    kp, bk = _kernel_tiles(op.kernels, blocks, x.dtype)
    _forward_kernel[grid](
        x, op.weight, op.pi, op.gi, op.go, y, c_in_g, c_out_g, h, w, oh, ow, groups, op.kernels, *op.rows.values(),
        *_pi_strides(op.pi), *x.stride(), *op.w_strides, *y.stride(), **geometry,
        KP=kp, BM=blocks.m, BN=blocks.n, BK=bk, F32=interpreting(), PRECISION=_precision(x.dtype), GATED=op.gated,
        num_warps=blocks.warps,
    )
    return y


def _grad_input(dy: Tensor, x: Tensor, weight: Tensor, pi: Tensor, gate_in: Tensor | None, gate_out: Tensor | None,
                kernels: int, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                kernel_major: bool, blocks: Blocks) -> Tensor:
    n, c_in, h, w = x.shape
    c_out, oh, ow = dy.shape[1:]
    c_in_g, c_out_g = c_in // groups, c_out // groups
    dx = _like(x, tuple(x.shape), x.dtype)
    geometry = _constexprs(weight, stride, padding, dilation)
    op = _operands(x, weight, pi, gate_in, gate_out, kernels, groups, kernel_major, blocks)
    _CALLS["grad_input"] += 1
    if c_in_g == c_out_g == 1:
        grid = (n, triton.cdiv(h * w, blocks.m), triton.cdiv(c_in, blocks.n))
        _depthwise_grad_input_kernel[grid](
            dy, op.weight, op.pi, op.gi, op.go, dx, c_in, h, w, oh, ow, op.kernels, *op.rows.values(),
            *_pi_strides(op.pi), *dy.stride(), op.weight.stride(0), *op.weight.stride()[2:], *dx.stride(), **geometry,
            KP=triton.next_power_of_2(op.kernels), BM=blocks.m, BC=blocks.n, GATED=op.gated, num_warps=blocks.warps)
        return dx
    # the input's positions by stride phase (the kernel's docstring), tiled within each phase
    phase_tiles = triton.cdiv(triton.cdiv(h, stride[0]) * triton.cdiv(w, stride[1]), blocks.m)
    grid = (n * groups, stride[0] * stride[1] * phase_tiles, triton.cdiv(c_in_g, blocks.n))
    kp, bk = _kernel_tiles(op.kernels, blocks, x.dtype)
    _grad_input_kernel[grid](
        dy, op.weight, op.pi, op.gi, op.go, dx, c_in_g, c_out_g, h, w, oh, ow, groups, op.kernels, *op.rows.values(),
        *_pi_strides(op.pi), *dy.stride(), *op.w_strides, *dx.stride(), **geometry,
        KP=kp, BM=blocks.m, BN=blocks.n, BK=bk, F32=interpreting(), PRECISION=_precision(x.dtype), GATED=op.gated,
        num_warps=blocks.warps,
    )
    return dx


def _grad_weight(dy: Tensor, x: Tensor, weight: Tensor, pi: Tensor, gate_in: Tensor | None,
                 gate_out: Tensor | None, kernels: int, stride: list[int], padding: list[int], dilation: list[int],
                 groups: int, kernel_major: bool, blocks: Blocks) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dW, dpi and, with gates, the gates' gradients (else empty tensors)."""
    n, c_in, h, w = x.shape
    c_out, oh, ow = dy.shape[1:]
    c_in_g, c_out_g = c_in // groups, c_out // groups
    kh, kw = weight.shape[2:]
    kp = triton.next_power_of_2(kernels)
    geometry = dict(_constexprs(weight, stride, padding, dilation), KP=kp)
    rows = _rows(kernels, c_out_g, groups, kernel_major)
    gi, go, gated = _gate_args(pi, (gate_in, gate_out))

    def partial(shape: tuple[int, ...]) -> Tensor:  # float32 partial sums
        return torch.empty(shape, dtype=torch.float32, device=x.device)

    _CALLS["grad_weight"] += 1
    if c_in_g == c_out_g == 1:
        grid = (triton.cdiv(c_in, blocks.n), kh * kw)
        splits, per_split = _splits(n, grid[0] * grid[1], blocks.programs)
        dw = partial((splits, *weight.shape))
        dpi = partial((grid[0] * grid[1], n, kernels))
        dg = partial((kh * kw, n, c_in) if gated else (0,))  # per tap
        _depthwise_grad_weight_kernel[grid + (splits,)](
            dy, x, weight, pi, gi, go, dw, dpi, dg, n, c_in, h, w, oh, ow, kernels, *rows.values(),
            *_pi_strides(pi), per_split, *dy.stride(), *x.stride(), weight.stride(0), *weight.stride()[2:],
            **geometry, BM=blocks.m, BC=blocks.n, GATED=gated, num_warps=blocks.warps)
        dw, dpi = _reduce_grad_weight(dw, dpi, weight, pi, kh * kw, 1)
        if not gated:
            return dw, dpi, dg, partial((0,))
        dg = dg.sum(0)  # the gradient of the product of the two gates
        return dw, dpi, dg * go, dg * gi
    # the K kernel tiles and their gradients, (KP, BO, BI) each, stay in registers: at most
    # 1024 elements a warp each where K allows
    bo, bi = min(blocks.n, blocks.dw_rows), min(blocks.k, 32)
    while kp * bo * bi > 1024 * blocks.dw_warps and max(bo, bi) > 16:
        bo, bi = (bo // 2, bi) if bo >= bi else (bo, bi // 2)
    # float32 position tiles half as long: at 64 the gated kernel spilled 40 B a thread (sm_90)
    bp = max(16, blocks.dw_positions // (x.element_size() // 2))
    o_tiles, i_tiles = triton.cdiv(c_out_g, bo), triton.cdiv(c_in_g, bi)
    grid0, grid1 = groups * o_tiles, kh * kw * i_tiles
    splits, per_split = _splits(n, grid0 * grid1, blocks.programs)
    dw = partial((splits, *weight.shape))
    dpi = partial((grid0 * grid1, n, kernels))
    # the gates' partial gradients, one per tile of the other channel axis and tap
    dgi = partial((o_tiles * kh * kw, n, c_in) if gated else (0,))
    dgo = partial((i_tiles * kh * kw, n, c_out) if gated else (0,))
    _grad_weight_kernel[(grid0, grid1, splits)](
        dy, x, weight, pi, gi, go, dw, dpi, dgi, dgo, n, c_in_g, c_out_g, h, w, oh, ow, groups, kernels,
        *rows.values(), *_pi_strides(pi), per_split, *dy.stride(), *x.stride(), *weight.stride(), **geometry,
        BO=bo, BI=bi, BP=bp, F32=interpreting(), PRECISION=_precision(x.dtype), GATED=gated,
        num_warps=blocks.dw_warps,
    )
    dw, dpi = _reduce_grad_weight(dw, dpi, weight, pi, kh * kw, i_tiles)
    return (dw, dpi, dgi.sum(0), dgo.sum(0)) if gated else (dw, dpi, dgi, dgo)


def _splits(n: int, programs: int, target: int) -> tuple[int, int]:
    """Split the batch so that the dW grid has about ``target`` programs (at most 32 splits,
    each writing its own float32 partial dW): how many splits, and samples per split."""
    splits = max(1, min(n, (target + programs - 1) // programs, 32))
    per_split = triton.cdiv(n, splits)
    return triton.cdiv(n, per_split), per_split


def _reduce_grad_weight(dw: Tensor, dpi: Tensor, weight: Tensor, pi: Tensor, taps: int,
                        inner: int) -> tuple[Tensor, Tensor]:
    """Sum the per-split partial dW, and the per-tile partial dpi into pi's shape. The dW
    grids order their tiles (outer, tap, ``inner``), so a per-tap pi sums each tap's tiles.
    dW in the weight's dtype and layout."""
    last = not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    dw = dw.sum(0).to(weight.dtype)
    if last:
        dw = dw.contiguous(memory_format=torch.channels_last)
    dpi = dpi.view(-1, taps, inner, *dpi.shape[1:])
    dpi = dpi.sum((0, 1, 2))[:, None] if pi.shape[1] == 1 else dpi.sum((0, 2)).transpose(0, 1)
    return dw, dpi.contiguous()


# --- the torch.library op ----------------------------------------------------------------

if AVAILABLE:

    @torch.library.custom_op("attnsurgeon::dynconv", mutates_args=())
    def _dynconv(x: Tensor, weight: Tensor, pi: Tensor, gate_in: Tensor | None, gate_out: Tensor | None,
                 kernels: int, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                 kernel_major: bool, blocks: list[int]) -> Tensor:
        return _forward(x, weight, pi, gate_in, gate_out, kernels, stride, padding, dilation, groups, kernel_major,
                        Blocks(*blocks))

    @_dynconv.register_fake
    def _(x, weight, pi, gate_in, gate_out, kernels, stride, padding, dilation, groups,  # noqa: ANN001, ANN202
          kernel_major, blocks):  # noqa: ANN001
        c_out, oh, ow, _ = _geometry(x, weight, kernels, stride, padding, dilation, groups)
        return _like(x, (x.shape[0], c_out, oh, ow), x.dtype)

    @torch.library.custom_op("attnsurgeon::dynconv_grad_input", mutates_args=())
    def _dynconv_grad_input(dy: Tensor, x: Tensor, weight: Tensor, pi: Tensor, gate_in: Tensor | None,
                            gate_out: Tensor | None, kernels: int, stride: list[int], padding: list[int],
                            dilation: list[int], groups: int, kernel_major: bool, blocks: list[int]) -> Tensor:
        return _grad_input(dy, x, weight, pi, gate_in, gate_out, kernels, stride, padding, dilation, groups,
                           kernel_major, Blocks(*blocks))

    @_dynconv_grad_input.register_fake
    def _(dy, x, weight, pi, gate_in, gate_out, kernels, stride, padding, dilation, groups,  # noqa: ANN001, ANN202
          kernel_major, blocks):  # noqa: ANN001
        return _like(x, tuple(x.shape), x.dtype)

    @torch.library.custom_op("attnsurgeon::dynconv_grad_weight", mutates_args=())
    def _dynconv_grad_weight(dy: Tensor, x: Tensor, weight: Tensor, pi: Tensor, gate_in: Tensor | None,
                             gate_out: Tensor | None, kernels: int, stride: list[int], padding: list[int],
                             dilation: list[int], groups: int, kernel_major: bool,
                             blocks: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _grad_weight(dy, x, weight, pi, gate_in, gate_out, kernels, stride, padding, dilation, groups,
                            kernel_major, Blocks(*blocks))

    @_dynconv_grad_weight.register_fake
    def _(dy, x, weight, pi, gate_in, gate_out, kernels, stride, padding, dilation, groups,  # noqa: ANN001, ANN202
          kernel_major, blocks):  # noqa: ANN001
        dw = _like(weight, tuple(weight.shape), weight.dtype)
        dpi = pi.new_empty(tuple(pi.shape), dtype=torch.float32)
        gated = gate_in is not None and gate_out is not None
        dgi = pi.new_empty(tuple(gate_in.shape) if gated else (0,), dtype=torch.float32)
        dgo = pi.new_empty(tuple(gate_out.shape) if gated else (0,), dtype=torch.float32)
        return dw, dpi, dgi, dgo

    def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x, weight, pi, gate_in, gate_out, *ctx.args = inputs
        ctx.save_for_backward(x, weight, pi, gate_in, gate_out)

    def _backward(ctx, dy: Tensor):  # noqa: ANN001, ANN202
        x, weight, pi, gate_in, gate_out = ctx.saved_tensors
        dx = dw = dpi = dgi = dgo = None
        if ctx.needs_input_grad[0]:
            dx = _dynconv_grad_input(dy, x, weight, pi, gate_in, gate_out, *ctx.args)
        if any(ctx.needs_input_grad[1:5]):
            dw, dpi, dgi, dgo = _dynconv_grad_weight(dy, x, weight, pi, gate_in, gate_out, *ctx.args)
            dpi = dpi.to(pi.dtype)
            if gate_in is None or gate_out is None:
                dgi = dgo = None
        return dx, dw, dpi, dgi, dgo, None, None, None, None, None, None, None

    _dynconv.register_autograd(_backward, setup_context=_setup_context)


def dynamic_conv2d(x: Tensor, weight: Tensor, pi: Tensor, *, kernels: int, stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int], groups: int, kernel_major: bool = False,
                   gates: tuple[Tensor, Tensor] | None = None, blocks: Blocks | None = None) -> Tensor:
    """``conv2d(x[n], sum_k pi[n, k] W_k)`` for every sample n, without bias.

    Args:
        x: ``(N, C_in, H, W)``, contiguous or channels_last; ``weight`` has its dtype.
        weight: the bank ``(K * C_out, C_in / groups, kh, kw)``, any memory format, its rows
            ordered (group, kernel, out-channel of the group), or with ``kernel_major``
            (kernel, group, out-channel of the group).
        pi: ``(N, K)`` attention weights, or ``(N, kh * kw, K)`` for a mix per kernel tap
            (ODConv's spatial attention times its kernel attention): tap t of sample n's
            kernel is ``sum_k pi[n, t, k] W_k[..., t]``. Computed in float32.
        gates: ``(gate_in (N, C_in), gate_out (N, C_out))``: sample n's kernel scaled by
            ``gate_out[n, o] * gate_in[n, i]`` (ODConv's channel attentions; the same as
            multiplying the input and the output by them, without those passes). Float32.
        blocks: tile sizes (the tests use small ones in the interpreter).
    """
    blocks = blocks or _BLOCKS
    taps = weight.shape[2] * weight.shape[3]
    if pi.dim() == 2:
        pi = pi[:, None]
    if pi.dim() != 3 or pi.shape[1] not in (1, taps) or pi.shape[2] != kernels or pi.shape[0] != x.shape[0]:
        raise ValueError(f"dynconv: pi {tuple(pi.shape)} is neither (N, K) nor (N, kh * kw, K) for input "
                         f"{tuple(x.shape)}, K={kernels}, {taps} taps")
    gate_in = gate_out = None
    if gates is not None:
        gate_in, gate_out = (g.float().contiguous() for g in gates)
        c_out = weight.shape[0] // kernels
        if gate_in.shape != (x.shape[0], x.shape[1]) or gate_out.shape != (x.shape[0], c_out):
            raise ValueError(f"dynconv: gates {tuple(gate_in.shape)}, {tuple(gate_out.shape)} do not fit input "
                             f"{tuple(x.shape)} and {c_out} output channels")
    return _dynconv(x, weight, pi.float().contiguous(), gate_in, gate_out, kernels, list(stride), list(padding),
                    list(dilation), groups, kernel_major, blocks.as_list())
