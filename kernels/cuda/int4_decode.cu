// Launcher of the decode kernel (int4_decode_kernel.cuh): picks the kernel variant, warps per
// block and tiles per block for the shape, and launches it on the caller's stream.
#include <stdlib.h>

#include "int4_decode_kernel.cuh"

namespace gptq_lab {
namespace {

// What the launchers need to know about the GPU, read once per process (one GPU model assumed).
struct Device {
  int sms = 0, major = 0, smem_optin = 0;           // SMs, compute capability, max smem per block
  bool pdl = false, xs = false;                     // dependent launch, x staged in shared memory
};
// GPTQ_LAB_PDL=0 / GPTQ_LAB_XS=0 in the environment turn those features off, for comparisons.
inline cudaError_t device_info(const Device** out) {
  static Device dev;
  static cudaError_t err = cudaErrorNotReady;
  if (err == cudaErrorNotReady) {
    int id = 0;
    Device d;
    err = cudaGetDevice(&id);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, id);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, id);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, id);
    const char* pdl = getenv("GPTQ_LAB_PDL");
    const char* xs = getenv("GPTQ_LAB_XS");
    d.pdl = d.major >= 9 && !(pdl && pdl[0] == '0');
    d.xs = d.major >= 9 && !(xs && xs[0] == '0');
    dev = d;
  }
  *out = &dev;
  return err;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent where enabled.
template <typename... Params, typename... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), bool pdl, dim3 grid, dim3 block,
                             size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

// Dynamic shared memory of a block of `warps` warps: the rings, and with XS x (batch row 0).
template <int NT, int U, bool XS>
size_t block_smem(int warps, int K) {
  return (size_t)warps * ring_bytes<NT, U>() + (XS ? 2 * (size_t)K : 0);
}

constexpr int kWarpOptions[4] = {8, 4, 2, 1};

// Blocks per SM of a kernel for each of kWarpOptions (0: does not fit), cached per process and,
// with XS (x's size depends on K), per K.
template <typename T, int MT, int NT, int U, bool XS>
cudaError_t blocks_per_sm(int K, const Device& dev, const int** out) {
  struct Fit { int K = -1; int blocks[4] = {0, 0, 0, 0}; };
  static Fit fits[8];
  static int next = 0;
  static bool ready = false;
  auto kernel = int4_decode_kernel<T, MT, NT, U, XS>;
  const int key = XS ? K : 0;
  for (const Fit& f : fits)
    if (f.K == key) return *out = f.blocks, cudaSuccess;
  cudaError_t err = cudaSuccess;                // setup errors are returned, not left sticky
  if (!ready)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dev.smem_optin);
  Fit f;
  f.K = key;
  for (int i = 0; i < 4 && err == cudaSuccess; ++i) {
    const size_t smem = block_smem<NT, U, XS>(kWarpOptions[i], K);
    if (smem <= (size_t)dev.smem_optin)
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&f.blocks[i], kernel,
                                                          kWarpOptions[i] * 32, smem);
  }
  if (err != cudaSuccess) return err;
  ready = true;
  fits[next] = f;
  *out = fits[next].blocks;
  next = (next + 1) % 8;
  return cudaSuccess;
}

// A launch's shape: warps per block and its estimated time (waves x stages per warp, where a
// wave is as many blocks as the GPU holds at once).
struct Plan { int warps = 1; long long waves = 0; double cost = 1e30; };

// Tuning overrides (0: the launcher chooses): warps per block (1..8), tiles per block (1, 2, 4).
struct Forced { int warps = 0, nt = 0; };

// The warps per block (8, 4, 2 or 1, splitting K) with the least estimated time; ties go to fewer
// waves (a second, mostly idle wave costs a whole one).
template <typename T, int MT, int NT, int U, bool XS>
cudaError_t plan(int M, int N, int K, const Forced& forced, const Device& dev, Plan* out) {
  const int* fit = nullptr;
  const cudaError_t err = blocks_per_sm<T, MT, NT, U, XS>(K, dev, &fit);
  if (err != cudaSuccess) return err;
  const long long groups = (N + 16 * NT - 1) / (16 * NT), slabs = (M + 8 * MT - 1) / (8 * MT);
  const long long blocks = groups * slabs;
  const int stages = (K / 64 + U - 1) / U;
  Plan best;
  for (int i = 0; i < 4; ++i) {
    const int w = kWarpOptions[i], per_sm = fit[i];
    if (w > stages || per_sm <= 0) continue;
    const long long slots = (long long)per_sm * dev.sms, waves = (blocks + slots - 1) / slots;
    const double cost = (double)waves * ((stages + w - 1) / w) + 1e-3 * waves;
    if (cost < best.cost) best.cost = cost, best.warps = w, best.waves = waves;
  }
  if (forced.warps > 0) best.warps = forced.warps < kMaxWarps ? forced.warps : kMaxWarps;
  *out = best;
  return cudaSuccess;
}

template <typename T, int MT, int NT, int U, bool XS>
cudaError_t launch_tiles(const T* x, const uint4* qw, const uint2* meta, T* y, int M, int N,
                         int K, int group_chunks, const Plan& p, const Device& dev,
                         cudaStream_t stream) {
  const int groups = (N + 16 * NT - 1) / (16 * NT), slabs = (M + 8 * MT - 1) / (8 * MT);
  return launch_dependent(int4_decode_kernel<T, MT, NT, U, XS>, dev.pdl, dim3(slabs, groups),
                          dim3(p.warps * 32), block_smem<NT, U, XS>(p.warps, K), stream, x, qw,
                          meta, y, M, N, K, group_chunks);
}

