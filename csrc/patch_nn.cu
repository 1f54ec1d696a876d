// Fused patch nearest-neighbour search: best_index[q] = argmax_j <q, k_j> * key_inv_norm[j].
//
// One block owns kBM = 128 queries and walks key tiles of kBN = 128 keys in increasing order,
// keeping a running (value, index) per query; no Nq x Nk buffer and no im2col matrix exists.
// The reduction dimension D = k*k*C is walked as (offset o = dy*k + dx) x (channel chunk of
// kRowBytes bytes); each step gathers a [128 x chunk] tile of query patches and of key patches
// straight from the channels-last maps via the position lists (implicit im2col), zero-filling
// ragged channels and rows, into a double-buffered shared-memory tile (register-staged: the next
// step's global loads are in flight while the tensor cores work on the current step).
//
// Compute paths (MODE):
//   kModeFP32: fp32 maps, FFMA, each thread an 8x8 micro tile (exact fp32 arithmetic).
//   kModeTF32: fp32 maps rounded to tf32 (cvt.rna) when stored to shared memory,
//              mma.sync.m16n8k8 tf32, fp32 accumulate. 8 warps as 4 (M) x 2 (N), 32x64 per warp.
//   kModeBF16: bf16 maps, mma.sync.m16n8k16 bf16, fp32 accumulate, same warp layout.
//
// Ties: within a tile the lowest key index wins among equal maxima ((value, lower index)
// comparison in every reduction); across key tiles (processed in increasing order) a later tile
// replaces the running best only when strictly greater; across key splits (blockIdx.y) the merge
// walks splits in increasing order with a strict comparison. NaN scores are never chosen.
//
// Out-of-contract positions never cause out-of-bounds reads: a key whose patch is not fully
// inside the key map scores -inf; a query whose patch is not fully inside the (padded) query map
// gets index -1 and value NaN.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "common.h"

namespace neuralpatch {
namespace {

constexpr int kModeFP32 = 0;
constexpr int kModeTF32 = 1;
constexpr int kModeBF16 = 2;

constexpr int kThreads = 256;                  // 8 warps
constexpr int kBM = 128;                       // queries per block
constexpr int kBN = 128;                       // keys per tile
constexpr int kRowBytes = 128;                 // one tile row per step: 32 fp32 or 64 bf16
constexpr int kRowPadBytes = 16;               // row stride 144 B = 36 words: fragment loads and
constexpr int kStrideBytes = kRowBytes + kRowPadBytes;  // 16 B stores are bank-conflict free
constexpr int kTileBytes = kBM * kStrideBytes; // 18432 (kBM == kBN)
constexpr int kVecPerRow = kRowBytes / 16;     // 8 x 16-byte vectors per row
constexpr int kRowsPerPass = kThreads / kVecPerRow;  // 32 rows loaded per pass
constexpr int kLoadPasses = kBM / kRowsPerPass;      // 4 vectors per thread per operand
constexpr int kStages = 2;
constexpr size_t kDynSmemBytes = size_t(kStages) * 2 * kTileBytes;  // 73728: > 48 KB, opt-in
constexpr int kMergeThreads = 256;

static_assert(kBM == kBN, "the loader uses one mapping for both operands");
static_assert(kThreads % kVecPerRow == 0 && kBM % kRowsPerPass == 0, "loader mapping");
static_assert(kThreads >= kBM && kThreads >= kBN, "per-row bookkeeping uses one thread per row");

template <int MODE>
struct ModeTraits;
template <>
struct ModeTraits<kModeFP32> {
  using Elem = float;
  static constexpr int kMinBlocks = 1;
};
// MMA paths: 2 blocks per SM (regs capped at 128, no spills in the -Xptxas -v report;
// smem 2 x 77 KB fits sm_80's 164 KB and sm_90's 228 KB). FP32 path: 1 block (254 regs).
template <>
struct ModeTraits<kModeTF32> {
  using Elem = float;
  static constexpr int kMinBlocks = 2;
};
template <>
struct ModeTraits<kModeBF16> {
  using Elem = uint16_t;  // raw bfloat16 bits
  static constexpr int kMinBlocks = 2;
};

// Element offset of the patch with top-left `pos` in an (H, W, C) map, or -1 when the k x k
// patch is not fully inside the map (out-of-contract input: never read).
__device__ __forceinline__ long long patch_offset(int pos, int H, int W, int k, int C) {
  if (pos < 0) return -1;
  const int y = pos / W;
  const int x = pos - y * W;
  if (y > H - k || x > W - k) return -1;
  return static_cast<long long>(pos) * C;
}

// (v, i) beats (bv, bi): larger value, or equal value and lower index. NaN never wins.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ uint32_t elem_bits(const float* p) { return __float_as_uint(__ldg(p)); }
__device__ __forceinline__ uint32_t elem_bits(const uint16_t* p) {
  return static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

// 16 bytes (4 fp32 or 8 bf16) of channels [c, c + 16/sizeof(T)) of the patch element
// map[base + off + c ...]; zero where base < 0 (invalid row) or a channel is >= C.
// VEC: C is a multiple of the vector width and the map is 16-byte aligned, so one 16-byte load.
template <typename T, bool VEC>
__device__ __forceinline__ uint4 load_chunk(const T* __restrict__ map, long long base, long long off,
                                            int c, int C) {
  constexpr int kVE = 16 / static_cast<int>(sizeof(T));
  uint4 r = make_uint4(0u, 0u, 0u, 0u);
  if (base < 0 || c >= C) return r;
  const T* p = map + (base + off + c);
  if (VEC) {
    r = __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    uint32_t w[4] = {0u, 0u, 0u, 0u};
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (c + e < C) w[e] = elem_bits(p + e);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVE; ++e) {
        if (c + e < C) w[e >> 1] |= elem_bits(p + e) << (16 * (e & 1));
      }
    }
    r = make_uint4(w[0], w[1], w[2], w[3]);
  }
  return r;
}

__device__ __forceinline__ uint32_t to_tf32(uint32_t bits) {
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(out) : "f"(__uint_as_float(bits)));
  return out;
}

