// The one pybind11 binding file of neuralpatch._C. Functions take raw device
// pointers, shapes and the CUDA stream handle as integers; no libtorch is linked.
#include <pybind11/pybind11.h>

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "neuralpatch CUDA kernels (raw pointers + stream, no libtorch)";
  m.def("build_info", &build_info, "CUDA version, nvcc version, target archs and visible GPU count.");
  m.def("device_count", &neuralpatch::device_count, "Visible CUDA devices (0 without a GPU or driver).");
  m.def("device_properties", &device_properties, py::arg("device") = 0,
        "Name, compute capability, SM count and memory of a device; RuntimeError without a GPU.");
}
