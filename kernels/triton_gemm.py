"""Fused dequantize + matmul Triton kernels for GPTQ 2/4/8-bit weights.

    p = triton_pack.prepare(qweight, scales, qzeros, g_idx, bits)   # once, at load
    y = matmul(x, p)                        # x [M, K] fp16/bf16 on CUDA -> y [M, N], x's dtype
    y = matmul(x, p, config=KernelConfig("gemv", block_n=128, block_k=128, split_k=4))

Three kernels, all reading the layout of ``triton_pack`` (weights K-major, groups uniform in
kernel row order, so a K tile never straddles two groups):
  gemv     no tensor cores, one program row per x row; codes turned into floats with the
           2**23 exponent trick; zero point and scale applied once per tile. For M of 1 or 2.
  gemm     tensor cores (wgmma on Hopper). ``swap=True`` makes the weight tile the left operand
           (out^T = W^T x^T) so that small batches fill the MMA's 64-row side; ``swap=False``
           keeps x on the left and the weights in shared memory. ``deq_first=False``
           multiplies the raw codes (as OFFSET + code, exact in fp16/bf16) and corrects each
           tile with scale * (dot - (zero + OFFSET) * sum(x)); ``deq_first=True`` dequantizes
           the tile first and keeps one accumulator (the usual winner from M = 16 on).
  dequant  writes the fp16/bf16 weight [N, K'] for a cuBLAS matmul (very large M).
Split-K (``split_k`` > 1) adds partial tiles into a zeroed output with atomics (results vary
in the last bit between runs). Constraints: ``block_k`` divides ``group_size`` unless there is
one group; tiles are powers of two, block_k >= 32; x rows contiguous.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_pack import PreparedGPTQ, permute_input


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration; ``kind`` is "gemv", "gemm" or "dequant".

    gemv: ``num_stages`` 1 prefetches the next tile into registers by hand, 2 also asks L2 for
    the tile after it, 3+ leaves loads to Triton. gemm: ``swap`` puts the weights on the MMA's
    row side (out^T = W^T x^T); ``deq_first`` dequantizes before the MMA instead of correcting
    after it. ``block_m`` is unused by gemv (one program row per x row).
    """
    kind: str
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    deq_first: bool = False
    num_warps: int = 4
    num_stages: int = 3
    swap: bool = True


# fp16: 0x6400 | c is 1024 + c; bf16: 0x4300 | c is 128 + c (exact while c < 128).
def _magic(bits: int, dtype: torch.dtype) -> tuple[int, float]:
    if dtype == torch.float16:
        return 0x6400, 1024.0
    if dtype == torch.bfloat16 and bits < 8:
        return 0x4300, 128.0
    return 0, 0.0


