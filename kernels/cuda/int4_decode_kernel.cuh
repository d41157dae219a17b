// The int4 matmul kernel for decode-sized batches (M <= 16 per slab): y[M, N] = x[M, K] @ W on
// the layout described in int4_common.cuh. Its launcher is int4_decode.cu.
//
// The product is computed as y^T = W^T x^T on tensor cores (mma.sync m16n8k16, fp32 accumulate):
// W^T is the A operand, dequantized in registers straight into A fragments (a mask-and-or
// turns 4-bit codes into 16-bit floats MAGIC + code, two at a time), x^T is the B operand with
// the batch as its 8 columns (two MMAs for batches 9-16). Each block owns 16 output features
// and one slab of up to 16 batch rows (larger batches: several slabs, scheduled next to each
// other so that only the first reads the tile's weights from memory, the others from L2);
// its warps split K and reduce through shared memory. Weight words are streamed with 16-byte
// asynchronous copies (cp.async) into a per-warp shared-memory ring, several chunks in flight
// per warp while the oldest is consumed.
#pragma once
#include "int4_common.cuh"

namespace gptq_lab {
namespace {   // internal linkage, as in int4_common.cuh

// cp.async (sm_80+): global -> shared without passing through registers; the copies of one
// commit group complete together (wait_group N: all but the newest N groups are done).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem)
               : "memory");
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(smem)), "l"(gmem)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The bulk copy engine (TMA, sm_90): one thread copies `bytes` (a multiple of 16) of global
// memory into shared memory; the mbarrier's phase completes when they have landed. Used for the
// batch-1 activations, so that they are read from shared memory instead of L2 in the main loop.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar) {   // one arrival per phase
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n"
               "fence.mbarrier_init.release.cluster;\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes) : "memory");
  if (bytes > 0)
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1], %2, [%3];\n"
                 ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
#else
  __trap();                                        // (the launcher uses it on sm_90 only)
#endif
}
__device__ __forceinline__ void mbarrier_inval(uint64_t* bar) {   // before reusing its bytes
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
#endif
}

// Programmatic dependent launch (sm_90; no-ops before): the launcher lets the kernel start while
// the previous kernel of the stream is still finishing. It then streams its first weight stages
// (the packed weights are constant: cuda_pack.prepare waits for its own writes to land) and
// waits in grid_dependency_wait() for the previous kernel's writes (x) before reading them.
// allow_dependents() lets the next kernel of the stream, if it is launched the same way, start.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

#ifndef GPTQ_LAB_ABLATE   // timing experiments only (wrong results): 1 = no math, 2 = no x loads,
#define GPTQ_LAB_ABLATE 0 // 3 = no weight loads
#endif
#ifndef GPTQ_LAB_STAGES
#define GPTQ_LAB_STAGES 4
#endif
#ifndef GPTQ_LAB_B1_MINBLOCKS  // the one-tile kernels for batch <= 8 are compiled to fit this
#define GPTQ_LAB_B1_MINBLOCKS 4  // many blocks of 8 warps per SM (4: at most 64 registers)
#endif
constexpr int kB1MinBlocks = GPTQ_LAB_B1_MINBLOCKS;
constexpr int kMaxWarps = 8;                // warps per block (they split K)
constexpr int kStages = GPTQ_LAB_STAGES;    // stages per warp's ring (all but 1 in flight)
// Bytes of one warp's ring: kStages stages of U chunks x NT tiles (each lane's 16-byte weight
// word per chunk and tile) and one 8-byte record per lane and tile (the U chunks of a stage
// share their group).
template <int NT, int U> __host__ __device__ constexpr int ring_bytes() {
  return kStages * NT * 32 * (16 * U + 8);
}

