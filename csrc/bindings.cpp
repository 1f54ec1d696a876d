// The one pybind11 binding file of neuralpatch._C. Functions take raw device
// pointers, shapes and the CUDA stream handle as integers; no libtorch is linked.
//
// Every kernel binding checks its arguments first (py::value_error naming the argument), then
// that a GPU can be used (RuntimeError), and only then touches a pointer. Launch failures raise
// RuntimeError with the CUDA error string. Launches are asynchronous on the given stream.
#include <pybind11/pybind11.h>

#include <climits>
#include <cstdint>
#include <string>

#include "common.h"

namespace py = pybind11;

namespace {

// Raises a Python RuntimeError (never aborts) when no GPU can be used.
void require_device() {
  std::string reason = neuralpatch::device_unavailable_reason();
  if (!reason.empty()) {
    throw std::runtime_error("neuralpatch._C needs a CUDA GPU, but none can be used (" + reason + ")");
  }
}

py::dict build_info() {
  py::dict info;
  info["cuda_runtime_version"] = CUDART_VERSION;  // e.g. 13000 for CUDA 13.0
  info["nvcc_version"] = NEURALPATCH_NVCC_VERSION;
  info["archs"] = NEURALPATCH_CUDA_ARCHS;
  int driver = 0;
  info["driver_version"] = cudaDriverGetVersion(&driver) == cudaSuccess ? driver : 0;
  info["device_count"] = neuralpatch::device_count();
  return info;
}

py::dict device_properties(int device) {
  require_device();
  int count = neuralpatch::device_count();
  if (device < 0 || device >= count) {
    throw py::value_error("device: index " + std::to_string(device) + " is out of range for " +
                          std::to_string(count) + " visible device(s)");
  }
  cudaDeviceProp prop;
  cudaError_t err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) throw std::runtime_error(std::string("cudaGetDeviceProperties: ") + cudaGetErrorString(err));
  py::dict out;
  out["name"] = std::string(prop.name);
  out["capability"] = py::make_tuple(prop.major, prop.minor);
  out["multiprocessors"] = prop.multiProcessorCount;
  out["total_memory"] = static_cast<long long>(prop.totalGlobalMem);
  out["l2_cache_bytes"] = prop.l2CacheSize;
  out["shared_memory_per_block_optin"] = static_cast<long long>(prop.sharedMemPerBlockOptin);
  return out;
}

// ---- argument checks (all raise py::value_error naming the argument) ----

// Counts and sizes stay well inside int32 so that block/tile index arithmetic cannot overflow.
constexpr long long kMaxCount = 1LL << 30;

void check_ptr(const char* name, std::uintptr_t ptr, std::size_t align) {
  if (ptr == 0) throw py::value_error(std::string(name) + ": null device pointer");
  if (ptr % align != 0) {
    throw py::value_error(std::string(name) + ": pointer " + std::to_string(ptr) + " is not " +
                          std::to_string(align) + "-byte aligned");
  }
}

int check_count(const char* name, long long value) {
  if (value < 1) throw py::value_error(std::string(name) + ": must be >= 1, got " + std::to_string(value));
  if (value > kMaxCount) {
    throw py::value_error(std::string(name) + ": must be <= 2**30, got " + std::to_string(value));
  }
  return static_cast<int>(value);
}

int check_patch_size(long long k) {
  if (k < 1 || k % 2 == 0) {
    throw py::value_error("patch_size: must be an odd integer >= 1, got " + std::to_string(k));
  }
  if (k > 255) throw py::value_error("patch_size: must be <= 255, got " + std::to_string(k));
  return static_cast<int>(k);
}

// A map of (height, width) whose flat positions are int32 indices; optionally at least k x k.
void check_map(const char* hname, long long h, const char* wname, long long w, int min_side) {
  check_count(hname, h);
  check_count(wname, w);
  if (h * w > INT_MAX) {
    throw py::value_error(std::string(hname) + " * " + wname + ": " + std::to_string(h * w) +
                          " positions do not fit the int32 position lists");
  }
  if (h < min_side || w < min_side) {
    throw py::value_error(std::string(hname) + "/" + wname + ": map " + std::to_string(h) + "x" +
                          std::to_string(w) + " is smaller than the patch (" + std::to_string(min_side) + ")");
  }
}

