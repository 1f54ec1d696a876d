// neuralpatch._cpu: PatchMatch over feature patches on the CPU (OpenMP over queries).
//
// The algorithm, its random numbers and its order are those of the torch reference,
// neuralpatch/patchmatch.py (torch_patchmatch_fwd); with exactly representable features both
// return the same field. Each iteration runs two sweeps (along rows, then along columns;
// backwards on odd iterations). A query reads only the field of its neighbour one step back
// along the sweep, so within a sweep every row (column) is an independent sequential chain:
// lines run in parallel, in any order, and the result does not depend on the thread count. Patch dot products are computed on the fly from the
// channels-last maps: no buffer beyond one query patch per thread.
//
// The reduced stage's exhaustive scan (reduced_argmax_i8) runs on int8 entries with exact int32
// sums: AVX512-VNNI where the CPU has it, portable integer code otherwise, the same answer.
//
// Functions take raw host pointers (integers) and sizes; no libtorch is linked. Arguments and
// the contents of the index arrays are validated first (ValueError naming the argument).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kSamplesPerSweep = 32;  // patchmatch.py: _SAMPLES_PER_SWEEP
constexpr uint32_t kSamplesPerIteration = 2 * kSamplesPerSweep;
constexpr long long kMaxCount = 1LL << 30;

// lowbias32 (C. Wellons), as patchmatch.hash_u32.
inline uint32_t hash_u32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t sample_base(uint32_t seed, int iteration, int sample) {
  return hash_u32(seed + kGolden * (static_cast<uint32_t>(iteration) * kSamplesPerIteration +
                                    static_cast<uint32_t>(sample) + 1u));
}

// Dot product of n contiguous floats. Built for AVX2+FMA as well as baseline x86-64 where the
// compiler supports it; the loader picks one per machine, so results are reproducible per machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx2,fma", "default")))
#endif
float dot(const float* __restrict a, const float* __restrict b, int n) {
  // eight partial sums: independent FMA chains, vectorisable without -ffast-math
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail;
}

struct Problem {
  const float* query_map;      // [Hq+2r, Wq+2r, C] zero-padded by r
  const float* key_map;        // [Hk, Wk, C]
  const int32_t* query_center; // [Nq] flat y*Wq + x
  const int32_t* query_slot;   // [Hq, Wq] query index or -1
  const int32_t* key_center;   // [Nk] valid key centres
  const float* key_inv_norm;   // [Hk, Wk] 1/|k| at valid keys, 0 elsewhere
  int nq, nk, channels, k, hq, wq, hk, wk;
};

// <q, key centred at `centre`> / |key|, or -inf when `centre` is not a valid key.
inline float score(const Problem& p, const float* qbuf, int64_t centre) {
  const float inv = p.key_inv_norm[centre];
  if (!(inv > 0.f)) return -INFINITY;
  const int r = p.k / 2;
  const int row = p.k * p.channels;
  const float* top_left = p.key_map + (centre - static_cast<int64_t>(r) * p.wk - r) * p.channels;
  float acc = 0.f;
  for (int dy = 0; dy < p.k; ++dy) {
    acc += dot(qbuf + dy * row, top_left + static_cast<int64_t>(dy) * p.wk * p.channels, row);
  }
  return acc * inv;
}

inline void gather_query(const Problem& p, int q, float* qbuf) {
  const int y = p.query_center[q] / p.wq, x = p.query_center[q] % p.wq;
  const int wpad = p.wq + 2 * (p.k / 2);
  const int row = p.k * p.channels;
  for (int dy = 0; dy < p.k; ++dy) {
    const float* src = p.query_map + (static_cast<int64_t>(y + dy) * wpad + x) * p.channels;
    std::copy(src, src + row, qbuf + dy * row);
  }
}

inline void consider(float value, int32_t centre, float& best_value, int32_t& best_centre) {
  if (value > best_value || (value == best_value && centre < best_centre)) {
    best_value = value;
    best_centre = centre;
  }
}