// MT: batch tiles of 8 rows per slab (1 for M <= 8, 2 for M <= 16); NT: tiles of 16 output
// features per block, sharing each activation fragment (x is read once per block from L2, so
// NT > 1 divides that traffic, which dominates from batch ~8 on); U: 64-k chunks per stage
// (2 where a group spans an even number of chunks and NT is 1, else 1).
// blockDim.x / 32 warps share the block's tiles, splitting K in whole stages, and reduce
// through shared memory at the end. Each warp streams its stages with cp.async into a ring of
// kStages stages, kStages - 1 in flight while the oldest is dequantized and multiplied; each
// stage travels with its group's (zero, scale) record. Each lane copies and later reads only its
// own words, so the ring needs no barrier (the stage refilled is the one consumed in the
// previous step, whose values are already used). At one tile per block the main loop is
// unrolled over the ring, so every shared-memory address is a constant offset. Each stage's
// MMAs start from zero and its group's scales are applied right after them, so no group
// bookkeeping is needed besides the record pointer, which the issuing side advances by counting.
// Inside a 64-k chunk the k order is permuted so that lane (g, t) reads its B fragments of
// all four k-tiles as x[m][64c + 16t .. 64c + 16t + 15]: two 16-byte loads per batch row
// (through L1: every tile of the SM reads the same activations). XS (batch 1, sm_90): each warp
// instead has its K range of x copied into shared memory once, by the bulk copy engine, after
// its first weight stages are on their way (loads from L2 inside the loop stalled every stage).
template <typename T, int MT, int NT, int U, bool XS>
__global__ void __launch_bounds__(kMaxWarps * 32, NT > 1 ? 1 : MT > 1 ? 2 : kB1MinBlocks)
int4_decode_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight,
                   const uint2* __restrict__ meta, T* __restrict__ y, int M, int N, int K,
                   int group_chunks) {
  extern __shared__ uint4 ring[];                   // per warp: its ring; later the reduction
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  // Slabs of one tile group run side by side: all but the first read W from L2.
  const int tiles = (N + 15) / 16, tile0 = blockIdx.y * NT, m_base = blockIdx.x * 8 * MT;
  const int chunks = K / 64, stages = (chunks + U - 1) / U;
  const int c_begin = warp * stages / warps * U;    // whole stages: a stage shares one group
  const int c_end = min(chunks, (warp + 1) * stages / warps * U);

  char* mine = reinterpret_cast<char*>(ring) + warp * ring_bytes<NT, U>();
  uint4 (*wslot)[U][NT][32] = reinterpret_cast<uint4 (*)[U][NT][32]>(mine);
  uint2 (*mslot)[NT][32] = reinterpret_cast<uint2 (*)[NT][32]>(mine + kStages * U * NT * 32 * 16);
  // XS: x [K] after all rings (each warp fills its own range). The warp's mbarrier lives in its
  // ring's last stage, which the prologue leaves empty (64 bytes per block less: at K = 8192
  // that is what lets 4 blocks of 8 warps share an H100 SM).
  uint4* xs = reinterpret_cast<uint4*>(reinterpret_cast<char*>(ring) + warps * ring_bytes<NT, U>());
  uint64_t* xbar = reinterpret_cast<uint64_t*>(&wslot[kStages - 1][0][0][0]);
  if (XS && lane == 0) mbarrier_init(xbar);
  const size_t wstride = (size_t)tiles * 32, mstride = (size_t)tiles * 8;
  const uint4* wsrc = qweight + (size_t)c_begin * wstride + (size_t)tile0 * 32 + lane;
  const uint2* msrc = meta + (size_t)(c_begin / group_chunks) * mstride + (size_t)tile0 * 8 + g;
  const int nt_valid = tiles - tile0 < NT ? tiles - tile0 : NT;   // the last group may be short
  int issued = c_begin, issued_in_group = c_begin % group_chunks;
  auto issue = [&](int stage) {                     // the next stage: U chunks and their record
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (GPTQ_LAB_ABLATE == 3 || issued >= c_end || (NT > 1 && nt >= nt_valid)) continue;
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u == 0 || issued + u < c_end)
          cp_async16(&wslot[stage][u][nt][lane], wsrc + u * wstride + nt * 32);
      cp_async8(&mslot[stage][nt][lane], msrc + nt * 8);
    }
    issued += U;
    wsrc += U * wstride;
    issued_in_group += U;
    if (issued_in_group == group_chunks) issued_in_group = 0, msrc += mstride;
    cp_async_commit();
  };

  // Lane (g, t) reads batch row m_base + 8 mt + g; rows past M read row M - 1 instead (their
  // MMA columns are never stored), so the loads need no zero fill.
  const uint4* xr[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = m_base + mt * 8 + g;
    xr[mt] = reinterpret_cast<const uint4*>(x + (size_t)(m < M ? m : M - 1) * K + 16 * t);
  }
  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);  // prologue: the first kStages - 1 stages
  grid_dependency_wait();                           // x and y may belong to the previous kernel
  allow_dependents();
  if constexpr (XS) {                               // this warp's K range of x (batch row 0)
    __syncwarp();                                   // (the barrier's initialization)
    if (lane == 0)
      bulk_copy(xs + c_begin * 8, x + (size_t)c_begin * 64, (c_end - c_begin) * 128, xbar);
    mbarrier_wait(xbar, 0);
    __syncwarp();                                   // every lane is past the wait: the stage
    if (lane == 0) mbarrier_inval(xbar);            // may now be refilled
    __syncwarp();
  }
  auto step = [&](int s, int cs) {                  // consume stage s (chunks cs ..), refill the
    issue(s == 0 ? kStages - 1 : s - 1);            // stage consumed before it
    uint4 xv[U][MT][2];                             // B fragments of the U chunks
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (GPTQ_LAB_ABLATE == 2) {
          xv[u][mt][0] = xv[u][mt][1] = make_uint4(cs, cs, cs, cs);
          continue;
        }
        if (u > 0 && cs + u >= c_end) continue;     // (an odd chunk count: nothing to read)
        if constexpr (XS) {                         // every lane reads row 0 (see xr)
          xv[u][mt][0] = xs[(cs + u) * 8 + 2 * t];
          xv[u][mt][1] = xs[(cs + u) * 8 + 2 * t + 1];
          continue;
        }
        xv[u][mt][0] = __ldg(xr[mt] + (cs + u) * 8);
        xv[u][mt][1] = __ldg(xr[mt] + (cs + u) * 8 + 1);
      }
    cp_async_wait<kStages - 1>();                   // this stage has landed (this lane's copies)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint2 rec = mslot[s][nt][lane];
      if (GPTQ_LAB_ABLATE == 1) {
        const uint4 w = wslot[s][0][nt][lane];
        acc[0][nt][0] += __uint_as_float((w.x ^ w.y ^ w.z ^ w.w ^ rec.x) & 0x3fffffffu) *
                         __low2float(as_t2<__half2>(rec.y));
        continue;
      }
      float part[MT][4];                            // the stage's sums, before the scales
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[mt][i] = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u > 0 && cs + u >= c_end) break;
        uint32_t a[4][4];
        dequant_words<T>(wslot[s][u][nt][lane], rec.x, a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(part[mt], a[0], word<0>(xv[u][mt][0]), word<1>(xv[u][mt][0]));
          mma_16816<T>(part[mt], a[1], word<2>(xv[u][mt][0]), word<3>(xv[u][mt][0]));
          mma_16816<T>(part[mt], a[2], word<0>(xv[u][mt][1]), word<1>(xv[u][mt][1]));
          mma_16816<T>(part[mt], a[3], word<2>(xv[u][mt][1]), word<3>(xv[u][mt][1]));
        }
      }
      float s_lo, s_hi;
      group_scales<T>(rec, s_lo, s_hi);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        acc[mt][nt][0] += s_lo * part[mt][0];
        acc[mt][nt][1] += s_lo * part[mt][1];
        acc[mt][nt][2] += s_hi * part[mt][2];
        acc[mt][nt][3] += s_hi * part[mt][3];
      }
    }
  };
  if constexpr (NT == 1) {                          // unrolled over the ring: constant offsets
    for (int c0 = c_begin; c0 < c_end; c0 += kStages * U) {
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        if (s > 0 && c0 + s * U >= c_end) break;
        step(s, c0 + s * U);
      }
    }
  } else {                                          // (a body unrolled kStages times outgrows
    int s = 0;                                      // the instruction cache: slower at NT 4)
    for (int cs = c_begin; cs < c_end; cs += U) {
      step(s, cs);
      s = s + 1 == kStages ? 0 : s + 1;
    }
  }
  cp_async_wait<0>();
  __syncthreads();                                  // the ring becomes the reduction buffer
  float (*red)[MT * 8][NT * 16] = reinterpret_cast<float (*)[MT * 8][NT * 16]>(ring);
  static_assert(MT * 8 * NT * 16 * 4 <= ring_bytes<NT, U>(), "reduction buffer larger than a ring");

  // C fragment: c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1],
  // rows = output features of the tile, columns = batch rows of the 8-row slab.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      red[warp][mt * 8 + 2 * t][nt * 16 + g] = acc[mt][nt][0];
      red[warp][mt * 8 + 2 * t + 1][nt * 16 + g] = acc[mt][nt][1];
      red[warp][mt * 8 + 2 * t][nt * 16 + g + 8] = acc[mt][nt][2];
      red[warp][mt * 8 + 2 * t + 1][nt * 16 + g + 8] = acc[mt][nt][3];
    }
  __syncthreads();
  for (int i = threadIdx.x; i < MT * 8 * NT * 16; i += blockDim.x) {
    const int m = i / (NT * 16), nn = i % (NT * 16);
    float sum = 0.f;
    for (int w = 0; w < warps; ++w) sum += red[w][m][nn];
    const int gm = m_base + m, gn = tile0 * 16 + nn;
    if (gm < M && gn < N) y[(size_t)gm * N + gn] = Dtype<T>::from_float(sum);
  }
}

}  // namespace
}  // namespace gptq_lab