neuralpatch::DType parse_dtype(const std::string& dtype) {
  if (dtype == "float32") return neuralpatch::DType::kFloat32;
  if (dtype == "bfloat16") return neuralpatch::DType::kBFloat16;
  throw py::value_error("dtype: must be 'float32' or 'bfloat16', got '" + dtype + "'");
}

neuralpatch::Precision parse_precision(const std::string& precision, neuralpatch::DType dtype) {
  neuralpatch::Precision p;
  if (precision == "fp32") {
    p = neuralpatch::Precision::kFP32;
  } else if (precision == "tf32") {
    p = neuralpatch::Precision::kTF32;
  } else if (precision == "bf16") {
    p = neuralpatch::Precision::kBF16;
  } else {
    throw py::value_error("precision: must be 'fp32', 'tf32' or 'bf16', got '" + precision + "'");
  }
  const bool bf16_maps = dtype == neuralpatch::DType::kBFloat16;
  if (p == neuralpatch::Precision::kBF16 && !bf16_maps) {
    throw py::value_error("precision: 'bf16' needs dtype 'bfloat16' maps, got 'float32'");
  }
  if (p != neuralpatch::Precision::kBF16 && bf16_maps) {
    throw py::value_error("precision: '" + precision + "' needs dtype 'float32' maps; use 'bf16' for 'bfloat16'");
  }
  return p;
}

std::size_t elem_size(neuralpatch::DType dtype) { return dtype == neuralpatch::DType::kFloat32 ? 4 : 2; }

cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// The static cudart in this module keeps its own current device, apart from torch's:
// make it the device that owns the data before launching.
void use_device_of(std::uintptr_t ptr, const char* name) {
  cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess || attr.type != cudaMemoryTypeDevice) {
    cudaGetLastError();
    throw py::value_error(std::string(name) + ": is not a CUDA device pointer");
  }
  err = cudaSetDevice(attr.device);
  if (err != cudaSuccess) throw std::runtime_error(std::string("neuralpatch._C: cudaSetDevice: ") + cudaGetErrorString(err));
}

void raise_if(const std::string& err) {
  if (!err.empty()) throw std::runtime_error("neuralpatch._C: " + err);
}

// ---- kernel bindings ----

void patch_nn_fwd(std::uintptr_t query_map, std::uintptr_t key_map, std::uintptr_t query_pos, std::uintptr_t key_pos,
                  std::uintptr_t key_inv_norm, std::uintptr_t out_index, std::uintptr_t out_value, long long nq,
                  long long nk, long long channels, long long patch_size, long long query_height,
                  long long query_width, long long key_height, long long key_width, const std::string& dtype,
                  const std::string& precision, std::uintptr_t stream) {
  neuralpatch::PatchNNArgs a;
  a.dtype = parse_dtype(dtype);
  a.precision = parse_precision(precision, a.dtype);
  const std::size_t es = elem_size(a.dtype);
  check_ptr("query_map", query_map, es);
  check_ptr("key_map", key_map, es);
  check_ptr("query_pos", query_pos, 4);
  check_ptr("key_pos", key_pos, 4);
  check_ptr("key_inv_norm", key_inv_norm, 4);
  check_ptr("out_index", out_index, 4);
  check_ptr("out_value", out_value, 4);
  a.nq = check_count("nq", nq);
  a.nk = check_count("nk", nk);
  a.channels = check_count("channels", channels);
  a.patch_size = check_patch_size(patch_size);
  check_map("query_height", query_height, "query_width", query_width, a.patch_size);
  check_map("key_height", key_height, "key_width", key_width, a.patch_size);
  a.query_height = static_cast<int>(query_height);
  a.query_width = static_cast<int>(query_width);
  a.key_height = static_cast<int>(key_height);
  a.key_width = static_cast<int>(key_width);
  a.query_map = reinterpret_cast<const void*>(query_map);
  a.key_map = reinterpret_cast<const void*>(key_map);
  a.query_pos = reinterpret_cast<const int32_t*>(query_pos);
  a.key_pos = reinterpret_cast<const int32_t*>(key_pos);
  a.key_inv_norm = reinterpret_cast<const float*>(key_inv_norm);
  a.out_index = reinterpret_cast<int32_t*>(out_index);
  a.out_value = reinterpret_cast<float*>(out_value);

  require_device();
  use_device_of(query_map, "query_map");
  std::string err;
  {
    py::gil_scoped_release release;
    err = neuralpatch::launch_patch_nn(a, as_stream(stream));
  }
  raise_if(err);
}