// The lines of a sweep: rows (a horizontal sweep) or columns (a vertical one), each holding its
// queries in sweep order (ascending x, resp. y): order[offsets[l]..offsets[l+1]).
void group_lines(const Problem& p, bool columns, std::vector<int>& order, std::vector<int>& offsets) {
  const int lines = columns ? p.wq : p.hq;
  offsets.assign(lines + 1, 0);
  for (int q = 0; q < p.nq; ++q) {
    const int c = p.query_center[q];
    offsets[(columns ? c % p.wq : c / p.wq) + 1]++;
  }
  for (int l = 0; l < lines; ++l) offsets[l + 1] += offsets[l];
  std::vector<int> fill(offsets.begin(), offsets.end() - 1);
  order.resize(p.nq);
  // query indices ascend in row-major order, so each line fills in sweep order
  for (int q = 0; q < p.nq; ++q) {
    const int c = p.query_center[q];
    order[fill[columns ? c % p.wq : c / p.wq]++] = q;
  }
}

void update(const Problem& p, int q, int iteration, int sweep, int dy, int dx, const std::vector<int>& radii,
            uint32_t seed, float* qbuf, int32_t* field, float* value) {
  gather_query(p, q, qbuf);
  float best_value = value[q];
  int32_t best_centre = field[q];
  const int c = p.query_center[q];
  const int y = c / p.wq, x = c % p.wq;
  // 1. propagation from the neighbour one step back along the sweep
  const int ny = y - dy, nx = x - dx;
  if (ny >= 0 && ny < p.hq && nx >= 0 && nx < p.wq) {
    const int n = p.query_slot[ny * p.wq + nx];
    if (n >= 0) {
      const int cy = field[n] / p.wk + dy, cx = field[n] % p.wk + dx;
      if (cy >= 0 && cy < p.hk && cx >= 0 && cx < p.wk) {
        const int32_t candidate = cy * p.wk + cx;
        consider(score(p, qbuf, candidate), candidate, best_value, best_centre);
      }
    }
  }
  // 2. random search around that best, then one key drawn from the whole list
  const int cy = best_centre / p.wk, cx = best_centre % p.wk;
  const int base = sweep * static_cast<int>(kSamplesPerSweep);
  for (size_t s = 0; s < radii.size(); ++s) {
    const uint32_t h = hash_u32(static_cast<uint32_t>(q) ^ sample_base(seed, iteration, base + static_cast<int>(s)));
    const uint32_t span = 2u * static_cast<uint32_t>(radii[s]) + 1u;
    const int u = static_cast<int>(h % span) - radii[s];
    const int v = static_cast<int>(hash_u32(h) % span) - radii[s];
    const int sy = std::min(std::max(cy + u, 0), p.hk - 1);
    const int sx = std::min(std::max(cx + v, 0), p.wk - 1);
    const int32_t candidate = sy * p.wk + sx;
    consider(score(p, qbuf, candidate), candidate, best_value, best_centre);
  }
  const uint32_t h = hash_u32(static_cast<uint32_t>(q) ^
                              sample_base(seed, iteration, base + static_cast<int>(radii.size())));
  const int32_t candidate = p.key_center[h % static_cast<uint32_t>(p.nk)];
  consider(score(p, qbuf, candidate), candidate, best_value, best_centre);
  field[q] = best_centre;
  value[q] = best_value;
}

// ---- argument checks (py::value_error naming the argument) ----

template <typename T>
const T* as_ptr(const char* name, std::uintptr_t ptr) {
  if (ptr == 0) throw py::value_error(std::string(name) + ": null pointer");
  if (ptr % alignof(T) != 0) {
    throw py::value_error(std::string(name) + ": pointer is not " + std::to_string(alignof(T)) + "-byte aligned");
  }
  return reinterpret_cast<const T*>(ptr);
}

int check_count(const char* name, long long value, long long low = 1) {
  if (value < low || value > kMaxCount) {
    throw py::value_error(std::string(name) + ": must be in [" + std::to_string(low) + ", 2**30], got " +
                          std::to_string(value));
  }
  return static_cast<int>(value);
}

