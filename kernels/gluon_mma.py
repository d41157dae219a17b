"""A Gluon (Triton's layout-explicit dialect) int4 kernel for batches of 1 to 64 rows: each
thread's 16-byte weight loads land directly in its tensor-core fragments, with no trip through
shared memory. A trial kernel: benchmarks and GPU tests run it; ``gptq_matmul`` does not yet.

    g = prepare(p)                   # p: triton_pack.PreparedGPTQ (4-bit), once at load
    y = matmul(x, g)                 # x [M, K] fp16/bf16 on an sm_80+ GPU, M <= 64 -> [M, N]

Why: the Triton tensor-core kernel (``triton_gemm``) dequantizes each weight tile in registers
and then has Triton move it through shared memory into the MMA operand layout (stores, ldmatrix,
barriers); at batch 16 on an H100 it ran at 1.4-1.9x fp16, the CUDA decode kernel, which loads
weights straight into fragments, at 2.5-3.0x. Gluon lets the
kernel state layouts, so this one does the same, and the compiler proves it (below).

The problem is computed swapped, out^T [N, M] = W^T [N, K] @ x^T [K, M], so the weights fill the
MMA's 16-row side (``mma_v2``, m16n8k16, fp32 accumulators) and the batch its 8-column side.
Both operands use ``DotOperandLayout(k_width=8)``: every thread then holds runs of 8
consecutive k, which is what one packed int32 word holds. One CTA (``NW`` warps) computes
``BN = 16 * NW`` outputs over tiles of ``BK`` inputs; grid (N / BN, split_k), split-K partial
sums added with atomics.

Weight layout (``prepare``): per tile, the BN x BK / 8 words are stored in the order of the
hardware, (warp, lane, register), so that each thread loads its ``BK / 16`` words as contiguous
16-byte vectors. The kernel reshapes and permutes that [NW, 32, R] block back into [BN, BK / 8]
(``tile_words_torch`` is the same in torch): register, lane and warp assignments are unchanged
by it, which ``convert_layout(..., assert_trivial=True)`` checks when the kernel compiles, and
again after unpacking, against the MMA's operand layout. Within a word the 8 codes of k = 8w + j
sit at nibble ``NIBBLE[j] = (j >> 1) + 4 * (j & 1)`` (even j in the low half-word), so one LOP3
makes two half-precision values ``MAGIC + code`` at once (``ASM_F16``, ``ASM_BF16``: the
exponent trick) and one half2 subtraction takes the zero point off both. Each tile lies in one
group (``BK`` divides the group size), so its product is scaled once, in fp32. Scales and zero
points are ``triton_pack``'s tensors; act-order activations are permuted per call as for the
Triton kernels (``triton_pack.permute_input``).

Compiled for sm_90 on the CPU (``python benchmarks/triton_sass.py --gluon``, 2026-12-08): no
shared memory, and per weight a thread handles, 2.1 SASS instructions in the K loop at up to 8
batch rows (47 registers), 2.6 at 16 (72), 3.4 at 32 and 5.2 at 64 (the MMAs grow with the
rows); the Triton tensor-core kernel's batch-16 tile counts 6.6 (with 9 barriers and the
shared-memory round trip), its batch-64 tile 7.2. Not yet run on a GPU.

Gluon is experimental in Triton: this module imports it only when a kernel is built, and
``unavailable()`` says why it cannot run here. The Triton interpreter does not run Gluon, so the
CPU tests (``tests/test_gluon_mma.py``) check the layouts (compiling for sm_90), the packing, the
asm (through a small PTX emulator) and the kernel's steps replayed in torch against the
reference; the kernel's values are checked on a GPU (tests marked ``gpu``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from triton.language import constexpr
from triton.runtime.jit import constexpr_function

from .triton_pack import PreparedGPTQ, permute_input, unpack_kernel_codes

NW = 4                  # warps per CTA
BN = 16 * NW            # outputs per CTA: one m16 MMA row block per warp
BK = 128                # inputs per tile: each thread loads BK // 16 = 8 words (two 16-byte vectors)
R = BK // 16            # words per thread per tile
MAX_M = 64              # batch rows one CTA computes (the MMA's n side: 8, 16, 32 or 64)
# nibble of code j in its word: even j in the low half-word, odd j in the high one
NIBBLE = [(j >> 1) + 4 * (j & 1) for j in range(8)]


# code - zero for the 8 codes of word $4, as four half2 registers $0..$3 (pair i: codes 2i and
# 2i + 1); $12 is (MAGIC + zero) twice, $16 -(MAGIC / 16 + zero) twice. fp16: 0x6400 | c is
# 1024 + c and 0x6400 | c << 4 is 1024 + 16 c, so one shift serves two pairs.
ASM_F16 = constexpr(
    "{ .reg .b32 e, k;\n"
    "mov.b32 k, 0x2c002c00;\n"                                              # 1/16, 1/16
    "shr.u32 e, $4, 8;\n"
    "lop3.b32 $0, $4, 0x000f000f, 0x64006400, 0xea;\n"
    "lop3.b32 $1, $4, 0x00f000f0, 0x64006400, 0xea;\n"
    "lop3.b32 $2, e, 0x000f000f, 0x64006400, 0xea;\n"
    "lop3.b32 $3, e, 0x00f000f0, 0x64006400, 0xea;\n"
    "sub.f16x2 $0, $0, $12; fma.rn.f16x2 $1, $1, k, $16;\n"
    "sub.f16x2 $2, $2, $12; fma.rn.f16x2 $3, $3, k, $16; }")
# bf16: 0x4300 | c is 128 + c; the 7-bit mantissa leaves no room for c << 4, so one shift per pair
ASM_BF16 = constexpr(
    "{ .reg .b32 b, c, d;\n"
    "shr.u32 b, $4, 4; shr.u32 c, $4, 8; shr.u32 d, $4, 12;\n"
    "lop3.b32 $0, $4, 0x000f000f, 0x43004300, 0xea;\n"
    "lop3.b32 $1, b, 0x000f000f, 0x43004300, 0xea;\n"
    "lop3.b32 $2, c, 0x000f000f, 0x43004300, 0xea;\n"
    "lop3.b32 $3, d, 0x000f000f, 0x43004300, 0xea;\n"
    "sub.bf16x2 $0, $0, $12; sub.bf16x2 $1, $1, $12; sub.bf16x2 $2, $2, $12; sub.bf16x2 $3, $3, $12; }")


@constexpr_function     # (also called while a kernel is traced)
def word_bases(nw: int, bk: int) -> tuple[list, list, list]:
    """The (register, lane, warp) bases of a tile's [16 * nw, bk // 8] words as the unpacked MMA
    operand needs them (each basis: the (n, w) a set bit adds): register bits n + 8 and w + 4,
    8, ...; lane bits w + 1, 2 and n + 1, 2, 4; warp bits n + 16, 32, ..."""
    regs = [[8, 0]] + [[0, 4 << i] for i in range((bk // 32).bit_length() - 1)]
    lanes = [[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]]
    warps = [[16 << i, 0] for i in range(nw.bit_length() - 1)]
    return regs, lanes, warps


class PreparedGluon(NamedTuple):
    """The kernel's tensors for one 4-bit layer (layout in the module docstring)."""
    qweight: torch.Tensor           # int32 [Np / BN, Kp / BK, NW * 32 * R]
    base: PreparedGPTQ              # scales, zeros, perm, group size and shapes