void patch_loss_fwd(std::uintptr_t feat_map, std::uintptr_t target_map, std::uintptr_t query_center,
                    std::uintptr_t target_pos, std::uintptr_t out_per_query, long long nq, long long channels,
                    long long patch_size, long long height, long long width, long long target_height,
                    long long target_width, const std::string& dtype, std::uintptr_t stream) {
  neuralpatch::PatchLossFwdArgs a;
  a.dtype = parse_dtype(dtype);
  const std::size_t es = elem_size(a.dtype);
  check_ptr("feat_map", feat_map, es);
  check_ptr("target_map", target_map, es);
  check_ptr("query_center", query_center, 4);
  check_ptr("target_pos", target_pos, 4);
  check_ptr("out_per_query", out_per_query, 4);
  a.nq = check_count("nq", nq);
  a.channels = check_count("channels", channels);
  a.patch_size = check_patch_size(patch_size);
  check_map("height", height, "width", width, 1);
  check_map("target_height", target_height, "target_width", target_width, a.patch_size);
  a.height = static_cast<int>(height);
  a.width = static_cast<int>(width);
  a.target_height = static_cast<int>(target_height);
  a.target_width = static_cast<int>(target_width);
  a.feat_map = reinterpret_cast<const void*>(feat_map);
  a.target_map = reinterpret_cast<const void*>(target_map);
  a.query_center = reinterpret_cast<const int32_t*>(query_center);
  a.target_pos = reinterpret_cast<const int32_t*>(target_pos);
  a.per_query = reinterpret_cast<float*>(out_per_query);

  require_device();
  use_device_of(feat_map, "feat_map");
  std::string err;
  {
    py::gil_scoped_release release;
    err = neuralpatch::launch_patch_loss_fwd(a, as_stream(stream));
  }
  raise_if(err);
}