@triton.jit
def _and_or(a, MASK: tl.constexpr, BITS_SET: tl.constexpr, ASM: tl.constexpr):
    """(a & MASK) | BITS_SET as one LOP3 (ptxas emits two when both are immediates)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
            [a, tl.full(a.shape, MASK, tl.int32), tl.full(a.shape, BITS_SET, tl.int32)],
            dtype=tl.int32, is_pure=True, pack=1)
    return (a & MASK) | BITS_SET


@triton.jit
def _prefetch_l2(ptrs):
    """Ask for the lines at ``ptrs`` to be brought into L2 (no register result to wait on)."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n mov.u32 $0, 0;", "=r,l", [ptrs],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _unpack(q, BITS: tl.constexpr, MAGIC: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """int32 words [BLOCK_N, BLOCK_K // P] -> [BLOCK_N, BLOCK_K] DTYPE holding OFFSET + code."""
    P: tl.constexpr = 32 // BITS
    q4 = tl.reshape(q, (BLOCK_N, BLOCK_K // 32, 1, BITS))                      # [n, block, 1, r]
    shifted = q4 >> (tl.arange(0, P) * BITS)[None, None, :, None]              # [n, block, j, r]
    if MAGIC != 0:
        codes = tl.reshape(_and_or(shifted, (1 << BITS) - 1, MAGIC, ASM), (BLOCK_N, BLOCK_K))
        return codes.to(tl.int16).to(DTYPE, bitcast=True)                      # k = 32b + jR + r
    codes = tl.reshape(shifted & ((1 << BITS) - 1), (BLOCK_N, BLOCK_K))
    return codes.to(DTYPE)


@triton.jit
def _group_params(s_ptr, z_ptr, g, stride_sg, offs_n, ZERO: tl.constexpr, OFFSET: tl.constexpr):
    """Scale and (zero point + OFFSET) of group g for columns offs_n, both float32 [BN]."""
    s = tl.load(s_ptr + g * stride_sg + offs_n).to(tl.float32)
    if ZERO >= 0:
        zf = tl.full(offs_n.shape, ZERO + OFFSET, tl.float32)
    else:
        zf = tl.load(z_ptr + g * stride_sg + offs_n).to(tl.float32) + OFFSET
    return s, zf


@triton.jit
def _k_tiles(K, BLOCK_K: tl.constexpr, split_k, pid_k):
    """The K tiles [t_lo, t_hi) of split pid_k of split_k."""
    tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(tiles, split_k)
    t_lo = pid_k * per_split
    return t_lo, tl.minimum(t_lo + per_split, tiles)


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_qn,
                 stride_sg, group_size, split_k,
                 BITS: tl.constexpr, ZERO: tl.constexpr, MAGIC: tl.constexpr, OFFSET: tl.constexpr,
                 DEQ_FIRST: tl.constexpr, SWAP: tl.constexpr, ASM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    P: tl.constexpr = 32 // BITS
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    t_lo, t_hi = _k_tiles(K, BLOCK_K, split_k, pid_k)
    q_ptrs = qw_ptr + offs_n[:, None] * stride_qn + tl.arange(0, BLOCK_K // P)[None, :]
    dtype = x_ptr.dtype.element_ty
    # rows past M read row M - 1 again (their results are never stored), so x's loads need no
    # predicate unless K is not a multiple of BLOCK_K (EVEN_K)
    rows = tl.minimum(offs_m, M - 1)
    if SWAP:        # out^T [BN, BM] = W^T [BN, BK] @ x^T [BK, BM]: weights fill the MMA rows
        x_ptrs = x_ptr + rows[None, :] * stride_xm + offs_k[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:           # out [BM, BN] = x [BM, BK] @ W [BK, BN]: weights go to shared memory
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        k0 = t * BLOCK_K
        q = tl.load(q_ptrs + k0 // P)
        s, zf = _group_params(s_ptr, z_ptr, k0 // group_size, stride_sg, offs_n, ZERO, OFFSET)
        w = _unpack(q, BITS, MAGIC, BLOCK_N, BLOCK_K, dtype, ASM)                 # [BN, BK]
        if DEQ_FIRST:
            w = (w - zf.to(dtype)[:, None]) * s.to(dtype)[:, None]
        if SWAP:
            if EVEN_K:
                xt = tl.load(x_ptrs + k0)                                         # [BK, BM]
            else:
                xt = tl.load(x_ptrs + k0, mask=k0 + offs_k[:, None] < K, other=0.0)
            if DEQ_FIRST:
                acc = tl.dot(w, xt, acc)
            else:
                part = tl.dot(w, xt)                                              # [BN, BM]
                xs = tl.sum(xt.to(tl.float32), axis=0)                            # [BM]
                acc += s[:, None] * (part - zf[:, None] * xs[None, :])
        else:
            if EVEN_K:
                xm = tl.load(x_ptrs + k0)                                         # [BM, BK]
            else:
                xm = tl.load(x_ptrs + k0, mask=k0 + offs_k[None, :] < K, other=0.0)
            if DEQ_FIRST:
                acc = tl.dot(xm, tl.trans(w), acc)
            else:
                part = tl.dot(xm, tl.trans(w))                                    # [BM, BN]
                xs = tl.sum(xm.to(tl.float32), axis=1)                            # [BM]
                acc += s[None, :] * (part - zf[None, :] * xs[:, None])
    if SWAP:
        out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if split_k == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_qn,
                 stride_sg, group_size, split_k,
                 BITS: tl.constexpr, ZERO: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr,
                 PREFETCH_L2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    P: tl.constexpr = 32 // BITS
    W: tl.constexpr = BLOCK_K // P                                              # words per row
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, W)
    k_of_word = (offs_w // BITS) * 32 + offs_w % BITS                          # k of code 0, [W]
    t_lo, t_hi = _k_tiles(K, BLOCK_K, split_k, pid_k)
    q_ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_w[None, :]
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PREFETCH:        # by hand, one tile ahead (num_stages=1); else Triton's pipeliner
        q_next = tl.load(q_ptrs + t_lo * W, mask=t_lo < t_hi, other=0)
    for t in range(t_lo, t_hi):
        k0 = t * BLOCK_K
        if PREFETCH_L2:     # the tile after next: its loads below then hit L2
            _prefetch_l2(qw_ptr + offs_n * stride_qn + tl.minimum(t + 2, t_hi - 1) * W)
        if PREFETCH:
            q = q_next
            q_next = tl.load(q_ptrs + (t + 1) * W, mask=t + 1 < t_hi, other=0)
        else:
            q = tl.load(q_ptrs + t * W)
        q_hi = q >> 16
        part = tl.zeros((BLOCK_N, W), dtype=tl.float32)
        xs = tl.zeros((W,), dtype=tl.float32)
        for j in tl.static_range(P):
            kk = k0 + j * BITS + k_of_word
            xj = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)     # [W]
            xs += xj
            # (word & (MASK << pos)) | 2**23 as a float is 2**23 + code * 2**pos, exactly.
            if j * BITS < 16:
                f = _and_or(q, MASK << (j * BITS), 0x4B000000, ASM).to(tl.float32, bitcast=True)
                if j == 0:
                    part += (f - 8388608.0) * xj[None, :]
                else:
                    part += (f - 8388608.0) * (xj * (1.0 / (1 << (j * BITS))))[None, :]
            else:
                f = _and_or(q_hi, MASK << (j * BITS - 16), 0x4B000000, ASM).to(tl.float32,
                                                                              bitcast=True)
                if j * BITS == 16:
                    part += (f - 8388608.0) * xj[None, :]
                else:
                    part += (f - 8388608.0) * (xj * (1.0 / (1 << (j * BITS - 16))))[None, :]
        g = k0 // group_size
        s = tl.load(s_ptr + g * stride_sg + offs_n).to(tl.float32)
        if ZERO >= 0:
            zero = ZERO
        else:
            zero = tl.load(z_ptr + g * stride_sg + offs_n).to(tl.float32)
        acc += s * (tl.sum(part, axis=1) - zero * tl.sum(xs, axis=0))
    res = acc.to(out_ptr.dtype.element_ty)                                     # [BN]
    out_ptrs = out_ptr + m * stride_om + offs_n
    if split_k == 1:
        tl.store(out_ptrs, res, mask=offs_n < N)
    else:
        tl.atomic_add(out_ptrs, res, mask=offs_n < N, sem="relaxed")


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qn, stride_sg, stride_wn, group_size,
                    BITS: tl.constexpr, ZERO: tl.constexpr, MAGIC: tl.constexpr,
                    OFFSET: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    P: tl.constexpr = 32 // BITS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    words = k0 // P + tl.arange(0, BLOCK_K // P)
    q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + words[None, :])
    s, zf = _group_params(s_ptr, z_ptr, k0 // group_size, stride_sg, offs_n, ZERO, OFFSET)
    dtype = w_ptr.dtype.element_ty
    w = _unpack(q, BITS, MAGIC, BLOCK_N, BLOCK_K, dtype, ASM).to(tl.float32)
    w = (w - zf[:, None]) * s[:, None]
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(dtype), mask=mask)


def check_config(cfg: KernelConfig, p: PreparedGPTQ, k_rows: int) -> str | None:
    """Why ``cfg`` cannot run on ``p`` (None when it can)."""
    if cfg.kind == "dequant":
        return None
    single_group = p.group_size >= k_rows
    if cfg.block_k % 32 or (not single_group and p.group_size % cfg.block_k):
        return f"block_k={cfg.block_k} must be a multiple of 32 dividing group_size={p.group_size}"
    if cfg.kind == "gemm" and cfg.block_k // (32 // p.bits) < 2:
        return f"block_k={cfg.block_k} is too small for {p.bits}-bit gemm tiles"
    if cfg.kind not in ("gemv", "gemm", "dequant"):
        return f"kind={cfg.kind!r} is not one of 'gemv', 'gemm', 'dequant'"
    return None


def _plan(x: torch.Tensor, p: PreparedGPTQ, cfg: KernelConfig):
    """-> (kernel, grid, args, meta, out) for a gemv/gemm launch on x [M, K']."""
    m, k_rows = x.shape
    n = p.out_features
    why = check_config(cfg, p, k_rows)
    if why:
        raise ValueError(f"{cfg} cannot run on this layer: {why}")
    out = (torch.zeros if cfg.split_k > 1 else torch.empty)((m, n), dtype=x.dtype, device=x.device)
    zeros = p.zeros if p.zero < 0 else p.scales                          # unused when uniform
    args = (x, p.qweight, p.scales, zeros, out, m, n, k_rows, x.stride(0), out.stride(0),
            p.qweight.stride(0), p.scales.stride(0), p.group_size, cfg.split_k)
    meta = launch_meta(cfg, p.bits, p.zero, x.dtype, x.is_cuda, k_rows)
    if cfg.kind == "gemv":
        return _gemv_kernel, (triton.cdiv(n, cfg.block_n), cfg.split_k, m), args, meta, out
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    return _gemm_kernel, grid, args, meta, out


def launch_meta(cfg: KernelConfig, bits: int, zero: int, dtype: torch.dtype, on_cuda: bool,
                k_rows: int) -> dict:
    """The constexpr arguments and launch options of a gemv/gemm ``cfg`` on x [M, k_rows] (what
    Triton specializes on besides the tensors)."""
    meta = {"BITS": bits, "ZERO": zero, "ASM": on_cuda, "BLOCK_N": cfg.block_n,
            "BLOCK_K": cfg.block_k, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.kind == "gemv":
        meta.update(PREFETCH=cfg.num_stages <= 2, PREFETCH_L2=cfg.num_stages == 2 and on_cuda)
        return meta
    magic, offset = _magic(bits, dtype)
    meta.update(MAGIC=magic, OFFSET=offset, DEQ_FIRST=cfg.deq_first, SWAP=cfg.swap,
                BLOCK_M=cfg.block_m, EVEN_K=k_rows % cfg.block_k == 0)
    return meta


# (config, everything Triton specializes on) -> (compiled kernel, constexpr values in order)
_COMPILED: dict[tuple, tuple] = {}


def launch(x: torch.Tensor, p: PreparedGPTQ, cfg: KernelConfig) -> torch.Tensor:
    """Run one kernel on kernel-ordered activations x [M, K'] (contiguous rows) -> [M, N].

    After the first launch of a configuration, later ones skip Triton's argument binding and
    call the compiled kernel directly (a few microseconds of host time instead of tens).
    """
    if cfg.kind == "dequant":
        return x @ dequantize_weight(p, x.dtype, x.shape[1]).t()
    m, k_rows = x.shape
    n = p.out_features
    zeros = p.zeros if p.zero < 0 else p.scales
    key = (cfg, x.dtype, p.scales.dtype, zeros.dtype, p.bits, p.zero, n, k_rows, x.stride(0),
           p.qweight.stride(0), p.scales.stride(0), p.group_size, x.device,
           x.data_ptr() % 16, p.qweight.data_ptr() % 16, p.scales.data_ptr() % 16,
           zeros.data_ptr() % 16)
    hit = _COMPILED.get(key)
    if hit is None or m == 0:
        kernel, grid, args, meta, out = _plan(x, p, cfg)
        if m:
            compiled = kernel[grid](*args, **meta)
            if x.is_cuda:
                _COMPILED[key] = (compiled, tuple(meta[a] for a in kernel.arg_names[len(args):]))
        return out
    compiled, consts = hit
    out = (torch.zeros if cfg.split_k > 1 else torch.empty)((m, n), dtype=x.dtype, device=x.device)
    if cfg.kind == "gemv":
        grid = (triton.cdiv(n, cfg.block_n), cfg.split_k, m)
    else:
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    compiled[grid](x, p.qweight, p.scales, zeros, out, m, n, k_rows, x.stride(0), out.stride(0),
                   p.qweight.stride(0), p.scales.stride(0), p.group_size, cfg.split_k, *consts)
    return out


def compile_ahead(x: torch.Tensor, p: PreparedGPTQ, configs: list[KernelConfig],
                  workers: int = 8) -> None:
    """Compile the kernels of ``configs`` for x's shape class in parallel threads (no launch)."""
    from concurrent.futures import ThreadPoolExecutor
    if not hasattr(triton, "AsyncCompileMode") or x.device.type != "cuda":
        return
    with ThreadPoolExecutor(workers) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
        for cfg in configs:
            if cfg.kind != "dequant":
                kernel, grid, args, meta, _ = _plan(x, p, cfg)
                kernel.warmup(*args, grid=grid, **meta)


def dequantize_weight(p: PreparedGPTQ, dtype: torch.dtype, k_rows: int | None = None,
                      cfg: KernelConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight in kernel order as ``dtype`` [N, K'] (row n = output column n), written into
    ``out`` (contiguous [N, K'] of ``dtype``) when given."""
    k_rows = k_rows or (p.perm.numel() if p.perm is not None else p.in_features)
    bk = 128 if p.group_size >= k_rows else min(128, p.group_size & -p.group_size)
    cfg = cfg or KernelConfig("dequant", block_n=64, block_k=bk)
    w = out if out is not None else torch.empty((p.out_features, k_rows), dtype=dtype,
                                                device=p.qweight.device)
    zeros = p.zeros if p.zero < 0 else p.scales
    magic, offset = _magic(p.bits, dtype)
    grid = (triton.cdiv(p.out_features, cfg.block_n), triton.cdiv(k_rows, cfg.block_k))
    _dequant_kernel[grid](p.qweight, p.scales, zeros, w, p.out_features, k_rows,
                          p.qweight.stride(0), p.scales.stride(0), w.stride(0), p.group_size,
                          BITS=p.bits, ZERO=p.zero, MAGIC=magic, OFFSET=offset, ASM=w.is_cuda,
                          BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=4)
    return w


def matmul(x: torch.Tensor, p: PreparedGPTQ, config: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16, CUDA, or CPU under TRITON_INTERPRET=1) @ W -> [M, N] in x's dtype.

    ``config=None`` picks the kernel tuned for this shape (``triton_tune.select``).
    """
    if x.dim() != 2 or x.shape[1] != p.in_features:
        raise ValueError(f"x must be [M, {p.in_features}], got {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    xk = permute_input(x, p)
    if xk.stride(1) != 1:
        xk = xk.contiguous()
    if config is None:
        from .triton_tune import select
        config = select(xk, p)
    return launch(xk, p, config)
