// Patch loss (squared L2 between query patches of feat_map and matched patches of target_map).
//
// Forward:  per_query[q] = sum over (dy, dx) in [0, k)^2 with (y + dy - r, x + dx - r) inside
//           feat_map of sum_c (feat[y+dy-r, x+dx-r, c] - target[ty+dy, tx+dx, c])^2, fp32 accumulate.
// Backward: grad[p, c] = grad_scale * sum over (dy, dx): centre = p - (dy - r, dx - r) inside the
//           map with query_slot[centre] = q >= 0 of (feat[p, c] - target[target_pos[q] + dy*Wt + dx, c]).
//           A gather over the k*k offsets: no atomics, every output element written exactly once.
//
// Both kernels are memory-bound: consecutive threads (lanes) read consecutive 16-byte channel
// vectors (4 fp32 or 8 bf16) when C is a multiple of the vector width and the maps are 16-byte
// aligned (VE > 1), else consecutive scalars (VE = 1). All indices into maps are 64-bit.
//
// Out-of-contract indices never cause out-of-bounds reads: a query centre outside feat_map or a
// target patch not fully inside target_map gives a NaN per_query entry (forward) or NaN gradient
// at the pixels it touches (backward); a query_slot entry >= Nq likewise gives NaN.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace neuralpatch {
namespace {

constexpr int kLossThreads = 256;
constexpr int kWarpsPerBlock = kLossThreads / 32;
// At least 4 resident blocks (<= 64 registers): without a minimum, ptxas targets full occupancy
// (32 registers) and spills the bf16 path.
constexpr int kLossMinBlocks = 4;

__device__ __forceinline__ float nan_value() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ float bf16_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// Loads VE consecutive elements starting at p as floats. VE in {1, 4 (fp32), 8 (bf16)}.
template <typename T, int VE>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&out)[VE]) {
  if constexpr (sizeof(T) == 4) {
    if constexpr (VE == 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p));
      out[0] = v.x;
      out[1] = v.y;
      out[2] = v.z;
      out[3] = v.w;
    } else {
#pragma unroll
      for (int e = 0; e < VE; ++e) out[e] = __ldg(reinterpret_cast<const float*>(p) + e);
    }
  } else {
    if constexpr (VE == 8) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) out[e] = bf16_to_float((w[e >> 1] >> (16 * (e & 1))) & 0xffffu);
    } else {
#pragma unroll
      for (int e = 0; e < VE; ++e) {
        out[e] = bf16_to_float(__ldg(reinterpret_cast<const unsigned short*>(p) + e));
      }
    }
  }
}

// True when the k x k patch with top-left `pos` lies fully inside an (H, W) map.
__device__ __forceinline__ bool patch_inside(int pos, int H, int W, int k) {
  if (pos < 0) return false;
  const int y = pos / W;
  const int x = pos - y * W;
  return y <= H - k && x <= W - k;
}

// One warp per query; the warp's lanes stride over the k*k*(C/VE) (offset, channel-vector) units.
// grid: ceil(nq / 8) blocks of 256 threads.
template <typename T, int VE>
__global__ void __launch_bounds__(kLossThreads, kLossMinBlocks)
patch_loss_fwd_kernel(const T* __restrict__ feat,            // [H, W, C]
                      const T* __restrict__ target,          // [Ht, Wt, C]
                      const int32_t* __restrict__ center,    // [Nq]
                      const int32_t* __restrict__ tpos,      // [Nq]
                      float* __restrict__ per_query,         // [Nq]
                      int nq, int C, int k, int H, int W, int Ht, int Wt) {
  const int lane = threadIdx.x & 31;
  const long long q = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (q >= nq) return;  // uniform per warp: the shuffles below see full warps

  const int p = __ldg(center + q);
  const int tp = __ldg(tpos + q);
  if (p < 0 || p >= H * W || !patch_inside(tp, Ht, Wt, k)) {
    if (lane == 0) per_query[q] = nan_value();
    return;
  }
  const int y = p / W;
  const int x = p - y * W;
  const int r = k / 2;
  const int nvec = C / VE;  // VE divides C (VE == 1 otherwise)
  const int total = k * k * nvec;

  float sum = 0.0f;
  for (int u = lane; u < total; u += 32) {
    const int o = u / nvec;
    const int cv = u - o * nvec;
    const int dy = o / k;
    const int dx = o - dy * k;
    const int yy = y + dy - r;
    const int xx = x + dx - r;
    if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
    const long long fo = (static_cast<long long>(yy) * W + xx) * C + static_cast<long long>(cv) * VE;
    const long long to = (static_cast<long long>(tp) + static_cast<long long>(dy) * Wt + dx) * C +
                         static_cast<long long>(cv) * VE;
    float f[VE];
    float t[VE];
    load_floats<T, VE>(feat + fo, f);
    load_floats<T, VE>(target + to, t);
#pragma unroll
    for (int e = 0; e < VE; ++e) {
      const float d = f[e] - t[e];
      sum = fmaf(d, d, sum);
    }
  }
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
  if (lane == 0) per_query[q] = sum;
}