void patchmatch(std::uintptr_t query_map, std::uintptr_t key_map, std::uintptr_t query_center,
                std::uintptr_t query_slot, std::uintptr_t key_center, std::uintptr_t key_inv_norm,
                std::uintptr_t init_field, std::uintptr_t out_field, std::uintptr_t out_value, long long nq,
                long long nk, long long channels, long long patch_size, long long query_height,
                long long query_width, long long key_height, long long key_width, long long iterations,
                long long seed, long long num_threads) {
  Problem p;
  p.nq = check_count("nq", nq);
  p.nk = check_count("nk", nk);
  p.channels = check_count("channels", channels);
  if (patch_size < 1 || patch_size % 2 == 0 || patch_size > 255) {
    throw py::value_error("patch_size: must be an odd integer in [1, 255], got " + std::to_string(patch_size));
  }
  p.k = static_cast<int>(patch_size);
  p.hq = check_count("query_height", query_height);
  p.wq = check_count("query_width", query_width);
  p.hk = check_count("key_height", key_height);
  p.wk = check_count("key_width", key_width);
  if (key_height < patch_size || key_width < patch_size) {
    throw py::value_error("key_height/key_width: map " + std::to_string(key_height) + "x" + std::to_string(key_width) +
                          " is smaller than the patch (" + std::to_string(patch_size) + ")");
  }
  const long long r = patch_size / 2;
  if ((query_height + 2 * r) * (query_width + 2 * r) > INT_MAX || key_height * key_width > INT_MAX) {
    throw py::value_error("query_height/key_height: maps must have fewer than 2**31 positions");
  }
  const int iters = check_count("iterations", iterations, 0);
  if (seed < 0 || seed > 0xFFFFFFFFLL) throw py::value_error("seed: must be a uint32, got " + std::to_string(seed));
  if (num_threads < 0) throw py::value_error("num_threads: must be >= 0 (0 = the OpenMP default)");
  p.query_map = as_ptr<float>("query_map", query_map);
  p.key_map = as_ptr<float>("key_map", key_map);
  p.query_center = as_ptr<int32_t>("query_center", query_center);
  p.query_slot = as_ptr<int32_t>("query_slot", query_slot);
  p.key_center = as_ptr<int32_t>("key_center", key_center);
  p.key_inv_norm = as_ptr<float>("key_inv_norm", key_inv_norm);
  const int32_t* init = as_ptr<int32_t>("init_field", init_field);
  int32_t* field = const_cast<int32_t*>(as_ptr<int32_t>("out_field", out_field));
  float* value = const_cast<float*>(as_ptr<float>("out_value", out_value));

  const int64_t q_positions = static_cast<int64_t>(p.hq) * p.wq;
  const int64_t k_positions = static_cast<int64_t>(p.hk) * p.wk;
  for (int q = 0; q < p.nq; ++q) {
    const int c = p.query_center[q];
    if (c < 0 || c >= q_positions || p.query_slot[c] != q) {
      throw py::value_error("query_center: entry " + std::to_string(q) + " (" + std::to_string(c) +
                            ") is outside the query map or disagrees with query_slot");
    }
    if (init[q] < 0 || init[q] >= k_positions || !(p.key_inv_norm[init[q]] > 0.f)) {
      throw py::value_error("init_field: entry " + std::to_string(q) + " (" + std::to_string(init[q]) +
                            ") is not a valid key (key_inv_norm must be > 0 there)");
    }
  }
  for (int j = 0; j < p.nk; ++j) {
    const int c = p.key_center[j];
    if (c < 0 || c >= k_positions || !(p.key_inv_norm[c] > 0.f)) {
      throw py::value_error("key_center: entry " + std::to_string(j) + " (" + std::to_string(c) +
                            ") is not a valid key (key_inv_norm must be > 0 there)");
    }
  }
  const int64_t min_r = r, max_y = p.hk - 1 - r, max_x = p.wk - 1 - r;
  for (int64_t c = 0; c < k_positions; ++c) {
    if (p.key_inv_norm[c] > 0.f) {
      const int64_t y = c / p.wk, x = c % p.wk;
      if (y < min_r || y > max_y || x < min_r || x > max_x) {
        throw py::value_error("key_inv_norm: is > 0 at position " + std::to_string(c) +
                              ", whose patch leaves the key map");
      }
    }
  }

  std::vector<int> radii;
  for (int radius = std::max(p.hk, p.wk); radius >= 1; radius /= 2) radii.push_back(radius);
  std::vector<int> order[2], offsets[2];
  group_lines(p, false, order[0], offsets[0]);
  group_lines(p, true, order[1], offsets[1]);
  const uint32_t seed32 = static_cast<uint32_t>(seed);
  const int patch_len = p.k * p.k * p.channels;

  py::gil_scoped_release release;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? static_cast<int>(num_threads) : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
#endif
  {
    std::vector<float> qbuf(patch_len);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int q = 0; q < p.nq; ++q) {
      field[q] = init[q];
      gather_query(p, q, qbuf.data());
      value[q] = score(p, qbuf.data(), init[q]);
    }
    for (int t = 0; t < iters; ++t) {
      const bool reverse = t % 2 == 1;
      for (int sweep = 0; sweep < 2; ++sweep) {
        int dy = sweep == 1 ? 1 : 0, dx = sweep == 1 ? 0 : 1;
        if (reverse) dy = -dy, dx = -dx;
        const std::vector<int>& off = offsets[sweep];
        const std::vector<int>& line_order = order[sweep];
        const int lines = static_cast<int>(off.size()) - 1;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int line = 0; line < lines; ++line) {
          const int n = off[line + 1] - off[line];
          for (int j = 0; j < n; ++j) {
            const int i = off[line] + (reverse ? n - 1 - j : j);
            update(p, line_order[i], t, sweep, dy, dx, radii, seed32, qbuf.data(), field, value);
          }
        }
      }
    }
  }
}