__device__ __forceinline__ uint32_t lds32(const unsigned char* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// D += A * B, m16n8k16, A row-major bf16, B col-major bf16, fp32 accumulate.
__device__ __forceinline__ void mma_bf16_16816(float& d0, float& d1, float& d2, float& d3, const uint32_t (&a)[4],
                                               const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D += A * B, m16n8k8, tf32 inputs, fp32 accumulate.
__device__ __forceinline__ void mma_tf32_1688(float& d0, float& d1, float& d2, float& d3, const uint32_t (&a)[4],
                                              const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Reduce (bv, bi) over the lanes whose ids differ only in the bits of `mask_bits` (a butterfly;
// every lane of the group ends with the group's best).
template <int MASK_BITS>
__device__ __forceinline__ void warp_best(float& bv, int& bi) {
#pragma unroll
  for (int m = 1; m <= MASK_BITS; m <<= 1) {
    if (MASK_BITS & m) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, m);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, m);
      if (better(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
  }
}

// Accumulators: FP32 path 8x8 per thread; MMA paths [2 m16][8 n8][4] per thread. Both 64 floats.
constexpr int kAcc = 64;

// grid: (ceil(nq / kBM), nsplit); block: kThreads; dynamic smem: kDynSmemBytes.
// Split s handles key tiles [s * tiles_per_split, min(ntiles, (s + 1) * tiles_per_split)) and
// writes out_index/out_value + s * out_split_stride.
template <int MODE, bool VEC>
__global__ void __launch_bounds__(kThreads, ModeTraits<MODE>::kMinBlocks)
patch_nn_fwd_kernel(const typename ModeTraits<MODE>::Elem* __restrict__ qmap,  // [Hq, Wq, C]
                    const typename ModeTraits<MODE>::Elem* __restrict__ kmap,  // [Hk, Wk, C]
                    const int32_t* __restrict__ qpos,                          // [Nq]
                    const int32_t* __restrict__ kpos,                          // [Nk]
                    const float* __restrict__ kinv,                            // [Nk]
                    int32_t* __restrict__ out_index,                           // [nsplit, Nq]
                    float* __restrict__ out_value,                             // [nsplit, Nq]
                    long long out_split_stride, int nq, int nk, int C, int k, int Hq, int Wq,
                    int Hk, int Wk, int tiles_per_split) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800)
  __trap();  // the host launcher refuses devices below sm_80
#else
  using T = typename ModeTraits<MODE>::Elem;
  constexpr int kVE = 16 / static_cast<int>(sizeof(T));        // elements per 16-byte vector
  constexpr int kBK = kRowBytes / static_cast<int>(sizeof(T));  // elements per step (32 | 64)

  extern __shared__ __align__(16) unsigned char smem[];  // [kStages][2 operands][kBM][kStrideBytes]
  __shared__ float red_v[2][kBM];  // per-row candidate of each half of the key tile
  __shared__ int red_i[2][kBM];
  __shared__ float col_inv[kBN];  // key_inv_norm of the tile's keys
  __shared__ int col_ok[kBN];     // 1 when the tile column is a real, in-bounds key
  __shared__ long long row_qbase[kBM];  // patch offset of each query row of the block
  __shared__ long long row_kbase[kBN];  // patch offset of each key row of the current tile

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int q0 = blockIdx.x * kBM;
  const int split = blockIdx.y;
  const int ntiles = (nk + kBN - 1) / kBN;
  const int tile_begin = split * tiles_per_split;
  const int tile_end = min(ntiles, tile_begin + tiles_per_split);

  // Loader mapping: thread loads vector (tid & 7) of rows (tid >> 3) + 32 * p, p < kLoadPasses.
  const int ld_row = tid / kVecPerRow;
  const int ld_vec = tid % kVecPerRow;
  const int ld_c = ld_vec * kVE;

  // Element offset of each tile row's patch in its map (-1: padding row or bad position).
  if (tid < kBM) {
    const int q = q0 + tid;
    row_qbase[tid] = q < nq ? patch_offset(__ldg(qpos + q), Hq, Wq, k, C) : -1;
  }

  const int nchunks = (C + kBK - 1) / kBK;
  const int nsteps = k * k * nchunks;

  // Running best of query row `tid` (threads tid < kBM). Starts at the split's first key so that
  // an all -inf/NaN row still reports a valid index.
  float run_v = -INFINITY;
  int run_i = tile_begin * kBN;

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int n0 = tile * kBN;

    if (tid < kBN) {
      const int j = n0 + tid;
      const long long base = j < nk ? patch_offset(__ldg(kpos + j), Hk, Wk, k, C) : -1;
      row_kbase[tid] = base;
      col_ok[tid] = base >= 0 ? 1 : 0;
      col_inv[tid] = base >= 0 ? __ldg(kinv + j) : 0.0f;
    }
    __syncthreads();  // row_qbase / row_kbase are read by other threads' loads

    float acc[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;

    uint4 qreg[kLoadPasses];
    uint4 kreg[kLoadPasses];

    // Global -> registers for step s.
    auto load_step = [&](int s) {
      const int o = s / nchunks;
      const int c0 = (s - o * nchunks) * kBK;
      const int dy = o / k;
      const int dx = o - dy * k;
      const long long qoff = static_cast<long long>(dy * Wq + dx) * C;
      const long long koff = static_cast<long long>(dy * Wk + dx) * C;
#pragma unroll
      for (int p = 0; p < kLoadPasses; ++p) {
        const int row = ld_row + p * kRowsPerPass;
        qreg[p] = load_chunk<T, VEC>(qmap, row_qbase[row], qoff, c0 + ld_c, C);
        kreg[p] = load_chunk<T, VEC>(kmap, row_kbase[row], koff, c0 + ld_c, C);
      }
    };
    // Registers -> shared-memory stage `buf` (tf32 rounding applied here, once per element).
    auto store_step = [&](int buf) {
      unsigned char* qs = smem + buf * 2 * kTileBytes;
      unsigned char* ks = qs + kTileBytes;
#pragma unroll
      for (int p = 0; p < kLoadPasses; ++p) {
        uint4 qv = qreg[p];
        uint4 kv = kreg[p];
        if constexpr (MODE == kModeTF32) {
          qv = make_uint4(to_tf32(qv.x), to_tf32(qv.y), to_tf32(qv.z), to_tf32(qv.w));
          kv = make_uint4(to_tf32(kv.x), to_tf32(kv.y), to_tf32(kv.z), to_tf32(kv.w));
        }
        const int off = (ld_row + p * kRowsPerPass) * kStrideBytes + ld_vec * 16;
        *reinterpret_cast<uint4*>(qs + off) = qv;
        *reinterpret_cast<uint4*>(ks + off) = kv;
      }
    };

    load_step(0);
    store_step(0);
    __syncthreads();

    for (int s = 0; s < nsteps; ++s) {
      const bool has_next = s + 1 < nsteps;
      if (has_next) load_step(s + 1);  // in flight during the math below

      const unsigned char* qs = smem + (s & 1) * 2 * kTileBytes;
      const unsigned char* ks = qs + kTileBytes;

      if constexpr (MODE == kModeFP32) {
        // Thread (tx, ty) of a 16 x 16 grid owns rows ty + 16 i and columns tx + 16 j.
        // Each warp spans 8 tx x 4 ty: conflict-free 16-byte LDS (broadcast rows for Q).
        const int tx = (lane & 7) + 8 * (warp & 1);
        const int ty = (lane >> 3) + 4 * (warp >> 1);
#pragma unroll
        for (int kk = 0; kk < kBK; kk += 4) {
          float4 b[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            b[j] = *reinterpret_cast<const float4*>(ks + (tx + 16 * j) * kStrideBytes + kk * 4);
          }
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const float4 a = *reinterpret_cast<const float4*>(qs + (ty + 16 * i) * kStrideBytes + kk * 4);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              float v = acc[i * 8 + j];
              v = fmaf(a.x, b[j].x, v);
              v = fmaf(a.y, b[j].y, v);
              v = fmaf(a.z, b[j].z, v);
              v = fmaf(a.w, b[j].w, v);
              acc[i * 8 + j] = v;
            }
          }
        }
      } else {
        // Warp (warp_m, warp_n) owns rows warp_m*32 + [0, 32) and columns warp_n*64 + [0, 64).
        const int warp_m = warp >> 1;
        const int warp_n = warp & 1;
        const int g = lane >> 2;  // groupID
        const int t = lane & 3;   // threadID_in_group
        constexpr int kMmaK = (MODE == kModeBF16) ? 16 : 8;
#pragma unroll
        for (int kk = 0; kk < kBK; kk += kMmaK) {
          uint32_t a[2][4];
          uint32_t b[8][2];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            const unsigned char* r0 = qs + (warp_m * 32 + mt * 16 + g) * kStrideBytes;
            const unsigned char* r8 = r0 + 8 * kStrideBytes;
            if constexpr (MODE == kModeBF16) {
              // a0a1: (g, 2t..2t+1), a2a3: (g+8, 2t..), a4a5: (g, 2t+8..), a6a7: (g+8, 2t+8..)
              a[mt][0] = lds32(r0 + (kk + 2 * t) * 2);
              a[mt][1] = lds32(r8 + (kk + 2 * t) * 2);
              a[mt][2] = lds32(r0 + (kk + 2 * t + 8) * 2);
              a[mt][3] = lds32(r8 + (kk + 2 * t + 8) * 2);
            } else {
              // a0: (g, t), a1: (g+8, t), a2: (g, t+4), a3: (g+8, t+4)
              a[mt][0] = lds32(r0 + (kk + t) * 4);
              a[mt][1] = lds32(r8 + (kk + t) * 4);
              a[mt][2] = lds32(r0 + (kk + t + 4) * 4);
              a[mt][3] = lds32(r8 + (kk + t + 4) * 4);
            }
          }
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            // B[kidx][n] = key tile row n, so B fragments read key rows like A reads query rows.
            const unsigned char* rn = ks + (warp_n * 64 + nt * 8 + g) * kStrideBytes;
            if constexpr (MODE == kModeBF16) {
              b[nt][0] = lds32(rn + (kk + 2 * t) * 2);      // b0b1: k = 2t..2t+1, n = g
              b[nt][1] = lds32(rn + (kk + 2 * t + 8) * 2);  // b2b3: k = 2t+8..2t+9
            } else {
              b[nt][0] = lds32(rn + (kk + t) * 4);      // b0: k = t, n = g
              b[nt][1] = lds32(rn + (kk + t + 4) * 4);  // b1: k = t+4
            }
          }
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
              const int base = (mt * 8 + nt) * 4;  // c0, c1: row g; c2, c3: row g + 8
              if constexpr (MODE == kModeBF16) {
                mma_bf16_16816(acc[base], acc[base + 1], acc[base + 2], acc[base + 3], a[mt], b[nt]);
              } else {
                mma_tf32_1688(acc[base], acc[base + 1], acc[base + 2], acc[base + 3], a[mt], b[nt]);
              }
            }
          }
        }
      }

      if (has_next) store_step((s + 1) & 1);  // the other stage: nobody reads it this step
      __syncthreads();
    }

    // Epilogue: score = acc * key_inv_norm (or -inf for padding columns), per-row best of this
    // tile with ties to the lowest key index, then merge into the running best.
    if constexpr (MODE == kModeFP32) {
      const int tx = (lane & 7) + 8 * (warp & 1);
      const int ty = (lane >> 3) + 4 * (warp >> 1);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float bv = -INFINITY;
        int bi = INT_MAX;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int col = tx + 16 * j;
          const float sc = col_ok[col] ? acc[i * 8 + j] * col_inv[col] : -INFINITY;
          if (better(sc, n0 + col, bv, bi)) {
            bv = sc;
            bi = n0 + col;
          }
        }
        warp_best<7>(bv, bi);  // the 8 lanes sharing ty (lane bits 0..2)
        if ((lane & 7) == 0) {
          red_v[warp & 1][ty + 16 * i] = bv;
          red_i[warp & 1][ty + 16 * i] = bi;
        }
      }
    } else {
      const int warp_m = warp >> 1;
      const int warp_n = warp & 1;
      const int g = lane >> 2;
      const int t = lane & 3;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // accumulator rows g (c0, c1) and g + 8 (c2, c3)
          float bv = -INFINITY;
          int bi = INT_MAX;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = warp_n * 64 + nt * 8 + 2 * t + e;
              const float sc = col_ok[col] ? acc[(mt * 8 + nt) * 4 + 2 * h + e] * col_inv[col] : -INFINITY;
              if (better(sc, n0 + col, bv, bi)) {
                bv = sc;
                bi = n0 + col;
              }
            }
          }
          warp_best<3>(bv, bi);  // the 4 lanes of the quad share the row
          if (t == 0) {
            const int row = warp_m * 32 + mt * 16 + g + 8 * h;
            red_v[warp_n][row] = bv;
            red_i[warp_n][row] = bi;
          }
        }
      }
    }
    __syncthreads();
    if (tid < kBM) {
      float v = red_v[0][tid];
      int i = red_i[0][tid];
      if (better(red_v[1][tid], red_i[1][tid], v, i)) {
        v = red_v[1][tid];
        i = red_i[1][tid];
      }
      if (v > run_v) {  // later tiles hold larger indices: strict keeps the lowest on ties
        run_v = v;
        run_i = i;
      }
    }
    __syncthreads();  // red_* and col_* are rewritten by the next tile
  }

  if (tid < kBM) {
    const int q = q0 + tid;
    if (q < nq) {
      const bool valid = row_qbase[tid] >= 0;
      const long long o = static_cast<long long>(split) * out_split_stride + q;
      out_index[o] = valid ? run_i : -1;
      out_value[o] = valid ? run_v : __int_as_float(0x7fc00000);  // NaN flags a bad position
    }
  }