// One thread per (pixel, channel vector); grid-stride over H*W*(C/VE) units, so consecutive
// threads write consecutive channel vectors of a pixel.
template <typename T, int VE>
__global__ void __launch_bounds__(kLossThreads, kLossMinBlocks)
patch_loss_bwd_kernel(const T* __restrict__ feat,            // [H, W, C]
                      const T* __restrict__ target,          // [Ht, Wt, C]
                      const int32_t* __restrict__ slot,      // [H, W]
                      const int32_t* __restrict__ tpos,      // [Nq]
                      const float* __restrict__ grad_scale,  // [1]
                      float* __restrict__ grad,              // [H, W, C]
                      int nq, int C, int k, int H, int W, int Ht, int Wt) {
  const float scale = __ldg(grad_scale);
  const int r = k / 2;
  const int nvec = C / VE;
  const long long total = static_cast<long long>(H) * W * nvec;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long u = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; u < total; u += stride) {
    const long long pix = u / nvec;
    const int cv = static_cast<int>(u - pix * nvec);
    const int y = static_cast<int>(pix / W);
    const int x = static_cast<int>(pix - static_cast<long long>(y) * W);
    const long long fo = pix * C + static_cast<long long>(cv) * VE;

    float f[VE];
    load_floats<T, VE>(feat + fo, f);
    float acc[VE];
#pragma unroll
    for (int e = 0; e < VE; ++e) acc[e] = 0.0f;
    bool poison = false;

    for (int dy = 0; dy < k; ++dy) {
      const int cy = y - dy + r;  // centre row of the query that covers (y, x) at offset dy
      if (cy < 0 || cy >= H) continue;
      for (int dx = 0; dx < k; ++dx) {
        const int cx = x - dx + r;
        if (cx < 0 || cx >= W) continue;
        const int q = __ldg(slot + (static_cast<long long>(cy) * W + cx));
        if (q < 0) continue;
        if (q >= nq) {
          poison = true;
          continue;
        }
        const int tp = __ldg(tpos + q);
        if (!patch_inside(tp, Ht, Wt, k)) {
          poison = true;
          continue;
        }
        const long long to = (static_cast<long long>(tp) + static_cast<long long>(dy) * Wt + dx) * C +
                             static_cast<long long>(cv) * VE;
        float t[VE];
        load_floats<T, VE>(target + to, t);
#pragma unroll
        for (int e = 0; e < VE; ++e) acc[e] += f[e] - t[e];
      }
    }

    float out[VE];
#pragma unroll
    for (int e = 0; e < VE; ++e) out[e] = poison ? nan_value() : scale * acc[e];
    float* g = grad + fo;
    if constexpr (VE >= 4) {
#pragma unroll
      for (int e = 0; e < VE; e += 4) {
        *reinterpret_cast<float4*>(g + e) = make_float4(out[e], out[e + 1], out[e + 2], out[e + 3]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VE; ++e) g[e] = out[e];
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int VE>
std::string launch_fwd(const PatchLossFwdArgs& a, cudaStream_t stream) {
  const long long blocks = (static_cast<long long>(a.nq) + kWarpsPerBlock - 1) / kWarpsPerBlock;
  patch_loss_fwd_kernel<T, VE><<<static_cast<unsigned>(blocks), kLossThreads, 0, stream>>>(
      static_cast<const T*>(a.feat_map), static_cast<const T*>(a.target_map), a.query_center, a.target_pos,
      a.per_query, a.nq, a.channels, a.patch_size, a.height, a.width, a.target_height, a.target_width);
  return cuda_error_message(cudaGetLastError(), "patch_loss_fwd: launching patch_loss_fwd_kernel");
}

template <typename T, int VE>
std::string launch_bwd(const PatchLossBwdArgs& a, cudaStream_t stream) {
  const long long units = static_cast<long long>(a.height) * a.width * (a.channels / VE);
  long long blocks = (units + kLossThreads - 1) / kLossThreads;
  // Grid-stride beyond this; enough blocks to fill any current GPU many times over.
  constexpr long long kMaxBlocks = 1 << 20;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  patch_loss_bwd_kernel<T, VE><<<static_cast<unsigned>(blocks), kLossThreads, 0, stream>>>(
      static_cast<const T*>(a.feat_map), static_cast<const T*>(a.target_map), a.query_slot, a.target_pos,
      a.grad_scale, a.grad_map, a.nq, a.channels, a.patch_size, a.height, a.width, a.target_height,
      a.target_width);
  return cuda_error_message(cudaGetLastError(), "patch_loss_bwd: launching patch_loss_bwd_kernel");
}

}  // namespace

std::string launch_patch_loss_fwd(const PatchLossFwdArgs& a, cudaStream_t stream) {
  const bool aligned = aligned16(a.feat_map) && aligned16(a.target_map);
  if (a.dtype == DType::kFloat32) {
    return (aligned && a.channels % 4 == 0) ? launch_fwd<float, 4>(a, stream) : launch_fwd<float, 1>(a, stream);
  }
  return (aligned && a.channels % 8 == 0) ? launch_fwd<uint16_t, 8>(a, stream) : launch_fwd<uint16_t, 1>(a, stream);
}

std::string launch_patch_loss_bwd(const PatchLossBwdArgs& a, cudaStream_t stream) {
  const bool aligned = aligned16(a.feat_map) && aligned16(a.target_map) && aligned16(a.grad_map);
  if (a.dtype == DType::kFloat32) {
    return (aligned && a.channels % 4 == 0) ? launch_bwd<float, 4>(a, stream) : launch_bwd<float, 1>(a, stream);
  }
  return (aligned && a.channels % 8 == 0) ? launch_bwd<uint16_t, 8>(a, stream) : launch_bwd<uint16_t, 1>(a, stream);
}

}  // namespace neuralpatch