// ---- the reduced stage: exhaustive argmax of integer-valued dot products ----

constexpr int kTile = 16;       // keys per register tile
typedef float Tile __attribute__((vector_size(kTile * sizeof(float))));
constexpr int kQueryBlock = 8;  // queries sharing one key tile
constexpr int kBlock = 64;      // queries per task
constexpr int kKeyChunk = 4096; // keys per L2-resident chunk

// body(q0, q1) for the blocks of kBlock queries of [0, n_q), spread over num_threads OpenMP
// threads (0 = the OpenMP default), one block per task.
template <typename Body>
void for_each_query_block(int n_q, long long num_threads, Body body) {
  const int tasks = (n_q + kBlock - 1) / kBlock;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? static_cast<int>(num_threads) : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int task = 0; task < tasks; ++task) {
    const int q0 = task * kBlock;
    body(q0, std::min(n_q, q0 + kBlock));
  }
}

// best[i] = the first j maximising <queries[i], keys_t[:, j]> over j < nk, for the queries of
// [q0, q1); keys_t is [dim, nk_pad] (nk_pad a multiple of kTile). With integer-valued entries
// whose dot products stay below 2**24 every sum is exact, so the answer does not depend on the
// order of the sums: it is the torch reference's (matmul, then the first argmax).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx512f", "avx2,fma", "default")))
#endif
void argmax_block(const float* __restrict queries, const float* __restrict keys_t, int dim, int nk, int nk_pad,
                  int q0, int q1, int32_t* __restrict best_index) {
  // per query and lane t: the best value and key among keys = t (mod kTile) seen so far; a
  // lane keeps its first maximum (strict >), and the lanes are merged at the end
  float lane_value[kBlock][kTile];
  int32_t lane_index[kBlock][kTile];
  for (int b = 0; b < kBlock; ++b)
    for (int t = 0; t < kTile; ++t) lane_value[b][t] = -INFINITY, lane_index[b][t] = INT_MAX;
  float qv[kQueryBlock][256];
  for (int c0 = 0; c0 < nk; c0 += kKeyChunk) {
    const int c1 = std::min(nk, c0 + kKeyChunk);
    for (int i0 = q0; i0 < q1; i0 += kQueryBlock) {
      const int nb = std::min(kQueryBlock, q1 - i0);
      for (int b = 0; b < kQueryBlock; ++b) {
        for (int j = 0; j < dim; ++j) qv[b][j] = b < nb ? queries[static_cast<int64_t>(i0 + b) * dim + j] : 0.f;
      }
      for (int k0 = c0; k0 < c1; k0 += kTile) {
        // register accumulators: a GCC/Clang vector of kTile floats per query of the block
        Tile acc[kQueryBlock];
        for (int b = 0; b < kQueryBlock; ++b) acc[b] = Tile{};
        for (int j = 0; j < dim; ++j) {
          Tile kr;
          std::memcpy(&kr, keys_t + static_cast<int64_t>(j) * nk_pad + k0, sizeof(Tile));
          for (int b = 0; b < kQueryBlock; ++b) acc[b] += qv[b][j] * kr;
        }
        for (int b = 0; b < kQueryBlock; ++b) {
          float* lv = lane_value[i0 - q0 + (b < nb ? b : 0)];
          int32_t* li = lane_index[i0 - q0 + (b < nb ? b : 0)];
          for (int t = 0; t < kTile; ++t) {
            const bool take = b < nb && k0 + t < c1 && acc[b][t] > lv[t];
            lv[t] = take ? acc[b][t] : lv[t];
            li[t] = take ? k0 + t : li[t];
          }
        }
      }
    }
  }
  for (int i = q0; i < q1; ++i) {
    float v = lane_value[i - q0][0];
    int32_t ix = lane_index[i - q0][0];
    for (int t = 1; t < kTile; ++t) {
      const float w = lane_value[i - q0][t];
      const int32_t j = lane_index[i - q0][t];
      if (w > v || (w == v && j < ix)) v = w, ix = j;
    }
    best_index[i] = ix;
  }
}