// plan, then launch_tiles.
template <typename T, int MT, int NT, int U, bool XS>
cudaError_t plan_and_launch(const T* x, const uint4* qw, const uint2* meta, T* y, int M, int N,
                            int K, int group_chunks, const Forced& forced, const Device& dev,
                            cudaStream_t stream) {
  Plan p;
  const cudaError_t err = plan<T, MT, NT, U, XS>(M, N, K, forced, dev, &p);
  if (err != cudaSuccess) return err;
  return launch_tiles<T, MT, NT, U, XS>(x, qw, meta, y, M, N, K, group_chunks, p, dev, stream);
}

// Tiles per block: 1 at batch 1 (the activations are one row: most blocks is best; launch_mt
// makes one exception, for grids of several waves); from batch 2 on the largest of 4 (batch > 8
// only) and 2 that still gives every SM a block, else 1.
// `forced` (1, 2 or 4) overrides, for tuning.
inline int tiles_per_block(int M, int N, int MT, int sms, int forced) {
  if (forced == 1 || forced == 2 || forced == 4) return forced;
  if (M == 1) return 1;
  const long long tiles = (N + 15) / 16, slabs = (M + 8 * MT - 1) / (8 * MT);
  for (int nt = MT == 2 ? 4 : 2; nt > 1; nt /= 2)
    if ((tiles + nt - 1) / nt * slabs >= sms) return nt;
  return 1;
}

template <typename T, int MT>
cudaError_t launch_mt(const T* x, const uint4* qw, const uint2* meta, T* y, int M, int N, int K,
                      int group_chunks, const Forced& forced, cudaStream_t stream) {
  const Device* dev = nullptr;
  const cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  const int nt = tiles_per_block(M, N, MT, dev->sms, forced.nt);
  if constexpr (MT == 2)                        // (MT 1, NT 4 spills: one slab of 8 rows needs
    if (nt == 4)                                // less sharing anyway)
      return plan_and_launch<T, MT, 4, 1, false>(x, qw, meta, y, M, N, K, group_chunks, forced,
                                                 *dev, stream);
  if (nt >= 2)
    return plan_and_launch<T, MT, 2, 1, false>(x, qw, meta, y, M, N, K, group_chunks, forced,
                                               *dev, stream);
  if (group_chunks % 2 == 0) {                  // two chunks per stage share one group's record
    if constexpr (MT == 1)                      // batch 1: x from shared memory (XS) where the
      if (M == 1 && dev->xs) {                  // grid is one wave, also with x's bytes
        Plan with, without;
        cudaError_t e = plan<T, 1, 1, 2, true>(M, N, K, forced, *dev, &with);
        if (e == cudaSuccess) e = plan<T, 1, 1, 2, false>(M, N, K, forced, *dev, &without);
        if (e != cudaSuccess) return e;
        if (with.waves == 1 && with.cost <= without.cost)   // (later waves would wait for
                                                            // their x: 8192x28672 2.8% slower)
          return launch_tiles<T, 1, 1, 2, true>(x, qw, meta, y, M, N, K, group_chunks, with,
                                                *dev, stream);
        // Several waves: up to K = 8192, two tiles per block (half the blocks) measured faster
        // on an H100 (4096x22016 19.8-20.2 us against 21.8-22.3, 8192x28672 46.1 against
        // 47.1); 28672x8192 was 2% slower, so longer K keeps one tile.
        if (forced.nt == 0 && without.waves > 1 && K <= 8192)
          return plan_and_launch<T, 1, 2, 1, false>(x, qw, meta, y, M, N, K, group_chunks,
                                                    forced, *dev, stream);
        return launch_tiles<T, 1, 1, 2, false>(x, qw, meta, y, M, N, K, group_chunks, without,
                                               *dev, stream);
      }
    return plan_and_launch<T, MT, 1, 2, false>(x, qw, meta, y, M, N, K, group_chunks, forced,
                                               *dev, stream);
  }
  return plan_and_launch<T, MT, 1, 1, false>(x, qw, meta, y, M, N, K, group_chunks, forced,
                                             *dev, stream);
}

template <typename T>
cudaError_t launch(const void* x, const void* qweight, const void* meta, void* y, int M, int N,
                   int K, int group_size, const Forced& forced, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  const uint4* qw = static_cast<const uint4*>(qweight);
  const uint2* mp = static_cast<const uint2*>(meta);
  if (M <= 8) return launch_mt<T, 1>(xp, qw, mp, yp, M, N, K, group_size / 64, forced, stream);
  return launch_mt<T, 2>(xp, qw, mp, yp, M, N, K, group_size / 64, forced, stream);
}

}  // namespace
}  // namespace gptq_lab

// x [M, K] (K a multiple of 64, rows contiguous), y [M, N]; dtype 0 = fp16, 1 = bf16.
// group_size: kernel rows per group, a multiple of 64 dividing K (K for per-channel).
// warps: warps per block (1..8), nt: tiles of 16 outputs per block (1, 2, 4); 0 lets the
// launcher choose (other values are for tuning).
extern "C" cudaError_t gptq_lab_int4_decode(const void* x, const void* qweight, const void* meta,
                                            void* y, int M, int N, int K, int group_size,
                                            int warps, int nt, int dtype, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (K <= 0 || K % 64 || group_size <= 0 || group_size % 64 || K % group_size ||
      (N + 15) / 16 > 65535)                        // tile groups are the grid's y dimension
    return cudaErrorInvalidValue;
  gptq_lab::Forced forced;
  forced.warps = warps, forced.nt = nt;
  return dtype == 1
             ? gptq_lab::launch<__nv_bfloat16>(x, qweight, meta, y, M, N, K, group_size, forced,
                                               stream)
             : gptq_lab::launch<__half>(x, qweight, meta, y, M, N, K, group_size, forced, stream);
}