#endif
}

// Merges the per-split results in increasing split order (strict >: ties keep the lower split,
// whose key indices are lower).
__global__ void __launch_bounds__(kMergeThreads)
patch_nn_merge_kernel(const int32_t* __restrict__ part_index,  // [nsplit, Nq]
                      const float* __restrict__ part_value,    // [nsplit, Nq]
                      int nsplit, int nq, int32_t* __restrict__ out_index, float* __restrict__ out_value) {
  const int q = blockIdx.x * kMergeThreads + threadIdx.x;
  if (q >= nq) return;
  float bv = part_value[q];
  int bi = part_index[q];
  for (int s = 1; s < nsplit; ++s) {
    const long long o = static_cast<long long>(s) * nq + q;
    const float v = part_value[o];
    if (v > bv) {
      bv = v;
      bi = part_index[o];
    }
  }
  out_index[q] = bi;
  out_value[q] = bv;
}

template <int MODE, bool VEC>
std::string launch_mode(const PatchNNArgs& a, cudaStream_t stream, int device) {
  using T = typename ModeTraits<MODE>::Elem;
  auto kernel = patch_nn_fwd_kernel<MODE, VEC>;
  std::string err;

  err = cuda_error_message(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kDynSmemBytes)),
      "patch_nn: cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  if (!err.empty()) return err;

  int sms = 0;
  err = cuda_error_message(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                           "patch_nn: cudaDeviceGetAttribute(MultiProcessorCount)");
  if (!err.empty()) return err;
  int per_sm = 0;
  err = cuda_error_message(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, kDynSmemBytes),
                           "patch_nn: cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (!err.empty()) return err;
  if (per_sm < 1) return "patch_nn: the kernel does not fit on this device (occupancy 0)";

  const int qblocks = (a.nq + kBM - 1) / kBM;
  const int ntiles = (a.nk + kBN - 1) / kBN;

  // Too few query blocks to fill the GPU: split the key tiles over blockIdx.y and merge after.
  const long long slots = static_cast<long long>(sms) * per_sm;
  int nsplit = 1;
  if (qblocks < slots) {
    const long long want = (slots + qblocks - 1) / qblocks;
    nsplit = static_cast<int>(want < ntiles ? want : ntiles);
    if (nsplit > 65535) nsplit = 65535;
    if (nsplit < 1) nsplit = 1;
  }
  int tiles_per_split = (ntiles + nsplit - 1) / nsplit;
  nsplit = (ntiles + tiles_per_split - 1) / tiles_per_split;  // no empty split

  void* workspace = nullptr;
  if (nsplit > 1) {
    const size_t bytes = static_cast<size_t>(nsplit) * static_cast<size_t>(a.nq) * (sizeof(int32_t) + sizeof(float));
    if (cudaMallocAsync(&workspace, bytes, stream) != cudaSuccess) {
      cudaGetLastError();  // clear it and fall back to one split (slower, same result)
      workspace = nullptr;
      nsplit = 1;
      tiles_per_split = ntiles;
    }
  }

  int32_t* idx_out = a.out_index;
  float* val_out = a.out_value;
  if (nsplit > 1) {
    idx_out = static_cast<int32_t*>(workspace);
    val_out = reinterpret_cast<float*>(static_cast<int32_t*>(workspace) + static_cast<size_t>(nsplit) * a.nq);
  }

  dim3 grid(static_cast<unsigned>(qblocks), static_cast<unsigned>(nsplit));
  kernel<<<grid, kThreads, kDynSmemBytes, stream>>>(
      static_cast<const T*>(a.query_map), static_cast<const T*>(a.key_map), a.query_pos, a.key_pos, a.key_inv_norm,
      idx_out, val_out, static_cast<long long>(a.nq), a.nq, a.nk, a.channels, a.patch_size, a.query_height,
      a.query_width, a.key_height, a.key_width, tiles_per_split);
  err = cuda_error_message(cudaGetLastError(), "patch_nn: launching patch_nn_fwd_kernel");

  if (err.empty() && nsplit > 1) {
    const int mblocks = (a.nq + kMergeThreads - 1) / kMergeThreads;
    patch_nn_merge_kernel<<<mblocks, kMergeThreads, 0, stream>>>(idx_out, val_out, nsplit, a.nq, a.out_index,
                                                                 a.out_value);
    err = cuda_error_message(cudaGetLastError(), "patch_nn: launching patch_nn_merge_kernel");
  }
  if (workspace != nullptr) {
    const std::string free_err = cuda_error_message(cudaFreeAsync(workspace, stream), "patch_nn: cudaFreeAsync");
    if (err.empty()) err = free_err;
  }
  return err;
}

}  // namespace