void reduced_argmax(std::uintptr_t queries, std::uintptr_t keys_t, std::uintptr_t out_index, long long nq,
                    long long nk, long long nk_pad, long long dim, long long num_threads) {
  const int n_q = check_count("nq", nq);
  const int n_k = check_count("nk", nk);
  if (nk_pad < nk || nk_pad % kTile != 0 || nk_pad > kMaxCount) {
    throw py::value_error("nk_pad: must be a multiple of " + std::to_string(kTile) + " and >= nk, got " +
                          std::to_string(nk_pad));
  }
  if (dim < 1 || dim > 256) throw py::value_error("dim: must be in [1, 256], got " + std::to_string(dim));
  if (num_threads < 0) throw py::value_error("num_threads: must be >= 0 (0 = the OpenMP default)");
  const float* q = as_ptr<float>("queries", queries);
  const float* k = as_ptr<float>("keys_t", keys_t);
  int32_t* out = const_cast<int32_t*>(as_ptr<int32_t>("out_index", out_index));
  const int d = static_cast<int>(dim), pad = static_cast<int>(nk_pad);
  py::gil_scoped_release release;
  for_each_query_block(n_q, num_threads, [&](int q0, int q1) { argmax_block(q, k, d, n_k, pad, q0, q1, out); });
}