void patch_loss_bwd(std::uintptr_t feat_map, std::uintptr_t target_map, std::uintptr_t query_slot,
                    std::uintptr_t target_pos, std::uintptr_t grad_scale, std::uintptr_t out_grad_map, long long nq,
                    long long channels, long long patch_size, long long height, long long width,
                    long long target_height, long long target_width, const std::string& dtype,
                    std::uintptr_t stream) {
  neuralpatch::PatchLossBwdArgs a;
  a.dtype = parse_dtype(dtype);
  const std::size_t es = elem_size(a.dtype);
  check_ptr("feat_map", feat_map, es);
  check_ptr("target_map", target_map, es);
  check_ptr("query_slot", query_slot, 4);
  check_ptr("target_pos", target_pos, 4);
  check_ptr("grad_scale", grad_scale, 4);
  check_ptr("out_grad_map", out_grad_map, 4);
  a.nq = check_count("nq", nq);
  a.channels = check_count("channels", channels);
  a.patch_size = check_patch_size(patch_size);
  check_map("height", height, "width", width, 1);
  check_map("target_height", target_height, "target_width", target_width, a.patch_size);
  a.height = static_cast<int>(height);
  a.width = static_cast<int>(width);
  a.target_height = static_cast<int>(target_height);
  a.target_width = static_cast<int>(target_width);
  a.feat_map = reinterpret_cast<const void*>(feat_map);
  a.target_map = reinterpret_cast<const void*>(target_map);
  a.query_slot = reinterpret_cast<const int32_t*>(query_slot);
  a.target_pos = reinterpret_cast<const int32_t*>(target_pos);
  a.grad_scale = reinterpret_cast<const float*>(grad_scale);
  a.grad_map = reinterpret_cast<float*>(out_grad_map);

  require_device();
  use_device_of(feat_map, "feat_map");
  std::string err;
  {
    py::gil_scoped_release release;
    err = neuralpatch::launch_patch_loss_bwd(a, as_stream(stream));
  }
  raise_if(err);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "neuralpatch CUDA kernels (raw pointers + stream, no libtorch)";
  m.def("build_info", &build_info, "CUDA version, nvcc version, target archs and visible GPU count.");
  m.def("device_count", &neuralpatch::device_count, "Visible CUDA devices (0 without a GPU or driver).");
  m.def("device_properties", &device_properties, py::arg("device") = 0,
        "Name, compute capability, SM count and memory of a device; RuntimeError without a GPU.");

  m.def("patch_nn_fwd", &patch_nn_fwd, py::arg("query_map"), py::arg("key_map"), py::arg("query_pos"),
        py::arg("key_pos"), py::arg("key_inv_norm"), py::arg("out_index"), py::arg("out_value"), py::arg("nq"),
        py::arg("nk"), py::arg("channels"), py::arg("patch_size"), py::arg("query_height"),
        py::arg("query_width"), py::arg("key_height"), py::arg("key_width"), py::arg("dtype"),
        py::arg("precision"), py::arg("stream") = 0,
        "Patch nearest neighbour: out_index[q] = argmax_j <q, k_j> * key_inv_norm[j] (int32, ties to the "
        "lowest j), out_value[q] = that maximum (float32).\n"
        "Pointers (ints): query_map [query_height, query_width, channels], key_map [key_height, key_width, "
        "channels] (dtype 'float32' | 'bfloat16', channels-last, contiguous), query_pos int32 [nq], key_pos "
        "int32 [nk] (flat top-left indices; every k x k patch must lie inside its map), key_inv_norm float32 "
        "[nk], out_index int32 [nq], out_value float32 [nq]. precision: 'fp32' | 'tf32' (float32 maps) or "
        "'bf16' (bfloat16 maps). stream: cudaStream_t as an int (0 = default stream). Asynchronous.\n"
        "Arguments are validated (ValueError) before the GPU check (RuntimeError).");
  m.def("patch_loss_fwd", &patch_loss_fwd, py::arg("feat_map"), py::arg("target_map"), py::arg("query_center"),
        py::arg("target_pos"), py::arg("out_per_query"), py::arg("nq"), py::arg("channels"), py::arg("patch_size"),
        py::arg("height"), py::arg("width"), py::arg("target_height"), py::arg("target_width"), py::arg("dtype"),
        py::arg("stream") = 0,
        "Patch loss forward: out_per_query[q] = sum over in-map offsets of the squared difference between the "
        "k x k patch of feat_map [height, width, channels] centred at query_center[q] (int32 [nq], flat y*W+x) "
        "and the patch of target_map [target_height, target_width, channels] at target_pos[q] (int32 [nq], flat "
        "top-left). out_per_query float32 [nq]. Asynchronous on `stream`.");
  m.def("patch_loss_bwd", &patch_loss_bwd, py::arg("feat_map"), py::arg("target_map"), py::arg("query_slot"),
        py::arg("target_pos"), py::arg("grad_scale"), py::arg("out_grad_map"), py::arg("nq"), py::arg("channels"),
        py::arg("patch_size"), py::arg("height"), py::arg("width"), py::arg("target_height"),
        py::arg("target_width"), py::arg("dtype"), py::arg("stream") = 0,
        "Patch loss backward: out_grad_map float32 [height, width, channels] (every element written) = "
        "grad_scale[0] * sum over the k*k offsets of (feat - matched target) for the queries covering each "
        "pixel. query_slot int32 [height, width] (query index centred there, or -1), target_pos int32 [nq], "
        "grad_scale float32 [1] device scalar. Asynchronous on `stream`.");
}
