// Device discovery for neuralpatch._C. Kept in a .cu unit so that every build
// exercises the nvcc path, even before any kernel is added.
#include "common.h"

namespace neuralpatch {

int device_count() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return count;
}

std::string device_unavailable_reason() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  if (count == 0) return "no CUDA device is visible";
  return "";
}

}  // namespace neuralpatch