// ---- the reduced stage on int8 entries: AVX512-VNNI where the CPU has it ----
//
// queries_u8 [nq, dim4*4] holds q + 128 (q in [-127, 127]), keys_pack holds the int8 keys
// tile by tile: [nk_pad/16][dim4][16 keys][4 entries], key_bias [nk_pad] = -128 * sum(k) (and a
// large negative value on padding keys), so that <q_u8, k> + bias = <q, k> exactly in int32.
// Integer sums are exact, so the answer (the first j of the highest dot product) is the same
// with or without VNNI and for any order of the sums.
constexpr int kI8QueryBlock = 8;   // queries sharing the key tiles
constexpr int kI8KeyChunk = 8192;  // keys per L2-resident chunk (8192 * 64 B = 512 KB at dim 64)

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NEURALPATCH_VNNI 1
#include <immintrin.h>

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void argmax_i8_vnni(
    const uint32_t* __restrict queries, const int8_t* __restrict keys_pack, const int32_t* __restrict key_bias,
    int dim4, int nk_pad, int q0, int q1, int32_t* __restrict best_index) {
  const int n = q1 - q0;
  // per query and lane t: the best value and key among keys = t (mod 16) seen so far
  alignas(64) int32_t lane_value[kBlock * kTile], lane_index[kBlock * kTile];
  for (int i = 0; i < n * kTile; ++i) lane_value[i] = INT_MIN, lane_index[i] = INT_MAX;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int c0 = 0; c0 < nk_pad; c0 += kI8KeyChunk) {
    const int c1 = std::min(nk_pad, c0 + kI8KeyChunk);
    for (int i0 = 0; i0 < n; i0 += kI8QueryBlock) {
      const int nb = std::min(kI8QueryBlock, n - i0);
      const uint32_t* qrow[kI8QueryBlock];
      for (int b = 0; b < kI8QueryBlock; ++b) qrow[b] = queries + static_cast<int64_t>(q0 + i0 + (b < nb ? b : 0)) * dim4;
      for (int k0 = c0; k0 < c1; k0 += 2 * kTile) {
        const bool two = k0 + kTile < c1;
        const int8_t* t0 = keys_pack + static_cast<int64_t>(k0 / kTile) * dim4 * 64;
        const int8_t* t1 = two ? t0 + static_cast<int64_t>(dim4) * 64 : t0;
        __m512i acc0[kI8QueryBlock], acc1[kI8QueryBlock];
        for (int b = 0; b < kI8QueryBlock; ++b) acc0[b] = _mm512_setzero_si512(), acc1[b] = _mm512_setzero_si512();
        for (int g = 0; g < dim4; ++g) {
          const __m512i k0v = _mm512_loadu_si512(t0 + g * 64);
          const __m512i k1v = _mm512_loadu_si512(t1 + g * 64);
          for (int b = 0; b < kI8QueryBlock; ++b) {
            const __m512i qb = _mm512_set1_epi32(static_cast<int>(qrow[b][g]));
            acc0[b] = _mm512_dpbusd_epi32(acc0[b], qb, k0v);
            acc1[b] = _mm512_dpbusd_epi32(acc1[b], qb, k1v);
          }
        }
        const __m512i bias0 = _mm512_loadu_si512(key_bias + k0);
        const __m512i idx0 = _mm512_add_epi32(iota, _mm512_set1_epi32(k0));
        const __m512i bias1 = two ? _mm512_loadu_si512(key_bias + k0 + kTile) : _mm512_set1_epi32(INT_MIN);
        const __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32(kTile));
        for (int b = 0; b < nb; ++b) {
          int32_t* lvp = lane_value + (i0 + b) * kTile;
          int32_t* lip = lane_index + (i0 + b) * kTile;
          __m512i lv = _mm512_load_si512(lvp), li = _mm512_load_si512(lip);
          // keys ascend within a lane: a strict > keeps each lane's first maximum
          const __m512i v0 = _mm512_add_epi32(acc0[b], bias0);
          __mmask16 m = _mm512_cmpgt_epi32_mask(v0, lv);
          lv = _mm512_mask_mov_epi32(lv, m, v0);
          li = _mm512_mask_mov_epi32(li, m, idx0);
          if (two) {
            const __m512i v1 = _mm512_add_epi32(acc1[b], bias1);
            m = _mm512_cmpgt_epi32_mask(v1, lv);
            lv = _mm512_mask_mov_epi32(lv, m, v1);
            li = _mm512_mask_mov_epi32(li, m, idx1);
          }
          _mm512_store_si512(lvp, lv);
          _mm512_store_si512(lip, li);
        }
      }
    }
  }
  for (int i = 0; i < n; ++i) {
    const int32_t* v = lane_value + i * kTile;
    const int32_t* ix = lane_index + i * kTile;
    int32_t bv = v[0], bi = ix[0];
    for (int t = 1; t < kTile; ++t) {
      if (v[t] > bv || (v[t] == bv && ix[t] < bi)) bv = v[t], bi = ix[t];
    }
    best_index[q0 + i] = bi;
  }
}
#endif

