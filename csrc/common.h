// Shared declarations between the pybind11 binding (bindings.cpp) and the CUDA units.
// Everything here is plain C++ + the CUDA runtime: no libtorch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace neuralpatch {

// Number of visible CUDA devices; 0 when there is no GPU or no driver (never throws).
int device_count();

// Why no device can be used ("" when one can), e.g. "CUDA driver version is insufficient".
std::string device_unavailable_reason();

enum class DType { kFloat32, kBFloat16 };
enum class Precision { kFP32, kTF32, kBF16 };

// Kernel launchers. Each launches on `stream` (enqueued, not synchronised) and returns
// "" on success or a message naming the failing CUDA call and cudaGetErrorString.
// They never throw; the binding turns a message into a Python RuntimeError.
// Arguments are validated by the binding before any launcher is called.

// Patch nearest neighbour (maps are channels-last, patch element d = (dy*k + dx)*C + c).
struct PatchNNArgs {
  const void* query_map = nullptr;     // [Hq, Wq, C] float32 | bfloat16
  const void* key_map = nullptr;       // [Hk, Wk, C] same dtype
  const int32_t* query_pos = nullptr;  // [Nq] flat top-left index into query_map
  const int32_t* key_pos = nullptr;    // [Nk] flat top-left index into key_map
  const float* key_inv_norm = nullptr; // [Nk] 1/|k_j|
  int32_t* out_index = nullptr;        // [Nq] argmax_j <q, k_j> * key_inv_norm[j]
  float* out_value = nullptr;          // [Nq] that maximum
  int nq = 0, nk = 0, channels = 0, patch_size = 0;
  int query_height = 0, query_width = 0, key_height = 0, key_width = 0;
  DType dtype = DType::kFloat32;
  Precision precision = Precision::kFP32;
};
std::string launch_patch_nn(const PatchNNArgs& args, cudaStream_t stream);

// Patch loss forward: per_query[q] = sum of squared differences over the in-map offsets.
struct PatchLossFwdArgs {
  const void* feat_map = nullptr;        // [H, W, C] float32 | bfloat16 (not padded)
  const void* target_map = nullptr;      // [Ht, Wt, C] same dtype
  const int32_t* query_center = nullptr; // [Nq] flat centre y*W + x in feat_map
  const int32_t* target_pos = nullptr;   // [Nq] flat top-left in target_map
  float* per_query = nullptr;            // [Nq]
  int nq = 0, channels = 0, patch_size = 0;
  int height = 0, width = 0, target_height = 0, target_width = 0;
  DType dtype = DType::kFloat32;
};
std::string launch_patch_loss_fwd(const PatchLossFwdArgs& args, cudaStream_t stream);

// Patch loss backward: a gather over the k*k offsets, every grad_map element written.
struct PatchLossBwdArgs {
  const void* feat_map = nullptr;        // [H, W, C] float32 | bfloat16
  const void* target_map = nullptr;      // [Ht, Wt, C] same dtype
  const int32_t* query_slot = nullptr;   // [H, W] query index centred at that pixel, or -1
  const int32_t* target_pos = nullptr;   // [Nq] flat top-left in target_map
  const float* grad_scale = nullptr;     // [1] device scalar (2 * grad_out / Nq)
  float* grad_map = nullptr;             // [H, W, C] float32
  int nq = 0, channels = 0, patch_size = 0;
  int height = 0, width = 0, target_height = 0, target_width = 0;
  DType dtype = DType::kFloat32;
};
std::string launch_patch_loss_bwd(const PatchLossBwdArgs& args, cudaStream_t stream);

// "" when `err` is cudaSuccess, else "<what>: <name>: <description>".
inline std::string cuda_error_message(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return std::string();
  return std::string(what) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

}  // namespace neuralpatch