def tile_words_torch(raw: torch.Tensor) -> torch.Tensor:
    """The kernel's view of one tile, in torch: raw [NW, 32, R] (hardware order) -> [BN, BK // 8]."""
    return raw.reshape(NW, 8, 4, R // 2, 2).permute(0, 4, 1, 3, 2).reshape(BN, BK // 8)


def words_to_tiles(words: torch.Tensor) -> torch.Tensor:
    """words [Np, Kp // 8] (logical order) -> [Np / BN, Kp / BK, NW * 32 * R] (hardware order);
    the inverse of ``tile_words_torch`` applied to every tile."""
    n, kw = words.shape
    t = words.reshape(n // BN, BN, kw // (BK // 8), BK // 8).permute(0, 2, 1, 3)
    t = t.reshape(n // BN, kw // (BK // 8), NW, 2, 8, R // 2, 4).permute(0, 1, 2, 4, 6, 5, 3)
    return t.reshape(n // BN, kw // (BK // 8), NW * 32 * R)


def pack_words(codes: torch.Tensor) -> torch.Tensor:
    """codes [Np, Kp] (0..15) -> int32 [Np, Kp // 8]: word w holds k = 8w + j at NIBBLE[j]."""
    n, kp = codes.shape
    v = codes.to(torch.int64).reshape(n, kp // 8, 8)
    shifts = torch.tensor(NIBBLE, device=codes.device, dtype=torch.int64) * 4
    words = (v << shifts).sum(dim=2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def group_tiles(p: PreparedGPTQ) -> int:
    """K tiles per group (0: one group for all of K'); ValueError where a tile would straddle
    two groups (the kernel scales each tile's product by one group's scales)."""
    k_rows = p.perm.numel() if p.perm is not None else p.in_features
    if p.group_size >= k_rows:
        return 0
    if p.group_size % BK:
        raise ValueError(f"group_size={p.group_size} must be a multiple of {BK} (or one group)")
    return p.group_size // BK


def prepare(p: PreparedGPTQ) -> PreparedGluon:
    """A 4-bit ``triton_pack`` layer -> the Gluon kernel's layout (a new copy of the weights)."""
    if p.bits != 4:
        raise ValueError(f"the Gluon kernel reads 4-bit layers, got bits={p.bits}")
    group_tiles(p)                                                  # refuses straddling tiles
    codes = unpack_kernel_codes(p.qweight, p.bits)                  # [Np, Kp]
    return PreparedGluon(words_to_tiles(pack_words(codes)).contiguous(), p)


@functools.cache
def unavailable() -> str | None:
    """None when the kernel can run here, else why not."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "no CUDA device"
    if torch.cuda.get_device_capability() < (8, 0):
        return "the Gluon kernel needs an sm_80+ GPU (mma.sync m16n8k16 bf16)"
    try:
        _kernel()
    except (ImportError, AttributeError) as e:
        return f"this Triton has no usable Gluon: {e}"
    return None


@functools.cache
def _kernel():
    """Build the Gluon kernel (imports Triton's experimental Gluon; raises if it is missing)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    @gluon.constexpr_function
    def word_layout(nw, bk):
        return gl.DistributedLinearLayout(*word_bases(nw, bk), [], [16 * nw, bk // 8])

    @gluon.jit
    def codes_bf16(q, zz):
        """[BN, BK] tensors, each element the word holding its code and the row's 128 + zero ->
        code - zero as bf16 (``ASM_BF16``: 8 consecutive k per asm, in four bf16x2 registers;
        the word and zero operands repeat)."""
        return gl.inline_asm_elementwise(ASM_BF16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", [q, zz],
                                         dtype=gl.bfloat16, is_pure=True, pack=8)

    @gluon.jit
    def codes_f16(q, zz, zn):
        """As ``codes_bf16`` for fp16 (``ASM_F16``), with 1024 + zero and -(64 + zero)."""
        return gl.inline_asm_elementwise(ASM_F16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                                         [q, zz, zn], dtype=gl.float16, is_pure=True, pack=8)

    @gluon.jit(do_not_specialize=["M"])
    def kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_sg,
               k_tiles, tiles_per_row, tiles_per_split,
               ZERO: gl.constexpr, BF16: gl.constexpr, ATOMIC: gl.constexpr, BM: gl.constexpr,
               NW: gl.constexpr, BK: gl.constexpr, GROUP_TILES: gl.constexpr, EVEN_K: gl.constexpr):
        BN: gl.constexpr = 16 * NW
        R: gl.constexpr = BK // 16
        MAGIC: gl.constexpr = 128.0 if BF16 else 1024.0
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1],
                                                      instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
        raw_layout: gl.constexpr = gl.BlockedLayout([1, 1, R], [1, 32, 1], [NW, 1, 1], [2, 1, 0])
        q_layout: gl.constexpr = word_layout(NW, BK)
        dtype = x_ptr.dtype.element_ty

        pid_n = gl.program_id(0)
        t_lo = gl.program_id(1) * tiles_per_split
        t_hi = gl.minimum(t_lo + tiles_per_split, k_tiles)
        # one tile's words in hardware order: warp, lane, register (16-byte vectors)
        i0 = gl.arange(0, NW, layout=gl.SliceLayout(1, gl.SliceLayout(2, raw_layout)))
        i1 = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, raw_layout)))
        i2 = gl.arange(0, R, layout=gl.SliceLayout(0, gl.SliceLayout(1, raw_layout)))
        q_ptrs = (q_ptr + pid_n.to(gl.int64) * tiles_per_row * (BN * BK // 8)
                  + (i0[:, None, None] * (32 * R) + i1[None, :, None] * R + i2[None, None, :]))
        rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, a_layout))
        on = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
        kk = gl.arange(0, BK, layout=gl.SliceLayout(1, b_layout))
        mm = gl.arange(0, BM, layout=gl.SliceLayout(0, b_layout))
        # rows past M read row M - 1 again (their products are never stored), so x's loads
        # need no predicate unless K' is not a multiple of BK
        x_ptrs = x_ptr + gl.minimum(mm, M - 1)[None, :] * stride_xm + kk[:, None]
        acc = gl.zeros([BN, BM], gl.float32, layout=mma)
        # the weights one tile ahead: the next tile's loads are issued before this tile's math
        # (the last iteration loads its own tile again rather than mask the vector loads). x
        # comes from L2 and is loaded in the iteration that uses it: carried across iterations,
        # its fp16 registers were split and rejoined (PRMT) at every step.
        raw = gl.load(q_ptrs + t_lo * (BN * BK // 8))
        for t in range(t_lo, t_hi):
            raw_next = gl.load(q_ptrs + gl.minimum(t + 1, t_hi - 1) * (BN * BK // 8))
            if EVEN_K:
                xt = gl.load(x_ptrs + t * BK)
            else:
                xt = gl.load(x_ptrs + t * BK, mask=t * BK + kk[:, None] < K, other=0.0)
            q = raw.reshape([NW, 8, 4, R // 2, 2]).permute([0, 4, 1, 3, 2]).reshape([BN, BK // 8])
            q = gl.convert_layout(q, q_layout, assert_trivial=True)
            # each word repeated for its 8 codes: [BN, BK] in the MMA operand's layout, the
            # repeats in registers (no data moves; the asm reads the first of each 8)
            q2 = gl.join(q, q)
            q = gl.join(gl.join(q2, q2), gl.join(q2, q2)).reshape([BN, BK])
            q = gl.convert_layout(q, a_layout, assert_trivial=True)
            g = t // GROUP_TILES if GROUP_TILES > 0 else 0      # the tile's group
            if ZERO >= 0:
                z = gl.full([BN], ZERO, gl.float32, layout=gl.SliceLayout(1, a_layout))
            else:
                z = gl.load(z_ptr + g * stride_sg + rows).to(gl.float32)
            if BF16:                                   # (the per-row values broadcast)
                w = codes_bf16(q, (z + MAGIC).to(dtype)[:, None])
            else:
                w = codes_f16(q, (z + MAGIC).to(dtype)[:, None], (-(z + MAGIC / 16)).to(dtype)[:, None])
            w = gl.convert_layout(w, a_layout, assert_trivial=True)
            # a tile lies in one group (BK divides group_size): scale its product once, in fp32
            part = mma_v2(w, xt, gl.zeros([BN, BM], gl.float32, layout=mma))
            s = gl.load(s_ptr + g * stride_sg + on).to(gl.float32)
            acc += part * s[:, None]
            raw = raw_next
        om = gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
        out_ptrs = out_ptr + om[None, :] * stride_om + on[:, None]
        live = (om[None, :] < M) & (on[:, None] < N)
        if ATOMIC:
            gl.atomic_add(out_ptrs, acc.to(dtype), mask=live, sem="relaxed")
        else:
            gl.store(out_ptrs, acc.to(dtype), mask=live)

    return kernel


def compile_sm90(bm: int, bf16: bool = False, zero: int = 8, atomic: bool = True,
                 group_tiles: int = 1, even_k: bool = True):
    """The kernel compiled for sm_90 without a GPU, as a launch with 16-byte aligned pointers and
    sizes would specialize it; for the CPU tests and ``triton_sass.py``."""
    from .sm90 import compile_for_sm90
    kernel = _kernel()
    consts = {"ZERO": zero, "BF16": bf16, "ATOMIC": atomic, "BM": bm, "NW": NW, "BK": BK,
              "GROUP_TILES": group_tiles, "EVEN_K": even_k}
    dt = "bf16" if bf16 else "fp16"
    args = {a: ("*i32" if a == "q_ptr" else f"*{dt}") if a.endswith("_ptr") else "i32"
            for a in kernel.arg_names if a not in consts}
    aligned = [a for a in args if a.endswith("_ptr") or a in ("N", "K", "stride_xm", "stride_om",
                                                               "stride_sg")]
    return compile_for_sm90(kernel, args, consts, aligned, num_warps=NW)


def launch_args(x: torch.Tensor, g: PreparedGluon, split_k: int):
    """-> (grid, runtime arguments, constexprs, out) for kernel-ordered x [M, K'] (M <= 64)."""
    p = g.base
    m, k_rows = x.shape
    n_tiles, tiles_per_row = g.qweight.shape[:2]
    k_tiles = -(-k_rows // BK)                    # the tiles past K' (padding) are never read
    per_split = -(-k_tiles // split_k)
    out = (torch.zeros if split_k > 1 else torch.empty)((m, p.out_features), dtype=x.dtype,
                                                        device=x.device)
    zeros = p.zeros if p.zero < 0 else p.scales                     # unread when uniform
    args = (x, g.qweight, p.scales, zeros, out, m, p.out_features, k_rows, x.stride(0),
            out.stride(0), p.scales.stride(0), k_tiles, tiles_per_row, per_split)
    bm = max(8, 1 << max(m - 1, 0).bit_length())
    consts = {"ZERO": p.zero, "BF16": x.dtype == torch.bfloat16, "ATOMIC": split_k > 1, "BM": bm,
              "NW": NW, "BK": BK, "GROUP_TILES": group_tiles(p), "EVEN_K": k_rows % BK == 0}
    return (n_tiles, -(-k_tiles // per_split)), args, consts, out


def matmul(x: torch.Tensor, g: PreparedGluon, split_k: int = 1) -> torch.Tensor:
    """x [M, K] fp16/bf16 (M <= 64) on a CUDA GPU @ the layer -> [M, N] in x's dtype."""
    p = g.base
    if x.dim() != 2 or x.shape[1] != p.in_features:
        raise ValueError(f"x must be [M, {p.in_features}], got {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    if not 1 <= x.shape[0] <= MAX_M:
        raise ValueError(f"the Gluon kernel takes 1 to {MAX_M} rows, got {x.shape[0]}")
    if not x.is_cuda or g.qweight.device != x.device:
        raise ValueError(f"the Gluon kernel runs on a CUDA GPU with the layer on x's device; x is "
                         f"on {x.device}, the layer on {g.qweight.device}")
    xk = permute_input(x, p).contiguous()
    grid, args, consts, out = launch_args(xk, g, split_k)
    _kernel()[grid](*args, **consts, num_warps=NW)
    return out