// The same answer in portable integer code (machines without VNNI).
void argmax_i8_portable(const uint32_t* __restrict queries, const int8_t* __restrict keys_pack,
                        const int32_t* __restrict key_bias, int dim4, int nk_pad, int q0, int q1,
                        int32_t* __restrict best_index) {
  for (int i = q0; i < q1; ++i) {
    const uint8_t* q = reinterpret_cast<const uint8_t*>(queries + static_cast<int64_t>(i) * dim4);
    int32_t best_value = INT_MIN, best = INT_MAX;
    for (int k0 = 0; k0 < nk_pad; k0 += kTile) {
      const int8_t* tile = keys_pack + static_cast<int64_t>(k0 / kTile) * dim4 * 64;
      int32_t acc[kTile];
      for (int t = 0; t < kTile; ++t) acc[t] = key_bias[k0 + t];
      for (int g = 0; g < dim4; ++g) {
        for (int t = 0; t < kTile; ++t) {
          for (int e = 0; e < 4; ++e) acc[t] += static_cast<int32_t>(q[g * 4 + e]) * tile[g * 64 + t * 4 + e];
        }
      }
      for (int t = 0; t < kTile; ++t) {
        if (acc[t] > best_value) best_value = acc[t], best = k0 + t;
      }
    }
    best_index[i] = best;
  }
}