std::string launch_patch_nn(const PatchNNArgs& a, cudaStream_t stream) {
  int device = 0;
  std::string err = cuda_error_message(cudaGetDevice(&device), "patch_nn: cudaGetDevice");
  if (!err.empty()) return err;
  int major = 0;
  err = cuda_error_message(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                           "patch_nn: cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  if (!err.empty()) return err;
  if (major < 8) {
    return "patch_nn: the CUDA kernels need compute capability 8.0 or newer (device " + std::to_string(device) +
           " is " + std::to_string(major) + ".x)";
  }

  const size_t vec_bytes = 16;
  const uintptr_t qaddr = reinterpret_cast<uintptr_t>(a.query_map);
  const uintptr_t kaddr = reinterpret_cast<uintptr_t>(a.key_map);
  const bool aligned = (qaddr % vec_bytes == 0) && (kaddr % vec_bytes == 0);

  switch (a.precision) {
    case Precision::kFP32: {
      const bool vec = aligned && a.channels % 4 == 0;
      return vec ? launch_mode<kModeFP32, true>(a, stream, device) : launch_mode<kModeFP32, false>(a, stream, device);
    }
    case Precision::kTF32: {
      const bool vec = aligned && a.channels % 4 == 0;
      return vec ? launch_mode<kModeTF32, true>(a, stream, device) : launch_mode<kModeTF32, false>(a, stream, device);
    }
    case Precision::kBF16: {
      const bool vec = aligned && a.channels % 8 == 0;
      return vec ? launch_mode<kModeBF16, true>(a, stream, device) : launch_mode<kModeBF16, false>(a, stream, device);
    }
  }
  return "patch_nn: unknown precision";
}

}  // namespace neuralpatch
