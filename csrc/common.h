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

}  // namespace neuralpatch