bool has_vnni() {
#ifdef NEURALPATCH_VNNI
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// Returns false (and leaves out_index alone) when some entry is not an integer in [-127, 127].
bool reduced_argmax_i8(std::uintptr_t queries, std::uintptr_t keys, std::uintptr_t out_index, long long nq,
                       long long nk, long long dim, long long num_threads, bool allow_vnni) {
  const int n_q = check_count("nq", nq);
  const int n_k = check_count("nk", nk);
  if (dim < 1 || dim > 256) throw py::value_error("dim: must be in [1, 256], got " + std::to_string(dim));
  if (num_threads < 0) throw py::value_error("num_threads: must be >= 0 (0 = the OpenMP default)");
  const float* q = as_ptr<float>("queries", queries);
  const float* k = as_ptr<float>("keys", keys);
  int32_t* out = const_cast<int32_t*>(as_ptr<int32_t>("out_index", out_index));
  const int d = static_cast<int>(dim), d4 = (d + 3) / 4, pad = (n_k + kTile - 1) / kTile * kTile;
  const bool vnni = allow_vnni && has_vnni();
  py::gil_scoped_release release;
  // pack: queries + 128 as uint8 [nq, d4*4]; keys int8 [pad/16][d4][16][4]; bias -128 * sum(k)
  std::vector<uint32_t> q8(static_cast<size_t>(n_q) * d4);
  std::vector<int8_t> k8(static_cast<size_t>(pad) * d4 * 4, 0);
  std::vector<int32_t> bias(pad, -(1 << 30));
  bool fits = true;
  auto to_int = [&fits](float v) {
    const bool ok = v >= -127.f && v <= 127.f && v == std::nearbyint(v);
    fits = fits && ok;
    return ok ? static_cast<int>(v) : 0;
  };
  for (int i = 0; i < n_q; ++i) {
    uint8_t* row = reinterpret_cast<uint8_t*>(q8.data() + static_cast<size_t>(i) * d4);
    for (int j = 0; j < d4 * 4; ++j) row[j] = static_cast<uint8_t>((j < d ? to_int(q[static_cast<int64_t>(i) * d + j]) : 0) + 128);
  }
  for (int i = 0; i < n_k; ++i) {
    int8_t* tile = k8.data() + static_cast<size_t>(i / kTile) * d4 * 64 + (i % kTile) * 4;
    int32_t sum = 0;
    for (int j = 0; j < d; ++j) {
      const int v = to_int(k[static_cast<int64_t>(i) * d + j]);
      tile[(j / 4) * 64 + j % 4] = static_cast<int8_t>(v);
      sum += v;
    }
    bias[i] = -128 * sum;
  }
  if (!fits) return false;
  for_each_query_block(n_q, num_threads, [&](int q0, int q1) {
#ifdef NEURALPATCH_VNNI
    if (vnni) {
      argmax_i8_vnni(q8.data(), k8.data(), bias.data(), d4, pad, q0, q1, out);
      return;
    }
#endif
    argmax_i8_portable(q8.data(), k8.data(), bias.data(), d4, pad, q0, q1, out);
  });
  return true;
}

py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
  info["max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = 0;
  info["max_threads"] = 1;
#endif
  info["vnni"] = has_vnni();
  return info;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "neuralpatch CPU kernels (raw host pointers, OpenMP, no libtorch)";
  m.def("reduced_argmax", &reduced_argmax, py::arg("queries"), py::arg("keys_t"), py::arg("out_index"),
        py::arg("nq"), py::arg("nk"), py::arg("nk_pad"), py::arg("dim"), py::arg("num_threads") = 0,
        "out_index[i] = the first j < nk maximising <queries[i], keys_t[:, j]>. Pointers (host, contiguous): "
        "queries float32 [nq, dim], keys_t float32 [dim, nk_pad] (nk_pad a multiple of 16), out_index int32 [nq]. "
        "Exact (and so equal to a matmul and argmax) when the entries are integers whose dot products stay below "
        "2**24.");
  m.def("reduced_argmax_i8", &reduced_argmax_i8, py::arg("queries"), py::arg("keys"), py::arg("out_index"),
        py::arg("nq"), py::arg("nk"), py::arg("dim"), py::arg("num_threads") = 0, py::arg("allow_vnni") = true,
        "reduced_argmax for entries that are integers in [-127, 127]: int8 products, exact int32 sums "
        "(AVX512-VNNI where the CPU has it and allow_vnni, else portable integer code: the same answer). "
        "Pointers (host, contiguous): queries float32 [nq, dim], keys float32 [nk, dim], out_index int32 [nq]. "
        "Returns False, writing nothing, when an entry is not such an integer.");
  m.def("build_info", &build_info, "OpenMP version (0 when built without it) and the default thread count.");
  m.def("patchmatch", &patchmatch, py::arg("query_map"), py::arg("key_map"), py::arg("query_center"),
        py::arg("query_slot"), py::arg("key_center"), py::arg("key_inv_norm"), py::arg("init_field"),
        py::arg("out_field"), py::arg("out_value"), py::arg("nq"), py::arg("nk"), py::arg("channels"),
        py::arg("patch_size"), py::arg("query_height"), py::arg("query_width"), py::arg("key_height"),
        py::arg("key_width"), py::arg("iterations"), py::arg("seed"), py::arg("num_threads") = 0,
        "PatchMatch: out_field[q] = a key centre (flat y*key_width + x) found for query q and out_value[q] = "
        "<q, k>/|k| for it.\n"
        "Pointers (ints, host memory, contiguous): query_map float32 [query_height+2r, query_width+2r, "
        "channels] (zero-padded by r = patch_size//2), key_map float32 [key_height, key_width, channels], "
        "query_center int32 [nq] (flat y*query_width + x), query_slot int32 [query_height, query_width] "
        "(query index or -1), key_center int32 [nk] (valid keys), key_inv_norm float32 [key_height, key_width] "
        "(1/|k| at valid keys, 0 elsewhere), init_field int32 [nq] (valid keys), out_field int32 [nq], "
        "out_value float32 [nq]. seed: uint32. num_threads: 0 = the OpenMP default.\n"
        "Deterministic for a given seed whatever the thread count. ValueError on bad arguments.");
}
